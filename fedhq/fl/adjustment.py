"""Runs FedHQ's fine-grained adjustment (fedhq.allocation.adjust) inside a run: after
``adjust_after`` rounds, detect the clients the initialization got wrong, flip leaves
directly, and search flagged inner nodes' subtrees with few-round trials on snapshots.

A trial never touches the main run: it deep-copies the server's model and the
clients' local state, plays ``adjust_trial_rounds`` rounds with the candidate's
strategies, and scores (simulated seconds, accuracy on the held-out validation split).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable

import fedhq_kernels as fk
from fedhq.allocation.adjust import detect, flip_leaf, search_subtree
from fedhq.data.base import Split
from fedhq.fl import seeds
from fedhq.fl.client import evaluate, has_batchnorm
from fedhq.fl.rounds import RoundContext, RoundOutcome, play_round, predicted_compute_s

log = logging.getLogger("fedhq.adjust")


def _validation_accuracy(ctx: RoundContext, state: dict, validation: Split) -> float:
    return evaluate(ctx.spec, fk.dequantize_state_dict(state), validation)[0]


def contributions(ctx: RoundContext, outcome: RoundOutcome, validation: Split) -> dict[int, float]:
    """Validation accuracy of this round's aggregate minus that of the aggregate
    without each client's update (leave one out, along the tree)."""
    accepted = [u for u in outcome.updates if u.client in outcome.accepted]
    full = _validation_accuracy(ctx, ctx.server.state, validation)
    result = {}
    for update in accepted:
        others = [u for u in accepted if u is not update]
        if not others:
            continue
        without = (
            ctx.server.combine([(u.state, u.num_samples) for u in others])
            if ctx.topology.is_flat
            else ctx.server.combine_tree(others, ctx.topology)
        )
        result[update.client] = full - _validation_accuracy(ctx, without, validation)
    return result


def predicted_round_times(ctx: RoundContext, outcome: RoundOutcome) -> dict[int, float]:
    """What the initialization expected of each client that trained: Eq. 1 for its
    strategy (fp32 costs as PTQ) plus the upload of the bytes it sent."""
    config, predicted = ctx.config, {}
    nbytes = {u.client: u.nbytes for u in outcome.updates}
    batchnorm = has_batchnorm(ctx.spec.build())
    for c in ctx.clients:
        if c.id in outcome.times:
            compute = predicted_compute_s(c, ctx.spec, c.strategy, config.local_epochs, batchnorm)
            predicted[c.id] = compute + c.device.upload_seconds(nbytes[c.id])
    return predicted


def trial(ctx: RoundContext, assignment: dict[int, str], first_round: int, validation: Split) -> tuple[float, float]:
    """Few-round training of a candidate from a snapshot of the run."""
    snapshot = dataclasses.replace(
        ctx,
        server=copy.deepcopy(ctx.server),
        clients=[dataclasses.replace(c, strategy=assignment.get(c.id, c.strategy)) for c in ctx.clients],
        states=copy.deepcopy(ctx.states),
    )
    seconds = sum(play_round(snapshot, first_round + k).sim_s for k in range(ctx.config.adjust_trial_rounds))
    return seconds, _validation_accuracy(snapshot, snapshot.server.state, validation)


def adjust_allocation(
    ctx: RoundContext, outcome: RoundOutcome, validation: Split, *, next_round: int, echo: Callable[[str], None]
) -> dict:
    """Adjusts ``ctx.clients``' strategies in place; returns the report for results.json."""
    started = time.perf_counter()
    config, topology = ctx.config, ctx.topology
    before = [c.strategy for c in ctx.clients]
    flags = detect(
        {cid: t.total_s for cid, t in outcome.times.items()},
        contributions(ctx, outcome, validation),
        time_tolerance=config.adjust_time_tolerance,
        acc_tolerance=config.adjust_acc_tolerance,
        predicted=predicted_round_times(ctx, outcome),
    )
    report = {"after_round": outcome.round, "flagged": [], "searches": [], "ranked": 0, "trained": 0}
    if flags and len(flags) == len(ctx.clients):
        report["note"] = "every client was flagged: the tolerances tell nobody apart, so nobody was adjusted"
        log.warning(report["note"])
        flags = []
    budget = config.adjust_budget
    rng = seeds.generator(config.seed, "adjustment")
    decided: set[int] = set()
    for flag in sorted(flags, key=lambda f: (topology.level(f.client), f.client)):
        node = flag.client
        entry = {"client": node, "level": topology.level(node), "reasons": flag.reasons}
        if node in decided:
            entry["action"] = "decided by the search of an ancestor's subtree"
        elif not topology.children(node):  # Situation 1
            new, why = flip_leaf(flag, ctx.clients[node].strategy)
            ctx.clients[node].strategy = new
            entry.update(situation=1, action=why)
        elif budget <= 0:  # Situation 2 without a budget: documented, nothing trained
            entry.update(situation=2, action="no search budget left (adjust_budget): strategy kept")
        else:  # Situation 2
            subtree = topology.subtree(node)
            levels = [
                [n for n in subtree if topology.level(n) == lv] for lv in sorted({topology.level(n) for n in subtree})
            ]
            current = {c.id: c.strategy for c in ctx.clients}
            search = search_subtree(
                levels,
                current,
                lambda a: trial(ctx, a, next_round, validation),
                budget=budget,
                acc_tolerance=config.adjust_acc_tolerance,
                rng=rng,
            )
            budget -= search.trained
            for n, s in search.chosen.items():
                ctx.clients[n].strategy = s
            decided.update(subtree)
            report["searches"].append(search.as_dict())
            report["ranked"] += search.ranked
            report["trained"] += search.trained
            entry.update(situation=2, action=f"subtree searched: {search.trained} trained, {search.ranked} ranked")
        report["flagged"].append(entry)
    after = [c.strategy for c in ctx.clients]
    changed = [n for n in range(len(after)) if after[n] != before[n]]
    report["changed"] = changed
    report["before"] = topology.per_level(changed, before)
    report["after"] = topology.per_level(changed, after)
    report["time_s"] = time.perf_counter() - started
    echo(
        f"adjustment after round {outcome.round}: {len(report['flagged'])} flagged, {len(changed)} changed "
        f"{report['before']} -> {report['after']}; {report['trained']} candidates trained, "
        f"{report['ranked']} ranked; {report['time_s']:.1f} s"
    )
    return report
