"""Schedulers: choose the node that runs each stage of each request.

A scheduler sees nodes only through the monitor's snapshots, and learns execution times only
through :meth:`Scheduler.observe`, so it behaves the same in simulation and on containers.
"""

from __future__ import annotations

import math
from array import array
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Container, Mapping, NoReturn, Protocol, Sequence

import numpy as np

from amp4ec.errors import UsageError
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


def check_choice(scheduler: str, name: object, nodes: Container[str]) -> None:
    """Raise a UsageError unless ``name``, the node a scheduler's select() returned, is one of ``nodes``."""
    if name not in nodes:
        raise UsageError(
            f"scheduler {scheduler!r} chose {name!r}, which is not a node of the scenario; "
            "select() must return the name of one of the nodes in the states it is given",
            field="policy.scheduler",
        )


def raise_scheduler_failure(scheduler: str, error: Exception) -> NoReturn:
    """Raise a usage error for a plug-in scheduler (``package.module:Class``) whose select() raised ``error``.

    A built-in scheduler's exception is a bug in amp4ec, not in the scenario, so it is raised as it is.
    """
    if ":" not in scheduler:
        raise error
    raise UsageError(f"scheduler {scheduler!r} failed: {type(error).__name__}: {error}", field="policy.scheduler") from error


class NoNodeAvailable(RuntimeError):
    def __init__(self, task: StageTask):
        where = f" among its assigned nodes {', '.join(task.segment.nodes)}" if task.segment.nodes else ""
        super().__init__(f"no live node{where} for stage {task.segment.id} of request {task.request_id}")
        self.task = task


# Score term of a node that the snapshot, or its load, rules out for a stage. Every other term
# is >= 0, because the weights and the ratios are, and a sum with -inf stays -inf.
_RULED_OUT = -math.inf
# Uniform draws taken from the scheduler's generator at a time.
_DRAW_BLOCK = 4096
# Values per node in Amp4ecScheduler._terms, at these offsets. _LOAD is the node's load and
# _LOAD_PERFORMANCE is w_load * S_L + w_performance * S_P, both changed when the node reports.
# _BALANCE is w_balance * S_B, changed when the node is chosen. _DYNAMIC is the sum of the last
# two, or _RULED_OUT while the load is above max_load. One node's values share a cache line,
# which matters at 10,000 nodes.
_TERMS = 4
_LOAD, _LOAD_PERFORMANCE, _BALANCE, _DYNAMIC = range(_TERMS)


