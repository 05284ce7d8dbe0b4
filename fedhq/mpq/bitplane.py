"""FedMPQ's bit-plane layers (seed §3.2-3.3): a weight is a layer scale times a signed
integer held as its bit planes, trained with a straight-through gradient and integer
updates; the group Lasso over the planes; top-bit pruning.

    bp = to_bitplane(model, {"conv1.weight": 6, "fc.weight": 4, ...})   # a copy
    float_state_dict(bp)          # the dequantized float model's state dict (the upload)
    bit_map(bp), group_lasso(bp), prune_top_bits(bp, epsilon=0.02, min_bits=2)

A layer at ``bits`` b holds sign-magnitude integers in [-(2^(b-1) - 1), 2^(b-1) - 1]:
b - 1 magnitude planes and a sign, so b bits per weight and the same symmetric range as
the project's INT-b weights. Why each rule is as it is: docs/mixed-precision.md.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fedhq_kernels as fk
from fedhq.quant.qat import _swap
from fedhq_kernels.checks import check_bits, is_real

MIN_BITS = 2  # one magnitude plane and a sign: ternary weights, the narrowest a layer gets


def code_max(bits: int) -> int:
    """The largest magnitude a ``bits``-bit sign-magnitude integer holds."""
    return (1 << (bits - 1)) - 1


def encode(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(integer codes as int64, scale): symmetric per layer, the scale from the largest
    magnitude (seed Eq. 14), round to nearest."""
    qmax = code_max(bits)
    top = weight.detach().abs().max() if weight.numel() else weight.new_zeros(())
    scale = torch.clamp(top.float() / qmax, min=torch.finfo(torch.float32).eps)
    code = torch.clamp(torch.round(weight.detach().float() / scale), -qmax, qmax).to(torch.int64)
    return code, scale


def to_planes(code: Tensor, bits: int) -> Tensor:
    """Ternary planes, least significant first: plane b = sign(code) x bit b of |code|."""
    shifts = torch.arange(bits - 1, device=code.device).view(-1, *([1] * code.dim()))
    magnitude = (code.abs().unsqueeze(0) >> shifts) & 1
    return (magnitude * code.sign().unsqueeze(0)).float()


class BitPlaneLayer(nn.Module):
    """What BitPlaneConv2d and BitPlaneLinear share: the parameter ``planes`` (float,
    shape (bits - 1, *weight.shape), entries in {-1, 0, 1}, a weight's planes sharing
    its sign) and the buffer ``scale``. The forward weight is scale x sum_b 2^b plane_b,
    linear in the planes, so autograd gives each plane's gradient as if it were
    continuous: the straight-through estimator of seed Eq. 5."""

    def __init__(self, weight: Tensor, bias: Tensor | None, bits: int, name: str):
        super().__init__()
        check_bits(f"bit-plane layer {name}", bits)
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"bit-plane layer {name}: the weight contains NaN or Inf")
        self.name = name
        code, scale = encode(weight, bits)
        self.planes = nn.Parameter(to_planes(code, bits))
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def bits(self) -> int:
        return self.planes.shape[0] + 1

    def _powers(self) -> Tensor:
        return torch.pow(2.0, torch.arange(self.planes.shape[0], device=self.planes.device, dtype=torch.float32))

    def code(self) -> Tensor:
        """The signed integers the planes hold (int64)."""
        return torch.tensordot(self._powers(), self.planes.detach(), dims=1).round().to(torch.int64)

    def dequantized(self) -> Tensor:
        """scale x integer, differentiable in the planes."""
        return self.scale * torch.tensordot(self._powers(), self.planes, dims=1)

    def _store(self, code: Tensor, bits: int) -> None:
        """Replaces the planes by those of ``code`` at ``bits`` (gradient dropped)."""
        if bits == self.bits:
            with torch.no_grad():
                self.planes.copy_(to_planes(code, bits))
            self.planes.grad = None
        else:
            self.planes = nn.Parameter(to_planes(code, bits))

    @torch.no_grad()
    def weight_grad(self) -> Tensor | None:
        """The gradient of the dequantized weight recovered from the planes' gradients:
        sum_b 2^b grad_b / (scale x sum_b 4^b), the least-squares inverse of grad_b =
        2^b scale x dW. It returns the cross-entropy's dW exactly, and carries the group
        Lasso's pull on each plane to the weight, most from the top planes."""
        grad = self.planes.grad
        if grad is None:
            return None
        powers = self._powers()
        return torch.tensordot(powers, grad, dims=1) / (self.scale * powers.square().sum())

    @torch.no_grad()
    def integer_step(self, step: Tensor, generator: torch.Generator) -> None:
        """Subtracts the float ``step`` (weight units) as an integer update (seed Eq.
        6-10, after WAGE): each entry rounded to the nearest power of two (shift
        friendly), in units of the scale, clipped to the layer's range, stochastically
        rounded (a step below one unit still moves the entry by one with that
        probability), then applied with the integers clamped to the layer's range."""
        if not bool(torch.isfinite(step).all()):
            raise ValueError(f"bit-plane layer {self.name}: its update contains NaN or Inf")
        qmax = code_max(self.bits)
        magnitude = torch.where(step == 0, 0.0, torch.exp2(torch.round(torch.log2(step.abs()))))
        magnitude = torch.clamp(magnitude / self.scale, max=qmax)
        whole = magnitude.floor()
        # drawn on the CPU generator whatever the device, so a seed gives the same run everywhere
        units = whole + (torch.rand(step.shape, generator=generator).to(step.device) < magnitude - whole)
        code = torch.clamp(self.code() - step.sign().to(torch.int64) * units.to(torch.int64), -qmax, qmax)
        self._store(code, self.bits)

    def top_density(self) -> float:
        """The fraction of weights whose most significant magnitude bit is set (seed Eq. 13)."""
        return float(self.planes[-1].detach().abs().mean()) if self.planes[-1].numel() else 0.0

    @torch.no_grad()
    def drop_top_plane(self) -> None:
        """One bit narrower at the same scale: weights beyond the new range saturate to
        it (the nearest value the remaining planes hold; dropping the bit itself would
        turn the largest weights into small ones)."""
        bits = self.bits - 1
        check_bits(f"bit-plane layer {self.name}", bits)
        qmax = code_max(bits)
        self._store(torch.clamp(self.code(), -qmax, qmax), bits)

    def extra_repr(self) -> str:
        return f"{self.name}, bits={self.bits}, scale={float(self.scale):.3g}"


