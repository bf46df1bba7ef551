"""The SimPy engine: nodes with CFS-limited CPUs, links, a monitor and a coordinator.

Each request's stages go through the coordinator, as in real mode: the coordinator sends a
stage's input over the node's link, the node runs the segment when its worker is free, and
the output comes back over the same link. The scheduler picks the node of every stage from
the monitor's snapshots only.

Hot path: a request is a chain of callbacks on SimPy events, not a SimPy process, and its
record is a row of preallocated columns (:mod:`amp4ec.sim.records`). A node's worker is a
first-come-first-served single server, so the engine keeps the time it becomes free instead
of a SimPy resource. Each direction of a node's link is a :class:`SharedLink`: concurrent
transfers share its bandwidth, and the link needs one event per finished transfer. A stage
therefore costs two events: its input arriving (when the worker's run is booked and the
output's start is known) and its output arriving. A stage sent to a node with nothing else
in flight costs one event instead, because both its transfers have their links to
themselves until something else reaches the node (Simulation._run_stage_direct). Links are
full duplex: output transfers never share bandwidth with input transfers.
"""

from __future__ import annotations

import gc
import math
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy
from simpy.events import URGENT

from amp4ec import policies
from amp4ec.adapt import Adapter
from amp4ec.costs import CostModel, idle_share
from amp4ec.errors import UsageError
from amp4ec.metrics import summarise_arrays
from amp4ec.monitor import NodeState
from amp4ec.partition import Plan
from amp4ec.scenario import EventSpec, LinkTimes, NodeSpec, Scenario, check_run_length
from amp4ec.schedule import NoNodeAvailable, Scheduler, StageTask, check_choice, raise_scheduler_failure
from amp4ec.sim.cfs import CfsCpu
from amp4ec.sim.links import SharedLink, schedule_at
from amp4ec.sim.records import COMPLETED, REQUEST_BYTES, STAGE_BYTES, RecordColumns
from amp4ec.timeline import PAUSED_STAGE_TIMEOUT_S, first_kinds, ordered_events
from amp4ec.workload import open_loop_arrivals_s, request_count, rng_for

# CPUs a stage requests in the AMP4EC node filter. The published rule gives no value.
DEFAULT_CPU_NEEDED = 0.1
# The progress callback is called about this many times per run, not once per request.
PROGRESS_STEPS = 1000
# No nodes excluded from a stage's selection; one shared object, so the hot path allocates nothing.
NO_NODES: frozenset[str] = frozenset()
# Epoch of a flow whose stage timed out on a paused node: no node has it, so the stage's
# remaining link and timer callbacks are ignored.
ABANDONED_EPOCH = -1
# Event kinds after which a node may be down or paused, so a request may end without a transfer.
NODE_STOPPING_KINDS = frozenset({"fail", "leave", "restart", "pause"})


class NodeLost(Exception):
    """Interrupt cause: the node running a stage failed."""

    def __init__(self, node: str):
        super().__init__(node)
        self.node = node


# Memory estimates for the check before a run. They are rounded up from the peak resident
# set size of a simulation that writes records.parquet, measured with Python 3.11 on
# scenarios/scale/10-nodes.toml and 10k-nodes.toml. The measurement gave about 120 MiB of
# imports, 9 kB per node (its spec, CFS state, links, snapshots, scheduler entries and
# summary) and 460 bytes per 3-stage request. REQUEST_OVERHEAD_BYTES covers a request's
# arrival time and summary arrays.
RUNTIME_BYTES = 150 * 2**20
NODE_BYTES = 10_000
REQUEST_OVERHEAD_BYTES = 100


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimated_run_bytes(nodes: int, requests: int, stages: int) -> int:
    """Estimate the memory a run's state and records take at their peak (writing records.parquet)."""
    # The columns are built once while running and copied once into the Parquet table.
    per_request_bytes = 2 * (REQUEST_BYTES + STAGE_BYTES * stages) + REQUEST_OVERHEAD_BYTES
    return RUNTIME_BYTES + nodes * NODE_BYTES + requests * per_request_bytes


def check_fits_in_memory(requests: int, stages: int, nodes: int = 0) -> None:
    """Reject, before the run, a scenario whose state and records would not fit in the memory available."""
    needed_bytes = estimated_run_bytes(nodes, requests, stages)
    available_bytes = available_memory_bytes()
    if available_bytes is None or needed_bytes <= available_bytes:
        return
    message = (
        f"{requests:,} requests of {stages} stages on {nodes:,} nodes need about {needed_bytes / 2**30:.1f} GiB "
        f"(an estimate) but {available_bytes / 2**30:.1f} GiB of memory is available; "
    )
    if nodes * NODE_BYTES > estimated_run_bytes(0, requests, stages) - RUNTIME_BYTES:
        raise UsageError(message + "use fewer nodes (nodes or node_groups counts)", field="nodes")
    raise UsageError(message + "lower workload.requests or split the run into several seeds", field="workload.requests")


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
    uplink: SharedLink | None = None
    downlink: SharedLink | None = None
    index: int = 0
    """position in the scenario's node list, the node's id in the record columns"""
    worker_free_s: float = -math.inf
    """when the worker's last booked run ends; -inf until it has run, so its first stage finds it idle"""
    epoch: int = 0
    """incremented when the node fails, so a stage can tell it outlived its container"""
    in_flight: dict = field(default_factory=dict)
    """request id -> the request's flow, for the stages dispatched to this node other than direct_flow"""
    paused_since_s: float | None = None
    """while the node is paused: when the pause began; None while it runs"""
    frozen_s: float = 0.0
    """total length of the node's finished pauses, so a stage can tell how long its node was paused"""
    parked: list = field(default_factory=list)
    """(flow, continuation, remaining s) of the stages that reached an event while the node was paused"""
    direct_flow: "RequestFlow | None" = None
    """the flow whose stage was computed in one step, without the links, and has not ended (see _run_stage_direct)"""
    name: str = ""
    """the spec's name, kept here because the hot path reads it once per stage"""


