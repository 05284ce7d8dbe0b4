"""One client's round: load the global model, train with its strategy, upload.

``train_local`` is a pure function of its arguments (both engines run it); shuffling
comes from the seed's shuffle stream keyed by (round, client), so a run is reproducible
and resumable without saved RNG state. What a PTQ or QAT client quantizes and uploads:
docs/fl.md."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fedhq_kernels as fk
from fedhq import mpq
from fedhq.analysis.speed import batches_per_epoch
from fedhq.data.base import Split
from fedhq.fl import seeds
from fedhq.models import ModelSpec
from fedhq.quant import float_state_dict, load_float_state_dict, observer_keys, prepare_qat
from fedhq.quant.deploy import score
from fedhq_kernels.checks import MAX_BITS, MIN_BITS, valid_bits

CLIENT_STRATEGIES = ("ptq", "qat", "fp32", "mpq")


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of a client in one round."""

    round: int
    strategy: str  # 'ptq' | 'qat' | 'fp32' (float training, float upload) | 'mpq' (FedMPQ's bit planes)
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    bits: int
    seed: int
    # Per-tensor bit widths where they differ from ``bits`` (mixed precision, docs/fl.md
    # "Bits per client"): of the upload, and of the global model the server sends it.
    upload_bits: Mapping[str, int] | None = None
    download_bits: Mapping[str, int] | None = None
    act_bits: int | None = None  # QAT's activations; None: ``bits``

    def __post_init__(self):
        if self.strategy not in CLIENT_STRATEGIES:
            raise ValueError(f"RoundPlan: strategy must be one of {CLIENT_STRATEGIES}, got {self.strategy!r}")
        if self.act_bits is not None and not valid_bits(self.act_bits):
            raise ValueError(f"RoundPlan: act_bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.act_bits!r}")
        for what in ("upload_bits", "download_bits"):
            bits = getattr(self, what)
            if bits is not None and not (isinstance(bits, Mapping) and all(valid_bits(b) for b in bits.values())):
                raise ValueError(f"RoundPlan: {what} must map names to widths in [{MIN_BITS}, {MAX_BITS}], got {bits}")

    def upload_map(self, names: set[str]) -> dict[str, int]:
        """The bits of each quantized entry of the client's upload."""
        return _bit_map(names, self.bits, self.upload_bits)

    def download_map(self, names: set[str]) -> dict[str, int] | None:
        """The bits of each quantized entry of the global model sent to the client;
        None: the global model as the server holds it."""
        return None if self.download_bits is None else _bit_map(names, self.bits, self.download_bits)


def _bit_map(names: set[str], bits: int, overrides: Mapping[str, int] | None) -> dict[str, int]:
    unknown = sorted(set(overrides or {}) - names)
    if unknown:
        raise ValueError(f"per-tensor bits name entries that are not quantized: {unknown[:5]}")
    return {name: (overrides or {}).get(name, bits) for name in sorted(names)}


@dataclass
class ClientState:
    """What a client keeps between rounds: its QAT observers' ranges."""

    observers: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Update:
    """A client's upload: ``state`` maps the float model's names to QuantizedTensors
    (float tensors for fp32), plus what the server weighs and reports it by."""

    client: int
    state: dict
    num_samples: int
    train_loss: float
    steps: int
    wall_s: float

    @property
    def nbytes(self) -> int:
        return payload_bytes(self.state)


def payload_bytes(state: Mapping) -> int:
    """Bytes on the wire: codes + scales + zero points, or raw tensor bytes."""
    total = 0
    for value in state.values():
        if isinstance(value, fk.QuantizedTensor):
            total += value.nbytes
        elif isinstance(value, Tensor):
            total += value.numel() * value.element_size()
    return total


def quantized_names(model: nn.Module) -> set[str]:
    """The state-dict entries that travel quantized: the float parameters."""
    return {name for name, p in model.named_parameters() if p.is_floating_point()}


