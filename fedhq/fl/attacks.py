"""Model-poisoning attacks for tests and bench/bench_attacks.py: each one turns an
honest client's ``Update`` into a bad one. ``attacking(attack)`` is a ``train_fn`` for
``fedhq.fl.engine.run`` whose client 0 attacks; fedhq.flower.attacks applies the same
definitions to a Flower reply. ``attack_report`` reads a run's results for what the
server did with the attacker (docs/fl.md, "Attacks").

    results = engine.run(config, train_fn=attacking(ATTACKS["noise"]))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

import fedhq_kernels as fk
from fedhq.fl.client import Update, train_local
from fedhq.fl.rounds import TrainFn
from fedhq.fl.server import DEFAULT_MAX_GROWTH, MAGNITUDE_FLOOR

ATTACKER = 0  # the client that attacks
BOOST = 10.0  # the in-bound scaling and sign-flip factor on the client's change
OUT_OF_BOUND = 1e4  # a scaling factor that takes the change past the growth bound
LIE = 10  # the sample-count lie: this many times the client's own count
EXTRA_ELEMENTS = 1 << 20  # the oversized update's extra entry (4 MiB of float32)

Tamper = Callable[[Update, Mapping[str, Tensor], torch.Generator], Update]


@dataclass(frozen=True)
class Attack:
    """``tamper(honest update, global float weights, rng)``: the bad update.
    ``rejected``: words of the server's reason when it rejects the update; None for
    an attack that stays within every check (only aggregation can answer it)."""

    name: str
    what: str
    tamper: Tamper
    rejected: str | None


def _parameters(state: Mapping) -> list[str]:
    """The entries an attack changes: the quantized ones (every float one in fp32
    updates, BatchNorm's running statistics apart)."""
    quantized = [n for n, v in state.items() if isinstance(v, fk.QuantizedTensor)]
    if quantized:
        return quantized
    return [n for n, v in state.items() if v.is_floating_point() and "running_" not in n]


def _requantize(x: Tensor, like: object, **scheme) -> object:
    """``x`` in the form of ``like``: quantized with its scheme (or ``scheme``'s), or float."""
    if not isinstance(like, fk.QuantizedTensor):
        return x.to(like.dtype)
    kept = {"bits": like.bits, "symmetric": like.symmetric, "axis": like.axis}
    return fk.quantize(x, **(kept | scheme))


def _float(value: object) -> Tensor:
    return value.dequantize() if isinstance(value, fk.QuantizedTensor) else value.float()


def _map(update: Update, f: Callable[[str, Tensor], Tensor], **scheme) -> Update:
    state = dict(update.state)
    for name in _parameters(state):
        state[name] = _requantize(f(name, _float(state[name])), state[name], **scheme)
    return dataclasses.replace(update, state=state)


def along_change(factor: float) -> Tamper:
    """global + factor x (the client's change): scaling (> 1) or sign-flipping (< 0)."""

    def tamper(update, global_weights, rng):
        return _map(update, lambda n, x: global_weights[n] + factor * (x - global_weights[n]))

    return tamper


def noise(update, global_weights, rng, bound: float = DEFAULT_MAX_GROWTH) -> Update:
    """Gaussian noise of std bound x 0.3, clipped to 0.9 x bound x MAGNITUDE_FLOOR: within
    any entry's growth limit, however small the initial entry was."""
    reach = 0.9 * bound * MAGNITUDE_FLOOR

    def f(name, x):
        return (x + 0.3 * bound * torch.randn(x.shape, generator=rng)).clamp(-reach, reach)

    return _map(update, f)


def sample_lie(update, global_weights, rng) -> Update:
    return dataclasses.replace(update, num_samples=LIE * update.num_samples)


def per_tensor(update, global_weights, rng) -> Update:
    return _map(update, lambda n, x: x, axis=None)


def symmetric_flip(update, global_weights, rng) -> Update:
    state = dict(update.state)
    for name in _parameters(state):
        q = state[name]
        if isinstance(q, fk.QuantizedTensor):
            state[name] = fk.quantize(q.dequantize(), bits=q.bits, symmetric=not q.symmetric, axis=q.axis)
    return dataclasses.replace(update, state=state)


def nan(update, global_weights, rng) -> Update:
    """NaN in the first parameter: its scales when quantized, else its values."""
    state = dict(update.state)
    name = _parameters(state)[0]
    q = state[name]
    if isinstance(q, fk.QuantizedTensor):
        state[name] = dataclasses.replace(q, scale=torch.full_like(q.scale, float("nan")))
    else:
        state[name] = torch.full_like(q, float("nan"))
    return dataclasses.replace(update, state=state)


def empty(update, global_weights, rng) -> Update:
    return dataclasses.replace(update, state={})


def oversized(update, global_weights, rng) -> Update:
    return dataclasses.replace(update, state=dict(update.state) | {"attack.extra": torch.zeros(EXTRA_ELEMENTS)})


ATTACKS = {
    a.name: a
    for a in (
        Attack("scale", f"its change x{BOOST:g}", along_change(BOOST), None),
        Attack("sign-flip", f"its change x-{BOOST:g}", along_change(-BOOST), None),
        Attack("noise", "Gaussian noise within the growth bound", noise, None),
        Attack(
            "scale-out",
            f"its change x{OUT_OF_BOUND:g}, past the growth bound",
            along_change(OUT_OF_BOUND),
            "growth limit",
        ),
        Attack("sample-lie", f"num_samples x{LIE}", sample_lie, "num_samples must be"),
        Attack("per-tensor", "weights quantized per tensor", per_tensor, "quantized with"),
        Attack("asymmetric", "asymmetric quantization", symmetric_flip, "quantized with"),
        Attack("nan", "NaN scales", nan, "finite"),
        Attack("empty", "an empty state", empty, "missing"),
        Attack("oversized", f"an extra entry of {EXTRA_ELEMENTS} floats", oversized, "unexpected"),
    )
}
IN_BOUND = [a for a in ATTACKS.values() if a.rejected is None]


def attacking(attack: Attack, train_fn: TrainFn = train_local, *, attacker: int = ATTACKER, seed: int = 0) -> TrainFn:
    """``train_fn`` whose client ``attacker`` sends ``attack``'s update instead of its own."""
    rng = torch.Generator().manual_seed(seed)

    def train(spec, global_weights, data, plan, client, state):
        update, new_state = train_fn(spec, global_weights, data, plan, client, state)
        return (attack.tamper(update, global_weights, rng) if client == attacker else update), new_state

    return train


def attack_report(results: Mapping, *, attacker: int = ATTACKER) -> dict:
    """What the server did with ``attacker`` in a run's results: rounds completed,
    rounds it was rejected in and why, and whether every other client's update was
    used in every round."""
    rows = results["rounds"]
    honest = {c["id"] for c in results["clients"]} - {attacker}
    reasons = [next((x["reason"] for x in r["rejected"] if x["client"] == attacker), None) for r in rows]
    return {
        "rounds_completed": len(rows),
        "attacker_rejected": sum(reason is not None for reason in reasons),
        "reasons": sorted({r for r in reasons if r is not None}),
        "honest_used": all(honest <= set(r["participants"]) for r in rows),
        "final_deployed_accuracy": results["final_deployed_accuracy"],
    }
