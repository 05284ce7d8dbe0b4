"""Quantized transport for any Flower app: ``quantize_mod`` (client) and
``QuantizedStrategy`` (server), in the pattern of Flower's ``fixedclipping_mod`` with
``DifferentialPrivacyClientSideFixedClipping`` (docs/flower.md, "Use it in your Flower app").

Both sides use ``records.encode_state`` / ``decode_state``: the ArrayRecord of packed
codes, scales and zero points, with its layout as a ConfigRecord under ``LAYOUT``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Strategy

import fedhq_kernels as fk
from fedhq.flower.records import RecordError, decode_state, encode_state, expect, to_array
from fedhq_kernels.checks import check_bits, is_real
from fedhq_kernels.functional import DEFAULT_TRIM

log = logging.getLogger("fedhq.flower")

LAYOUT = "fedhq.layout"  # the ConfigRecord next to a quantized ArrayRecord
# aggregate_train implementations the kernels compute fused: -> aggregate_state_dicts method
FUSED = {
    FedAvg.aggregate_train: "mean",
    FedMedian.aggregate_train: "median",
    FedTrimmedAvg.aggregate_train: "trimmed-mean",
}

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def quantize_arrays(
    arrays: ArrayRecord, bits: int, per_channel: bool, keep_float: Collection[str], dtypes: Mapping[str, str] = {}
) -> dict:
    """The state dict of ``arrays`` (cast to ``dtypes``, numpy names, where given) with
    every float array not in ``keep_float`` quantized (float64 ones as float32)."""
    state = arrays.to_torch_state_dict()
    state = {k: v.to(_torch_dtype(dtypes[k])) if k in dtypes else v for k, v in state.items()}
    state = {k: v.float() if v.dtype == torch.float64 and k not in keep_float else v for k, v in state.items()}
    kept = {k: v for k, v in state.items() if k in keep_float}
    quantized = fk.quantize_state_dict(
        {k: v for k, v in state.items() if k not in keep_float}, bits=bits, per_channel=per_channel
    )
    return {k: kept[k] if k in kept else quantized[k] for k in state}


def _torch_dtype(name: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=name)).dtype


def _check_options(op: str, bits: object, keep_float: Collection[str]) -> tuple[int, frozenset]:
    bits = check_bits(op, bits)
    if not 2 <= bits <= 8:
        raise ValueError(f"{op}: bits must be in [2, 8], got {bits}")
    if isinstance(keep_float, str) or not all(isinstance(k, str) for k in keep_float):
        raise TypeError(f"{op}: keep_float must be a collection of array names")
    return bits, frozenset(keep_float)


def _only_arrays(content: RecordDict, where: str) -> tuple[str, ArrayRecord]:
    if len(content.array_records) != 1:
        raise RecordError(f"{where} must hold exactly one ArrayRecord, it holds {len(content.array_records)}")
    return next(iter(content.array_records.items()))


def dequantized(content: RecordDict, expected: Mapping | None = None) -> RecordDict:
    """A copy of ``content`` with its quantized ArrayRecord as float arrays and without
    the layout; ``RecordError`` if malformed (or, given ``expected``, not like it)."""
    key, arrays = _only_arrays(content, "a quantized message")
    state = decode_state(arrays, content[LAYOUT], expected)
    out = RecordDict({k: v for k, v in content.items() if k != LAYOUT})
    out[key] = ArrayRecord(fk.dequantize_state_dict(state))
    return out


def make_quantize_mod(*, bits: int = 8, per_channel: bool = True, keep_float: Collection[str] = ()) -> Mod:
    """A client mod: train replies' ArrayRecord quantized to ``bits``; a quantized model
    from the server dequantized before the app sees it; everything else untouched."""
    bits, keep = _check_options("make_quantize_mod", bits, keep_float)

    def quantize_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if LAYOUT in msg.content.config_records:
            msg.content = dequantized(msg.content)  # raises RecordError: the runtime replies with an error
        # the model sent fixes the reply's dtypes (what the server's check expects)
        models = list(msg.content.array_records.values())
        dtypes = {k: a.dtype for k, a in models[0].items()} if len(models) == 1 else {}
        reply = call_next(msg, context)
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
            return reply
        if len(reply.content.array_records) != 1:
            log.warning(
                "quantize_mod: a train reply with %d ArrayRecords is sent as it is", len(reply.content.array_records)
            )
            return reply
        key, arrays = next(iter(reply.content.array_records.items()))
        content = RecordDict(dict(reply.content.items()))
        content[key], content[LAYOUT] = encode_state(quantize_arrays(arrays, bits, per_channel, keep, dtypes))
        reply.content = content
        return reply

    return quantize_mod


quantize_mod = make_quantize_mod()


class QuantizedStrategy(Strategy):
    """Wraps a Flower ``Strategy``: reads quantize_mod's replies, aggregates them fused
    (FedAvg / FedMedian / FedTrimmedAvg aggregation) or hands the wrapped strategy
    dequantized replies; optionally quantizes the model it sends."""

    def __init__(
        self,
        strategy: Strategy,
        bits: int = 8,
        *,
        per_channel: bool = True,
        keep_float: Collection[str] = (),
        quantize_downlink: bool = False,
        aggregate: str = "auto",
    ):
        self.bits, self.keep_float = _check_options("QuantizedStrategy", bits, keep_float)
        self.strategy, self.per_channel, self.quantize_downlink = strategy, per_channel, quantize_downlink
        method = FUSED.get(getattr(type(strategy), "aggregate_train", None))
        if aggregate not in ("auto", "fused", "strategy"):
            raise ValueError(f"QuantizedStrategy: aggregate must be 'auto', 'fused' or 'strategy', got {aggregate!r}")
        if aggregate == "fused" and method is None:
            raise ValueError(f"QuantizedStrategy: no fused aggregation for {type(strategy).__name__}")
        self.method = None if aggregate == "strategy" else method
        self.weighted_by_key = getattr(strategy, "weighted_by_key", "num-examples")
        self._template: dict = {}  # the model sent this round, quantized: what a reply must look like
        self._expected = expect({})  # its records.expect
        self._accumulator: torch.Tensor | None = None  # the streaming mean's, reused (_buffer)
        self.dropped: list[dict] = []  # {"round", "node_id", "reason"} of every reply left out
        self.aggregate_s: dict[int, float] = {}  # round -> seconds in aggregate_train

    def __repr__(self) -> str:
        return f"QuantizedStrategy({self.strategy!r}, bits={self.bits})"

    def summary(self) -> None:
        how = f"fused {self.method}" if self.method else f"{type(self.strategy).__name__}'s own"
        log.info(
            "QuantizedStrategy: %d-bit uploads, %s aggregation, downlink quantized: %s",
            self.bits,
            how,
            self.quantize_downlink,
        )
        self.strategy.summary()

    def _quantized(self, arrays: ArrayRecord) -> dict:
        return quantize_arrays(arrays, self.bits, self.per_channel, self.keep_float)

    def _send(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        """The wrapped strategy's messages, with its model quantized when asked."""
        messages = list(messages)
        if not self.quantize_downlink:
            return messages
        records = encode_state(self._quantized(arrays))
        done: dict[int, RecordDict] = {}  # strategies share one RecordDict between messages
        for msg in messages:
            key = id(msg.content)
            if key not in done:
                content = RecordDict(dict(msg.content.items()))
                found = [k for k, v in content.array_records.items() if v is arrays] or list(content.array_records)
                name = found[0] if len(found) == 1 else None
                if name is not None:
                    content[name], content[LAYOUT] = records
                done[key] = content
            msg.content = done[key]
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._template = self._quantized(arrays)
        self._expected = expect(self._template)
        return self._send(self.strategy.configure_train(server_round, arrays, config, grid), arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._send(self.strategy.configure_evaluate(server_round, arrays, config, grid), arrays)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def _read(self, msg: Message) -> tuple[dict, float]:
        """(quantized state dict, weight) of a reply; RecordError saying why it is unusable."""
        content = msg.content
        if LAYOUT not in content.config_records:
            raise RecordError("not quantized (no layout): is quantize_mod in the ClientApp's mods?")
        _, arrays = _only_arrays(content, "a reply")
        metrics = list(content.metric_records.values())
        if len(metrics) != 1:
            raise RecordError(f"expected one MetricRecord, the reply holds {len(metrics)}")
        weight = metrics[0].get(self.weighted_by_key)
        if not is_real(weight) or weight < 0:
            raise RecordError(f"'{self.weighted_by_key}' must be a finite number >= 0, got {weight!r}")
        return decode_state(arrays, content[LAYOUT], self._expected, copy=False), float(weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = time.perf_counter()
        try:
            if self.method is not None:
                return self._fused(server_round, replies)
            replies = list(replies)
            usable = list(self._each_read(server_round, replies))
            forwarded = []
            for msg, (state, _) in usable:
                try:  # values a well-formed record may still hold: the aggregation's own check
                    fk.check_update(self._template, state, op="QuantizedStrategy")
                except (TypeError, ValueError) as error:
                    self._drop(server_round, msg.metadata.src_node_id, str(error))
                    continue
                floats = fk.dequantize_state_dict(state)
                key, _ = _only_arrays(msg.content, "a reply")
                msg.content = RecordDict({k: v for k, v in msg.content.items() if k != LAYOUT})
                msg.content[key] = ArrayRecord(floats)
                forwarded.append(msg)
            errors = [msg for msg in replies if msg.has_error()]  # the wrapped strategy sees them too
            return self.strategy.aggregate_train(server_round, errors + forwarded)
        finally:
            self.aggregate_s[server_round] = time.perf_counter() - start

    def _each_read(self, server_round: int, replies: Iterable[Message]) -> Iterable[tuple[Message, tuple]]:
        """(reply, (state, weight)) of every usable reply; the others are logged (error
        replies) or dropped with their reason."""
        for msg in replies:
            if msg.has_error():
                log.info(
                    "round %d: error reply from node %d: %s", server_round, msg.metadata.src_node_id, msg.error.reason
                )
                continue
            try:
                read = self._read(msg)
            except Exception as error:  # noqa: BLE001  one reply never ends the run
                self._drop(server_round, msg.metadata.src_node_id, _reason(error))
                continue
            yield msg, read

    def _fused(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation on the quantized replies: each reply checked
        and added to an ``fk.Aggregator`` as it is read (one with bad values is dropped
        alone). The mean's new model is the float32 mean itself (it travels as floats);
        the median and trimmed mean are requantized by the kernels, then dequantized."""
        trim = getattr(self.strategy, "beta", DEFAULT_TRIM) if self.method == "trimmed-mean" else DEFAULT_TRIM
        aggregator, used = fk.Aggregator(self._template, method=self.method, trim=trim, **self._buffer()), []
        for msg, (state, weight) in self._each_read(server_round, replies):
            try:
                aggregator.add(state, weight)  # refused: the aggregator is unchanged
            except (TypeError, ValueError) as error:
                self._drop(server_round, msg.metadata.src_node_id, str(error))
                continue
            used.append(msg.content)
        try:
            if self.method == "mean":
                model = aggregator.result(requantize=False)
            else:
                model = fk.dequantize_state_dict(aggregator.result())
        except ValueError as error:  # no usable reply, every weight 0, too few to trim
            log.warning("round %d: no aggregate: %s", server_round, error)
            return None, None
        return ArrayRecord({k: to_array(v) for k, v in model.items()}), self._metrics(used)

    def _buffer(self) -> dict:
        """The mean's accumulator, kept from round to round (its result is copied into the
        new ArrayRecord before the next round zeroes it)."""
        if self.method != "mean":
            return {}
        elements = sum(v.data.numel() for v in self._template.values() if isinstance(v, fk.QuantizedTensor))
        if self._accumulator is None or self._accumulator.numel() != elements:
            self._accumulator = torch.empty(elements, dtype=torch.float32)
        return {"accumulator": self._accumulator}

    def _metrics(self, contents: list[RecordDict]) -> MetricRecord | None:
        metrics_fn = getattr(self.strategy, "train_metrics_aggr_fn", None)
        return metrics_fn(contents, self.weighted_by_key) if metrics_fn else None

    def _drop(self, server_round: int, node_id: int, reason: str) -> None:
        log.warning("round %d: reply from node %d left out: %s", server_round, node_id, reason)
        self.dropped.append({"round": server_round, "node_id": node_id, "reason": reason})


def _reason(error: Exception) -> str:
    return str(error) if isinstance(error, RecordError) else f"unreadable ({type(error).__name__}): {error}"


def record_bytes(content: RecordDict) -> int:
    """Bytes of a message's records as Flower counts them (``count_bytes``)."""
    return sum(record.count_bytes() for record in content.values())
