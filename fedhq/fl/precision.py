"""How many bits each client trains, uploads and receives, round by round: one policy
per run, chosen by its strategy (docs/mixed-precision.md, "In the harness").

- ``Uniform``: every client at the run's ``bits`` (FedHQ, FedAQT, FedFQ, ...).
- ``Budgets``: each client at its device's bit budget (``fedhq.mpq.device_budget``):
  weights trained (QAT) and uploaded at it, activations at the run's bits (``aqfl``:
  everyone QAT; ``fedhq-budget``: FedHQ's allocation).
- ``LayerBits`` (``fedlq``): float training, per-layer upload bits from the layer
  significance measured on the server's validation split, greedy under each client's
  uplink (``fedhq.allocation.layer_bits``), measured again every ``REMEASURE_EVERY`` rounds.
- ``MixedPrecision`` (``fedmpq``): bit-plane training at each client's own bit map
  (client strategy ``mpq``), which the client may prune; the server weighs updates by
  samples x budget and gives each client its next map by pruning-growing the averaged
  map to its budget (``fedhq.mpq.server_step``); each client receives the global model
  at its map.

The global model stays at the run's ``bits``; the server checks every update against
the bits its plan asked for (``RoundPlan.upload_bits``, ``Server.open_round``)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from fedhq.allocation.layer_bits import CANDIDATE_BITS, client_bit_maps, measure_significance
from fedhq.data.base import Split
from fedhq.fl.client import RoundPlan, quantized_names
from fedhq.fl.config import ConfigError, RunConfig
from fedhq.fl.server import Server
from fedhq.models import ModelSpec
from fedhq.mpq import quantizable_layers, server_step
from fedhq.quant import load_float_state_dict
from fedhq_kernels.checks import MAX_BITS, MIN_BITS, is_int, valid_bits

# fedlq: the layer significance is measured on the global model before round 1 and
# again every this many rounds (a pass over the validation split per layer and width).
REMEASURE_EVERY = 5
BUDGET_STRATEGIES = ("aqfl", "fedhq-budget")


class Uniform:
    """Every client at the run's bits; updates weighted by their sample counts."""

    def __init__(self, config: RunConfig):
        self.config = config

    def plan(self, client: int, plan: RoundPlan) -> RoundPlan:
        return plan

    def weights(self) -> dict[int, int]:
        """Each client's aggregation weight per sample, where not 1."""
        return {}

    def before_round(self, r: int, server: Server) -> None:
        """Called before round ``r``'s plans are made."""

    def after_round(self, received: Sequence, server: Server) -> None:
        """Called with the round's accepted updates (``rounds.Received``)."""

    def state(self) -> dict:
        """What a checkpoint keeps to resume the policy."""
        return {}

    def restore(self, state: dict) -> None:
        """The policy as ``state`` (from ``state()``) left it."""


class Budgets(Uniform):
    """Each client's weights at its device's bit budget, activations at the run's bits."""

    def __init__(self, config: RunConfig, budgets: dict[int, int]):
        super().__init__(config)
        self.budgets = capped(budgets, config.bits)

    def plan(self, client: int, plan: RoundPlan) -> RoundPlan:
        return dataclasses.replace(plan, bits=self.budgets[client], act_bits=self.config.bits)


