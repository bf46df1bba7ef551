"""Baseline schedulers to compare the AMP4EC node-selection rule against.

Like every scheduler, they see nodes only through the monitor's snapshots and learn from
:meth:`select` (what they sent where) and :meth:`observe` (execution times). Each node runs one
stage at a time in arrival order, in the simulator and on a worker, so a node's observations
arrive in the order its stages were selected. The schedulers use that order to tell which
segment an observation belongs to and how many stages are still queued on a node.
When the plan assigns a segment to nodes, only those nodes are candidates.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Mapping

import numpy as np

from amp4ec.monitor import NodeState
from amp4ec.schedule import LiveCandidates, NoNodeAvailable, StageTask, plan_candidates


class _Tracking:
    """Queued stages per node and mean execution time per (node, segment)."""

    def __init__(self) -> None:
        self._queued: dict[str, deque[str]] = defaultdict(deque)
        self._exec_sum_ms: dict[tuple[str, str], float] = defaultdict(float)
        self._exec_count: dict[tuple[str, str], int] = defaultdict(int)
        self._cpus: dict[str, float] = {}

    def queued(self, node: str) -> int:
        return len(self._queued[node])

    def _record_selection(self, task: StageTask, node: str) -> str:
        self._queued[node].append(task.segment.id)
        return node

    def observe(self, node: str, exec_ms: float) -> None:
        queue = self._queued[node]
        if not queue:
            return
        segment_id = queue.popleft()
        self._exec_sum_ms[(node, segment_id)] += exec_ms
        self._exec_count[(node, segment_id)] += 1

    def expected_exec_ms(self, segment_id: str, state: NodeState) -> float:
        """Mean observed time of the segment on the node; else scaled from another node by CPU quota.

        With no observation of the segment anywhere the estimate is 1/cpus, which only ranks nodes.
        """
        count = self._exec_count.get((state.name, segment_id), 0)
        if count:
            return self._exec_sum_ms[(state.name, segment_id)] / count
        seen = [(node, n) for (node, sid), n in self._exec_count.items() if sid == segment_id and n]
        if seen:
            node, n = seen[0]
            other_cpus = self._cpus.get(node, state.cpus)
            return self._exec_sum_ms[(node, segment_id)] / n * other_cpus / state.cpus
        return 1.0 / state.cpus

    def expected_completion_ms(self, task: StageTask, state: NodeState) -> float:
        """Time until the stage would finish on the node: the queued stages and this one."""
        return (self.queued(state.name) + 1) * self.expected_exec_ms(task.segment.id, state)

    def _remember_cpus(self, states: list[NodeState]) -> None:
        for state in states:
            self._cpus[state.name] = state.cpus


class RandomScheduler:
    """A live candidate chosen uniformly at random, from the scenario's seed."""

    name = "random"

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        # The candidates are listed once per snapshot, in plan_candidates' order, not per stage.
        self._candidates = LiveCandidates()

    def select(self, task: StageTask, states: Mapping[str, NodeState]) -> str:
        indices = self._candidates.for_task(task, states)
        return self._candidates.live[indices[int(self._rng.integers(len(indices)))]].name

    def observe(self, node: str, exec_ms: float) -> None:
        pass


class LeastLoaded(_Tracking):
    """The candidate with the fewest queued stages per CPU; ties go to the lower sampled utilisation."""

    name = "least_loaded"

    def __init__(self, rng: np.random.Generator):
        super().__init__()

    def select(self, task: StageTask, states: Mapping[str, NodeState]) -> str:
        candidates = plan_candidates(task, states)
        if not candidates:
            raise NoNodeAvailable(task)
        chosen = min(candidates, key=lambda s: (self.queued(s.name) / s.cpus, s.cpu_utilisation))
        return self._record_selection(task, chosen.name)


class ShortestExpectedCompletion(_Tracking):
    """The candidate where the stage is expected to finish first: (queued + 1) x expected time.

    This is capacity-aware routing for replicated segments: a node with half the CPU quota
    gets about half the requests once its times have been observed.
    """

    name = "shortest_expected_completion"

    def __init__(self, rng: np.random.Generator):
        super().__init__()

    def select(self, task: StageTask, states: Mapping[str, NodeState]) -> str:
        candidates = plan_candidates(task, states)
        if not candidates:
            raise NoNodeAvailable(task)
        self._remember_cpus(candidates)
        chosen = min(candidates, key=lambda s: self.expected_completion_ms(task, s))
        return self._record_selection(task, chosen.name)


class CacheAware(_Tracking):
    """Each segment sticks to the node that ran it last, where its weights and buffers are warm.

    The segment moves only when its home node's expected completion exceeds the best
    candidate's by more than the factor ``slack``, and the new node becomes its home.
    """

    name = "cache_aware"

    def __init__(self, rng: np.random.Generator, *, slack: float = 1.5):
        if slack < 1.0:
            raise ValueError(f"slack must be at least 1.0, got {slack}")
        super().__init__()
        self.slack = slack
        self.home: dict[str, str] = {}

    def select(self, task: StageTask, states: Mapping[str, NodeState]) -> str:
        candidates = plan_candidates(task, states)
        if not candidates:
            raise NoNodeAvailable(task)
        self._remember_cpus(candidates)
        best = min(candidates, key=lambda s: self.expected_completion_ms(task, s))
        chosen = best
        home = self.home.get(task.segment.id)
        for state in candidates:
            if state.name == home:
                if self.expected_completion_ms(task, state) <= self.slack * self.expected_completion_ms(task, best):
                    chosen = state
                break
        self.home[task.segment.id] = chosen.name
        return self._record_selection(task, chosen.name)
