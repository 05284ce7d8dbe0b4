"""QAT model preparation: every nn.Conv2d / nn.Linear becomes a fake-quantizing twin.

    qat_model = prepare_qat(model, bits=4)                      # a copy by default
    float_model = strip_qat(qat_model)                          # plain modules, same weights

Weights: symmetric per output channel; input activations: per-tensor affine with a
running range (buffers ``act_range``, ``act_observed``, client-local state in FL).
What a prepared layer computes and how its state dict aggregates: docs/kernels.md,
"The QAT layer".
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fedhq_kernels as fk
from fedhq_kernels import ops
from fedhq_kernels.checks import check_bits, is_real
from fedhq_kernels.qparams import qparams_from_range
from fedhq_kernels.quantized_tensor import quant_range

OBSERVER_BUFFERS = ("act_range", "act_observed")
OBSERVERS = ("envelope", "ema")


@dataclass(frozen=True)
class QATConfig:
    """How a prepared layer quantizes. Weights: symmetric, per output channel (axis 0).
    Activations: per tensor, affine (``act_symmetric=False``, the usual choice after a
    ReLU) over the signed ``act_bits`` range."""

    weight_bits: int = 8
    act_bits: int = 8
    # 0.1 (torch.ao's default is 0.01): a time constant of 10 steps, so a client follows
    # a new global model within its round (a digits client takes 9 steps per epoch).
    averaging_constant: float = 0.1
    act_symmetric: bool = False
    observer: str = "envelope"  # or "ema"; see docs/kernels.md, "The QAT layer"

    def __post_init__(self):
        for field in ("weight_bits", "act_bits"):
            check_bits("QATConfig", getattr(self, field), field)
        c = self.averaging_constant
        if not (is_real(c) and 0 < c <= 1):
            raise ValueError(f"QATConfig: averaging_constant must be in (0, 1], got {c!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"QATConfig: observer must be one of {OBSERVERS}, got {self.observer!r}")


class _WeightBuffer:
    """Where a layer writes its fake-quantized weight (fake_quant's out= form), kept
    across steps: it saves a fresh output's allocation and page faults every step
    (docs/kernels.md, "The QAT layer"). The convolution saves that output for its
    backward, so while a graph may still read it the buffer is busy: a hook on the
    output's gradient, which runs once that backward is done with it, frees it, and a
    call that finds it busy (a layer called twice before a backward, a forward with
    no backward) starts a new one. Copies and pickles of a model start empty."""

    def __init__(self):
        self.tensor: Tensor | None = None
        self.busy = False

    def __deepcopy__(self, memo):
        return _WeightBuffer()

    def __reduce__(self):
        return (_WeightBuffer, ())

    def take(self, like: Tensor) -> Tensor:
        t = self.tensor
        if self.busy or t is None or (t.shape, t.dtype, t.device) != (like.shape, like.dtype, like.device):
            self.tensor, self.busy = torch.empty(like.shape, dtype=like.dtype, device=like.device), False
        return self.tensor

    def hold_until_backward(self, output: Tensor) -> None:
        self.busy = True
        current = self.tensor

        def release(grad):
            if self.tensor is current:  # not a buffer this one has since replaced
                self.busy = False

        output.register_hook(release)


def _sharing(new: nn.Module, source: nn.Module) -> nn.Module:
    """``new`` (built on the meta device) holding ``source``'s weight and bias objects."""
    new.weight, new.bias = source.weight, source.bias
    return new


class _QATMixin:
    """The fake-quantization shared by QATConv2d and QATLinear."""

    qat_config: QATConfig

    FLOAT: type[nn.Module]  # the float layer this one fake-quantizes
    settings: Callable[[nn.Module], dict]  # constructor arguments of a layer shaped like the given one

    @classmethod
    def from_float(cls, layer: nn.Module, config: QATConfig) -> nn.Module:
        """A QAT twin sharing ``layer``'s parameter objects (no copy)."""
        new = _sharing(cls(**cls.settings(layer), device="meta", dtype=layer.weight.dtype, qat_config=config), layer)
        new._init_qat(config, layer.weight.device)
        return new.train(layer.training)

    def to_float(self) -> nn.Module:
        new = self.FLOAT(**self.settings(self), device="meta", dtype=self.weight.dtype)
        return _sharing(new, self).train(self.training)

    def _init_qat(self, config: QATConfig, device) -> None:
        self.qat_config = config
        self._qat_name = ""  # set by prepare_qat, for error messages
        # (min, max) of the input activations: one 2-element buffer, so the running
        # update and the scale computation are a handful of small ops, not two sets.
        self.register_buffer("act_range", torch.zeros(2, dtype=torch.float32, device=device))
        self.register_buffer("act_observed", torch.zeros((), dtype=torch.bool, device=device))
        self._weight_buffer = _WeightBuffer()

    def _activation_range(self, x: Tensor) -> Tensor:
        """(min, max) to quantize this input with; in training mode it also updates the
        running range. No host synchronization."""
        with torch.no_grad():
            batch = torch.stack(torch.aminmax(x.detach())).float()
            stored = self.act_range.float()
            if not self.training:
                # Eval uses the stored range; a layer that never saw a training batch
                # falls back to this batch's range (as if it were its first observation).
                return torch.where(self.act_observed, stored, batch)
            # EMA (torch.ao MovingAverageMinMaxObserver's rule): the first batch sets
            # the range, later ones move it by averaging_constant; "envelope" then widens
            # it to the batch's extremes.
            new = torch.lerp(stored, batch, self.qat_config.averaging_constant)
            if self.qat_config.observer == "envelope":
                new = torch.stack((torch.minimum(new[0], batch[0]), torch.maximum(new[1], batch[1])))
            new = torch.where(self.act_observed, new, batch)
            # A non-finite batch must not poison the stored range; it still reaches
            # fake_quant through ``new``, whose non-finite scale raises there.
            finite = torch.isfinite(new).all()
            self.act_range.copy_(torch.where(finite, new, stored))
            self.act_observed.logical_or_(finite)
            return new

    def quantize_input(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x
        cfg = self.qat_config
        quant_min, quant_max = quant_range(cfg.act_bits)
        lo, hi = self._activation_range(x)
        scale, zero_point = qparams_from_range(lo, hi, cfg.act_symmetric, quant_min, quant_max)
        try:
            return fk.fake_quant(x, scale, zero_point, bits=cfg.act_bits)
        except ValueError as error:
            if bool(torch.isfinite(scale)):
                raise
            raise ValueError(
                f"{type(self).__name__} {self._qat_name or ''}: its input activations contain NaN or Inf, so "
                "their range cannot be observed (the stored running range was left unchanged)"
            ) from error

    def quantize_weight(self) -> Tensor:
        w, bits = self.weight, self.qat_config.weight_bits
        recorded = torch.is_grad_enabled() and w.requires_grad
        # Under torch.compile / export / dispatch modes the out= form is not
        # differentiable; with a graph recorded but no gradient to hook, the buffer
        # could not be freed: both allocate, as before.
        if not ops.eager_fast_path(w) or (torch.is_grad_enabled() and not recorded):
            return fk.fake_quant(w, bits=bits, axis=0)
        y = fk.fake_quant(w, bits=bits, axis=0, out=self._weight_buffer.take(w))
        if recorded:
            self._weight_buffer.hold_until_backward(y)
        return y

    def extra_repr(self) -> str:
        cfg = self.qat_config
        return (
            f"{super().extra_repr()}, weight_bits={cfg.weight_bits} (per-channel), "
            f"act_bits={cfg.act_bits} ({'symmetric' if cfg.act_symmetric else 'affine'}, {cfg.observer} range)"
        )


class QATConv2d(_QATMixin, nn.Conv2d):
    """nn.Conv2d whose input and weight are fake-quantized (docs/kernels.md)."""

    FLOAT = nn.Conv2d

    @staticmethod
    def settings(conv: nn.Conv2d) -> dict:
        return dict(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )

    def __init__(self, *args, qat_config: QATConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_qat(qat_config or QATConfig(), self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantize_weight(), self.bias)


class QATLinear(_QATMixin, nn.Linear):
    """nn.Linear whose input and weight are fake-quantized (docs/kernels.md)."""

    FLOAT = nn.Linear

    @staticmethod
    def settings(linear: nn.Linear) -> dict:
        return dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)

    def __init__(self, *args, qat_config: QATConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_qat(qat_config or QATConfig(), self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantize_weight(), self.bias)


QAT_MODULES = (QATConv2d, QATLinear)
_FLOAT_TO_QAT = {qat.FLOAT: qat for qat in QAT_MODULES}


def _swap(model: nn.Module, convert) -> nn.Module:
    """Replaces every module for which ``convert(name, module)`` returns a new one
    (a module shared by several parents is converted once and stays shared)."""
    memo: dict[int, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        replacement = convert(prefix, module)
        if replacement is not None:
            memo[id(module)] = replacement
            return replacement
        memo[id(module)] = module
        # _modules, not named_children(): the latter skips a child already seen, so a
        # module shared by two parents would be replaced in only one of them.
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new = visit(child, f"{prefix}.{name}" if prefix else name)
            if new is not child:
                setattr(module, name, new)
        return module

    return visit(model, "")


def prepare_qat(
    model: nn.Module,
    config: QATConfig | None = None,
    *,
    bits: int | None = None,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    averaging_constant: float | None = None,
    observer: str | None = None,
    inplace: bool = False,
) -> nn.Module:
    """The model with every nn.Conv2d / nn.Linear replaced by QATConv2d / QATLinear.
    Parameters are shared with the float modules (a copy of the model is made first
    unless ``inplace``), so create the optimizer after preparing. ``bits`` sets both
    weight and activation bits (the deployed model is INT``bits`` throughout, see
    docs/fl.md); keyword overrides take precedence over ``config``. Already-prepared
    layers are left as they are."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat: expected an nn.Module, got {type(model).__name__}")
    if bits is not None:
        if weight_bits is not None or act_bits is not None:
            raise ValueError("prepare_qat: give bits, or weight_bits / act_bits, not both")
        weight_bits = act_bits = bits
    base = config or QATConfig()
    overrides = {
        k: v
        for k, v in (
            ("weight_bits", weight_bits),
            ("act_bits", act_bits),
            ("averaging_constant", averaging_constant),
            ("observer", observer),
        )
        if v is not None
    }
    cfg = QATConfig(**{**base.__dict__, **overrides})
    if not inplace:
        model = copy.deepcopy(model)

    def convert(name: str, module: nn.Module):
        qat_cls = _FLOAT_TO_QAT.get(type(module))
        if qat_cls is None:
            return None
        new = qat_cls.from_float(module, cfg)
        new._qat_name = name or "(root)"
        return new

    return _swap(model, convert)


def strip_qat(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The float model: every QAT layer back to a plain nn.Conv2d / nn.Linear with the
    same weights (observer ranges dropped). State dict names equal the float model's."""
    if not inplace:
        model = copy.deepcopy(model)
    return _swap(model, lambda name, m: m.to_float() if isinstance(m, QAT_MODULES) else None)


def prepare_ptq(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """A PTQ client trains the plain float model (paper §2.1): this returns ``model``
    itself, or its stripped float twin if it had been prepared for QAT."""
    if any(isinstance(m, QAT_MODULES) for m in model.modules()):
        return strip_qat(model, inplace=inplace)
    return model


def prepare(model: nn.Module, strategy: str, *, inplace: bool = False, **qat_options) -> nn.Module:
    """``prepare_ptq`` or ``prepare_qat`` by name ('ptq' | 'qat')."""
    if strategy == "qat":
        return prepare_qat(model, inplace=inplace, **qat_options)
    if strategy == "ptq":
        if qat_options:
            raise TypeError(f"prepare: options {sorted(qat_options)} apply to strategy 'qat' only")
        return prepare_ptq(model, inplace=inplace)
    raise ValueError(f"prepare: strategy must be 'ptq' or 'qat', got {strategy!r}")


def qat_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every QAT layer."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, QAT_MODULES))


def observer_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the activation observers (client-local state)."""
    return [f"{name}.{buf}" if name else buf for name, _ in qat_modules(model) for buf in OBSERVER_BUFFERS]


def float_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without the observer buffers: the names, shapes and
    dtypes of the float model's state dict, whatever the client's strategy."""
    drop = set(observer_keys(model))
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def load_float_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Loads float-model weights (e.g. the dequantized global model) into ``model``,
    PTQ or QAT. Strict about everything except the observer buffers: a QAT model keeps
    its own ranges when ``state_dict`` has none; any other missing or unexpected key
    raises (naming it)."""
    observers = set(observer_keys(model))
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in missing if k not in observers]
    if missing or unexpected:
        raise KeyError(f"load_float_state_dict: missing keys {missing}, unexpected keys {list(unexpected)}")