def quantize_upload(weights: Mapping[str, Tensor], names: set[str], bits: int | Mapping[str, int]) -> dict:
    """``weights`` with the entries in ``names`` quantized at ``bits`` (one width, or one
    per name), the others as they are."""
    quantized = fk.quantize_state_dict({k: v for k, v in weights.items() if k in names}, bits=bits)
    return {k: quantized[k] if k in names else v for k, v in weights.items()}


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` normalizes with batch statistics in training (BatchNorm layers)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def training_batches(order: Tensor, batch_size: int, batchnorm: bool) -> list[Tensor]:
    """``order`` (a shuffled index) cut into batches of ``batch_size``, the last one
    shorter. With ``batchnorm`` a last batch of one sample is left out: BatchNorm cannot
    train on one sample (PyTorch raises where the feature map is 1x1, as in ResNet-18's
    last stage on 8x8 images). The order is reshuffled every epoch, so a different sample
    sits out each time; folding it into the previous batch instead would exceed B_m, the
    largest batch the client's memory budget holds."""
    batches = list(order.split(batch_size))
    return batches[: batches_per_epoch(order.numel(), batch_size, drop_single=batchnorm)]


def build_client_model(
    spec: ModelSpec, strategy: str, state: ClientState | None, *, bits: int, act_bits: int | None = None
) -> nn.Module:
    """The model a client trains: float, or fake-quantized with weights at ``bits`` and
    activations at ``act_bits`` (default ``bits``)."""
    model = spec.build()
    if strategy == "qat":
        model = prepare_qat(model, weight_bits=bits, act_bits=act_bits or bits, inplace=True)
        if state is not None and state.observers:
            model.load_state_dict(state.observers, strict=False)
    return model


def train_local(
    spec: ModelSpec,
    global_state: Mapping[str, Tensor],
    data: Split,
    plan: RoundPlan,
    client: int,
    state: ClientState | None = None,
) -> tuple[Update, ClientState]:
    """Trains ``plan.epochs`` epochs from ``global_state`` (float tensors) on ``data``
    (SGD; for ``mpq`` FedMPQ's bit-plane training, fedhq.mpq); returns the upload and the
    client's new local state."""
    started = time.perf_counter()
    model = build_client_model(spec, plan.strategy, state, bits=plan.bits, act_bits=plan.act_bits)
    load_float_state_dict(model, global_state)
    names = quantized_names(model)
    batches = _epoch_batches(data, plan, client, has_batchnorm(model))
    if plan.strategy == "mpq":
        layers = mpq.quantizable_layers(model)
        planned = plan.upload_map(names)
        result = mpq.train_fedmpq(
            mpq.to_bitplane(model, {name: planned[name] for name in layers}),
            ((data.x[idx], data.y[idx]) for idx in batches),
            lr=plan.lr,
            momentum=plan.momentum,
            seed=seeds.int_seed(plan.seed, "mpq", plan.round, client),
        )
        weights, bits, new_state = result.state, planned | result.bits, ClientState()
        train_loss, steps = result.train_loss, result.steps
    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=plan.momentum)
        losses = []
        for idx in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        weights = {k: v.detach().clone() for k, v in float_state_dict(model).items()}
        bits = plan.upload_map(names)
        keys = observer_keys(model)
        new_state = ClientState({k: v.detach().clone() for k, v in model.state_dict().items() if k in keys})
        train_loss, steps = (float(torch.stack(losses).mean()) if losses else float("nan")), len(losses)
    upload = weights if plan.strategy == "fp32" else quantize_upload(weights, names, bits)
    update = Update(client, upload, len(data), train_loss, steps, time.perf_counter() - started)
    return update, new_state


def _epoch_batches(data: Split, plan: RoundPlan, client: int, batchnorm: bool) -> list[Tensor]:
    """The sample indices of every step of the round, epoch after epoch, shuffled from the
    seed's stream keyed by (round, client)."""
    n = len(data)
    if batchnorm and min(n, plan.batch_size) < 2:
        raise ValueError(
            f"BatchNorm cannot train on batches of one sample, and this client's {n} sample(s) at batch size "
            f"{plan.batch_size} make no other (it needs 2 samples and a batch of 2)"
        )
    generator = torch.Generator().manual_seed(seeds.int_seed(plan.seed, "shuffle", plan.round, client))
    batches = []
    for _ in range(plan.epochs):
        batches += training_batches(torch.randperm(n, generator=generator), plan.batch_size, batchnorm)
    return batches


def evaluate(spec: ModelSpec, weights: Mapping[str, Tensor], data: Split, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the float model with ``weights`` on ``data``
    (float activations; ``fedhq.quant.evaluate_deployed`` runs it as deployed)."""
    model = spec.build()
    model.load_state_dict(dict(weights))
    return score(model, data, batch_size)
