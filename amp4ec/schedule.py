"""Schedulers: choose the node that runs each stage of each request.

A scheduler sees nodes only through the monitor's snapshots, and learns execution times only
through :meth:`Scheduler.observe`, so it behaves the same in simulation and on containers.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np

from amp4ec.monitor import NodeState
from amp4ec.partition import Segment


@dataclass(frozen=True, slots=True)
class StageTask:
    """One stage of one request, waiting for a node."""

    request_id: int
    segment: Segment
    cpu_needed: float
    """CPUs the stage requests"""
    memory_needed_bytes: int


def plan_candidates(task: StageTask, states: Mapping[str, NodeState]) -> list[NodeState]:
    """Return the live nodes that may run the stage: the segment's assigned nodes, if it has any."""
    live = [state for state in states.values() if state.alive]
    if task.segment.nodes:
        live = [state for state in live if state.name in task.segment.nodes]
    return live


class LiveCandidates:
    """The live nodes of the last snapshot, and for each node assignment the live nodes it allows.

    Both are rebuilt only when a new snapshot is published, not per stage: with thousands of
    nodes a scan per stage costs more than the rest of a decision. The nodes keep the
    snapshot's order, so the result is the same as :func:`plan_candidates`.
    """

    def __init__(self) -> None:
        self._states: Mapping[str, NodeState] | None = None
        self.live: list[NodeState] = []
        self._assigned: dict[tuple[str, ...], list[int]] = {}

    def refresh(self, states: Mapping[str, NodeState]) -> bool:
        """Take a snapshot; return whether it is a new one."""
        if states is self._states:
            return False
        self._states = states
        self.live = [state for state in states.values() if state.alive]
        self._assigned = {}
        return True

    def indices(self, segment: Segment) -> Sequence[int]:
        """Positions in ``live`` of the nodes that may run ``segment``."""
        if not segment.nodes:
            return range(len(self.live))
        found = self._assigned.get(segment.nodes)
        if found is None:
            allowed = set(segment.nodes)
            found = [i for i, state in enumerate(self.live) if state.name in allowed]
            self._assigned[segment.nodes] = found
        return found

    def for_task(self, task: StageTask, states: Mapping[str, NodeState]) -> Sequence[int]:
        """Refresh from ``states`` and return the positions of the nodes that may run ``task``."""
        self.refresh(states)
        indices = self.indices(task.segment)
        if not indices:
            raise NoNodeAvailable(task)
        return indices


class Scheduler(Protocol):
    name: str

    def select(self, task: StageTask, states: Mapping[str, NodeState]) -> str: ...

    def observe(self, node: str, exec_ms: float) -> None: ...


class RoundRobin:
    """Stages go to the live nodes in turn, in the scenario's node order (only the assigned ones, if any)."""

    name = "round_robin"

    def __init__(self, rng: np.random.Generator):
        self._next = 0
        self._candidates = LiveCandidates()

    def select(self, task: StageTask, states: Mapping[str, NodeState]) -> str:
        indices = self._candidates.for_task(task, states)
        name = self._candidates.live[indices[self._next % len(indices)]].name
        self._next += 1
        return name

    def observe(self, node: str, exec_ms: float) -> None:
        pass


class Pinned:
    """Segment ``i`` always goes to the ``i``-th live node (modulo their number): a fixed pipeline.

    This is the layout the AMP4EC paper's plans describe, one segment per node, and it makes a
    multi-stage run a tandem of queues. When the plan assigns the segment to nodes, the count
    runs over the live ones among them.
    """

    name = "pinned"

    def __init__(self, rng: np.random.Generator):
        self._candidates = LiveCandidates()

    def select(self, task: StageTask, states: Mapping[str, NodeState]) -> str:
        indices = self._candidates.for_task(task, states)
        return self._candidates.live[indices[task.segment.index % len(indices)]].name

    def observe(self, node: str, exec_ms: float) -> None:
        pass


class NoNodeAvailable(RuntimeError):
    def __init__(self, task: StageTask):
        where = f" among its assigned nodes {', '.join(task.segment.nodes)}" if task.segment.nodes else ""
        super().__init__(f"no live node{where} for stage {task.segment.id} of request {task.request_id}")
        self.task = task


class _NodeStats:
    """What select() needs of one node between snapshots, in one object to keep lookups few."""

    __slots__ = ("load", "performance", "assigned")

    def __init__(self) -> None:
        self.load = 0.0
        self.performance = 0.5
        self.assigned = 0