@dataclass
class SimResult:
    records: RecordColumns
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
        workload = scenario.workload
        if workload.kind == "trace" and "requests" in workload.model_fields_set and workload.requests > self.total_requests:
            self.warnings.append(
                f"workload.requests = {workload.requests} but the trace has {self.total_requests} rows; "
                f"{self.total_requests} requests are simulated"
            )
        check_fits_in_memory(self.total_requests, len(self.plan.segments), len(scenario.nodes))
        self._segment_memory: dict[tuple[int, int], int] = {}
        self._stages = self._stage_table()
        # A node whose first event is join is absent until then, as in replay.
        self._first_kinds = first_kinds(scenario)
        self.nodes = {spec.name: self._make_node(spec) for spec in scenario.nodes}
        for index, node in enumerate(self.nodes.values()):
            node.index = index
        self._warn_extrapolation(scenario)
        self.adapter = (
            Adapter(scenario, costs, self.plan, bandwidth_bps=self.bandwidth_bps, hop_latency_ms=self.hop_latency_ms)
            if scenario.adaptation.enabled
            else None
        )
        self._published: dict[str, NodeState] = {}
        self.records = RecordColumns(self.total_requests, list(self.nodes))
        self._all_done = self.env.event()
        self._arrivals_s: list[float] = []
        self._next_arrival = 0
        self._pull = scenario.policy.dispatch == "pull"
        # Stages on a node with nothing else in flight are computed in one step (see
        # _run_stage_direct). Pull dispatch releases nodes at events of its own, so it always
        # goes through the links.
        self._direct_stages = not self._pull
        # One bound method for every direct stage's end event, rather than a new one per stage.
        self._end_direct_stage = self._direct_output_arrived
        self._batch = scenario.workload.batch
        # (segment start, stop, torch threads, container CPU quota) -> (busy CPU ms per request,
        # parallelism, cold start ms, idle minus busy CPU ms, idle curve). A node's CfsCpu has as
        # many cores as the node has torch threads.
        self._costs: dict[tuple[int, int, int, float], tuple[float, float, float, float, tuple]] = {}
        # Fitting the idle curves imports scipy (about 0.15 s), part of building the simulation
        # rather than of its first stages. Nodes added later fit theirs on first use.
        for threads in {node.cpu.cores for node in self.nodes.values()}:
            costs.idle_curve(threads)
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

    def _warn_extrapolation(self, scenario: Scenario) -> None:
        """Warn when nodes have more CPUs or threads than any calibrated profile, or less CPU than their thread count's profiles.

        The fit extrapolates the costs of such nodes along its quota exponent.
        """
        profiles = self.costs.calibration.profiles
        max_cpus = max(p.cpus for p in profiles)
        max_threads = max(p.threads for p in profiles)
        below = []
        for spec in scenario.nodes:
            count, same = self.costs.profiles_for_threads(spec.torch_threads)
            min_cpus = min(p.cpus for p in same)
            if spec.cpus < min_cpus:
                below.append((spec, count, min_cpus))
        if below:
            example, count, min_cpus = below[0]
            self.warnings.append(
                f"{len(below)} node(s), such as {example.name} (cpus {example.cpus:g}, {example.torch_threads} threads), "
                f"have less CPU than every calibrated profile with {count} thread(s) (at least {min_cpus:g} CPUs): "
                "their costs are extrapolated by the fitted model and can be far off; calibrate a profile like them "
                "(amp4ec calibrate --profile NAME:CPUS:MEMORY_MB:THREADS)"
            )
        beyond = [spec for spec in scenario.nodes if spec.cpus > max_cpus or spec.torch_threads > max_threads]
        if not beyond:
            return
        example = beyond[0]
        self.warnings.append(
            f"{len(beyond)} node(s), such as {example.name} (cpus {example.cpus:g}, {example.torch_threads} threads), "
            f"exceed the calibrated profiles (at most {max_cpus:g} CPUs and {max_threads} threads): their costs are "
            "extrapolated by the fitted model and can be far off; calibrate a profile like them "
            "(amp4ec calibrate --profile NAME:CPUS:MEMORY_MB:THREADS) or set threads on the node"
        )

    def _deployed_bytes(self, name: str) -> int:
        """Memory the current plan keeps resident on node ``name``: the runtime and its segments."""
        return self.costs.runtime_bytes + sum(self._segment_memory_bytes(s) for s in self.plan.segments_on(name))

    def _segment_memory_bytes(self, segment) -> int:
        """Return the segment's resident memory, computed once per segment rather than once per node."""
        key = (segment.start, segment.stop)
        memory_bytes = self._segment_memory.get(key)
        if memory_bytes is None:
            memory_bytes = self._segment_memory[key] = self.costs.segment_memory_bytes(segment.start, segment.stop)
        return memory_bytes

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
            name=spec.name,
        )
        node.uplink = SharedLink(self.env, bandwidth_bps)
        node.downlink = SharedLink(self.env, bandwidth_bps)
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
                alive=node.alive and node.paused_since_s is None,
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
        """Book the node's worker for shipping and loading the weights it newly hosts; return the end.

        The redeploy starts when the worker is free and keeps it busy until it ends, so stages
        booked afterwards queue behind it. Stages already booked keep their times.
        """
        # NOTE: the weights do not take a share of the uplink here; inputs keep its full bandwidth.
        self._settle_direct(node)
        start_s = max(self.env.now, node.worker_free_s)
        node.worker_free_s = start_s + duration_ms / 1e3
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
        self._settle_direct(node)
        throttled_jobs = node.cpu.throttled_jobs
        node.cpu = CfsCpu(
            max(1e-6, node.quota_cpus - node.background_cpus), cores=node.spec.torch_threads, phase_ms=node.cpu.phase_ms
        )
        node.cpu.throttled_jobs = throttled_jobs
        # The new container has run nothing yet, so its first stage pays an idle call's work.
        node.worker_free_s = -math.inf
        node.uplink.reset()
        node.downlink.reset()

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
        # Every event below may change the node's worker, CPU or links.
        self._settle_direct(node)
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
                node.uplink.set_bandwidth(node.bandwidth_bps)
                node.downlink.set_bandwidth(node.bandwidth_bps)
            if event.latency_ms is not None:
                node.latency_ms = event.latency_ms
        else:
            raise ValueError(f"event kind {kind!r} has no simulation; amp4ec.timeline.SUPPORTED_KINDS is out of date")

    def _start(self, node: SimNode) -> None:
        if node.paused_since_s is not None:
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
        if kind == "leave" and node.paused_since_s is not None:
            # A paused node that leaves is thawed first, so its stages finish as on any leaving node.
            self._resume(node)
        node.alive = False
        node.failure = "left" if kind == "leave" else "failed"
        if kind == "fail":
            # A killed container is not paused any more. The stages parked on it are in
            # in_flight too, so they are lost with the others.
            if node.paused_since_s is not None:
                node.frozen_s += self.env.now - node.paused_since_s
                node.paused_since_s = None
            node.parked.clear()
            node.epoch += 1
            lost = list(node.in_flight.values())
            node.in_flight.clear()
            for flow in lost:
                if flow.is_alive:
                    flow.interrupt(NodeLost(node.spec.name))
            self._fresh_container(node)
        if node in self._idle:
            self._idle.remove(node)

    # Pause. A stage whose input arrives, or whose output would arrive, while its node is
    # paused is parked on the node. It continues after the resume with the time it still had
    # to go. A stage whose event falls after the resume is held back by the time the node was
    # paused since the stage was sent. Links keep moving bytes during a pause.
    # NOTE: a pause moves the worker's booking and the stage's own events only. The link
    # shares, the CFS accounting and a pull release booked before the pause keep their times.

    def _pause(self, node: SimNode) -> None:
        """Freeze the node: stages in flight stop where they are and continue after the resume."""
        if not node.alive or node.paused_since_s is not None:
            return
        node.paused_since_s = self.env.now
        for flow in list(node.in_flight.values()):
            self._watch_deadline(flow, node)

    def _resume(self, node: SimNode) -> None:
        if node.paused_since_s is None:
            return
        now = self.env.now
        paused_s = node.paused_since_s
        # The worker's bookings after the pause began move by the pause's length.
        if node.worker_free_s > paused_s:
            node.worker_free_s += now - paused_s
        node.frozen_s += now - paused_s
        node.paused_since_s = None
        parked, node.parked = node.parked, []
        for flow, continuation, remaining_s in parked:
            # The time parked is spent; only the time the stage still had to go is left.
            flow.frozen_mark_s = node.frozen_s
            self._continue_later(flow, node, continuation, remaining_s)

    def _frozen_until(self, node: SimNode, now_s: float) -> float:
        """Return the node's total paused time up to ``now_s``, the current pause included."""
        if node.paused_since_s is None:
            return node.frozen_s
        return node.frozen_s + now_s - node.paused_since_s

    def _hold(self, flow: "RequestFlow", node: SimNode, continuation: Callable[["RequestFlow"], None]) -> bool:
        """Delay a stage's event by the time its node was paused since the stage was sent; True if delayed.

        While the node is paused the flow is parked on it until the resume.
        """
        now = self.env.now
        frozen_s = self._frozen_until(node, now)
        lag_s = frozen_s - flow.frozen_mark_s
        flow.frozen_mark_s = frozen_s
        if node.paused_since_s is not None:
            node.parked.append((flow, continuation, max(0.0, lag_s)))
            return True
        if lag_s <= 0:
            return False
        self._continue_later(flow, node, continuation, lag_s)
        return True

    def _continue_later(self, flow: "RequestFlow", node: SimNode, continuation, delay_s: float) -> None:
        epoch = flow.epoch

        def go(_event) -> None:
            # A failure or a timeout since then has taken the stage away.
            if flow.epoch == epoch and node.epoch == epoch:
                continuation(flow)

        self.env.timeout(delay_s).callbacks.append(go)

    def _watch_deadline(self, flow: "RequestFlow", node: SimNode) -> None:
        """Count the stage as lost if the node is paused and the stage unfinished PAUSED_STAGE_TIMEOUT_S after it was sent.

        Replay's request to a frozen worker times out after the same time.
        """
        stage_start_s = flow.stage_start_s
        deadline_s = stage_start_s + PAUSED_STAGE_TIMEOUT_S

        def check(_event) -> None:
            if (
                node.paused_since_s is not None
                and flow.node is node
                and flow.stage_start_s == stage_start_s
                and node.in_flight.get(flow.request_id) is flow
            ):
                self._time_out(flow, node)

        self.env.timeout(max(0.0, deadline_s - self.env.now)).callbacks.append(check)

    def _time_out(self, flow: "RequestFlow", node: SimNode) -> None:
        """Give up a stage on a paused node: retry it on another node or fail the request."""
        del node.in_flight[flow.request_id]
        # The stage's link and parked callbacks still refer to this flow; a successor carries
        # the request on, and the abandoned flow's events are ignored.
        successor = flow.successor()
        flow.epoch = ABANDONED_EPOCH
        flow.is_alive = False
        name = node.spec.name
        if self._pull and flow.exec_ms < 0:
            # The worker was never booked for the stage, so no release is due. The node goes
            # back to the idle nodes now, as it would have once its stage ended.
            self._release(node, node.epoch)
        if self._use_retry(successor):
            successor.exclude(name)
            self._next_stage(successor)
            return
        self._finish(successor, f"node {name} is paused and did not reply within {PAUSED_STAGE_TIMEOUT_S:g} s")

    def _work_ms(self, cpu_ms: float) -> float:
        if not self._exponential:
            return cpu_ms
        if self._service_next >= len(self._service_draws):
            self._service_draws = self._service_rng.exponential(1.0, size=65536)
            self._service_next = 0
        draw = self._service_draws[self._service_next]
        self._service_next += 1
        return cpu_ms * draw

    def _pull_node(self, allowed: frozenset[str] | None, flow: "RequestFlow") -> None:
        """Pull dispatch: run the flow's stage on an idle node, now or once one is released.

        ``allowed`` lists the nodes the plan assigns the stage to (None: any node); an idle
        node outside it is left for other stages.
        """
        if allowed is None:
            if self._idle:
                self._run_stage(flow, self._idle.popleft())
                return
        else:
            for node in self._idle:
                if node.spec.name in allowed:
                    self._idle.remove(node)
                    self._run_stage(flow, node)
                    return
        waiter = self.env.event()
        waiter.callbacks.append(lambda event: self._run_stage(flow, event.value))
        self._waiting.append((waiter, allowed))

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

    # A request's life, as callbacks. RequestFlow keeps its state between events.

    def _start_request(self, request_id: int) -> None:
        self._start_flow(RequestFlow(self, request_id))

    def _next_stage(self, flow: "RequestFlow") -> None:
        """Pick a node for the flow's current stage (or finish the request) and dispatch it."""
        if flow.stage == len(flow.stages):
            self._finish(flow, None)
            return
        segment, task, in_bytes, out_bytes, allowed = flow.stages[flow.stage]
        if self._pull:
            if allowed is not None and not any(self.nodes[n].alive or self.nodes[n].failure == "deploying" for n in allowed):
                # No assigned node can take the stage now or after a deployment under way,
                # as a push scheduler finds no live node among them.
                self._finish(flow, "no live node")
                return
            self._pull_node(allowed, flow)
            return
        while True:
            states = self._published
            if flow.excluded:
                # A retry picks among the nodes that have not refused or lost this stage, as replay's does.
                states = {n: state for n, state in states.items() if n not in flow.excluded}
            try:
                name = self.scheduler.select(task, states)
            except NoNodeAvailable:
                self._finish(flow, "no live node")
                return
            except Exception as error:
                raise_scheduler_failure(self.scenario.policy.scheduler, error)
            node = self.nodes.get(name)
            if node is None:
                check_choice(self.scenario.policy.scheduler, name, self.nodes)
            if node.alive:
                break
            # The scheduler chose from a stale snapshot; the stage is refused as a dead
            # container would refuse it.
            if not self._use_retry(flow):
                self._finish(flow, f"node {name} is down ({node.failure})")
                return
            flow.exclude(name)
        self._run_stage(flow, node)

    def _use_retry(self, flow: "RequestFlow") -> bool:
        if flow.retries_left <= 0:
            return False
        flow.retries_left -= 1
        self.records.retries[flow.request_id] += 1
        self.retries += 1
        return True

    def _run_stage(self, flow: "RequestFlow", node: SimNode) -> None:
        """Send the stage's input to ``node``; the rest follows when the input has arrived."""
        now = self.env.now
        segment, _, in_bytes, _, _ = flow.stages[flow.stage]
        records = self.records
        if flow.stage == 0 and math.isnan(records.start_s[flow.request_id]):
            records.start_s[flow.request_id] = now
        key = (segment.start, segment.stop, node.cpu.cores, node.quota_cpus)
        cost = self._costs.get(key)
        if cost is None:
            # The calibration's fit gives the work at this thread count and quota, measured or not.
            idle = self.costs.segment_cost(*key)
            busy = self.costs.busy_segment_cost(*key)
            # A wait for the quota in mid-stage leaves the rest of the stage cold, as an idle gap does.
            cold_ms = self.costs.cold_start(key[2], key[3]).cpu_ms
            curve = self.costs.idle_curve(key[2])
            cost = self._costs[key] = (busy.cpu_ms * self._batch, idle.parallelism, cold_ms, (idle.cpu_ms - busy.cpu_ms) * self._batch, curve)
        flow.node = node
        flow.epoch = node.epoch
        flow.stage_start_s = now
        if self._exponential:
            draw = self._work_ms(1.0)
            flow.busy_ms = cost[0] * draw
            flow.idle_extra_ms = cost[3] * draw
        else:
            flow.busy_ms = cost[0]
            flow.idle_extra_ms = cost[3]
        flow.idle_curve = cost[4]
        flow.parallelism = cost[1]
        flow.resume_ms = cost[2]
        # Negative until the input has arrived and the worker is booked.
        flow.exec_ms = -1.0
        # A direct stage enters in_flight only when _settle_direct hands it to the links, so
        # settling it before this stage enters keeps in_flight in the order stages were sent.
        if node.direct_flow is not None:
            self._settle_direct(node)
        flow.frozen_mark_s = node.frozen_s
        if node.paused_since_s is not None:
            # Sent to a paused node: the stage waits for the resume, for at most PAUSED_STAGE_TIMEOUT_S.
            node.in_flight[flow.request_id] = flow
            flow.frozen_mark_s = self._frozen_until(node, now)
            self._watch_deadline(flow, node)
        elif not node.in_flight and self._direct_stages and node.uplink.idle and node.downlink.idle:
            self._run_stage_direct(flow, node, in_bytes, now)
            return
        else:
            node.in_flight[flow.request_id] = flow
        node.uplink.send(in_bytes, node.latency_ms, flow.input_arrived)

    def _run_stage_direct(self, flow: "RequestFlow", node: SimNode, in_bytes: float, now: float) -> None:
        """Compute the whole stage on a node with nothing else in flight, with one event for its end.

        Unless another stage or a timeline event reaches the node first, the input and the
        output each have their link to themselves, so their arrivals follow in closed form,
        with the same float operations as the links' timers. The worker is booked now for
        the time the input will arrive. Whatever reaches the node before the stage ends calls
        _settle_direct first, which hands the stage to the links as if it had been sent
        through them, so the records are the same as without this path.
        """
        input_s = node.uplink.alone_arrival_s(in_bytes, node.latency_ms, now)
        flow.input_s = input_s
        flow.booking_undo = (node.worker_free_s, node.cpu.save_state())
        output_start_s = flow.output_start_s = self._book_worker(flow, node, input_s)
        out_bytes = flow.stages[flow.stage][3]
        output_s = node.downlink.alone_arrival_s(out_bytes, node.latency_ms, input_s, output_start_s)
        # The event's value is the flow, and the flow refers to the event until it is processed.
        event = flow.direct_event = schedule_at(self.env, output_s, flow)
        event.callbacks.append(self._end_direct_stage)
        node.direct_flow = flow

    def _direct_output_arrived(self, event: simpy.Event) -> None:
        flow = event.value
        if flow.direct_event is not event:
            # The stage was handed to the links before its input arrived, and its flow has moved on.
            return
        # This breaks the reference cycle between the flow and its event. A cycle that outlived
        # its event would stay in memory until the run ends, because the cyclic collector is off
        # until then.
        flow.direct_event = None
        node = flow.node
        if node.direct_flow is not flow:
            # The stage was handed to the links, whose timers carry it on.
            return
        node.direct_flow = None
        # Any event on the node since the stage was sent would have handed the stage to the
        # links, so the node has the stage's epoch and has not been paused.
        self._end_stage(flow, node)

    def _settle_direct(self, node: SimNode) -> None:
        """Hand the node's direct stage, if any, to its links, as they would carry it had it gone through them."""
        flow = node.direct_flow
        if flow is None:
            return
        node.direct_flow = None
        node.in_flight[flow.request_id] = flow
        _, _, in_bytes, out_bytes, _ = flow.stages[flow.stage]
        # NOTE: at a tie (now equal to the input's arrival) the input counts as arrived. Through
        # the links the order would follow the creation order of the two events instead.
        if self.env.now < flow.input_s:
            # The input is still on its way, so the worker is not booked yet.
            node.worker_free_s, cpu_state = flow.booking_undo
            node.cpu.restore_state(cpu_state)
            flow.exec_ms = -1.0
            node.uplink.adopt(in_bytes, node.latency_ms, flow.input_arrived, flow.stage_start_s)
        else:
            node.downlink.adopt(
                out_bytes,
                node.latency_ms,
                flow.output_arrived,
                flow.input_s,
                start_s=flow.output_start_s,
                timer=flow.direct_event,
            )

    def _input_arrived(self, flow: "RequestFlow") -> None:
        """Book the worker for the stage (first come, first served) and the output transfer after it."""
        node = flow.node
        if node.epoch != flow.epoch:
            return
        if (node.paused_since_s is not None or node.frozen_s != flow.frozen_mark_s) and self._hold(
            flow, node, self._input_arrived
        ):
            return
        now = self.env.now
        exec_end_s = self._book_worker(flow, node, now)
        if self._pull:
            epoch = node.epoch
            self.env.timeout(exec_end_s - now).callbacks.append(lambda _: self._release(node, epoch))
        out_bytes = flow.stages[flow.stage][3]
        node.downlink.send(out_bytes, node.latency_ms, flow.output_arrived, start_s=exec_end_s)

    def _book_worker(self, flow: "RequestFlow", node: SimNode, input_s: float) -> float:
        """Book the worker for the stage whose input arrives at ``input_s``; return when its run ends."""
        exec_start_s = max(input_s, node.worker_free_s)
        # The longer the worker idled since its last run, the closer the stage's work is to an idle call's.
        flow.work_ms = flow.busy_ms + flow.idle_extra_ms * idle_share(flow.idle_curve, (exec_start_s - node.worker_free_s) * 1e3)
        exec_end_s = node.cpu.run(exec_start_s * 1e3, flow.work_ms, flow.parallelism, flow.resume_ms) / 1e3
        flow.cold_ms = node.cpu.last_cold_ms
        node.worker_free_s = exec_end_s
        flow.exec_ms = (exec_end_s - exec_start_s) * 1e3
        return exec_end_s

    def _output_arrived(self, flow: "RequestFlow") -> None:
        node = flow.node
        if node.epoch != flow.epoch:
            return
        if (node.paused_since_s is not None or node.frozen_s != flow.frozen_mark_s) and self._hold(
            flow, node, self._output_arrived
        ):
            return
        node.in_flight.pop(flow.request_id, None)
        self._end_stage(flow, node)

    def _end_stage(self, flow: "RequestFlow", node: SimNode) -> None:
        """Record the stage whose output has arrived and go on to the request's next stage."""
        request_id = flow.request_id
        node.busy_cpu_ms += flow.work_ms + flow.cold_ms
        self.scheduler.observe(node.name, flow.exec_ms)
        _, _, in_bytes, out_bytes, _ = flow.stages[flow.stage]
        records = self.records
        # RecordColumns.add_stage, inlined on the hot path.
        records.stage_request.append(request_id)
        records.stage_node.append(node.index)
        records.stage_start_s.append(flow.stage_start_s)
        records.stage_end_s.append(self.env.now)
        records.stage_exec_ms.append(flow.exec_ms)
        records.bytes_moved[request_id] += in_bytes + out_bytes
        flow.stage += 1
        if flow.excluded:
            flow.excluded = NO_NODES
        self._next_stage(flow)

    def _node_lost(self, flow: "RequestFlow") -> None:
        """Run the stage again elsewhere after its node failed, or fail the request when no retry is left."""
        if self._use_retry(flow):
            flow.exclude(flow.node.spec.name)
            self._next_stage(flow)
            return
        segment = flow.stages[flow.stage][0]
        self._finish(flow, f"node {flow.node.spec.name} failed during stage {segment.id}")

    def _finish(self, flow: "RequestFlow", failure: str | None) -> None:
        """End the request: completed when ``failure`` is None, else failed for that reason."""
        flow.is_alive = False
        if failure is None:
            self.records.end_s[flow.request_id] = self.env.now
            self.records.outcome[flow.request_id] = COMPLETED
        else:
            self.records.fail(flow.request_id, self.env.now, failure)
        self._leave()
        if flow.on_done is not None:
            flow.on_done()
        if self._done == self.total_requests:
            self._all_done.succeed()

    # Workloads

    def _later(self, callback: Callable[[], None], delay_s: float = 0.0, *, urgent: bool = False) -> None:
        """Call ``callback`` after ``delay_s``; urgent: now, before the events already due now."""
        if urgent:
            event = simpy.Event(self.env)
            event._ok = True
            event._value = None
            event.callbacks.append(lambda _: callback())
            self.env.schedule(event, URGENT)
        else:
            self.env.timeout(delay_s).callbacks.append(lambda _: callback())

    def _closed_client(self, request_ids: range) -> None:
        """Send the client's requests one after another, ``think_time_ms`` after each reply.

        The steps go through the same events a SimPy process per client and per request would,
        so equal-time events keep the order they had when requests were processes.
        """
        think_s = self.scenario.workload.think_time_ms / 1e3
        ids = iter(request_ids)

        def send_next() -> None:
            request_id = next(ids, None)
            if request_id is not None:
                flow = RequestFlow(self, request_id)
                flow.on_done = lambda: self._later(after_reply)
                self._later(lambda: self._start_flow(flow), urgent=True)

        def after_reply() -> None:
            if think_s > 0:
                self._later(send_next, think_s)
            else:
                send_next()

        self._later(send_next, urgent=True)

    def _start_flow(self, flow: "RequestFlow") -> None:
        self.records.arrival_s[flow.request_id] = self.env.now
        self._arrive()
        self._next_stage(flow)

    def _open_arrivals(self, _event=None) -> None:
        """Start every request due now, then wait for the next arrival time."""
        arrivals_s = self._arrivals_s
        now = self.env.now
        first = self._next_arrival
        last = first + 1
        while last < len(arrivals_s) and not arrivals_s[last] > now:
            last += 1
        self._next_arrival = last
        if last < len(arrivals_s):
            self.env.timeout(arrivals_s[last] - now).callbacks.append(self._open_arrivals)
        for request_id in range(first, last):
            self._start_request(request_id)

    def _open_source(self) -> None:
        if not self._arrivals_s:
            return
        if self._arrivals_s[0] > self.env.now:
            self.env.timeout(self._arrivals_s[0] - self.env.now).callbacks.append(self._open_arrivals)
        else:
            self._open_arrivals()

    def run(self) -> SimResult:
        workload = self.scenario.workload
        wall_start = time.perf_counter()
        self.env.process(self._monitor())
        if self.scenario.events:
            self.env.process(self._timeline(ordered_events(self.scenario)))
        if self.scenario.policy.dispatch == "pull":
            self._idle.extend(node for node in self.nodes.values() if node.alive)
        arrivals_s = open_loop_arrivals_s(workload, self.scenario.seed)
        # Checked again here: a trace's length is known only now, and a scenario copied with
        # overrides (compare-policies --requests) was not validated again.
        last_arrival_s = float(arrivals_s[-1]) if arrivals_s is not None and len(arrivals_s) else None
        try:
            check_run_length(self.scenario, last_arrival_s, self.link_times())
        except ValueError as error:
            raise UsageError(str(error), field="workload") from None
        if arrivals_s is None:
            # Clients beyond the request count would never send one, as in the replay.
            for c in range(min(workload.clients, workload.requests)):
                self._closed_client(range(c, workload.requests, workload.clients))
        else:
            self._arrivals_s = arrivals_s.tolist()
            self._later(self._open_source, urgent=True)
        # Requests create no reference cycles (refcounting frees their flows and events), but
        # every monitor snapshot adds a tracked object per node, so the cyclic collector's full
        # passes cost more the more nodes there are. Switching it off for the run took the CPU
        # time per request at 10,000 nodes from about 225 to 182 us (60,000 requests, 2-core VM).
        collecting = gc.isenabled()
        gc.disable()
        try:
            if self.total_requests:
                self.env.run(until=self._all_done)
        finally:
            if collecting:
                gc.enable()
        summary = self._summarise()
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

    def link_times(self) -> LinkTimes | None:
        """Return lower bounds on the time requests spend on links, or None when a request may end without a transfer.

        A request fails at once, before any transfer, when no live node may run its stage, or
        when its scheduler raises NoNodeAvailable. Neither happens while every node is up and a
        built-in scheduler (or pull dispatch) picks the nodes, so the bounds hold until the first
        event that may stop a node (``valid_until_s``). Adaptation redeploys segments, and a node
        that is deploying takes no stages, so it is left out too.
        """
        if self.adapter is not None or not all(node.alive for node in self.nodes.values()):
            return None
        if not self._pull and type(self.scheduler) not in policies.BUILT_IN_SCHEDULERS:
            return None
        # Each stage sends its input over the node's uplink, and its output back over the
        # downlink once the segment has run, so a request's transfers follow one another.
        in_bits = sum(in_bytes for _, _, in_bytes, _, _ in self._stages) * 8.0
        out_bits = sum(out_bytes for _, _, _, out_bytes, _ in self._stages) * 8.0
        hops = 2 * len(self._stages)
        # Each node link's highest bandwidth, and the smallest per-hop cost, over the whole run.
        peak_bps = {name: node.bandwidth_bps for name, node in self.nodes.items()}
        min_latency_ms = min(node.latency_ms for node in self.nodes.values())
        for event in self.scenario.events:
            if event.bandwidth_mbps is not None:
                peak_bps[event.node] = max(peak_bps[event.node], event.bandwidth_mbps * 1e6)
            if event.latency_ms is not None:
                min_latency_ms = min(min_latency_ms, event.latency_ms)
        fastest_bps = max(peak_bps.values())
        total_bps = sum(peak_bps.values())
        return LinkTimes(
            request_s=(in_bits + out_bits) / fastest_bps + hops * min_latency_ms / 1e3,
            # Inputs cross the uplinks while outputs cross the downlinks, so the busier direction bounds the time.
            all_requests_s=self.total_requests * max(in_bits, out_bits) / total_bps,
            max_bandwidth_mbps=fastest_bps / 1e6,
            total_bandwidth_mbps=total_bps / 1e6,
            valid_until_s=min((e.time_s for e in self.scenario.events if e.kind in NODE_STOPPING_KINDS), default=math.inf),
        )

    def _summarise(self) -> dict:
        records = self.records
        outcome = records.outcome_array()
        return summarise_arrays(
            arrival_s=records.float_column("arrival_s"),
            end_s=records.float_column("end_s"),
            completed=outcome == COMPLETED,
            failure_reasons=[records.reasons[i] for i in sorted(records.reasons)],
            stages_per_node=records.stage_counts_by_node(),
            node_busy_cpu_ms={name: node.busy_cpu_ms for name, node in self.nodes.items()},
            node_cpus={name: node.spec.cpus for name, node in self.nodes.items()},
        )

    def littles_law(self) -> dict:
        """L from the engine's own integral of the number in system; lambda and W from the records.

        Over the span from the first arrival to the last departure, with every request gone
        at the end, L = lambda * W holds exactly; the two sides are computed independently,
        so a bookkeeping error in either shows as a difference.
        """
        span_s = self._last_change_s - self._first_arrival_s
        if not span_s > 0 or not len(self.records):
            return {"L": None, "lambda_W": None, "relative_error": None, "in_system_at_end": self._in_system}
        time_average_l = self._area_s / span_s
        sojourn_s = self.records.float_column("end_s") - self.records.float_column("arrival_s")
        arrival_rate = len(self.records) / span_s
        lambda_w = arrival_rate * float(sojourn_s.mean())
        return {
            "L": time_average_l,
            "lambda_W": lambda_w,
            "relative_error": abs(time_average_l - lambda_w) / lambda_w if lambda_w > 0 else 0.0,
            "in_system_at_end": self._in_system,
        }


