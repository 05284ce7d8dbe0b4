"""Every random draw of a run has its own stream of the seed (fedhq.fl.seeds): giving
or changing one quantity never moves another."""

import numpy as np
import pytest

from fedhq.data import load_dataset
from fedhq.fl import RunConfig, engine, seeds

LABELS = load_dataset("digits").train.y.numpy()


def fractions(**changes):
    return engine.client_fractions(RunConfig(clients=6, **changes).validated())


def test_giving_alphas_leaves_betas_as_drawn_and_vice_versa():
    alphas, betas = fractions()
    assert alphas != betas  # two streams, not one read twice
    given_alphas, same_betas = fractions(alphas=[0.5] * 6)
    same_alphas, given_betas = fractions(betas=[0.7] * 6)
    assert (given_alphas, same_betas) == ([0.5] * 6, betas)
    assert (same_alphas, given_betas) == (alphas, [0.7] * 6)
    assert fractions(seed=1) != (alphas, betas)


@pytest.mark.parametrize(
    "changes", [{"partition": "iid"}, {"dirichlet_alpha": 0.1}, {"partition": "quantity", "quantity_sigma": 2.0}]
)
def test_the_partition_settings_move_only_the_partition(changes):
    base = RunConfig(clients=6, strategy="fedrh").validated()
    other = base.replace(**changes)
    assert engine.client_fractions(other) == engine.client_fractions(base)
    assert engine.allocate(other, [0.5] * 6, [0.5] * 6) == engine.allocate(base, [0.5] * 6, [0.5] * 6)
    moved = engine.client_partition(other, LABELS)
    assert any(not np.array_equal(a, b) for a, b in zip(moved, engine.client_partition(base, LABELS)))


def test_fractions_strategy_and_devices_do_not_move_the_partition():
    base = RunConfig(clients=6).validated()
    parts = engine.client_partition(base, LABELS)
    for changes in ({"alphas": [0.4] * 6}, {"betas": [0.9] * 6}, {"strategy": "fedrh"}, {"devices": ["rtx-a6000"]}):
        moved = engine.client_partition(base.replace(**changes), LABELS)
        assert all(np.array_equal(a, b) for a, b in zip(moved, parts))
    assert any(not np.array_equal(a, b) for a, b in zip(engine.client_partition(base.replace(seed=3), LABELS), parts))


def test_streams_and_their_keys_never_share_a_seed():
    shuffles = {seeds.int_seed(s, "shuffle", r, c) for s in range(3) for r in range(1, 41) for c in range(60)}
    assert len(shuffles) == 3 * 40 * 60
    plain = {seeds.int_seed(s, name) for s in range(3) for name in seeds.STREAMS}
    assert len(plain) == 3 * len(seeds.STREAMS) and not plain & shuffles
    assert all(0 <= v < 2**63 for v in plain)
    first = seeds.generator(0, "alphas").random(4)
    assert np.array_equal(first, seeds.generator(0, "alphas").random(4))  # reproducible
    with pytest.raises(ValueError, match="unknown random stream 'alpha'; known: alphas, betas"):
        seeds.int_seed(0, "alpha")
