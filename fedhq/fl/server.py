"""The server: validates every client update before it touches the global model,
then aggregates with ``fedhq_kernels`` (dequantize, weighted float32 average by sample
count, requantize). A bad update is left out with a logged reason; if none is usable
the global model stays as it was."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fedhq_kernels as fk
from fedhq.fl.client import quantize_upload, quantized_names
from fedhq.fl.topology import Topology
from fedhq_kernels.checks import is_int
from fedhq_kernels.qparams import SCALE_EPS

log = logging.getLogger("fedhq.server")

# An update holding a weight more than this many times the largest of its tensor in the
# initial model (or of 1.0, whichever is larger) comes from a client whose training
# diverged, or is forged: its range would set the aggregate's scale and wipe out every
# other client's codes. Measured: one diverged 4-bit client (scale 8e17) took digits
# from 96% to 10% in one round. The reference is the initial model, not the current
# global one, so a poisoned round cannot raise the bound. RunConfig.max_weight_growth
# sets it per run; docs/fl.md, "Bad clients", has the measurement behind the default.
DEFAULT_MAX_GROWTH = 100.0
MAGNITUDE_FLOOR = 1.0
# No honest update weighs more than this many samples (and none more than its client
# holds: Server.declare_samples); a larger count would outweigh every other client.
MAX_SAMPLES = 2**31 - 1


@dataclass(frozen=True)
class RunningStats:
    """The state-dict names of one normalization layer's running mean and variance.

    They are statistics of the layer's input, not weights: the mean and the standard
    deviation (the variance's square root) are in the input's units, which scale
    linearly with the weights before the layer, so they share one bound, the growth
    limit applied to the layer's activation scale (docs/fl.md, "Bad clients")."""

    mean: str
    var: str


def running_stats(model: nn.Module) -> list[RunningStats]:
    """The running statistics of ``model``'s BatchNorm (and InstanceNorm) layers that
    track them, found by module type rather than by name."""
    found = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            where = f"{prefix}." if prefix else ""
            found.append(RunningStats(f"{where}running_mean", f"{where}running_var"))
    return found


@dataclass
class Rejection:
    client: int
    reason: str

    def as_dict(self) -> dict:
        return {"client": self.client, "reason": self.reason}


def validate_update(
    state: object,
    num_samples: object,
    template: Mapping[str, Tensor],
    *,
    bits: int | Mapping[str, int | range] | None,
    quantized: set[str],
    limits: Mapping[str, float] | None = None,
    stats: Sequence[RunningStats] = (),
    schemes: Mapping[str, fk.QuantizedTensor] | None = None,
    max_samples: int = MAX_SAMPLES,
) -> str | None:
    """Why ``state`` cannot be aggregated into a model shaped like ``template`` (the
    global float state dict), or None. The entries named in ``quantized`` must be
    ``bits``-bit QuantizedTensors (one width, or one per name, or a range of widths: the
    client's plan; ``bits`` None: a float fp32 update, nothing quantized), with the axis, symmetry and
    dtype of ``schemes``' entry of that name (the global model) where given. ``limits``
    bounds the magnitude of the float entries named in it (``growth_limits``); the
    running variances of ``stats`` must be finite and >= 0 and are bounded by their
    square root. ``num_samples`` must lie in [1, ``max_samples``]."""
    if not is_int(num_samples) or not 0 < num_samples <= min(max_samples, MAX_SAMPLES):
        return f"num_samples must be an int in [1, {min(max_samples, MAX_SAMPLES)}], got {num_samples!r}"
    if not isinstance(state, Mapping):
        return f"the update must be a mapping of tensors, got {type(state).__name__}"
    missing = sorted(set(template) - set(state))
    extra = sorted(set(state) - set(template))
    if missing or extra:
        return f"names differ from the global model's: missing {missing[:5]}, unexpected {extra[:5]}"
    variances = {s.var for s in stats}
    for name, reference in template.items():
        width = bits.get(name) if isinstance(bits, Mapping) else bits
        reason = _check_entry(state[name], reference, width if name in quantized else None)
        if reason is None and schemes and isinstance(schemes.get(name), fk.QuantizedTensor):
            reason = check_scheme(state[name], schemes[name])
        if reason is None and name in variances:
            reason = _check_variance(state[name])
        if reason is None and limits and name in limits:
            if name in variances:
                reason = _check_growth(math.sqrt(magnitude(state[name])), limits[name], "standard deviation")
            else:
                reason = _check_growth(magnitude(state[name]), limits[name], "magnitude")
        if reason:
            return f"'{name}': {reason}"
    return None


def _check_growth(largest: float, limit: float, what: str) -> str | None:
    if largest > limit:
        return (
            f"its largest {what} {largest:.3g} exceeds {limit:.3g}, the growth limit over the global "
            "model (a diverged or forged update)"
        )
    return None


def _check_variance(value: Tensor | fk.QuantizedTensor) -> str | None:
    values = value.dequantize() if isinstance(value, fk.QuantizedTensor) else value
    if not bool(torch.isfinite(values).all()):
        return "a running variance must be finite"
    lowest = float(values.min()) if values.numel() else 0.0
    if lowest < 0:  # BatchNorm divides by sqrt(var + eps): NaN outputs
        return f"a running variance must be >= 0, found {lowest:.3g}"
    return None


SCHEME_FIELDS = ("axis", "symmetric", "dtype")


def check_scheme(value: fk.QuantizedTensor, reference: fk.QuantizedTensor) -> str | None:
    """Aggregation needs every client's entry quantized as the global model's is, at
    the bits of the client's plan (checked apart: they may differ from the global's)."""
    got, want = ([getattr(q, f) for f in SCHEME_FIELDS] for q in (value, reference))
    if got != want:
        return f"quantized with {dict(zip(SCHEME_FIELDS, got))}, the global model with {dict(zip(SCHEME_FIELDS, want))}"
    return None


def magnitude(value: Tensor | fk.QuantizedTensor) -> float:
    """The largest |value| an entry can hold; for a QuantizedTensor read from its scales
    and zero points alone, without a pass over the codes."""
    if isinstance(value, fk.QuantizedTensor):
        qmin, qmax = value.quant_range
        zp = value.zero_point.to(torch.float32)
        reach = torch.maximum((qmax - zp).abs(), (qmin - zp).abs())
        return float((value.scale * reach).max()) if value.scale.numel() else 0.0
    return float(value.detach().abs().max()) if value.numel() else 0.0


def growth_limits(
    state: Mapping[str, object], max_growth: float | None, stats: Sequence[RunningStats] = ()
) -> dict[str, float]:
    """Per float entry of ``state`` (the server's initial model: ``Server.limits``, fixed
    so that a poisoned round cannot raise it): the largest magnitude an update may hold,
    ``max_growth`` x max(the entry's magnitude, MAGNITUDE_FLOOR); none when ``max_growth``
    is None. A layer's running ``stats`` share one limit, on the largest |mean| and on the
    largest standard deviation: ``max_growth`` x max(the global's, MAGNITUDE_FLOOR)."""
    if max_growth is None:
        return {}
    limits = {
        name: max_growth * max(magnitude(v), MAGNITUDE_FLOOR)
        for name, v in state.items()
        if isinstance(v, fk.QuantizedTensor) or v.is_floating_point()
    }
    for s in stats:
        scale = max(magnitude(state[s.mean]), math.sqrt(magnitude(state[s.var])), MAGNITUDE_FLOOR)
        limits[s.mean] = limits[s.var] = max_growth * scale
    return limits


def _check_entry(value: object, reference: Tensor, bits: int | range | None) -> str | None:
    shape = tuple(reference.shape)
    if not reference.is_floating_point():  # integer buffers travel as they are
        if not isinstance(value, Tensor) or value.dtype != reference.dtype or tuple(value.shape) != shape:
            return f"expected a {reference.dtype} tensor of shape {shape}, got {_describe(value)}"
        return None
    if bits is None:
        if not isinstance(value, Tensor) or value.dtype != reference.dtype or tuple(value.shape) != shape:
            return f"expected a {reference.dtype} tensor of shape {shape}, got {_describe(value)}"
        if not bool(torch.isfinite(value).all()):
            return "contains NaN or Inf"
        return None
    if not isinstance(value, fk.QuantizedTensor):
        return f"expected a QuantizedTensor, got {_describe(value)}"
    if tuple(value.shape) != shape or value.dtype != reference.dtype:
        return f"expected shape {shape} and dtype {reference.dtype}, got {tuple(value.shape)} {value.dtype}"
    if value.bits not in (bits if isinstance(bits, range) else (bits,)):
        wanted = f"{bits.start}- to {bits.stop - 1}" if isinstance(bits, range) else bits
        return f"expected {wanted}-bit codes, got {value.bits}-bit"
    try:
        value.check_codes()
    except ValueError as error:
        return str(error)
    if value.scale.numel() and float(value.scale.min()) < SCALE_EPS:  # quantization never picks a smaller one
        return f"a scale below {SCALE_EPS:.3g}, the smallest quantization chooses, found {float(value.scale.min()):.3g}"
    return None


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, fk.QuantizedTensor):
        return f"a QuantizedTensor of shape {tuple(value.shape)}"
    return type(value).__name__


