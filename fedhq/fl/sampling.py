"""Client sampling: who trains in a round (docs/fl.md, "Client sampling").

Round r's clients are K drawn uniformly without replacement from those available in
round r, from the seed's "sampling" stream keyed by r alone: the sample is a function
of (seed, round), so a resumed run draws what the uninterrupted one drew, and both
engines draw the same clients. A round whose clients are all available and number at
most K draws nothing: sampling every client is the run without sampling, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhq.fl import seeds
from fedhq.fl.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Sampler:
    seed: int
    per_round: int  # K
    available: np.ndarray | None  # bool [clients, rounds] of the trace; None: always available

    @classmethod
    def of(cls, config: RunConfig) -> Sampler:
        """The run's sampler; ConfigError (one line) for a bad availability trace."""
        path = config.availability
        trace = None if path is None else read_trace(Path(path), config.clients, config.rounds)
        return cls(config.seed, config.per_round, trace)

    def sample(self, r: int, candidates: list[int]) -> tuple[list[int], list[int]]:
        """(the clients that train in round ``r``, sorted; those of ``candidates``
        available in it)."""
        present = [c for c in candidates if self.available is None or self.available[c, r - 1]]
        if len(present) <= self.per_round:
            return present, present
        chosen = seeds.generator(self.seed, "sampling", r).choice(len(present), self.per_round, replace=False)
        return sorted(present[i] for i in chosen), present


def read_trace(path: Path, clients: int, rounds: int) -> np.ndarray:
    """An availability trace: a CSV file of one row per client (in client order) and one
    column per round, each cell 1 (available) or 0; blank lines and lines starting with
    '#' are skipped. ConfigError naming the file and the line for anything else."""
    where = f"availability file {path}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{where} is not readable: {error}") from None
    rows: list[list[bool]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [cell.strip() for cell in line.split(",")]
        wrong = [cell for cell in cells if cell not in ("0", "1")]
        if wrong:
            raise ConfigError(f"{where}, line {number}: cells must be 0 or 1, got {wrong[0]!r}")
        if rows and len(cells) != len(rows[0]):
            raise ConfigError(
                f"{where}, line {number}: client {len(rows)}'s row has {len(cells)} rounds, client 0's {len(rows[0])}"
            )
        rows.append([cell == "1" for cell in cells])
    if len(rows) != clients:
        raise ConfigError(f"{where} has {len(rows)} client rows but the run has clients = {clients}")
    if len(rows[0]) < rounds:
        raise ConfigError(f"{where} covers {len(rows[0])} rounds but the run has rounds = {rounds}")
    return np.array(rows, dtype=bool)