class LayerBits(Uniform):
    """FedLQ: per-layer upload bits under each client's uplink."""

    def __init__(
        self, config: RunConfig, spec: ModelSpec, validation: Split, upload_s: dict[int, float], model_bytes: int
    ):
        super().__init__(config)
        self.spec, self.validation = spec, validation
        # each client's uplink, from its predicted upload time of the model at the run's bits
        self.uplinks = {c: model_bytes * 8 / (s * 1e6) for c, s in upload_s.items()}
        # the round's upload time target: the median client's at the run's bits, so
        # clients at or above the median uplink keep uniform bits
        self.target_s = statistics.median(upload_s.values())
        self.maps: dict[int, dict[str, int]] = {}

    def before_round(self, r: int, server: Server) -> None:
        if self.maps and (r - 1) % REMEASURE_EVERY:
            return
        model = self.spec.build()
        load_float_state_dict(model, server.global_weights())
        # the run's bits first: the clients whose uplink carries the model at them keep them
        widths = (self.config.bits, *(b for b in CANDIDATE_BITS if b < self.config.bits))
        significance = measure_significance(model, self.validation, bits=widths)
        clients = sorted(self.uplinks)
        allocations = client_bit_maps(significance, [self.uplinks[c] for c in clients], self.target_s)
        self.maps = {c: a.bits for c, a in zip(clients, allocations)}

    def plan(self, client: int, plan: RoundPlan) -> RoundPlan:
        return dataclasses.replace(plan, upload_bits=self.maps[client])

    def state(self) -> dict:
        return {"maps": self.maps}

    def restore(self, state: dict) -> None:
        self.maps = restored_maps(state, set(self.uplinks), quantized_names(self.spec.build())) or {}


class MixedPrecision(Uniform):
    """FedMPQ: each client's own bit map, budget-weighted aggregation, pruning-growing."""

    def __init__(self, config: RunConfig, spec: ModelSpec, budgets: dict[int, int]):
        super().__init__(config)
        self.counts = quantizable_layers(spec.build())
        self.budgets = capped(budgets, config.bits)
        self.maps = {c: dict.fromkeys(self.counts, b) for c, b in self.budgets.items()}

    def plan(self, client: int, plan: RoundPlan) -> RoundPlan:
        bits = self.maps[client]
        return dataclasses.replace(plan, upload_bits=bits, download_bits=bits, act_bits=self.config.bits)

    def weights(self) -> dict[int, int]:
        """Each client's aggregation weight per sample: its budget (seed §3.4.2)."""
        return self.budgets

    def after_round(self, received: Sequence, server: Server) -> None:
        if not received:
            return
        maps = [{name: u.bits[name] for name in self.counts} for u in received]
        samples = [u.num_samples for u in received]
        step = server_step(self.counts, maps, samples, [self.budgets[u.client] for u in received])
        self.maps = {c: step.client_map(self.counts, b) for c, b in self.budgets.items()}

    def state(self) -> dict:
        return {"maps": self.maps}

    def restore(self, state: dict) -> None:
        self.maps = restored_maps(state, set(self.budgets), set(self.counts)) or self.maps


def capped(budgets: dict[int, int], bits: int) -> dict[int, int]:
    """Each client's bit budget, at most the run's bits (the global model's width)."""
    return {client: min(budget, bits) for client, budget in budgets.items()}


def restored_maps(state: object, clients: set[int], names: set[str]) -> dict[int, dict[str, int]] | None:
    """The bit maps a checkpoint's policy state holds (None: none saved, as before mixed
    precision; {}: none made yet), one per client of the run over exactly ``names``; a
    ConfigError saying what is wrong, rather than a failure rounds into the resumed run."""
    maps = state.get("maps") if isinstance(state, dict) else state
    if maps is None or maps == {}:
        return maps
    if not isinstance(maps, dict) or not all(is_int(c) for c in maps):
        problem = "must map client ids to bit maps"
    elif set(maps) != clients:
        problem = f"are for clients {sorted(maps)[:8]}, the run's are {sorted(clients)[:8]}"
    else:
        wrong = [
            c
            for c, m in sorted(maps.items())
            if not (isinstance(m, dict) and set(m) == names and all(valid_bits(b) for b in m.values()))
        ]
        if not wrong:
            return {int(c): dict(m) for c, m in maps.items()}
        problem = f"of clients {wrong[:8]} must map each of the {len(names)} entries the run plans to a width"
        problem += f" in [{MIN_BITS}, {MAX_BITS}]"
    raise ConfigError(f"--resume: the checkpoint's precision maps {problem}")