class Server:
    """Holds the global model (quantized state dict, or float for fp32) and runs the
    validate -> aggregate step of every round."""

    def __init__(
        self,
        initial: Mapping[str, Tensor],
        *,
        bits: int | None,
        quantized: set[str],
        max_growth: float | None = DEFAULT_MAX_GROWTH,
        stats: Sequence[RunningStats] = (),
        aggregation: str = "mean",
        trim: float = 0.0,
    ):
        self.bits = bits
        self.quantized = set() if bits is None else set(quantized)
        self.max_growth = max_growth
        self.stats = list(stats)  # running_stats(model): bounded as statistics, not as weights
        self.aggregation, self.trim = aggregation, trim
        self.template = {k: v.detach().clone() for k, v in initial.items()}
        self.state = dict(self.template) if bits is None else quantize_upload(self.template, self.quantized, bits)
        # from the initial model, once: a poisoned round cannot raise the bound
        self.limits = growth_limits(self.state, max_growth, self.stats)
        self.samples: dict[int, int] = {}  # client -> the sample count it declared (declare_samples)
        self.weights: dict[int, int] = {}  # client -> its weight per sample (1 unless set: FedMPQ's budgets)

    @classmethod
    def for_run(cls, config, model: torch.nn.Module) -> Server:
        """The server of a run (a ``RunConfig``) whose initial global model is ``model``."""
        method, trim = config.aggregation_method
        return cls(
            model.state_dict(),
            bits=config.bits if config.quantized else None,
            quantized=quantized_names(model),
            max_growth=config.max_weight_growth,
            stats=running_stats(model),
            aggregation=method,
            trim=trim,
        )

    def declare_samples(self, samples: Mapping[int, int]) -> None:
        """Each client's sample count (its partition's size; on Flower what its node
        declared in the query round): an update claiming more is rejected."""
        self.samples = dict(samples)

    def global_weights(self) -> dict[str, Tensor]:
        """The global model as float tensors: what clients load and evaluation uses."""
        return fk.dequantize_state_dict(self.state)

    def open_round(
        self, topology: Topology | None = None, upload_bits: Mapping[int, Mapping[str, int | range]] | None = None
    ) -> RoundIntake:
        """The round's aggregation, fed one update at a time as they arrive
        (``RoundIntake.offer``) and installed by ``RoundIntake.close``. ``upload_bits``:
        the bits (or range of bits) each client was asked to upload each entry at (its
        plan's, ``rounds.upload_bits``), where not the server's ``bits``."""
        return RoundIntake(self, topology, upload_bits or {})

    def download(self, bits: Mapping[str, int] | None) -> dict:
        """The global model as sent to a client whose plan asks for these bits per
        quantized entry (None: as the server holds it): entries at other widths are
        requantized from their dequantized values, with the same scheme."""
        if bits is None:
            return self.state
        out = dict(self.state)
        for name, width in bits.items():
            q = self.state[name]
            if q.bits != width:
                out[name] = fk.quantize(q.dequantize(), bits=width, symmetric=q.symmetric, axis=q.axis)
        return out

    def aggregate(self, updates: Sequence, topology: Topology | None = None) -> tuple[list[int], list[Rejection]]:
        """Validates every update (objects with client, state, num_samples), aggregates
        the good ones into the global model, and returns (accepted ids, rejections):
        ``open_round``, every update offered in order, ``close``."""
        intake = self.open_round(topology)
        for update in updates:
            intake.offer(update)
        return intake.close()

    def check(self, update, bits: Mapping[str, int | range] | None = None) -> str | None:
        """Why ``update`` (client, state, num_samples) cannot be aggregated, or None;
        ``bits``: the widths its plan asked for, where not the server's."""
        bits = self.bits if bits is None else bits
        checks = {"bits": bits, "quantized": self.quantized, "limits": self.limits, "stats": self.stats}
        cap = self.samples.get(update.client, MAX_SAMPLES)
        return validate_update(
            update.state, update.num_samples, self.template, schemes=self.state, max_samples=cap, **checks
        )

    def aggregator(self) -> fk.Aggregator:
        """An empty aggregation step shaped like the global model, with the run's method."""
        return fk.Aggregator(self.state, method=self.aggregation, trim=self.trim)

    def combine(self, parts: Sequence[tuple[Mapping, int]]) -> dict:
        """One aggregation step: (state, sample count) pairs -> their aggregate,
        requantized (float for fp32)."""
        step = self.aggregator()
        for state, weight in parts:
            step.add(state, weight)
        return step.result()

    def combine_tree(self, accepted: Sequence, topology: Topology) -> dict:
        """The aggregate of already validated updates along ``topology`` (RoundIntake)."""
        intake = RoundIntake(self, topology, {})
        for update in accepted:
            intake.place(update)
        return intake.aggregate()

    @staticmethod
    def reject(client: int, reason: str) -> Rejection:
        log.warning("client %s left out of this round: %s", client, reason)
        return Rejection(client, reason)


