"""Adaptation: repartition when the monitor shows a node's CPU quota changing, and price the redeploy.

The adapter sees nodes only through the monitor's snapshots, like a scheduler. It remembers
each node's quota at the last partitioning. When any live node's reported quota differs from
it by more than the threshold (relative), it asks the scenario's partitioner for a new plan on
the nodes as they are now. A new plan is kept only when it fits the nodes' memory; otherwise
the old plan stays and the reason is returned.

Redeploy cost: each node receives the weights of every segment the new plan deploys on it and
the old plan did not, over its link (hop latency plus bytes over bandwidth), then loads them
(``load_ms_per_mb``). The simulator holds the node's link and worker for that time, so requests
queue behind the redeploy. Replay exports the new segments and loads them on the workers, and
pays whatever that takes in real time.

:meth:`Adapter.step` is the one decision loop body both modes call on every published snapshot;
each mode passes the function that carries a new plan out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from amp4ec import policies
from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.monitor import NodeState
from amp4ec.partition import Plan
from amp4ec.scenario import NodeSpec, Scenario


@dataclass
class Adaptation:
    """One repartitioning decision."""

    time_s: float
    trigger: dict[str, tuple[float, float]]
    """node name to (quota at the last partitioning, quota now), for each node beyond the threshold"""
    old_bounds: list[int]
    new_bounds: list[int] | None = None
    old_nodes: list[list[str]] = field(default_factory=list)
    """per segment of the old plan, the nodes it is assigned to (empty: any node)"""
    new_nodes: list[list[str]] | None = None
    redeploy_ms: dict[str, float] = field(default_factory=dict)
    """per node, time to ship and load the segments it newly hosts"""
    error: str | None = None
    """why the new plan was rejected, when it was"""
    ready_s: float | None = None
    """when the new plan took over from the old one (requests started before then run on the old plan)"""
    measured: dict = field(default_factory=dict)
    """replay only: the real time each redeploy step took"""

    def to_dict(self) -> dict:
        return {
            "time_s": self.time_s,
            "trigger": {name: {"from_cpus": old, "to_cpus": new} for name, (old, new) in self.trigger.items()},
            "old_bounds": self.old_bounds,
            "new_bounds": self.new_bounds,
            "old_nodes": self.old_nodes,
            "new_nodes": self.new_nodes,
            "redeploy_ms": self.redeploy_ms,
            "ready_s": self.ready_s,
            "measured": self.measured,
            "error": self.error,
        }


class Adapter:
    def __init__(self, scenario: Scenario, costs: CostModel, plan: Plan, *, bandwidth_bps: float, hop_latency_ms: float):
        self.scenario = scenario
        self.costs = costs
        self.plan = plan
        self.bandwidth_bps = bandwidth_bps
        self.hop_latency_ms = hop_latency_ms
        self.threshold = scenario.adaptation.threshold
        self.load_ms_per_mb = scenario.adaptation.load_ms_per_mb
        self.baseline_cpus = {node.name: node.cpus for node in scenario.nodes}
        self.history: list[dict] = []
        """every decision taken, as Adaptation.to_dict, in order"""

    def step(
        self,
        states: Mapping[str, NodeState],
        now_s: float,
        redeploy: Callable[[Adaptation], None],
        warn: Callable[[str], None],
    ) -> Adaptation | None:
        """Check one published snapshot and carry out the new plan it calls for with ``redeploy``.

        ``redeploy`` switches the mode's plan and fills in ``ready_s`` and, in replay, what it
        measured. When the switch fails, it sets ``error`` and restores ``self.plan``. Every
        decision, kept or rejected, is appended to :attr:`history`.
        """
        decision = self.check(states, now_s)
        if decision is None:
            return None
        if decision.error is None:
            redeploy(decision)
        if decision.error is not None:
            warn(f"adaptation at {now_s:.3f} s kept the old plan: {decision.error}")
        self.history.append(decision.to_dict())
        return decision

    def check(self, states: Mapping[str, NodeState], now_s: float) -> Adaptation | None:
        """Return the adaptation the snapshot calls for, or None when every quota is within the threshold."""
        trigger = {}
        for name, state in states.items():
            base = self.baseline_cpus.get(name)
            if state.alive and base and abs(state.cpus - base) / base > self.threshold:
                trigger[name] = (base, state.cpus)
        if not trigger:
            return None
        decision = Adaptation(
            time_s=now_s, trigger=trigger, old_bounds=self.plan.bounds, old_nodes=[list(s.nodes) for s in self.plan.segments]
        )
        # Quotas are the baseline from now on even if the new plan is rejected, so the same
        # change does not trigger again at every sample.
        for name, state in states.items():
            if name in self.baseline_cpus:
                self.baseline_cpus[name] = state.cpus
        nodes = self.current_nodes()
        try:
            plan = policies.build_plan(self.scenario.model_copy(update={"nodes": nodes}), self.costs.graph, self.costs)
        except UsageError as exc:
            decision.error = str(exc)
            return decision
        decision.new_bounds = plan.bounds
        decision.new_nodes = [list(s.nodes) for s in plan.segments]
        decision.redeploy_ms = self.redeploy_ms(self.plan, plan)
        self.plan = plan
        return decision

    def current_nodes(self) -> list[NodeSpec]:
        # Thread counts stay as deployed: a quota change does not restart the worker.
        return [
            node.model_copy(update={"cpus": self.baseline_cpus[node.name], "threads": node.torch_threads})
            for node in self.scenario.nodes
        ]

    def redeploy_ms(self, old: Plan, new: Plan) -> dict[str, float]:
        times = {}
        for node in self.scenario.nodes:
            resident = {(s.start, s.stop) for s in old.segments_on(node.name)}
            incoming = [s for s in new.segments_on(node.name) if (s.start, s.stop) not in resident]
            if not incoming:
                continue
            n_bytes = sum(self.costs.graph.segment_param_bytes(s.start, s.stop) for s in incoming)
            times[node.name] = (
                CostModel.transfer_ms(n_bytes, self.bandwidth_bps, self.hop_latency_ms) + self.load_ms_per_mb * n_bytes / 1e6
            )
        return times

    def memory_bytes(self, node: str) -> int:
        """Memory the current plan uses on ``node``: the runtime and its deployed segments."""
        return self.costs.runtime_bytes + sum(
            self.costs.segment_memory_bytes(s.start, s.stop) for s in self.plan.segments_on(node)
        )
