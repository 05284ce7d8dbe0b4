"""A FedMPQ client's round (seed §3.3-3.4.1): sparsity-promoting training of a
bit-plane model, then top-bit pruning. A pure function of its arguments, like
``fedhq.fl.client.train_local``: the model is copied, and the only randomness (the
integer updates' stochastic rounding) comes from ``seed``."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedhq.mpq.bitplane import (
    MIN_BITS,
    bit_layers,
    bit_map,
    check_pruning,
    float_state_dict,
    group_lasso,
    prune_top_bits,
)
from fedhq_kernels.checks import is_real

LAMBDA = 0.001  # the group Lasso's weight: the seed's best (§4.5)
EPSILON = 0.02  # the top plane's density below which it is pruned: the seed's best (§4.5)


@dataclass(frozen=True)
class LocalResult:
    """A FedMPQ client's upload and what the server learns from it."""

    state: dict[str, Tensor]  # the dequantized float model, under the float model's names
    bits: dict[str, int]  # its bit map after pruning
    pruned: dict[str, int]  # planes dropped per layer this round
    train_loss: float  # mean cross-entropy over the steps (the Lasso term not included)
    steps: int


def train_fedmpq(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    lr: float,
    lam: float = LAMBDA,
    epsilon: float = EPSILON,
    min_bits: int = MIN_BITS,
    momentum: float = 0.0,
    seed: int = 0,
) -> LocalResult:
    """Trains a copy of the bit-plane ``model`` (``to_bitplane``) on ``batches`` of
    (inputs, labels) with cross-entropy + ``lam`` x group Lasso by SGD at ``lr`` with
    ``momentum``: the float parameters (biases, BatchNorm) as torch's SGD does, the
    bit-plane weights by the same step taken as an integer update
    (BitPlaneLayer.weight_grad, integer_step); then prunes top planes sparser than
    ``epsilon`` down to ``min_bits``."""
    for name, value in (("lr", lr), ("lam", lam)):
        if not (is_real(value) and value >= 0):
            raise ValueError(f"train_fedmpq: {name} must be a finite number >= 0, got {value!r}")
    if not (is_real(momentum) and 0 <= momentum < 1):
        raise ValueError(f"train_fedmpq: momentum must be in [0, 1), got {momentum!r}")
    check_pruning("train_fedmpq", epsilon, min_bits)  # before training, not after it
    model = copy.deepcopy(model)
    layers = bit_layers(model).values()
    if not layers:
        raise ValueError("train_fedmpq: the model has no bit-plane layers (convert it with to_bitplane)")
    planes = {id(layer.planes) for layer in layers}
    floats = [p for p in model.parameters() if id(p) not in planes]
    optimizer = torch.optim.SGD(floats, lr=lr, momentum=momentum) if floats else None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    velocity: dict[nn.Module, Tensor] = {}
    losses = []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        (loss + lam * group_lasso(model) if lam else loss).backward()
        if optimizer is not None:
            optimizer.step()
        for layer in layers:
            grad = layer.weight_grad()
            if grad is None:
                continue
            # torch.optim.SGD's momentum (buffer = momentum x buffer + grad), kept in float
            previous = velocity.get(layer)
            velocity[layer] = grad if previous is None else momentum * previous + grad
            layer.integer_step(lr * velocity[layer], generator)
        losses.append(loss.detach())
    pruned = prune_top_bits(model, epsilon, min_bits)
    train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
    return LocalResult(float_state_dict(model), bit_map(model), pruned, train_loss, len(losses))