class RequestFlow:
    """One request's state between the events of its stages."""

    __slots__ = (
        "sim",
        "request_id",
        "stages",
        "stage",
        "retries_left",
        "node",
        "epoch",
        "stage_start_s",
        "busy_ms",
        "idle_extra_ms",
        "idle_curve",
        "work_ms",
        "resume_ms",
        "cold_ms",
        "parallelism",
        "exec_ms",
        "is_alive",
        "on_done",
        "excluded",
        "frozen_mark_s",
        "input_s",
        "output_start_s",
        "booking_undo",
        "direct_event",
    )

    def __init__(self, sim: Simulation, request_id: int):
        policy = sim.scenario.policy
        self.sim = sim
        self.request_id = request_id
        # A request keeps the stage table it started with, so an adaptation does not split it.
        self.stages = sim._stages
        self.stage = 0
        self.retries_left = policy.max_retries if policy.on_failure == "retry" else 0
        self.node: SimNode | None = None
        self.epoch = 0
        self.stage_start_s = 0.0
        self.busy_ms = 0.0
        """CPU ms of the stage right after its node's previous run"""
        self.idle_extra_ms = 0.0
        """CPU ms an idle node's run costs beyond busy_ms (negative where idle runs cost less)"""
        self.idle_curve: tuple[tuple[float, float], ...] = ((0.0, 1.0),)
        """CostModel.idle_curve of the node's thread count"""
        self.work_ms = 0.0
        """CPU ms of the booked run"""
        self.resume_ms = 0.0
        """CPU ms the stage adds after each wait for its node's CFS quota"""
        self.cold_ms = 0.0
        """CPU ms that the stage's booked run added after waits for the quota"""
        self.parallelism = 1.0
        self.exec_ms = 0.0
        self.is_alive = True
        self.on_done: Callable[[], None] | None = None
        # Nodes that refused or lost the current stage.
        self.excluded = NO_NODES
        # The node's total paused time, as far as this stage's events have waited for it.
        self.frozen_mark_s = 0.0
        # A direct stage's input arrival, output start, the worker and CPU state before its
        # booking, and the event of its end (see Simulation._run_stage_direct).
        self.input_s = 0.0
        self.output_start_s = 0.0
        self.booking_undo: tuple = ()
        self.direct_event: simpy.Event | None = None

    def successor(self) -> "RequestFlow":
        """Return a flow that carries the request on from its current stage, with its retry budget."""
        flow = RequestFlow(self.sim, self.request_id)
        flow.stages = self.stages
        flow.stage = self.stage
        flow.retries_left = self.retries_left
        flow.on_done = self.on_done
        flow.excluded = self.excluded
        return flow

    def exclude(self, name: str) -> None:
        self.excluded = self.excluded | {name}

    def input_arrived(self) -> None:
        self.sim._input_arrived(self)

    def output_arrived(self) -> None:
        self.sim._output_arrived(self)

    def interrupt(self, cause: NodeLost) -> None:
        """Lose the stage in flight; the flow goes on at an urgent event, as a SimPy interrupt would."""
        self.sim._later(lambda: self.sim._node_lost(self), urgent=True)


def simulate(scenario: Scenario, costs: CostModel, *, progress: Callable[[int, int], None] | None = None) -> SimResult:
    return Simulation(scenario, costs, progress=progress).run()
