"""The SimPy engine: nodes with CFS-limited CPUs, links, a monitor and a coordinator.

Each request's stages go through the coordinator, as in real mode: the coordinator sends a
stage's input over the node's link, the node runs the segment when its worker is free, and
the output comes back over the same link. The scheduler picks the node of every stage from
the monitor's snapshots only.

Hot path: a node's uplink, worker and downlink are each a first-come-first-served single
server, so instead of a SimPy resource per server the engine keeps the time each becomes
free. A stage's input transfer, run and output transfer are then known the moment it is
dispatched, and the stage costs one timeout. Stages reach a node's worker in the order they
were dispatched to it (its uplink is FIFO), so this is the same queue a resource would give.
Links are full duplex: an output transfer never waits behind an input transfer.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from amp4ec import policies
from amp4ec.adapt import Adapter
from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.metrics import RequestRecord, summarise
from amp4ec.monitor import NodeState
from amp4ec.partition import Plan
from amp4ec.scenario import EventSpec, NodeSpec, Scenario
from amp4ec.schedule import NoNodeAvailable, Scheduler, StageTask
from amp4ec.sim.cfs import CfsCpu
from amp4ec.timeline import PAUSED_STAGE_TIMEOUT_S, first_kinds, ordered_events
from amp4ec.workload import open_loop_arrivals_s, request_count, rng_for

# CPUs a stage requests in the AMP4EC node filter. The published rule gives no value.
DEFAULT_CPU_NEEDED = 0.1
# The progress callback is called about this many times per run, not once per request.
PROGRESS_STEPS = 1000
# No nodes excluded from a stage's selection; one shared object, so the hot path allocates nothing.
NO_NODES: frozenset[str] = frozenset()


class NodeLost(Exception):
    """Interrupt cause: the node running a stage failed."""

    def __init__(self, node: str):
        super().__init__(node)
        self.node = node


class NodePaused(Exception):
    """Interrupt cause: the node running a stage froze; the stage waits for the resume."""


class StageTimedOut(Exception):
    """A stage waited on a paused node for longer than PAUSED_STAGE_TIMEOUT_S."""

    def __init__(self, node: str):
        super().__init__(node)
        self.node = node


# Measured with tracemalloc on a 3-stage run: about 1.4 kB per request record, most of it
# the four per-stage lists; the parquet table written at the end adds about 60 bytes per stage.
RECORD_BYTES = 500
RECORD_STAGE_BYTES = 320


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_in_memory(requests: int, stages: int) -> None:
    """Refuse, before the run, a workload whose records would not fit in the memory available."""
    needed_bytes = requests * (RECORD_BYTES + RECORD_STAGE_BYTES * stages)
    available_bytes = available_memory_bytes()
    if available_bytes is not None and needed_bytes > available_bytes:
        raise UsageError(
            f"{requests:,} requests of {stages} stages need about {needed_bytes / 2**30:.1f} GiB for their "
            f"records but {available_bytes / 2**30:.1f} GiB of memory is available; lower requests or "
            "split the run into several seeds",
            field="workload.requests",
        )


@dataclass(slots=True)
class SimNode:
    spec: NodeSpec
    cpu: CfsCpu
    memory_used_bytes: int
    bandwidth_bps: float
    latency_ms: float
    alive: bool = True
    failure: str = ""
    busy_cpu_ms: float = 0.0
    busy_cpu_ms_at_sample: float = 0.0
    background_cpus: float = 0.0
    quota_cpus: float = 0.0
    """the container's CFS quota: the spec's, until a capacity change; background work takes a share"""
    up_free_s: float = 0.0
    worker_free_s: float = 0.0
    down_free_s: float = 0.0
    epoch: int = 0
    """incremented when the node fails, so a stage can tell it outlived its container"""
    in_flight: dict = field(default_factory=dict)
    """request id -> the request's process, for the stages dispatched to this node"""
    resumed: simpy.Event | None = None
    """while the node is paused: the event its resume triggers; None while it runs"""
    paused_s: float = 0.0


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
        self.total_requests = request_count(scenario.workload)
        check_fits_in_memory(self.total_requests, len(self.plan.segments))
        self._stages = self._stage_table()
        # A node whose first event is join is absent until then, as in replay.
        self._first_kinds = first_kinds(scenario)
        self.nodes = {spec.name: self._make_node(spec) for spec in scenario.nodes}
        self.adapter = (
            Adapter(scenario, costs, self.plan, bandwidth_bps=self.bandwidth_bps, hop_latency_ms=self.hop_latency_ms)
            if scenario.adaptation.enabled
            else None
        )
        self._published: dict[str, NodeState] = {}
        self.records: list[RequestRecord] = []
        self._done = 0
        self._progress_step = max(1, self.total_requests // PROGRESS_STEPS)
        self._exponential = scenario.model.service == "exponential"
        self._service_rng = rng_for(scenario.seed, "service")
        self._service_draws = np.empty(0)
        self._service_next = 0
        # Pull dispatch: idle nodes in the order they became idle, and stages waiting for one.
        self._idle: deque[SimNode] = deque()
        self._waiting: deque[tuple[simpy.Event, frozenset[str] | None]] = deque()
        # Little's law: the number in system integrated over time, kept apart from the records.
        self._in_system = 0
        self._area_s = 0.0
        self._last_change_s = 0.0
        self._first_arrival_s = math.nan
        self.retries = 0

    def _stage_table(self) -> list[tuple]:
        """Per segment: its task, input and output bytes and assigned nodes, computed once per plan.

        Built at the start and again after each adaptation, rather than per request.
        """
        batch = self.scenario.workload.batch
        table = []
        for segment in self.plan.segments:
            task = StageTask(
                request_id=-1,
                segment=segment,
                cpu_needed=DEFAULT_CPU_NEEDED,
                memory_needed_bytes=self.costs.segment_memory_bytes(segment.start, segment.stop),
            )
            in_bytes = self.graph.cut_bytes(segment.start) * batch
            if not self.scenario.policy.cache:
                in_bytes += self.graph.segment_param_bytes(segment.start, segment.stop)
            out_bytes = self.graph.cut_bytes(segment.stop) * batch
            allowed = frozenset(segment.nodes) if segment.nodes else None
            table.append((segment, task, in_bytes, out_bytes, allowed))
        return table

    def _deployed_bytes(self, name: str) -> int:
        """Memory the current plan keeps resident on node ``name``: the runtime and its segments."""
        return self.costs.runtime_bytes + sum(
            self.costs.segment_memory_bytes(s.start, s.stop) for s in self.plan.segments_on(name)
        )

    def _make_node(self, spec: NodeSpec) -> SimNode:
        # A node's CFS phase depends on the seed and its name only, so adding nodes leaves the
        # others' phases alone; a hash is used because a generator per node is slow at 10,000 nodes.
        phase_ms = zlib.crc32(f"{self.scenario.seed}:cfs-phase:{spec.name}".encode()) / 2**32 * 100.0
        cpu = CfsCpu(spec.cpus, cores=spec.torch_threads, phase_ms=phase_ms)
        # Before the first request each segment is deployed on the nodes the plan assigns it to,
        # or on every node when it assigns none. Its weights and largest activation stay resident.
        memory_used = self._deployed_bytes(spec.name)
        bandwidth_bps = spec.bandwidth_mbps * 1e6 if spec.bandwidth_mbps is not None else self.bandwidth_bps
        latency_ms = spec.latency_ms if spec.latency_ms is not None else self.hop_latency_ms
        node = SimNode(
            spec=spec,
            cpu=cpu,
            memory_used_bytes=memory_used,
            bandwidth_bps=bandwidth_bps,
            latency_ms=latency_ms,
            quota_cpus=spec.cpus,
        )
        if not spec.present or self._first_kinds.get(spec.name) == "join":
            node.alive = False
            node.failure = "not joined"
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
        now = self.env.now
        for name, node in self.nodes.items():
            busy_ms = node.busy_cpu_ms - node.busy_cpu_ms_at_sample
            node.busy_cpu_ms_at_sample = node.busy_cpu_ms
            # The monitor reports the container's quota, which a capacity change alters; CPUs
            # taken by background work show as utilisation, as docker stats would show them.
            cpus = node.quota_cpus
            utilisation = min(1.0, busy_ms / (cpus * period_s * 1e3) + node.background_cpus / cpus) if now > 0 else 0.0
            states[name] = NodeState(
                name=name,
                time_s=now,
                cpus=cpus,
                memory_bytes=node.spec.memory_bytes,
                cpu_utilisation=utilisation,
                memory_used_bytes=min(node.memory_used_bytes, node.spec.memory_bytes),
                link_latency_ms=node.latency_ms,
                # A paused node sends the monitor no stats, as a frozen container sends none.
                alive=node.alive and node.resumed is None,
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
        if self.adapter is not None:
            self.adapter.step(self._published, self.env.now, self._switch_plan, self.warnings.append)

    def _switch_plan(self, decision) -> None:
        # Requests already in flight keep the stage table they started with, so they finish on
        # the old plan's segments; new requests take the new table.
        self.plan = self.adapter.plan
        self._stages = self._stage_table()
        ready_s = self.env.now
        for name, node in self.nodes.items():
            node.memory_used_bytes = self._deployed_bytes(name)
            if name in decision.redeploy_ms:
                ready_s = max(ready_s, self._redeploy(node, decision.redeploy_ms[name]))
        decision.ready_s = ready_s

    def _redeploy(self, node: SimNode, duration_ms: float) -> float:
        """Book the node's uplink and worker for shipping and loading the weights it newly hosts; return the end.

        The redeploy starts when both are free and keeps both busy until it ends, so stages dispatched
        afterwards queue behind it; stages already booked keep their times.
        """
        start_s = max(self.env.now, node.up_free_s, node.worker_free_s)
        node.up_free_s = node.worker_free_s = start_s + duration_ms / 1e3
        return node.worker_free_s

    # The dynamics timeline: one process applies every event, by time and then in list order,
    # the order the scenario checks replay.
    def _timeline(self, events: list[EventSpec]):
        for event in events:
            yield self.env.timeout(max(0.0, event.time_s - self.env.now))
            self._apply(event)

    def _set_worker_quota(self, node: SimNode) -> None:
        """Give the worker the container's quota less the CPUs background work takes.

        The quota changes in place, as a cgroup's does: the current period's accounting and the
        throttle count carry on, and stages that start afterwards run at the new quota.
        """
        cpus = max(1e-6, node.quota_cpus - node.background_cpus)
        node.cpu.cpus = cpus
        node.cpu.quota_ms = cpus * node.cpu.period_ms

    def _fresh_container(self, node: SimNode) -> None:
        now = self.env.now
        throttled_jobs = node.cpu.throttled_jobs
        node.cpu = CfsCpu(
            max(1e-6, node.quota_cpus - node.background_cpus), cores=node.spec.torch_threads, phase_ms=node.cpu.phase_ms
        )
        node.cpu.throttled_jobs = throttled_jobs
        node.up_free_s = node.worker_free_s = node.down_free_s = now

    def _deploy(self, node: SimNode):
        """Send every segment's weights over the node's link, load them, then take stages.

        The deployment before the run starts is not timed: the first request finds every
        node ready, as in the paper's experiments.
        """
        weight_bytes = sum(self.graph.segment_param_bytes(s.start, s.stop) for s in self.plan.segments_on(node.spec.name))
        deploy_ms = node.latency_ms + weight_bytes * 8e3 / node.bandwidth_bps + self.scenario.policy.load_time_ms
        yield self.env.timeout(deploy_ms / 1e3)
        if node.failure != "deploying":
            return
        node.alive = True
        node.failure = ""
        # The plan may have changed while the node was away; it is deployed as the plan is now.
        node.memory_used_bytes = self._deployed_bytes(node.spec.name)
        self._fresh_container(node)
        if self.scenario.policy.dispatch == "pull":
            self._release(node, node.epoch)

    def _apply(self, event: EventSpec) -> None:
        node = self.nodes[event.node]
        kind = event.kind
        if kind in ("join", "recover"):
            self._start(node)
        elif kind in ("leave", "fail"):
            self._stop(node, kind)
        elif kind == "restart":
            # The container restarts: work in flight is lost and its segments are deployed again.
            self._stop(node, "fail")
            self._start(node)
        elif kind == "pause":
            self._pause(node)
        elif kind == "resume":
            self._resume(node)
        elif kind == "cpu":
            node.quota_cpus = event.cpus
            self._set_worker_quota(node)
        elif kind == "background_load":
            node.background_cpus = event.cpus
            # The quota left for the worker changes from the next stage on.
            self._set_worker_quota(node)
        elif kind == "link_bandwidth":
            if event.bandwidth_mbps is not None:
                node.bandwidth_bps = event.bandwidth_mbps * 1e6
            if event.latency_ms is not None:
                node.latency_ms = event.latency_ms
        else:
            raise ValueError(f"event kind {kind!r} has no simulation; amp4ec.timeline.SUPPORTED_KINDS is out of date")

    def _start(self, node: SimNode) -> None:
        if node.resumed is not None:
            # Replay unpauses a paused container before it starts it again.
            self._resume(node)
        if node.alive or node.failure in ("oom", "deploying"):
            return
        node.failure = "deploying"
        self.env.process(self._deploy(node))

    def _stop(self, node: SimNode, kind: str) -> None:
        if node.failure == "deploying":
            node.failure = "left" if kind == "leave" else "failed"
            return
        if not node.alive:
            return
        if kind == "leave" and node.resumed is not None:
            # A paused node that leaves is thawed first, so its stages finish as on any leaving node.
            self._resume(node)
        node.alive = False
        node.failure = "left" if kind == "leave" else "failed"
        if kind == "fail":
            # A killed container is not paused any more; stages waiting for its resume are lost.
            resumed, node.resumed = node.resumed, None
            node.epoch += 1
            lost = list(node.in_flight.values())
            node.in_flight.clear()
            for process in lost:
                if process.is_alive:
                    process.interrupt(NodeLost(node.spec.name))
            self._fresh_container(node)
            if resumed is not None:
                resumed.succeed()
        if node in self._idle:
            self._idle.remove(node)

    def _pause(self, node: SimNode) -> None:
        """Freeze the node: stages in flight stop where they are and continue after the resume."""
        if not node.alive or node.resumed is not None:
            return
        node.resumed = self.env.event()
        node.paused_s = self.env.now
        for process in list(node.in_flight.values()):
            if process.is_alive:
                process.interrupt(NodePaused(node.spec.name))

    def _resume(self, node: SimNode) -> None:
        if node.resumed is None:
            return
        # Everything booked on the node after the pause began moves by the pause's length.
        frozen_s = self.env.now - node.paused_s
        for attribute in ("up_free_s", "worker_free_s", "down_free_s"):
            free_s = getattr(node, attribute)
            if free_s > node.paused_s:
                setattr(node, attribute, free_s + frozen_s)
        resumed, node.resumed = node.resumed, None
        resumed.succeed()

    def _wait_stage(self, node: SimNode, end_s: float, deadline_s: float):
        """Wait until a stage booked to end at ``end_s`` ends, standing still while its node is paused.

        NodeLost interrupts propagate to the caller. StageTimedOut is raised when the node is
        still paused at ``deadline_s``, as replay's request to a frozen worker times out.
        """
        env = self.env
        remaining_s = end_s - env.now
        while True:
            resumed = node.resumed
            if resumed is not None:
                # A failure interrupts this wait directly (the stage is in node.in_flight).
                yield resumed | env.timeout(max(0.0, deadline_s - env.now))
                if not resumed.triggered:
                    raise StageTimedOut(node.spec.name)
            started_s = env.now
            try:
                yield env.timeout(remaining_s)
                return
            except simpy.Interrupt as interrupt:
                if not isinstance(interrupt.cause, NodePaused):
                    raise
                remaining_s -= env.now - started_s

    def _work_ms(self, cpu_ms: float) -> float:
        if not self._exponential:
            return cpu_ms
        if self._service_next >= len(self._service_draws):
            self._service_draws = self._service_rng.exponential(1.0, size=65536)
            self._service_next = 0
        draw = self._service_draws[self._service_next]
        self._service_next += 1
        return cpu_ms * draw

    def _dispatch(self, node: SimNode, in_bytes: int, out_bytes: int, work_ms: float, parallelism: float):
        """Reserve the node's uplink, worker and downlink for one stage; return its times in s."""
        now = self.env.now
        in_end_s = max(now, node.up_free_s) + (node.latency_ms + in_bytes * 8e3 / node.bandwidth_bps) / 1e3
        node.up_free_s = in_end_s
        exec_start_s = max(in_end_s, node.worker_free_s)
        exec_end_s = node.cpu.run(exec_start_s * 1e3, work_ms, parallelism) / 1e3
        node.worker_free_s = exec_end_s
        out_end_s = max(exec_end_s, node.down_free_s) + (node.latency_ms + out_bytes * 8e3 / node.bandwidth_bps) / 1e3
        node.down_free_s = out_end_s
        return exec_start_s, exec_end_s, out_end_s

    def _pull(self, allowed: frozenset[str] | None):
        """Pull dispatch: wait until a node is idle and return it.

        ``allowed`` lists the nodes the plan assigns the stage to (None: any node); an idle
        node outside it is left for other stages.
        """
        if allowed is None:
            if self._idle:
                return self._idle.popleft()
        else:
            for node in self._idle:
                if node.spec.name in allowed:
                    self._idle.remove(node)
                    return node
        waiter = self.env.event()
        self._waiting.append((waiter, allowed))
        return (yield waiter)

    def _release(self, node: SimNode, epoch: int) -> None:
        if not node.alive or node.epoch != epoch:
            return
        name = node.spec.name
        for i, (waiter, allowed) in enumerate(self._waiting):
            if allowed is None or name in allowed:
                del self._waiting[i]
                waiter.succeed(node)
                return
        self._idle.append(node)

    def _arrive(self) -> None:
        now = self.env.now
        if self._in_system == 0 and math.isnan(self._first_arrival_s):
            self._first_arrival_s = now
            self._last_change_s = now
        self._area_s += self._in_system * (now - self._last_change_s)
        self._last_change_s = now
        self._in_system += 1

    def _leave(self) -> None:
        now = self.env.now
        self._area_s += self._in_system * (now - self._last_change_s)
        self._last_change_s = now
        self._in_system -= 1
        self._done += 1
        if self.progress and (self._done % self._progress_step == 0 or self._done == self.total_requests):
            self.progress(self._done, self.total_requests)

    def _request(self, request_id: int):
        env = self.env
        record = RequestRecord(request_id=request_id, arrival_s=env.now)
        self.records.append(record)
        self._arrive()
        policy = self.scenario.policy
        pull = policy.dispatch == "pull"
        retries_left = policy.max_retries if policy.on_failure == "retry" else 0
        process = env.active_process
        for segment, task, in_bytes, out_bytes, allowed in self._stages:
            # Nodes that refused or lost this stage; a retry picks among the others, as replay's does.
            excluded = NO_NODES
            while True:
                if pull:
                    if allowed is not None and not any(
                        self.nodes[n].alive or self.nodes[n].failure == "deploying" for n in allowed
                    ):
                        # No assigned node can take the stage now or after a deployment under way,
                        # as a push scheduler finds no live node among them.
                        record.fail(env.now, "no live node")
                        self._leave()
                        return
                    node = yield from self._pull(allowed)
                    name = node.spec.name
                else:
                    states = self._published
                    if excluded:
                        states = {n: state for n, state in states.items() if n not in excluded}
                    try:
                        name = self.scheduler.select(task, states)
                    except NoNodeAvailable:
                        record.fail(env.now, "no live node")
                        self._leave()
                        return
                    node = self.nodes[name]
                    if not node.alive:
                        # The scheduler chose from a stale snapshot; the stage is refused as a dead
                        # container would refuse it.
                        if retries_left > 0:
                            retries_left -= 1
                            record.retries += 1
                            self.retries += 1
                            excluded = excluded | {name}
                            continue
                        record.fail(env.now, f"node {name} is down ({node.failure})")
                        self._leave()
                        return
                stage_start_s = env.now
                if math.isnan(record.start_s):
                    record.start_s = stage_start_s
                cost = self.costs.segment_cost(segment.start, segment.stop, node.spec.torch_threads)
                work_ms = self._work_ms(cost.cpu_ms * self.scenario.workload.batch)
                exec_start_s, exec_end_s, out_end_s = self._dispatch(node, in_bytes, out_bytes, work_ms, cost.parallelism)
                epoch = node.epoch
                if pull:
                    env.timeout(exec_end_s - stage_start_s).callbacks.append(lambda _, n=node, e=epoch: self._release(n, e))
                node.in_flight[request_id] = process
                deadline_s = stage_start_s + PAUSED_STAGE_TIMEOUT_S
                cause = None
                try:
                    if node.resumed is None:
                        yield env.timeout(out_end_s - stage_start_s)
                    else:
                        # Sent to a paused node: the stage waits for the resume, then runs.
                        yield from self._wait_stage(node, out_end_s, deadline_s)
                        out_end_s = env.now
                except simpy.Interrupt as interrupt:
                    cause = interrupt.cause
                except StageTimedOut as timed_out:
                    cause = timed_out
                if isinstance(cause, NodePaused):
                    # The node froze mid-stage: the rest of the stage runs after the resume.
                    # NOTE: the CFS accounting and a pull release booked before the pause are not moved.
                    cause = None
                    try:
                        yield from self._wait_stage(node, out_end_s, deadline_s)
                        out_end_s = env.now
                    except simpy.Interrupt as interrupt:
                        cause = interrupt.cause
                    except StageTimedOut as timed_out:
                        cause = timed_out
                if cause is not None:
                    if not isinstance(cause, (NodeLost, StageTimedOut)):
                        raise RuntimeError(f"stage of request {request_id} interrupted by {cause!r}")
                    node.in_flight.pop(request_id, None)
                    if retries_left > 0:
                        retries_left -= 1
                        record.retries += 1
                        self.retries += 1
                        excluded = excluded | {name}
                        continue
                    if isinstance(cause, StageTimedOut):
                        reason = f"node {name} is paused and did not reply within {PAUSED_STAGE_TIMEOUT_S:g} s"
                    else:
                        reason = f"node {name} failed during stage {segment.id}"
                    record.fail(env.now, reason)
                    self._leave()
                    return
                node.in_flight.pop(request_id, None)
                break
            exec_ms = (exec_end_s - exec_start_s) * 1e3
            node.busy_cpu_ms += work_ms
            self.scheduler.observe(name, exec_ms)
            record.stage_nodes.append(name)
            record.stage_start_s.append(stage_start_s)
            record.stage_end_s.append(out_end_s)
            record.stage_exec_ms.append(exec_ms)
            record.bytes_moved += in_bytes + out_bytes
        record.complete(env.now)
        self._leave()

    def _closed_client(self, request_ids: range):
        think_s = self.scenario.workload.think_time_ms / 1e3
        for request_id in request_ids:
            yield self.env.process(self._request(request_id))
            if think_s > 0:
                yield self.env.timeout(think_s)

    def _open_source(self, arrivals_s, requests: list):
        env = self.env
        for request_id, arrival_s in enumerate(arrivals_s.tolist()):
            if arrival_s > env.now:
                yield env.timeout(arrival_s - env.now)
            requests.append(env.process(self._request(request_id)))

    def run(self) -> SimResult:
        workload = self.scenario.workload
        wall_start = time.perf_counter()
        self.env.process(self._monitor())
        if self.scenario.events:
            self.env.process(self._timeline(ordered_events(self.scenario)))
        if self.scenario.policy.dispatch == "pull":
            self._idle.extend(node for node in self.nodes.values() if node.alive)
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
            summary["adaptations"] = self.adapter.history
        summary["retries"] = self.retries
        summary["littles_law"] = self.littles_law()
        error = summary["littles_law"]["relative_error"]
        if self._in_system != 0 or (error is not None and error > 1e-6):
            # Both sides are computed independently, so a gap is a bookkeeping bug in the engine.
            self.warnings.append(f"Little's law check failed: {summary['littles_law']}")
            summary["warnings"] = list(self.warnings)
        summary["wall_time_s"] = time.perf_counter() - wall_start
        for name, node in self.nodes.items():
            summary["nodes"][name]["throttled_stages"] = node.cpu.throttled_jobs
        return SimResult(self.records, summary, self.warnings)

    def littles_law(self) -> dict:
        """L from the engine's own integral of the number in system; lambda and W from the records.

        Over the span from the first arrival to the last departure, with every request gone
        at the end, L = lambda * W holds exactly; the two sides are computed independently,
        so a bookkeeping error in either shows as a difference.
        """
        span_s = self._last_change_s - self._first_arrival_s
        if not span_s > 0 or not self.records:
            return {"L": None, "lambda_W": None, "relative_error": None, "in_system_at_end": self._in_system}
        time_average_l = self._area_s / span_s
        sojourn_s = np.array([r.end_s - r.arrival_s for r in self.records])
        arrival_rate = len(self.records) / span_s
        lambda_w = arrival_rate * float(sojourn_s.mean())
        return {
            "L": time_average_l,
            "lambda_W": lambda_w,
            "relative_error": abs(time_average_l - lambda_w) / lambda_w if lambda_w > 0 else 0.0,
            "in_system_at_end": self._in_system,
        }


def simulate(scenario: Scenario, costs: CostModel, *, progress: Callable[[int, int], None] | None = None) -> SimResult:
    return Simulation(scenario, costs, progress=progress).run()