class Amp4ecScheduler:
    """The node-selection rule of AMP4EC (Zhang et al., 2025), as the authors' code implements it.

    Nodes whose load exceeds ``max_load``, whose link latency exceeds ``max_latency_ms`` or that
    lack the CPU or memory the stage needs are skipped; the rest are scored
    ``w_resources*S_R + w_load*S_L + w_performance*S_P + w_balance*S_B`` and the highest score,
    after up to ``noise`` relative random noise, wins. Load is the mean of the node's last five
    execution times in ms divided by 100, capped at 1. When every node is filtered out, the
    least loaded live node is chosen (the published rule does not say; this is a choice).

    When the plan assigns the segment to nodes, only the live ones among them are candidates.
    At scale the rule is applied to a sample: when there are more than ``max_candidates``
    candidates, each decision scores ``max_candidates`` of them drawn uniformly (with
    replacement, duplicates dropped), in the manner of power-of-d-choices load balancing, and
    the fallback looks only at that sample. Up to ``max_candidates`` candidates, every one is
    scored, as the authors' code does.
    """

    name = "amp4ec"

    def __init__(
        self,
        rng: np.random.Generator,
        *,
        w_resources: float = 0.2,
        w_load: float = 0.2,
        w_performance: float = 0.1,
        w_balance: float = 0.5,
        max_load: float = 0.8,
        max_latency_ms: float = 100.0,
        noise: float = 0.05,
        clamp: bool = True,
        history: int = 5,
        max_candidates: int = 8,
    ):
        if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 1:
            raise ValueError(f"max_candidates must be an integer >= 1, got {max_candidates!r}")
        self.max_candidates = max_candidates
        self._candidates = LiveCandidates()
        self._rng = rng
        numbers = {
            "w_resources": w_resources,
            "w_load": w_load,
            "w_performance": w_performance,
            "w_balance": w_balance,
            "max_load": max_load,
            "max_latency_ms": max_latency_ms,
            "noise": noise,
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(clamp, bool):
            raise ValueError(f"clamp must be true or false, got {clamp!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        self.w_resources = float(w_resources)
        self.w_load = float(w_load)
        self.w_performance = float(w_performance)
        self.w_balance = float(w_balance)
        self.max_load = float(max_load)
        self.max_latency_ms = float(max_latency_ms)
        self.noise = float(noise)
        self.clamp = clamp
        self._exec_ms: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=history))
        self._all_exec_ms: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # sum, count
        self.tasks_assigned: dict[str, int] = defaultdict(int)
        # Decisions are made once per stage of every request, so the terms that change only
        # when a node reports (load, S_P) or when a snapshot arrives (filters, S_R) are kept
        # ready instead of recomputed for every candidate.
        self._load: dict[str, float] = {}
        self._performance: dict[str, float] = {}
        self._static: dict[tuple[float, int], list[tuple[str, float] | None]] = {}
        self._draws: list[float] = []
        self._draw_next = 0
        # The same load, S_P and task count as the dicts above, kept per node for select().
        self._stats: dict[str, _NodeStats] = {}

    def load(self, node: str) -> float:
        return self._load.get(node, 0.0)

    def _ratio(self, available: float, needed: float) -> float:
        if needed <= 0:
            return 1.0
        ratio = available / needed
        return min(1.0, max(0.0, ratio)) if self.clamp else ratio

    def score(self, task: StageTask, state: NodeState) -> float:
        s_resources = 0.5 * self._ratio(state.cpu_available, task.cpu_needed) + 0.5 * self._ratio(
            state.memory_available_bytes, task.memory_needed_bytes
        )
        s_load = 1.0 - self.load(state.name)
        total, count = self._all_exec_ms[state.name]
        # S_P takes the mean execution time in seconds; with no history it is 0.5.
        s_performance = 1.0 / (1.0 + total / count / 1e3) if count else 0.5
        s_balance = 1.0 / (1.0 + 2.0 * self.tasks_assigned[state.name])
        return (
            self.w_resources * s_resources
            + self.w_load * s_load
            + self.w_performance * s_performance
            + self.w_balance * s_balance
        )

    def eligible(self, task: StageTask, state: NodeState) -> bool:
        return (
            state.alive
            and self.load(state.name) <= self.max_load
            and state.link_latency_ms <= self.max_latency_ms
            and state.cpu_available >= task.cpu_needed
            and state.memory_available_bytes >= task.memory_needed_bytes
        )

    def _uniform(self) -> float:
        """Return the next uniform draw in [0, 1) of the scheduler's stream.

        Draws are taken from the generator in blocks because one numpy call per draw costs more
        than the rest of a decision; ``noise * draw`` equals ``rng.uniform(0, noise)`` bit for bit.
        """
        if self._draw_next >= len(self._draws):
            self._draws = self._rng.random(4096).tolist()
            self._draw_next = 0
        draw = self._draws[self._draw_next]
        self._draw_next += 1
        return draw

    def _ensure_draws(self, count: int) -> None:
        """Make the block hold at least ``count`` unused draws.

        Appending the next blocks early keeps the stream's order, so the draws are the same
        as when each block is fetched only once the previous one is spent.
        """
        if self._draw_next + count > len(self._draws):
            remaining = self._draws[self._draw_next :]
            while len(remaining) < count:
                remaining += self._rng.random(4096).tolist()
            self._draws = remaining
            self._draw_next = 0

    def _node_stats(self, name: str) -> _NodeStats:
        stats = self._stats.get(name)
        if stats is None:
            stats = self._stats[name] = _NodeStats()
            stats.load = self._load.get(name, 0.0)
            stats.performance = self._performance.get(name, 0.5)
            stats.assigned = self.tasks_assigned.get(name, 0)
        return stats

    def _static_terms(self, task: StageTask) -> list[tuple[str, float, _NodeStats] | None]:
        """Per live node: None if the snapshot alone rules it out, else its name, S_R and stats."""
        key = (task.cpu_needed, task.memory_needed_bytes)
        terms = self._static.get(key)
        if terms is None:
            terms = []
            for state in self._candidates.live:
                if (
                    state.link_latency_ms <= self.max_latency_ms
                    and state.cpu_available >= task.cpu_needed
                    and state.memory_available_bytes >= task.memory_needed_bytes
                ):
                    s_resources = 0.5 * self._ratio(state.cpu_available, task.cpu_needed) + 0.5 * self._ratio(
                        state.memory_available_bytes, task.memory_needed_bytes
                    )
                    terms.append((state.name, s_resources, self._node_stats(state.name)))
                else:
                    terms.append(None)
            self._static[key] = terms
        return terms

    def select(self, task: StageTask, states: Mapping[str, NodeState]) -> str:
        if self._candidates.refresh(states):
            self._static = {}
        live = self._candidates.live
        candidates = self._candidates.indices(task.segment)
        if not candidates:
            raise NoNodeAvailable(task)
        n_candidates = len(candidates)
        sampled = n_candidates > self.max_candidates
        # Uniform draws are read straight from the block: first the sample's, then one per
        # scored node, in the order _uniform() would return them.
        needed = (self.max_candidates if sampled else 0) + min(n_candidates, self.max_candidates)
        self._ensure_draws(needed)
        draws = self._draws
        position = self._draw_next
        if sampled:
            end = position + self.max_candidates
            indices = list(dict.fromkeys([candidates[int(draw * n_candidates)] for draw in draws[position:end]]))
            position = end
        else:
            indices = candidates
        terms = self._static_terms(task)
        loads = self._load
        max_load = self.max_load
        noise = self.noise
        w_resources, w_load, w_performance, w_balance = self.w_resources, self.w_load, self.w_performance, self.w_balance
        chosen = None
        best_score = -math.inf
        for i in indices:
            term = terms[i]
            if term is None:
                continue
            name, s_resources, stats = term
            load = stats.load
            if load > max_load:
                continue
            # Same terms, in the same order, as score().
            score = (
                w_resources * s_resources
                + w_load * (1.0 - load)
                + w_performance * stats.performance
                + w_balance * (1.0 / (1.0 + 2.0 * stats.assigned))
            )
            noisy = score * (1.0 + noise * draws[position])
            position += 1
            if noisy > best_score:
                chosen, best_score = name, noisy
        self._draw_next = position
        if chosen is None:
            chosen = min((live[i] for i in indices), key=lambda state: loads.get(state.name, 0.0)).name
        self._node_stats(chosen).assigned += 1
        self.tasks_assigned[chosen] += 1
        return chosen

    def observe(self, node: str, exec_ms: float) -> None:
        recent = self._exec_ms[node]
        recent.append(exec_ms)
        load = self._load[node] = min(1.0, sum(recent) / len(recent) / 100.0)
        sums = self._all_exec_ms[node]
        sums[0] += exec_ms
        sums[1] += 1
        # S_P takes the mean execution time in seconds.
        performance = self._performance[node] = 1.0 / (1.0 + sums[0] / sums[1] / 1e3)
        stats = self._stats.get(node)
        if stats is not None:
            stats.load = load
            stats.performance = performance
