"""fedhq.fl.attacks on Flower: ``reply_fault(name)`` alters a node's training reply
(a ``tests/flower_support.LocalGrid`` fault). The update-level attacks decode the
reply, tamper with it as on the embedded engine and encode it again (the sample-count
lie is the reply's ``num-examples``); ``empty`` and ``oversized`` act on the records:
empty records, and an array whose npy header claims 2^40 bytes."""

from __future__ import annotations

import io

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

import fedhq_kernels as fk
from fedhq.fl.attacks import ATTACKS
from fedhq.fl.client import Update
from fedhq.flower.records import decode_state, encode_state

HUGE = 2**40  # the elements the oversized record's forged array declares
# words of the server's reason when it leaves the attacked reply out (the decoder
# answers first where the records differ from the global model's)
REJECTED = {name: attack.rejected for name, attack in ATTACKS.items() if attack.rejected is not None} | {
    "per-tensor": "is not the global model's",
    "asymmetric": "is not the global model's",
    "empty": "missing",
    "oversized": "the array declares",
}


def _empty(reply: Message) -> None:
    reply.content["update"], reply.content["layout"] = ArrayRecord(), ConfigRecord()


def _oversized(reply: Message) -> None:
    arrays = reply.content["update"]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (HUGE,)})
    name = next(iter(arrays.keys()))
    arrays[name] = Array(dtype="uint8", shape=(HUGE,), stype="numpy.ndarray", data=header.getvalue() + bytes(16))


RECORD_FORMS = {"empty": _empty, "oversized": _oversized}


def reply_fault(name: str, *, seed: int = 0):
    """A LocalGrid fault: ``(reply, message) -> reply`` with attack ``name`` applied to
    every training reply (the query round's answers pass unchanged)."""
    attack = ATTACKS[name]
    rng = torch.Generator().manual_seed(seed)

    def fault(reply: Message, msg: Message) -> Message:
        if not msg.metadata.message_type.startswith("train") or reply.has_error():
            return reply
        if name in RECORD_FORMS:
            RECORD_FORMS[name](reply)
            return reply
        content, metrics = reply.content, reply.content["metrics"]
        honest = Update(
            -1, decode_state(content["update"], content["layout"]), int(metrics["num-examples"]), 0.0, 0, 0.0
        )
        weights = fk.dequantize_state_dict(decode_state(msg.content["global"], msg.content["layout"]))
        bad = attack.tamper(honest, weights, rng)
        content["update"], content["layout"] = encode_state(bad.state)
        metrics["num-examples"] = bad.num_samples
        return reply

    return fault
