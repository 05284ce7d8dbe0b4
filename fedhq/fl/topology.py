"""The shape of the federated system: a tree under the server (the flat system is the
tree whose every parent is the server), and its round time. Declared as ``topology``:
None (flat), ``"hierarchical:AxL"`` or a JSON file of parents (docs/hierarchical.md)."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fedhq_kernels.checks import is_int


class TopologyError(ValueError):
    """A tree that cannot be used; the message names the node."""


@dataclass(frozen=True)
class Topology:
    parents: tuple[int | None, ...]
    trains: tuple[bool, ...]

    def __post_init__(self):
        n = len(self.parents)
        if n == 0:
            raise TopologyError("topology: no nodes")
        if len(self.trains) != n:
            raise TopologyError(f"topology: {len(self.trains)} 'trains' flags for {n} nodes")
        for node, parent in enumerate(self.parents):
            if parent is not None and (not is_int(parent) or not 0 <= parent < n):
                raise TopologyError(f"topology: node {node} has parent {parent!r}, not a node id in [0, {n}) or null")
            if parent == node:
                raise TopologyError(f"topology: node {node} is its own parent")
        for node in range(n):  # every chain of parents must reach the server
            seen, current = set(), node
            while current is not None:
                if current in seen:
                    raise TopologyError(
                        f"topology: node {node} is in a cycle ({sorted(seen)}), not connected to the server"
                    )
                seen.add(current)
                current = self.parents[current]
        for node in range(n):
            if not self.trains[node] and not self.children(node):
                raise TopologyError(f"topology: node {node} has no data (trains = false) and no children")
        if not self.children(None):
            raise TopologyError("topology: the server has no children")

    # ---- construction ----

    @classmethod
    def flat(cls, n: int) -> Topology:
        return cls((None,) * n, (True,) * n)

    @classmethod
    def hierarchical(cls, aggregators: int, leaves_per_aggregator: int) -> Topology:
        if aggregators < 1 or leaves_per_aggregator < 0:
            raise TopologyError(
                f"topology: need >= 1 aggregator and >= 0 leaves each, got {aggregators}x{leaves_per_aggregator}"
            )
        parents = [None] * aggregators + [
            i // leaves_per_aggregator for i in range(aggregators * leaves_per_aggregator)
        ]
        return cls(tuple(parents), (True,) * len(parents))

    @classmethod
    def parse(cls, spec: str | None, clients: int) -> Topology:
        """From the run config's ``topology`` setting (module docstring)."""
        if spec is None:
            return cls.flat(clients)
        match = re.fullmatch(r"hierarchical:(\d+)x(\d+)", spec.strip())
        if match:
            topology = cls.hierarchical(int(match[1]), int(match[2]))
        else:
            path = Path(spec)
            try:
                doc = json.loads(path.read_text())
            except FileNotFoundError:
                raise TopologyError(
                    f"topology {spec!r}: neither 'hierarchical:AxL' nor an existing JSON file"
                ) from None
            except (OSError, json.JSONDecodeError) as error:
                raise TopologyError(f"topology file {path}: not readable JSON ({error})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("parents"), list):
                raise TopologyError(f'topology file {path}: expected {{"parents": [...], "trains": [...]}}')
            parents = doc["parents"]
            trains = doc.get("trains", [True] * len(parents))
            if not isinstance(trains, list) or not all(isinstance(t, bool) for t in trains):
                raise TopologyError(f"topology file {path}: 'trains' must be a list of booleans")
            topology = cls(tuple(parents), tuple(trains))
        if len(topology.parents) != clients:
            raise TopologyError(
                f"topology {spec!r} has {len(topology.parents)} nodes but the run has clients = {clients}"
            )
        return topology

    # ---- structure ----

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def is_flat(self) -> bool:
        return all(p is None for p in self.parents)

    def children(self, node: int | None) -> list[int]:
        return list(self._children.get(node, ()))

    @functools.cached_property
    def _children(self) -> dict[int | None, list[int]]:
        """Each node's children in id order (the server's under None), listed once: a
        round asks for every node's, and a scan per node made 10,000 clients' rounds
        take seconds."""
        children: dict[int | None, list[int]] = {}
        for node, parent in enumerate(self.parents):
            children.setdefault(parent, []).append(node)
        return children

    def level(self, node: int) -> int:
        """The paper's level: the server is L1, its children L2, theirs L3."""
        depth, current = 2, self.parents[node]
        while current is not None:
            depth, current = depth + 1, self.parents[current]
        return depth

    def subtree(self, node: int) -> list[int]:
        """``node`` and everything below it, top-down (breadth first)."""
        order, frontier = [], [node]
        while frontier:
            order.extend(frontier)
            frontier = [c for f in frontier for c in self.children(f)]
        return order

    def bottom_up(self) -> list[int]:
        """Every node, deepest first: children before their parents."""
        return sorted(range(self.size), key=lambda n: (-self.level(n), n))

    def per_level(self, nodes: list[int], strategies: list[str]) -> list[list[str]]:
        """The paper's input-space representation, e.g. [[], ['C1^QAT'], ['C3^PTQ', 'C4^PTQ']]
        (index 0 is the server's level, L1): ``nodes`` with ``strategies[node]``."""
        levels = [[] for _ in range(1 + max((self.level(n) for n in range(self.size)), default=1))]
        for n in sorted(nodes, key=lambda n: (self.level(n), n)):
            levels[self.level(n) - 1].append(f"C{n}^{strategies[n].upper()}")
        return levels[: max((self.level(n) for n in nodes), default=1)]

    # ---- time ----

    def round_time(self, compute_s: dict[int, float], upload_s: dict[int, float]) -> tuple[float, int | None]:
        """(seconds, node on the critical path) of a synchronous round: a node finishes
        when its own training and its slowest child are done, plus its upload; the
        server waits for its slowest child. Nodes absent from the dicts did not
        take part (their subtree still reports through them if any child did)."""
        finish: dict[int, float] = {}
        critical: dict[int, int] = {}
        for node in self.bottom_up():
            ready = [(finish[c], critical[c]) for c in self.children(node) if c in finish]
            own = compute_s.get(node)
            if own is None and not ready:
                continue
            start, blame = max([(own or 0.0, node), *ready], key=lambda t: t[0])
            finish[node] = start + upload_s.get(node, 0.0)
            critical[node] = blame if start > (own or 0.0) else node
        tops = [(finish[c], critical[c]) for c in self.children(None) if c in finish]
        if not tops:
            return 0.0, None
        return max(tops, key=lambda t: (t[0], -t[1]))
