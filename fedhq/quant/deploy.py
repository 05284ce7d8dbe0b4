"""The model as deployed: INT``bits`` weights *and* activations (docs/fl.md, "Deployed accuracy").

    x_cal = calibration_split(dataset.train, rng)            # 256 seeded training images
    accuracy, loss = evaluate_deployed(model, weights, x_cal, dataset.test, bits=4)

``weights`` is a state dict as clients upload it and the server holds it: every float
parameter a ``bits``-bit QuantizedTensor (per output channel for weights). The deployed
weights are its dequantized values, used as they are: quantizing them again would move
them (a fresh symmetric range rescales a 4-bit channel by 16/15 or 14/15). The input of
every nn.Conv2d / nn.Linear (the layers QAT quantizes) is fake-quantized per tensor,
affine, with MinMaxObserver's qparams (``qparams_from_range``) for the range observed
over the calibration images (``calibrate``: standard PTQ calibration, one pass with
float activations). Logits and BatchNorm stay float, as in QAT training.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fedhq_kernels as fk
from fedhq.data.base import Split
from fedhq.quant.qat import QAT_MODULES, qparams_from_range, strip_qat
from fedhq_kernels.checks import is_int
from fedhq_kernels.quantized_tensor import check_bits, quant_range

CALIBRATION_SAMPLES = 256
_LAYERS = (nn.Conv2d, nn.Linear)  # exact types, as prepare_qat swaps them


def calibration_split(split: Split, rng: np.random.Generator, size: int = CALIBRATION_SAMPLES) -> Tensor:
    """The images of ``size`` samples of ``split`` (all of them if it is smaller) drawn
    with ``rng``. A run passes its seed's own calibration stream,
    ``fedhq.fl.seeds.generator(seed, "calibration")``, so every strategy of a seed
    calibrates on the same images."""
    if not is_int(size) or size < 1:
        raise ValueError(f"calibration_split: size must be a positive int, got {size!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"calibration_split: rng must be a numpy Generator, got {type(rng).__name__}")
    order = rng.permutation(len(split))
    return split.x[torch.as_tensor(np.sort(order[:size]))]


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer whose input and weight a deployed model quantizes."""
    return [(name, m) for name, m in model.named_modules() if type(m) in _LAYERS]


@dataclass(frozen=True)
class Calibration:
    """The (min, max) of every quantized layer's input over the calibration images."""

    bits: int
    ranges: dict[str, tuple[float, float]]

    def qparams(self, name: str) -> tuple[Tensor, Tensor]:
        """Per-tensor affine (scale, zero_point) of layer ``name``'s input."""
        lo, hi = (torch.tensor(v, dtype=torch.float32) for v in self.ranges[name])
        return qparams_from_range(lo, hi, False, *quant_range(self.bits))


def _float_model(model: nn.Module) -> nn.Module:
    return strip_qat(model) if any(isinstance(m, QAT_MODULES) for m in model.modules()) else model


@torch.no_grad()
def calibrate(model: nn.Module, calibration_x: Tensor, bits: int, *, batch_size: int = 256) -> Calibration:
    """Observes every quantized layer's input range over ``calibration_x`` (eval mode,
    float activations; a QAT model is read as its float twin)."""
    check_bits("calibrate", bits)
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(calibration_x, Tensor) or not calibration_x.is_floating_point():
        raise ValueError(f"calibrate: calibration_x must be a float tensor, got {_describe(calibration_x)}")
    if calibration_x.dim() < 2 or calibration_x.shape[0] == 0:
        raise ValueError(f"calibrate: calibration_x must be a non-empty batch, got shape {tuple(calibration_x.shape)}")
    if not bool(torch.isfinite(calibration_x).all()):
        raise ValueError("calibrate: calibration_x contains NaN or Inf")
    model = _float_model(model)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("calibrate: the model has no nn.Conv2d or nn.Linear layer to quantize")
    seen: dict[str, Tensor] = {}

    def observe(name: str, module: nn.Module, args: tuple) -> None:
        batch = torch.stack(torch.aminmax(args[0].detach().float()))
        seen[name] = (
            batch
            if name not in seen
            else torch.stack([seen[name][0].minimum(batch[0]), seen[name][1].maximum(batch[1])])
        )

    was_training = model.training
    hooks = [m.register_forward_pre_hook(functools.partial(observe, name)) for name, m in layers]
    try:
        model.eval()
        for start in range(0, calibration_x.shape[0], batch_size):
            model(calibration_x[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for name, _ in layers:
        if name not in seen:
            raise ValueError(f"calibrate: layer '{name}' never ran on the calibration images")
        if not bool(torch.isfinite(seen[name]).all()):
            raise ValueError(f"calibrate: the input of layer '{name}' is not finite on the calibration images")
    return Calibration(bits, {name: (float(r[0]), float(r[1])) for name, r in seen.items()})


def _quantize_input(scale: Tensor, zero_point: Tensor, bits: int, module: nn.Module, args: tuple) -> tuple:
    return (fk.fake_quant(args[0], scale, zero_point, bits=bits), *args[1:])


def check_deployed_weights(model: nn.Module, weights: Mapping, bits: int) -> None:
    """ValueError unless every float parameter of ``model`` is a ``bits``-bit
    QuantizedTensor in ``weights`` (what clients upload and the server holds)."""
    for name, p in model.named_parameters():
        value = weights.get(name)
        if p.is_floating_point() and (not isinstance(value, fk.QuantizedTensor) or value.bits != bits):
            raise ValueError(
                f"deployed weights: '{name}' must be a {bits}-bit QuantizedTensor as uploaded, got {_describe(value)}"
            )


def deployed_model(model: nn.Module, weights: Mapping, calibration_x: Tensor, bits: int) -> nn.Module:
    """A copy of ``model`` (float or QAT) holding the dequantized ``weights``, whose
    Conv2d / Linear inputs are fake-quantized with ranges calibrated on ``calibration_x``."""
    check_bits("deployed_model", bits)
    deployed = strip_qat(model)  # a float copy, QAT or not
    check_deployed_weights(deployed, weights, bits)
    deployed.load_state_dict(fk.dequantize_state_dict(weights))
    deployed.eval()
    calibration = calibrate(deployed, calibration_x, bits)
    for name, layer in quantized_layers(deployed):
        layer.register_forward_pre_hook(functools.partial(_quantize_input, *calibration.qparams(name), bits))
    return deployed


@torch.no_grad()
def score(model: nn.Module, data: Split, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode on ``data``."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return correct / max(1, len(data)), loss_sum / max(1, len(data))


def evaluate_deployed(
    model: nn.Module, weights: Mapping, calibration_x: Tensor, data: Split, *, bits: int, batch_size: int = 512
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on ``data`` of ``model``'s architecture deployed
    with the quantized ``weights`` and activations calibrated on ``calibration_x``."""
    return score(deployed_model(model, weights, calibration_x, bits), data, batch_size)


def _describe(value: object) -> str:
    if isinstance(value, fk.QuantizedTensor):
        return f"a {value.bits}-bit QuantizedTensor"
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor"
    return "nothing" if value is None else type(value).__name__