class _Slot:
    """What a node of the tree has received so far: a single part is kept as it came
    (forwarded unchanged, as a node with one part always did); a second one starts an
    aggregation step, which takes every later part as it arrives."""

    def __init__(self, server: Server, passthrough: bool):
        self.server, self.passthrough = server, passthrough
        self.single: Mapping | None = None
        self.step: fk.Aggregator | None = None
        self.weight = 0

    def add(self, state: Mapping, weight: int) -> None:
        if self.passthrough and self.step is None and self.single is None:
            self.single = state
        else:
            if self.step is None:
                step = self.server.aggregator()
                if self.single is not None:
                    step.add(self.single, self.weight)
                self.step, self.single = step, None
            self.step.add(state, weight)
        self.weight += weight

    @property
    def empty(self) -> bool:
        return self.single is None and self.step is None

    def result(self) -> Mapping:
        """The node's aggregate; at the server's bits whatever widths its parts came at."""
        if self.step is None:
            return self.single
        return self.step.result() if self.server.bits is None else self.step.result(bits=self.server.bits)


class RoundIntake:
    """One round of the server, fed as updates arrive: ``offer`` validates an update
    and adds it at once to its place in the tree (the server's step for a flat
    system), keeping no reference to it, so the server holds O(model) however many
    clients report (O(inner nodes x model) for a tree; the robust methods keep every
    update: docs/fl.md, "Streaming aggregation"). ``close`` finishes the tree
    bottom-up and installs the new global model; a failure there leaves the model as
    it was and rejects the round's updates.

    Along a tree, a client's update goes to its own node if it has children, else to
    its parent's (a leaf forwards its update as it is); an inner node with one part
    forwards it unchanged, with more it aggregates them (those that arrived, then its
    inner children's subtree aggregates in child order), weighted by the samples
    under them; the server aggregates what reaches it."""

    def __init__(self, server: Server, topology: Topology | None, upload_bits: Mapping[int, Mapping[str, int | range]]):
        self.server, self.upload_bits = server, upload_bits
        tree = topology is not None and not topology.is_flat
        self.parents = topology.parents if tree else ()
        self.children: dict[int | None, list[int]] = {}
        for node, parent in enumerate(self.parents):
            self.children.setdefault(parent, []).append(node)
        self.slots: dict[int | None, _Slot] = {None: _Slot(server, passthrough=False)}
        self.accepted: list[int] = []
        self.rejected: list[Rejection] = []
        self.seen: set = set()

    def offer(self, update) -> None:
        """Validates ``update`` (client, state, num_samples) and adds it, or rejects it
        with a logged reason."""
        client = getattr(update, "client", None)
        if client in self.seen:
            self.rejected.append(
                self.server.reject(client, "a second update from this client in the round: the first counts")
            )
            return
        self.seen.add(client)
        try:
            reason = self.server.check(update, self.upload_bits.get(client))
        except Exception as error:  # noqa: BLE001  one bad update must never end the run
            reason = f"validation raised {type(error).__name__}: {error}"
        if reason is not None:
            self.rejected.append(self.server.reject(client, f"bad update: {reason}"))
            return
        try:
            self.place(update)
        except Exception as error:  # noqa: BLE001  refused before it touched the aggregate
            self.rejected.append(self.server.reject(client, f"aggregation failed: {error}"))
            return
        self.accepted.append(client)

    def place(self, update) -> None:
        """Adds a validated update to its node's slot (its own if it has children)."""
        node = (
            update.client if update.client in self.children else (self.parents[update.client] if self.parents else None)
        )
        self._slot(node).add(update.state, update.num_samples * self.server.weights.get(update.client, 1))

    def _slot(self, node: int | None) -> _Slot:
        if node not in self.slots:
            self.slots[node] = _Slot(self.server, passthrough=True)
        return self.slots[node]

    def aggregate(self) -> dict:
        """The new global model: every inner node's subtree aggregate, deepest first,
        into its parent's slot, then the server's step."""
        results: dict[int, tuple[Mapping, int]] = {}
        for node in sorted(self.children.keys() - {None}, key=self._depth, reverse=True) + [None]:
            slot = self._slot(node)
            for child in self.children.get(node, []):
                if child in results:
                    slot.add(*results.pop(child))
            if node is not None and not slot.empty:
                results[node] = slot.result(), slot.weight
        return self.slots[None].result()

    def _depth(self, node: int) -> int:
        depth = 0
        while self.parents[node] is not None:
            depth, node = depth + 1, self.parents[node]
        return depth

    def close(self) -> tuple[list[int], list[Rejection]]:
        """Installs the round's aggregate as the global model; (accepted ids, rejections)."""
        if not self.accepted:
            if self.seen:
                log.warning("no usable update this round: the global model is kept")
            return [], self.rejected
        try:
            new_state = self.aggregate()
        except Exception as error:  # noqa: BLE001  never corrupt the model, never end the run
            failed = [self.server.reject(c, f"aggregation failed: {error}") for c in self.accepted]
            return [], self.rejected + failed
        self.server.state = new_state
        return self.accepted, self.rejected
