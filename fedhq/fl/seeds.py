"""The run's random draws, each from its own stream of ``--seed``.

A stream is numpy's SeedSequence of (run seed, the stream's tag, the stream's keys),
so no two streams share draws: giving one quantity (say ``--alphas``) or changing one
setting (the partition's) leaves every other draw exactly as it was.
"""

from __future__ import annotations

import numpy as np

# One tag per stream (any distinct constants; changing one changes that stream's draws).
STREAMS = {
    "alphas": 0xA1FA,  # per-client memory fraction, when not given
    "betas": 0xBE7A,  # per-client compute fraction, when not given
    "partition": 0x9A27,  # the split of the training set among clients
    "init": 0x1417,  # the initial global model
    "fedrh": 0x4D,  # fedrh's coin per client
    "fedrh-matched": 0x4E,  # fedrh-matched's random choice of its QAT clients
    "shuffle": 0x5F,  # a client's batch order; keys (round, client)
    "adjustment": 0xAD,  # the adjustment's sample of candidate allocations
    "test_subset": 0x7E57,  # the test images kept by --max-test
    "calibration": 0xCA1B,  # the server's calibration images of the deployed model
    "sampling": 0x5A3B,  # the clients that train in a round; key round
    "mpq": 0x3B9,  # a FedMPQ client's stochastic rounding of integer updates; keys (round, client)
}


def _sequence(seed: int, stream: str, keys: tuple[int, ...]) -> np.random.SeedSequence:
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
    return np.random.SeedSequence([int(seed), STREAMS[stream], *(int(k) for k in keys)])


def generator(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """numpy's generator of ``stream`` (and ``keys``, e.g. round and client) of run ``seed``."""
    return np.random.default_rng(_sequence(seed, stream, keys))


def int_seed(seed: int, stream: str, *keys: int) -> int:
    """The same stream as one 63-bit int, for APIs that take an int seed
    (torch generators, the partitioners)."""
    return int(_sequence(seed, stream, keys).generate_state(1, np.uint64)[0] >> np.uint64(1))
