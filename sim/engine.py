"""The SimPy engine: nodes with CFS-limited CPUs, links, a monitor and a coordinator.

Each request's stages go through the coordinator, as in real mode: the coordinator sends a
stage's input over the node's link, the node runs the segment when its worker is free, and
the output comes back over the same link. The scheduler picks the node of every stage from
the monitor's snapshots only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import simpy

from amp4ec import policies
from amp4ec.adapt import Adapter
from amp4ec.costs import CostModel
from amp4ec.metrics import RequestRecord, summarise
from amp4ec.monitor import NodeState
from amp4ec.partition import Plan
from amp4ec.scenario import NodeSpec, Scenario
from amp4ec.schedule import NoNodeAvailable, Scheduler, StageTask
from amp4ec.workload import open_loop_arrivals_s, rng_for
from amp4ec.sim.cfs import CfsCpu

# CPUs a stage requests in the AMP4EC node filter. The published rule gives no value.
DEFAULT_CPU_NEEDED = 0.1


@dataclass
class SimNode:
    spec: NodeSpec
    cpu: CfsCpu
    worker: simpy.Resource
    link: simpy.Resource
    memory_used_bytes: int
    alive: bool = True
    failure: str = ""
    busy_cpu_ms: float = 0.0
    busy_cpu_ms_at_sample: float = 0.0


@dataclass
class SimResult:
    records: list[RequestRecord]
    summary: dict
    warnings: list[str] = field(default_factory=list)


class Simulation:
    """One run of one scenario. Build it, call :meth:`run`, read the records and summary."""

    def __init__(
        self,
        scenario: Scenario,
        costs: CostModel,
        *,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.scenario = scenario
        self.costs = costs
        self.progress = progress
        self.env = simpy.Environment()
        self.warnings: list[str] = []
        self.graph = costs.graph
        self.plan: Plan = policies.build_plan(scenario, self.graph, costs)
        self.scheduler: Scheduler = policies.make_scheduler(scenario, rng_for(scenario.seed, "scheduler"))
        self.hop_latency_ms = costs.hop_latency_ms(scenario.network.latency_ms)
        self.bandwidth_bps = scenario.network.bandwidth_mbps * 1e6
        self.nodes = {spec.name: self._make_node(spec) for spec in scenario.nodes}
        self.adapter = (
            Adapter(scenario, costs, self.plan, bandwidth_bps=self.bandwidth_bps, hop_latency_ms=self.hop_latency_ms)
            if scenario.adaptation.enabled
            else None
        )
        self.adaptations: list[dict] = []
        self._published: dict[str, NodeState] = {}
        self.records: list[RequestRecord] = []
        self._done = 0

    def _make_node(self, spec: NodeSpec) -> SimNode:
        phase_ms = rng_for(self.scenario.seed, f"cfs-phase:{spec.name}").uniform(0.0, 100.0)
        cpu = CfsCpu(spec.cpus, cores=spec.torch_threads, phase_ms=phase_ms)
        # Before the first request each segment is deployed on the nodes the plan assigns it to,
        # or on every node when it assigns none. Its weights and largest activation stay resident.
        memory_used = self.costs.runtime_bytes + sum(
            self.costs.segment_memory_bytes(s.start, s.stop) for s in self.plan.segments_on(spec.name)
        )
        node = SimNode(
            spec=spec,
            cpu=cpu,
            worker=simpy.Resource(self.env, capacity=1),
            link=simpy.Resource(self.env, capacity=1),
            memory_used_bytes=memory_used,
        )
        if memory_used > spec.memory_bytes:
            node.alive = False
            node.failure = "oom"
            self.warnings.append(
                f"node {spec.name} is OOM-killed at deployment: it needs {memory_used / 2**20:.0f} MiB "
                f"(runtime {self.costs.runtime_bytes / 2**20:.0f} MiB plus segments) but its limit is "
                f"{spec.memory_mb:.0f} MiB"
            )
        return node

    # The monitor samples every period and publishes each sample after the reporting delay.
    def _sample(self, period_s: float) -> dict[str, NodeState]:
        states = {}
        for name, node in self.nodes.items():
            busy_ms = node.busy_cpu_ms - node.busy_cpu_ms_at_sample
            node.busy_cpu_ms_at_sample = node.busy_cpu_ms
            # node.cpu.cpus is the current quota; it differs from the spec after a capacity change.
            utilisation = min(1.0, busy_ms / (node.cpu.cpus * period_s * 1e3)) if self.env.now > 0 else 0.0
            states[name] = NodeState(
                name=name,
                time_s=self.env.now,
                cpus=node.cpu.cpus,
                memory_bytes=node.spec.memory_bytes,
                cpu_utilisation=utilisation,
                memory_used_bytes=min(node.memory_used_bytes, node.spec.memory_bytes),
                link_latency_ms=self.hop_latency_ms,
                alive=node.alive,
            )
        return states

    def _monitor(self):
        period_s = self.scenario.monitor.period_s
        delay_s = self.scenario.monitor.delay_s
        self._published = self._sample(period_s)
        while True:
            yield self.env.timeout(period_s)
            sample = self._sample(period_s)
            if delay_s > 0:
                self.env.process(self._publish_later(sample, delay_s))
            else:
                self._published = sample
                self._adapt()

    def _publish_later(self, sample: dict[str, NodeState], delay_s: float):
        yield self.env.timeout(delay_s)
        self._published = sample
        self._adapt()

    def _adapt(self) -> None:
        """Repartition when the published snapshot shows a quota change beyond the threshold."""
        if self.adapter is None:
            return
        decision = self.adapter.check(self._published, self.env.now)
        if decision is None:
            return
        self.adaptations.append(decision.to_dict())
        if decision.error is not None:
            self.warnings.append(f"adaptation at {self.env.now:.3f} s kept the old plan: {decision.error}")
            return
        # Requests already in flight finish on the old plan's segments; new requests use the new one.
        self.plan = self.adapter.plan
        for name, node in self.nodes.items():
            node.memory_used_bytes = self.adapter.memory_bytes(name)
            if name in decision.redeploy_ms:
                self.env.process(self._redeploy(node, decision.redeploy_ms[name]))

    def _redeploy(self, node: SimNode, duration_ms: float):
        # Shipping and loading weights occupies the node's link and its worker.
        with node.link.request() as link_slot, node.worker.request() as worker_slot:
            yield link_slot & worker_slot
            yield self.env.timeout(duration_ms / 1e3)

    def _capacity_changes(self):
        for change in sorted(self.scenario.adaptation.capacity_changes, key=lambda c: c.time_s):
            yield self.env.timeout(max(0.0, change.time_s - self.env.now))
            cpu = self.nodes[change.node].cpu
            cpu.cpus = change.cpus
            cpu.quota_ms = change.cpus * cpu.period_ms

    def _transfer(self, node: SimNode, n_bytes: int):
        with node.link.request() as slot:
            yield slot
            yield self.env.timeout(CostModel.transfer_ms(n_bytes, self.bandwidth_bps, self.hop_latency_ms) / 1e3)

    def _request(self, request_id: int):
        record = RequestRecord(request_id=request_id, arrival_s=self.env.now)
        self.records.append(record)
        batch = self.scenario.workload.batch
        for segment in self.plan.segments:
            task = StageTask(
                request_id=request_id,
                segment=segment,
                cpu_needed=DEFAULT_CPU_NEEDED,
                memory_needed_bytes=self.costs.segment_memory_bytes(segment.start, segment.stop),
            )
            try:
                name = self.scheduler.select(task, self._published)
            except NoNodeAvailable:
                record.fail(self.env.now, "no live node")
                return
            node = self.nodes[name]
            if not node.alive:
                # The scheduler chose from a stale snapshot; the request fails as it would on a dead container.
                record.fail(self.env.now, f"node {name} is down ({node.failure})")
                return
            in_bytes = self.graph.cut_bytes(segment.start) * batch
            if not self.scenario.policy.cache:
                in_bytes += self.graph.segment_param_bytes(segment.start, segment.stop)
            out_bytes = self.graph.cut_bytes(segment.stop) * batch
            stage_start_s = self.env.now
            if math.isnan(record.start_s):
                record.start_s = stage_start_s
            yield from self._transfer(node, in_bytes)
            cost = self.costs.segment_cost(segment.start, segment.stop, node.spec.torch_threads)
            with node.worker.request() as slot:
                yield slot
                exec_start_s = self.env.now
                work_ms = cost.cpu_ms * batch
                end_ms = node.cpu.run(exec_start_s * 1e3, work_ms, cost.parallelism)
                yield self.env.timeout(end_ms / 1e3 - exec_start_s)
                node.busy_cpu_ms += work_ms
            exec_ms = (self.env.now - exec_start_s) * 1e3
            self.scheduler.observe(name, exec_ms)
            yield from self._transfer(node, out_bytes)
            record.stage_nodes.append(name)
            record.stage_start_s.append(stage_start_s)
            record.stage_end_s.append(self.env.now)
            record.stage_exec_ms.append(exec_ms)
            record.bytes_moved += in_bytes + out_bytes
        record.complete(self.env.now)
        self._done += 1
        if self.progress:
            self.progress(self._done, self.scenario.workload.requests)

    def _closed_client(self, request_ids: range):
        think_s = self.scenario.workload.think_time_ms / 1e3
        for request_id in request_ids:
            yield self.env.process(self._request(request_id))
            if think_s > 0:
                yield self.env.timeout(think_s)

    def _open_source(self, arrivals_s, requests: list):
        for request_id, arrival_s in enumerate(arrivals_s):
            yield self.env.timeout(max(0.0, arrival_s - self.env.now))
            requests.append(self.env.process(self._request(request_id)))

    def run(self) -> SimResult:
        workload = self.scenario.workload
        self.env.process(self._monitor())
        if self.scenario.adaptation.capacity_changes:
            self.env.process(self._capacity_changes())
        arrivals_s = open_loop_arrivals_s(workload, self.scenario.seed)
        if arrivals_s is None:
            clients = [
                self.env.process(self._closed_client(range(c, workload.requests, workload.clients)))
                for c in range(workload.clients)
            ]
            self.env.run(until=simpy.AllOf(self.env, clients))
        else:
            requests: list = []
            source = self.env.process(self._open_source(arrivals_s, requests))
            self.env.run(until=source)
            self.env.run(until=simpy.AllOf(self.env, requests))
        self.records.sort(key=lambda r: r.request_id)
        summary = summarise(
            self.records,
            {name: node.busy_cpu_ms for name, node in self.nodes.items()},
            {name: node.spec.cpus for name, node in self.nodes.items()},
        )
        summary["plan"] = {"partitioner": self.plan.partitioner, "bounds": self.plan.bounds}
        if any(s.nodes for s in self.plan.segments):
            summary["plan"]["nodes"] = [list(s.nodes) for s in self.plan.segments]
        summary["warnings"] = list(self.warnings)
        if self.adapter is not None:
            summary["adaptations"] = self.adaptations
        for name, node in self.nodes.items():
            summary["nodes"][name]["throttled_stages"] = node.cpu.throttled_jobs
        return SimResult(self.records, summary, self.warnings)


def simulate(scenario: Scenario, costs: CostModel, *, progress: Callable[[int, int], None] | None = None) -> SimResult:
    return Simulation(scenario, costs, progress=progress).run()