class _NodeHistory:
    """A node's execution times as the scheduler learns them, and its index in the per-node arrays."""

    __slots__ = ("index", "recent_ms", "total_ms", "count")

    def __init__(self, index: int, history: int) -> None:
        self.index = index
        self.recent_ms: deque[float] = deque(maxlen=history)
        self.total_ms = 0.0
        self.count = 0


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
        self.history = history
        self.tasks_assigned: dict[str, int] = defaultdict(int)
        self._histories: dict[str, _NodeHistory] = {}
        self._names: list[str] = []
        # Decisions are made once per stage of every request, so every term of the score is
        # kept ready, already multiplied by its weight, in flat arrays indexed by node. An
        # object per node and term made the scheduler take about 40 % of a run's CPU time at
        # 10,000 nodes. A tuple per node was slower than arrays in runs at 10,000 nodes,
        # although faster when select() ran alone in a loop.
        self._terms = array("d")
        self._static: dict[tuple[float, int], array] = {}
        """per (CPUs, memory bytes) a stage needs: w_resources * S_R per node, or _RULED_OUT where the snapshot rules the node out"""
        self._snapshot: Mapping[str, NodeState] | None = None
        """the states select() last took a snapshot of"""
        self._live_states: list[NodeState] = []
        self._live_nodes: list[int] = []
        """node index of each live node of the snapshot, in the snapshot's order"""
        self._live_array = np.empty(0, dtype=np.int64)
        self._assigned_nodes: dict[tuple[str, ...], list[int]] = {}
        self._latency_ms = np.empty(0)
        self._cpu_available = np.empty(0)
        self._memory_available_bytes = np.empty(0)
        # The block of uniform draws not yet used, from _draw_next on, with each draw's noise
        # factor and, computed when needed, the live node each draw picks.
        self._draw_block = np.empty(0)
        self._draws = array("d")
        self._factors = array("d")
        self._picks: array | None = None
        self._draw_next = 0

    def _node_history(self, name: str) -> _NodeHistory:
        history = self._histories.get(name)
        if history is None:
            history = self._histories[name] = _NodeHistory(len(self._names), self.history)
            self._names.append(name)
            # The terms of a node with no history: load 0, S_P 0.5.
            load_performance = self.w_load * (1.0 - 0.0) + self.w_performance * 0.5
            balance = self.w_balance * (1.0 / (1.0 + 2.0 * self.tasks_assigned.get(name, 0)))
            self._terms.extend((0.0, load_performance, balance, load_performance + balance))
        return history

    def load(self, node: str) -> float:
        history = self._histories.get(node)
        return self._terms[history.index * _TERMS + _LOAD] if history is not None else 0.0

    def _ratio(self, available: float, needed: float) -> float:
        if needed <= 0:
            return 1.0
        ratio = available / needed
        return min(1.0, max(0.0, ratio)) if self.clamp else ratio

    def _resources_score(self, task: StageTask, state: NodeState) -> float:
        return 0.5 * self._ratio(state.cpu_available, task.cpu_needed) + 0.5 * self._ratio(
            state.memory_available_bytes, task.memory_needed_bytes
        )

    def score(self, task: StageTask, state: NodeState) -> float:
        s_resources = self._resources_score(task, state)
        s_load = 1.0 - self.load(state.name)
        history = self._histories.get(state.name)
        # S_P takes the mean execution time in seconds; with no history it is 0.5.
        s_performance = 1.0 / (1.0 + history.total_ms / history.count / 1e3) if history is not None and history.count else 0.5
        s_balance = 1.0 / (1.0 + 2.0 * self.tasks_assigned[state.name])
        # The terms are added in the order select() adds its precomputed ones, so both give the same float.
        return self.w_resources * s_resources + (
            self.w_load * s_load + self.w_performance * s_performance + self.w_balance * s_balance
        )

    def eligible(self, task: StageTask, state: NodeState) -> bool:
        return (
            state.alive
            and self.load(state.name) <= self.max_load
            and state.link_latency_ms <= self.max_latency_ms
            and state.cpu_available >= task.cpu_needed
            and state.memory_available_bytes >= task.memory_needed_bytes
        )

    def _ensure_draws(self, count: int) -> None:
        """Make the block hold at least ``count`` unused draws.

        Appending the next blocks early keeps the stream's order, so the draws are the same
        as when each block is fetched only once the previous one is spent. Draws come in
        blocks because one numpy call per draw costs more than the rest of a decision.
        ``noise * draw`` equals ``rng.uniform(0, noise)`` bit for bit.
        """
        if self._draw_next + count <= len(self._draws):
            return
        blocks = [self._draw_block[self._draw_next :]]
        drawn = len(blocks[0])
        while drawn < count:
            blocks.append(self._rng.random(_DRAW_BLOCK))
            drawn += _DRAW_BLOCK
        self._draw_block = np.concatenate(blocks)
        self._draws = array("d", self._draw_block.tobytes())
        # The same float operations as 1.0 + noise * draw in Python.
        self._factors = array("d", (1.0 + self.noise * self._draw_block).tobytes())
        self._picks = None
        self._draw_next = 0

    def _live_picks(self) -> array:
        """Return the live node that each draw of the block picks when it samples the whole live list.

        ``int(draw * n)`` in Python and numpy's truncation of ``draw * n`` give the same index.
        """
        positions = (self._draw_block * len(self._live_nodes)).astype(np.int64)
        return array("q", self._live_array[positions].tobytes())

    def _take_snapshot(self, states: Mapping[str, NodeState]) -> None:
        """Index the live nodes of a new snapshot and keep the columns the filters and S_R read."""
        self._snapshot = states
        live = self._live_states = [state for state in states.values() if state.alive]
        self._live_nodes = [self._node_history(state.name).index for state in live]
        self._live_array = np.array(self._live_nodes, dtype=np.int64)
        self._assigned_nodes = {}
        self._static = {}
        self._picks = None
        self._latency_ms = np.array([state.link_latency_ms for state in live], dtype=np.float64)
        self._cpu_available = np.array([state.cpu_available for state in live], dtype=np.float64)
        # Memory sizes below 2**53 bytes are exact as float64, so comparisons and ratios match
        # the ones score() computes on Python integers.
        self._memory_available_bytes = np.array([state.memory_available_bytes for state in live], dtype=np.float64)

    def _candidates(self, segment: Segment) -> list[int]:
        """Return the node indices of the live nodes that may run ``segment``, in the snapshot's order."""
        if not segment.nodes:
            return self._live_nodes
        found = self._assigned_nodes.get(segment.nodes)
        if found is None:
            allowed = set(segment.nodes)
            found = [index for index, state in zip(self._live_nodes, self._live_states) if state.name in allowed]
            self._assigned_nodes[segment.nodes] = found
        return found

    def _ratios(self, available: np.ndarray, needed: float) -> np.ndarray:
        """Apply _ratio() to every element of ``available``, with the same float operations."""
        if needed <= 0:
            return np.ones_like(available)
        ratios = available / needed
        return np.minimum(1.0, np.maximum(0.0, ratios)) if self.clamp else ratios

    def _static_scores(self, task: StageTask) -> array:
        """Compute, per node, ``w_resources * S_R``, or _RULED_OUT unless the snapshot shows it live and able to run the stage."""
        eligible = (
            (self._latency_ms <= self.max_latency_ms)
            & (self._cpu_available >= task.cpu_needed)
            & (self._memory_available_bytes >= task.memory_needed_bytes)
        )
        s_resources = 0.5 * self._ratios(self._cpu_available, task.cpu_needed) + 0.5 * self._ratios(
            self._memory_available_bytes, task.memory_needed_bytes
        )
        by_node = np.full(len(self._names), _RULED_OUT)
        by_node[self._live_array] = np.where(eligible, self.w_resources * s_resources, _RULED_OUT)
        scores = self._static[(task.cpu_needed, task.memory_needed_bytes)] = array("d", by_node.tobytes())
        return scores

    def select(self, task: StageTask, states: Mapping[str, NodeState]) -> str:
        if states is not self._snapshot:
            self._take_snapshot(states)
        segment = task.segment
        candidates = self._candidates(segment)
        n_candidates = len(candidates)
        if not n_candidates:
            raise NoNodeAvailable(task)
        max_candidates = self.max_candidates
        sampled = n_candidates > max_candidates
        # A decision takes its draws in this order: first the sample's, then one per scored node.
        needed = max_candidates + max_candidates if sampled else n_candidates
        if self._draw_next + needed > len(self._draws):
            self._ensure_draws(needed)
        position = self._draw_next
        if sampled:
            end = position + max_candidates
            if segment.nodes:
                draws = self._draws
                picks = [candidates[int(draws[j] * n_candidates)] for j in range(position, end)]
            else:
                if self._picks is None:
                    self._picks = self._live_picks()
                picks = self._picks[position:end]
            # Duplicates are dropped, and each node keeps the place of its first draw.
            nodes = dict.fromkeys(picks)
            position = end
        else:
            nodes = candidates
        static_scores = self._static.get((task.cpu_needed, task.memory_needed_bytes))
        if static_scores is None:
            static_scores = self._static_scores(task)
        terms = self._terms
        factors = self._factors
        chosen = -1
        best_score = -math.inf
        for node in nodes:
            score = static_scores[node] + terms[node * _TERMS + _DYNAMIC]
            if score < 0.0:
                # The snapshot or the node's load rules the node out, so no draw is taken for it.
                continue
            noisy = score * factors[position]
            position += 1
            if noisy > best_score:
                chosen, best_score = node, noisy
        self._draw_next = position
        if chosen < 0:
            chosen = min(nodes, key=lambda node: terms[node * _TERMS + _LOAD])
        name = self._names[chosen]
        assigned = self.tasks_assigned[name] = self.tasks_assigned[name] + 1
        base = chosen * _TERMS
        balance = terms[base + _BALANCE] = self.w_balance * (1.0 / (1.0 + 2.0 * assigned))
        if terms[base + _LOAD] <= self.max_load:
            terms[base + _DYNAMIC] = terms[base + _LOAD_PERFORMANCE] + balance
        return name

    def observe(self, node: str, exec_ms: float) -> None:
        history = self._histories.get(node)
        if history is None:
            history = self._node_history(node)
        recent_ms = history.recent_ms
        recent_ms.append(exec_ms)
        mean_load = sum(recent_ms) / len(recent_ms) / 100.0
        load = mean_load if mean_load < 1.0 else 1.0
        history.total_ms += exec_ms
        history.count += 1
        terms = self._terms
        base = history.index * _TERMS
        terms[base + _LOAD] = load
        # S_P takes the mean execution time in seconds.
        load_performance = terms[base + _LOAD_PERFORMANCE] = self.w_load * (1.0 - load) + self.w_performance * (
            1.0 / (1.0 + history.total_ms / history.count / 1e3)
        )
        terms[base + _DYNAMIC] = load_performance + terms[base + _BALANCE] if load <= self.max_load else _RULED_OUT