class BitPlaneConv2d(BitPlaneLayer):
    """nn.Conv2d (zero padding) whose weight is a BitPlaneLayer's."""

    def __init__(self, conv: nn.Conv2d, bits: int, name: str):
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"bit-plane layer {name}: padding_mode {conv.padding_mode!r} is not supported (zeros only)"
            )
        super().__init__(conv.weight, conv.bias, bits, name)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.dequantized(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def plain(self) -> nn.Conv2d:
        out_channels, per_group, *kernel = self.planes.shape[1:]
        conv = nn.Conv2d(
            per_group * self.groups,
            out_channels,
            tuple(kernel),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            device="meta",
        )
        return _with(conv, self)


class BitPlaneLinear(BitPlaneLayer):
    """nn.Linear whose weight is a BitPlaneLayer's."""

    def __init__(self, linear: nn.Linear, bits: int, name: str):
        super().__init__(linear.weight, linear.bias, bits, name)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized(), self.bias)

    def plain(self) -> nn.Linear:
        out_features, in_features = self.planes.shape[1:]
        return _with(nn.Linear(in_features, out_features, bias=self.bias is not None, device="meta"), self)


def _with(layer: nn.Module, source: BitPlaneLayer) -> nn.Module:
    """``layer`` (built on the meta device) holding ``source``'s dequantized weight and a copy of its bias."""
    layer.weight = nn.Parameter(source.dequantized().detach().clone())
    layer.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone())
    return layer.train(source.training)


_BIT_PLANE = {nn.Conv2d: BitPlaneConv2d, nn.Linear: BitPlaneLinear}


def weight_name(module_name: str) -> str:
    """The bit-map key of a layer: its weight's state-dict name, as the server's per-tensor bit maps are keyed."""
    return f"{module_name}.weight" if module_name else "weight"


def quantizable_layers(model: nn.Module) -> dict[str, int]:
    """Every layer a bit map covers (weight name -> parameter count): the weights of the
    nn.Conv2d / nn.Linear layers, as QAT quantizes them. Biases and BatchNorm stay float."""
    return {weight_name(n): m.weight.numel() for n, m in model.named_modules() if type(m) in _BIT_PLANE}


def bit_layers(model: nn.Module) -> dict[str, BitPlaneLayer]:
    """The bit-plane layers of ``model`` by weight name."""
    return {weight_name(n): m for n, m in model.named_modules() if isinstance(m, BitPlaneLayer)}


