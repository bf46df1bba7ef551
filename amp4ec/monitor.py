"""Node state as schedulers see it: snapshots sampled by a monitor, never the true state.

Both backends fill :class:`NodeState` from their own source (the simulator from its node
model, real mode from the cgroup counters each worker reports) and publish it through a
:class:`Monitor`, which applies the sampling period and reporting delay of the scenario.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class NodeState:
    """A node as sampled at ``time_s``."""

    name: str
    time_s: float
    cpus: float
    memory_bytes: int
    cpu_utilisation: float
    """share of the node's CPU quota used over the last sampling period, 0 to 1"""
    memory_used_bytes: int
    link_latency_ms: float
    """fixed per-hop cost to reach the node, as last measured"""
    alive: bool = True

    @property
    def cpu_available(self) -> float:
        return max(0.0, self.cpus * (1.0 - self.cpu_utilisation))

    @property
    def memory_available_bytes(self) -> int:
        return max(0, self.memory_bytes - self.memory_used_bytes)


class Monitor(Protocol):
    """Publishes the latest snapshot of every node that has reached the scheduler."""

    def snapshot(self) -> dict[str, NodeState]: ...