def to_bitplane(model: nn.Module, bits: Mapping[str, int]) -> nn.Module:
    """A copy of the float ``model`` with every nn.Conv2d / nn.Linear in bit-plane form
    at its width in ``bits`` (weight name -> bits, exactly the layers of
    ``quantizable_layers``); every other parameter and buffer is copied as it is."""
    layers = quantizable_layers(model)
    unknown, missing = sorted(set(bits) - set(layers)), sorted(set(layers) - set(bits))
    if unknown or missing:
        raise ValueError(f"to_bitplane: bit map names unknown layers {unknown} and misses layers {missing}")
    for name, layer in model.named_modules():
        if type(layer) in _BIT_PLANE and layer.weight.dtype != torch.float32:
            raise TypeError(f"to_bitplane: layer {name} holds {layer.weight.dtype} weights, expected float32")
    model = copy.deepcopy(model)

    def convert(name: str, module: nn.Module):
        kind = _BIT_PLANE.get(type(module))
        return None if kind is None else kind(module, bits[weight_name(name)], weight_name(name))

    return _swap(model, convert)


def to_float(model: nn.Module) -> nn.Module:
    """A copy of a bit-plane ``model`` with plain layers holding the dequantized weights."""
    return _swap(copy.deepcopy(model), lambda name, m: m.plain() if isinstance(m, BitPlaneLayer) else None)


def float_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The float model's state dict (the upload, and what the server aggregates):
    dequantized weights under the float model's names, every other entry copied."""
    return {k: v.detach().clone() for k, v in to_float(model).state_dict().items()}


def upload_state(model: nn.Module) -> dict:
    """The upload without loss: each bit-plane weight as a per-tensor symmetric
    ``fedhq_kernels.QuantizedTensor`` at its layer's bits (its integers and scale, zero
    point 0; ``fk.dequantize`` gives ``float_state_dict``'s tensor bit for bit), every
    other entry as ``float_state_dict`` has it."""
    state = float_state_dict(model)
    for name, layer in bit_layers(model).items():
        code = layer.code()
        state[name] = fk.QuantizedTensor(
            data=code.to(torch.int8),
            scale=layer.scale.detach().clone(),
            zero_point=torch.zeros((), dtype=torch.int32, device=code.device),
            bits=layer.bits,
            axis=None,
            symmetric=True,
            dtype=torch.float32,
            shape=code.shape,
        )
    return state


def bit_map(model: nn.Module) -> dict[str, int]:
    """Each bit-plane layer's width (weight name -> bits)."""
    return {name: layer.bits for name, layer in bit_layers(model).items()}


def memory_shares(counts: Mapping[str, int], bits: Mapping[str, int]) -> dict[str, float]:
    """Each layer's share of the model's weight memory, n_l b_l / sum_k n_k b_k: how the
    group Lasso weighs its layers (seed Eq. 12), so that the layers holding most of the
    memory are pushed hardest to shed bits."""
    total = sum(counts[name] * bits[name] for name in counts)
    if total <= 0:
        raise ValueError("memory_shares: the layers hold no weights")
    return {name: counts[name] * bits[name] / total for name in counts}


def group_lasso(model: nn.Module) -> Tensor:
    """sum over layers of memory share x sum over planes of the plane's L2 norm (seed
    Eq. 11-12), differentiable in the planes (the gradient of an all-zero plane's norm
    is taken as 0, its subgradient)."""
    layers = bit_layers(model)
    if not layers:
        raise ValueError("group_lasso: the model has no bit-plane layers (convert it with to_bitplane)")
    shares = memory_shares({k: m.planes[0].numel() for k, m in layers.items()}, bit_map(model))
    terms = [shares[k] * torch.linalg.vector_norm(m.planes.flatten(1), dim=1).sum() for k, m in layers.items()]
    return torch.stack(terms).sum()


def check_pruning(op: str, epsilon: float, min_bits: int) -> None:
    """ValueError naming ``op`` unless epsilon is in [0, 1] and min_bits a valid width."""
    if not (is_real(epsilon) and 0 <= epsilon <= 1):
        raise ValueError(f"{op}: epsilon must be a number in [0, 1], got {epsilon!r}")
    check_bits(op, min_bits, "min_bits")


def prune_top_bits(model: nn.Module, epsilon: float = 0.02, min_bits: int = MIN_BITS) -> dict[str, int]:
    """In place: while a layer's top plane has density below ``epsilon`` and the layer is
    wider than ``min_bits``, drop that plane (seed §3.3, MSB pruning). Returns the planes
    dropped per layer (weight name -> count, every layer listed)."""
    check_pruning("prune_top_bits", epsilon, min_bits)
    dropped = {}
    for name, layer in bit_layers(model).items():
        dropped[name] = 0
        while layer.bits > min_bits and layer.top_density() < epsilon:
            layer.drop_top_plane()
            dropped[name] += 1
    return dropped
