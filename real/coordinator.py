"""The replay coordinator: many requests in flight, a monitor, and the scenario's dynamics.

Every request in flight runs in a thread of the workload driver. While one request runs
stage 2 on node B, another can run stage 1 on node A, so the stages pipeline. Each worker
serves the messages queued on it one at a time, as the simulator's workers do.

Activations travel one of two ways (``[replay] transport``). With "forward", the default,
the coordinator sends the input to the first stage's worker, and each worker sends its
outputs straight to the next one. The last worker returns the result and every stage's
timings. The scheduler picks each stage's node when the stage before has finished, or the
whole route at dispatch (``[replay] route``, see forward.py). With
"relay", each stage's output comes back to the coordinator, which picks the next stage's
node and sends it there over the thread's own REQ socket to that worker.

Faults come from the scenario's ``[[events]]`` timeline and are applied to the containers
with the Docker API. The coordinator learns that a node went down from the Docker call it
made itself, which stands in for the connection errors a remote coordinator would see. A
stage in flight on a node that goes down is cancelled at once and retried on another node
up to ``policy.max_retries`` times per request (with ``on_failure = "retry"``); a forwarded
request is retried as a whole, from its first stage. After that the request fails with the
reason. Every request ends completed or failed, exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from amp4ec.errors import DockerError, WorkerError
from amp4ec.metrics import RequestRecord
from amp4ec.monitor import NodeState
from amp4ec.schedule import NoNodeAvailable, StageTask, check_choice, raise_scheduler_failure

log = logging.getLogger(__name__)

# Same CPU request per stage as the simulator's AMP4EC node filter.
DEFAULT_CPU_NEEDED = 0.1
# Seconds a stage may wait for its reply. A paused node delays its requests up to this long.
STAGE_TIMEOUT_S = 60.0
# Seconds `docker stop` waits for SIGTERM before SIGKILL (leave, restart).
STOP_TIMEOUT_S = 2
# Seconds the monitor waits for every worker's first stats push at the start and its final stats at the end.
START_STATS_TIMEOUT_S = 5.0
# How often the container of a node that stays silent is inspected again.
RECHECK_SILENT_S = 1.0


@dataclass
class NodeRuntime:
    """The coordinator's view of one node's container during the run."""

    name: str
    cpus: float
    memory_bytes: int
    address: str
    up: bool = True
    paused: bool = False
    down_reason: str = ""
    # Bumped whenever the node goes down or comes back, so a stage started before the change
    # is cancelled and clients reconnect to the (possibly new) address.
    generation: int = 0
    busy_cpu_ns: int = 0
    last_usage_ns: int | None = None
    pause_method: str = ""

    @property
    def serving(self) -> bool:
        return self.up and not self.paused


class NodeTable:
    """Thread-safe node states, shared by request threads, the monitor and the dynamics thread."""

    def __init__(self, nodes: list[NodeRuntime]):
        self._nodes = {node.name: node for node in nodes}
        self.lock = threading.RLock()

    def __getitem__(self, name: str) -> NodeRuntime:
        return self._nodes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def names(self) -> list[str]:
        return list(self._nodes)

    def cancelled(self, name: str, generation: int, aborted: threading.Event) -> Callable[[], bool]:
        node = self._nodes[name]
        return lambda: node.generation != generation or not node.up or aborted.is_set()


class StatsMonitor:
    """Turns the cgroup counters each worker pushes into NodeStates, published every ``monitor.period_s``.

    Every worker pushes its own counters at the scenario's monitor period over the links (see
    links.py); the coordinator never polls. As the simulator's monitor does, this one
    publishes a snapshot of every node once per period, after ``monitor.delay_s``: a serving
    node with its latest pushed state, a node that is down or paused as not alive. A node
    whose last push is older than three periods (at least 1 s) has stopped reporting, as a
    killed or unreachable container does: it is published as not alive, so schedulers stop
    sending it stages, and it is named in ``silent``. ``on_silent(name)``, when set, runs in the
    monitor's thread for each node that falls silent (the coordinator checks its container).
    CPU time is accumulated from differences between pushes, so a restarted container, whose
    cpuacct.usage starts again from zero, keeps its earlier CPU time.
    """

    method = "push"

    def __init__(self, scenario, table: NodeTable, hop_latency_ms: float):
        self.scenario = scenario
        self.table = table
        self.hop_latency_ms = hop_latency_ms
        self.links = None
        self._published: dict[str, NodeState] = {}
        self._latest: dict[str, tuple[float, NodeState]] = {}
        self._previous: dict[str, tuple[float, int]] = {}
        self._utilisation: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Set when the replay is aborted: the silence of nodes it is shutting down is not reported.
        self.quiet = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="amp4ec-monitor", daemon=True)
        self.samples = 0
        self.missed = 0
        self.pushes = 0
        self.silent: set[str] = set()
        """nodes silent now; one that reports again leaves the set"""
        self.silences: Counter[str] = Counter()
        """per node, how many times it fell silent during the run"""
        self._checked_at: dict[str, float] = {}
        self.on_silent: Callable[[str], None] | None = None

    def start(self) -> None:
        """Wait up to a few seconds for a first push from every serving node, publish, and start the period."""
        serving = [name for name in self.table.names() if self.table[name].serving]
        arrived = self.links.request_stats(serving, period_s=self.scenario.monitor.period_s, timeout_s=START_STATS_TIMEOUT_S)
        for name in sorted(set(serving) - set(arrived)):
            self.silent.add(name)
            self.silences[name] += 1
            log.warning("monitor: no stats from node %s within %g s of the start; it takes no stages until it reports", name, START_STATS_TIMEOUT_S)
        self._publish(self._sample())
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing, and take a final sample of every serving node so its CPU time is complete."""
        self._stop.set()
        self._thread.join(timeout=10)
        if self.quiet.is_set():
            # An aborted replay writes no summary, and its workers may be gone already.
            return
        serving = [name for name in self.table.names() if self.table[name].serving]
        # A reply, not a periodic push, so it does not wait for the monitor period (1000 s in some scenarios).
        arrived = self.links.request_stats(serving, period_s=0, timeout_s=START_STATS_TIMEOUT_S)
        for name in sorted(set(serving) - set(arrived)):
            self.missed += 1
            log.warning("monitor: node %s sent no final stats; its CPU time ends at its last push", name)
        # The nodes that replied are current, however long a silent one kept the request waiting.
        self._publish(self._sample(replied=set(arrived)))

    def snapshot(self) -> dict[str, NodeState]:
        with self._lock:
            return dict(self._published)

    def on_stats(self, name: str, stats: dict) -> None:
        """Take one pushed stats message (runs in the links' I/O thread)."""
        node = self.table[name]
        if not node.up:
            # A push from a container already marked down must not revive it.
            return
        state = self._state_from_stats(node, stats)
        with self._lock:
            self.pushes += 1
            self._latest[name] = (time.monotonic(), state)

    def _publish(self, sample: dict[str, NodeState]) -> None:
        with self._lock:
            self._published = sample

    def _down_state(self, node: NodeRuntime) -> NodeState:
        return NodeState(node.name, time.time(), node.cpus, node.memory_bytes, 1.0, node.memory_bytes, math.inf, alive=False)

    def _sample(self, replied: set[str] = frozenset()) -> dict[str, NodeState]:
        """Return every node's published state; a node in ``replied`` counts as reporting whatever its last push's age."""
        self.samples += 1
        stale_after_s = max(3 * self.scenario.monitor.period_s, 1.0)
        now = time.monotonic()
        states = {}
        to_check: list[str] = []
        for name in self.table.names():
            node = self.table[name]
            with self._lock:
                latest = self._latest.get(name)
            if not node.serving or latest is None:
                states[name] = self._down_state(node)
                continue
            received_s, state = latest
            if now - received_s > stale_after_s and name not in replied:
                self.missed += 1
                # Each spell of silence is reported and checked, also one after the node came back.
                if name not in self.silent:
                    self.silent.add(name)
                    self.silences[name] += 1
                    self._checked_at[name] = now
                    if not self.quiet.is_set():
                        log.warning("monitor: node %s has sent no stats for %.1f s; it takes no stages until it reports", name, now - received_s)
                        to_check.append(name)
                elif now - self._checked_at.get(name, 0.0) >= RECHECK_SILENT_S and not self.quiet.is_set():
                    # A container paused from outside can be killed while still silent.
                    self._checked_at[name] = now
                    to_check.append(name)
                states[name] = replace(state, cpus=node.cpus, alive=False)
                continue
            self.silent.discard(name)
            # The CPU limit can change live (set_cpus), so the snapshot carries the current one.
            states[name] = state if state.cpus == node.cpus else replace(state, cpus=node.cpus)
        if self.on_silent is not None:
            for name in to_check:
                self.on_silent(name)
        return states

    def _state_from_stats(self, node: NodeRuntime, stats: dict) -> NodeState:
        now = stats.get("time_s") or time.time()
        usage_ns = int(stats.get("cpu_usage_ns") or 0)
        with self.table.lock:
            if node.last_usage_ns is not None:
                # A smaller counter means a new cgroup (restart): count it from zero.
                node.busy_cpu_ns += usage_ns - node.last_usage_ns if usage_ns >= node.last_usage_ns else usage_ns
            node.last_usage_ns = usage_ns
        previous = self._previous.get(node.name)
        # Utilisation is measured over at least half a period, as the simulator's monitor measures it
        # over a whole one. The window between the connect-time and the start samples is a few
        # milliseconds long, and over it an idle node read 100 % busy, which kept the scheduler off
        # that node for the whole first period. Until a full window exists a node reports 0, as the
        # simulator's first sample does.
        utilisation = self._utilisation.get(node.name, 0.0)
        if previous is None or usage_ns < previous[1]:
            self._previous[node.name] = (now, usage_ns)
        elif now - previous[0] >= 0.5 * self.scenario.monitor.period_s:
            utilisation = (usage_ns - previous[1]) / 1e9 / ((now - previous[0]) * node.cpus)
            self._previous[node.name] = (now, usage_ns)
        self._utilisation[node.name] = utilisation
        return NodeState(
            name=node.name,
            time_s=now,
            cpus=node.cpus,
            memory_bytes=node.memory_bytes,
            cpu_utilisation=min(1.0, max(0.0, utilisation)),
            memory_used_bytes=int(stats.get("memory_usage_bytes") or 0),
            link_latency_ms=self.hop_latency_ms,
        )

    def _loop(self) -> None:
        period_s = self.scenario.monitor.period_s
        delay_s = self.scenario.monitor.delay_s
        while not self._stop.wait(period_s):
            sample = self._sample()
            if delay_s > 0:
                timer = threading.Timer(delay_s, self._publish, args=(sample,))
                timer.daemon = True
                timer.start()
            else:
                self._publish(sample)


class Coordinator:
    """Drives requests through the plan's stages on the cluster, from any number of threads."""

    def __init__(self, scenario, plan, graph, scheduler, cluster, blobs: dict[str, bytes], table: NodeTable, hop_latency_ms: float):
        self.scenario = scenario
        self.plan = plan
        self.graph = graph
        self.scheduler = scheduler
        self.cluster = cluster
        self.blobs = blobs
        self.table = table
        # The simulator's rule: retries per request, over all its stages.
        self.retries = scenario.policy.max_retries if scenario.policy.on_failure == "retry" else 0
        self._scheduler_lock = threading.Lock()
        self._local = threading.local()
        self._clients_lock = threading.Lock()
        self._all_clients: list = []
        replay = getattr(scenario, "replay", None)
        self.transport = replay.transport if replay is not None else "forward"
        self.route_decision = replay.route if replay is not None else "per_stage"
        self.monitor = StatsMonitor(scenario, table, hop_latency_ms)
        self.monitor.on_silent = self._check_container
        from amp4ec.real.links import WorkerLinks

        self.links = WorkerLinks(self.monitor.on_stats, monitor_period_s=scenario.monitor.period_s)
        self.monitor.links = self.links
        for name in table.names():
            self.links.connect(name, table[name].address)
        self.t0 = time.perf_counter()
        self.aborted = threading.Event()
        self.monitor.quiet = self.aborted
        # One line per node whose container stopped outside the scenario's events, for the run's summary.
        self.stopped_outside: list[str] = []
        # Per node, the spell of silence whose outside pause is already reported.
        self._pause_reported: dict[str, int] = {}

    def _check_container(self, name: str) -> None:
        """Mark a silent node down when its container is no longer running or was restarted, so its stages in flight are retried now.

        A container killed or restarted outside the scenario's events (by docker kill, docker
        restart or the OOM killer) would otherwise hold each request routed to it until the
        stage timeout. A restarted worker has lost its segments and its stats link.
        """
        import docker.errors

        container = getattr(self.cluster, "containers", {}).get(name)
        if container is None:
            return
        try:
            container.reload()
        except docker.errors.NotFound:
            status, exit_code, oom = "removed", None, False
        except docker.errors.DockerException as error:
            log.warning("monitor: cannot inspect the container of silent node %s: %s", name, error)
            return
        else:
            state = container.attrs.get("State", {})
            status, exit_code, oom = container.status, state.get("ExitCode"), bool(state.get("OOMKilled"))
        started_at = getattr(self.cluster, "started_at", {}).get(name)
        restarted = status == "running" and started_at is not None and state.get("StartedAt") != started_at
        if status == "paused" and not self.table[name].paused:
            # Its stages in flight wait for the stage timeout, and it serves again once resumed.
            # The container is inspected again while it stays silent, with one warning per spell.
            spell = self.monitor.silences[name]
            if self._pause_reported.get(name) == spell:
                return
            self._pause_reported[name] = spell
            reason = f"container paused outside the scenario's events before {self.now_s():.2f} s; it takes no stages until it reports again"
            if not self.aborted.is_set():
                log.warning("node %s: %s", name, reason)
                self.stopped_outside.append(f"node {name}: {reason}")
            return
        if status in ("running", "paused") and not restarted:
            return
        if restarted:
            reason = f"container restarted outside the scenario's events before {self.now_s():.2f} s; its worker lost its segments"
        else:
            cause = "OOM-killed" if oom else f"{status}, exit code {exit_code}"
            reason = f"container stopped outside the scenario's events ({cause}) before {self.now_s():.2f} s"
        # After a signal the replay removes the containers itself.
        if not self.aborted.is_set():
            log.warning("node %s: %s; its stages in flight are retried per policy", name, reason)
            self.stopped_outside.append(f"node {name}: {reason}")
        mark_down(self, name, reason)

    def abort(self) -> None:
        """Cancel every stage in flight and fail the requests not yet finished (on a signal or an error)."""
        self.aborted.set()

    def now_s(self) -> float:
        return time.perf_counter() - self.t0

    def client(self, name: str):
        """Return this thread's client of node ``name``, reconnecting after the node came back."""
        from amp4ec.real.client import WorkerClient

        cache = getattr(self._local, "clients", None)
        if cache is None:
            cache = self._local.clients = {}
        node = self.table[name]
        entry = cache.get(name)
        if entry is None or entry[0] != node.generation or entry[1].address != node.address:
            if entry is not None:
                entry[1].close()
            client = WorkerClient(node.address, node=name, timeout_s=STAGE_TIMEOUT_S)
            with self._clients_lock:
                self._all_clients.append(client)
            cache[name] = (node.generation, client)
        return cache[name][1]

    def close(self) -> None:
        with self._clients_lock:
            for client in self._all_clients:
                client.close()
            self._all_clients.clear()
        self.links.close()

    def choose_route(self, request_id: int, segments, excluded: set[str]) -> list[tuple]:
        """Return (segment, node) for every stage, all chosen now from one monitor snapshot.

        The scheduler is called once per stage, in stage order, with no ``observe`` between
        the calls, because the route is fixed before its first stage runs. Raises
        NoNodeAvailable when a stage has no live node.
        """
        states = {name: state for name, state in self.monitor.snapshot().items() if name not in excluded}
        with self._scheduler_lock, self._plugin_errors():
            route = [(segment, self.scheduler.select(self._task(request_id, segment), states)) for segment in segments]
        for _, name in route:
            check_choice(self.scenario.policy.scheduler, name, self.table)
        return route

    def choose_stage(self, request_id: int, segment, excluded: set[str]) -> str:
        """Return the node for one stage, chosen now from the latest monitor snapshot."""
        return self._select(self._task(request_id, segment), excluded)

    def observe(self, name: str, exec_ms: float) -> None:
        """Tell the scheduler a stage's execution time on node ``name``."""
        with self._scheduler_lock:
            self.scheduler.observe(name, exec_ms)

    def _select(self, task: StageTask, excluded: set[str]) -> str:
        states = {name: state for name, state in self.monitor.snapshot().items() if name not in excluded}
        with self._scheduler_lock, self._plugin_errors():
            name = self.scheduler.select(task, states)
        check_choice(self.scenario.policy.scheduler, name, self.table)
        return name

    @contextlib.contextmanager
    def _plugin_errors(self) -> Iterator[None]:
        """Turn an exception of a plug-in scheduler's select() into a usage error that ends the replay."""
        try:
            yield
        except NoNodeAvailable:
            raise
        except Exception as error:
            raise_scheduler_failure(self.scenario.policy.scheduler, error)

    def _task(self, request_id: int, segment) -> StageTask:
        return StageTask(
            request_id=request_id,
            segment=segment,
            cpu_needed=DEFAULT_CPU_NEEDED,
            memory_needed_bytes=self.graph.segment_param_bytes(segment.start, segment.stop)
            + self.graph.segment_peak_activation_bytes(segment.start, segment.stop),
        )

    def run_request(self, request_id: int, x: np.ndarray, arrival_s: float) -> tuple[RequestRecord, np.ndarray | None]:
        """Run one request through every stage; return its record and its final output (None on failure)."""
        if self.transport == "forward":
            from amp4ec.real.forward import run_forwarded

            return run_forwarded(self, request_id, x, arrival_s)
        record = RequestRecord(request_id=request_id, arrival_s=arrival_s)
        tensors = [x]
        for segment in self.plan.segments:
            if self.aborted.is_set():
                record.fail(self.now_s(), "replay aborted")
                return record, None
            task = self._task(request_id, segment)
            outcome = self._run_stage(record, task, tensors)
            if outcome is None:
                return record, None
            tensors = outcome
        record.complete(self.now_s())
        return record, tensors[0] if len(tensors) == 1 else None

    def _run_stage(self, record: RequestRecord, task: StageTask, tensors: list[np.ndarray]) -> list[np.ndarray] | None:
        """Run one stage, retrying on other nodes per policy; on final failure mark the record failed."""
        excluded: set[str] = set()
        errors: list[str] = []
        budget = self.retries - record.retries
        for attempt in range(budget + 1):
            try:
                name = self._select(task, excluded)
            except NoNodeAvailable:
                reason = "no live node" if not errors else f"no live node after {'; '.join(errors)}"
                record.fail(self.now_s(), reason)
                return None
            node = self.table[name]
            generation = node.generation
            stage_start_s = self.now_s()
            if math.isnan(record.start_s):
                record.start_s = stage_start_s
            try:
                if not node.up:
                    raise WorkerError(f"node is down ({node.down_reason})", node=name)
                outputs, timing = self.client(name).run(
                    task.segment.id, tensors, cancelled=self.table.cancelled(name, generation, self.aborted)
                )
            except WorkerError as error:
                errors.append(f"stage {task.segment.id} attempt {attempt + 1} on {name}: {error}")
                excluded.add(name)
                # After a signal the replay cancels its own stages, which are not failures to report.
                if not self.aborted.is_set():
                    log.warning("request %d: %s", record.request_id, errors[-1])
                if attempt < budget:
                    record.retries += 1
                continue
            stage_end_s = self.now_s()
            with self._scheduler_lock:
                self.scheduler.observe(name, timing["wall_ms"])
            record.stage_nodes.append(name)
            record.stage_start_s.append(stage_start_s)
            record.stage_end_s.append(stage_end_s)
            record.stage_exec_ms.append(timing["wall_ms"])
            record.bytes_moved += sum(t.nbytes for t in tensors) + sum(t.nbytes for t in outputs)
            return outputs
        record.fail(self.now_s(), "; ".join(errors))
        return None


@dataclass
class AppliedEvent:
    at_s: float
    node: str
    action: str
    applied_s: float = math.nan
    done_s: float = math.nan
    cpus: float | None = None
    method: str = ""
    error: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not (isinstance(v, float) and math.isnan(v))}


@dataclass
class DynamicsRunner:
    """Applies the scenario's dynamics timeline to the containers, in its own thread."""

    coordinator: Coordinator
    events: list
    applied: list[AppliedEvent] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="amp4ec-dynamics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=STAGE_TIMEOUT_S)

    def _loop(self) -> None:
        for event in sorted(self.events, key=lambda e: e.at_s):
            wait_s = event.at_s - self.coordinator.now_s()
            if wait_s > 0 and self._stop.wait(wait_s):
                return
            applied = AppliedEvent(event.at_s, event.node, event.action, applied_s=self.coordinator.now_s(), cpus=event.cpus)
            try:
                apply_action(self.coordinator, event.node, event.action, event.cpus)
                if event.action in ("pause", "resume"):
                    applied.method = self.coordinator.table[event.node].pause_method
            except (DockerError, WorkerError) as error:
                applied.error = str(error)
                log.error("dynamics: %s on node %s failed: %s", event.action, event.node, error)
            except Exception as error:  # a Docker API failure must not kill the timeline silently
                applied.error = f"{type(error).__name__}: {error}"
                log.error("dynamics: %s on node %s failed: %s", event.action, event.node, applied.error)
            applied.done_s = self.coordinator.now_s()
            self.applied.append(applied)


def mark_down(coordinator: Coordinator, name: str, reason: str) -> None:
    node = coordinator.table[name]
    with coordinator.table.lock:
        node.up = False
        node.down_reason = reason
        node.generation += 1


def bring_up(coordinator: Coordinator, name: str, *, deadline_s: float = 120.0) -> None:
    """Wait for a started container's worker, deploy every segment on it, and mark it up."""
    from amp4ec.real.client import WorkerClient
    from amp4ec.real.containers import WORKER_PORT, container_address

    container = coordinator.cluster.containers[name]
    network = coordinator.cluster.network_name
    deadline = time.monotonic() + deadline_s
    address = None
    while address is None:
        container.reload()
        ip = container_address(container, network)
        if ip:
            address = f"tcp://{ip}:{WORKER_PORT}"
        elif time.monotonic() > deadline:
            raise DockerError(f"node {name} has no address on network {network} after starting")
        else:
            time.sleep(0.1)
    with WorkerClient(address, node=name, timeout_s=STAGE_TIMEOUT_S) as client:
        while True:
            try:
                client.ping(timeout_s=1.0)
                break
            except WorkerError:
                if time.monotonic() > deadline:
                    raise
        deploy_segments(client, name, coordinator.plan, coordinator.graph, coordinator.blobs)
    node = coordinator.table[name]
    with coordinator.table.lock:
        node.address = address
        node.up = True
        node.paused = False
        node.down_reason = ""
        node.generation += 1
        # The new container's cpuacct.usage starts from zero.
        node.last_usage_ns = 0
    # The new worker needs the coordinator's link (for the last hop's replies) and a new
    # monitor subscription.
    coordinator.links.connect(name, address)


def deploy_segments(client, node: str, plan, graph, blobs: dict[str, bytes]) -> None:
    """Load the plan's segments for ``node`` on its worker and run each once on zeros, untimed.

    The untimed call takes lazy initialisation out of the measurement. Without it the first
    request on each node looks many times slower, and a scheduler that remembers execution
    times (AMP4EC's load) may never pick that node again.
    """
    for segment in plan.segments_on(node):
        client.load(segment.id, blobs[segment.id])
        zeros = [np.zeros(t.shape, dtype=t.dtype) for t in graph.cuts[segment.start].tensors]
        client.run(segment.id, zeros)


def set_nano_cpus(container, cpus: float) -> None:
    """Change a running container's CPU limit (docker update --cpus)."""
    api = container.client.api
    # docker-py 7's update_container has no nano_cpus argument; the Engine API accepts NanoCpus.
    response = api._post_json(api._url("/containers/{0}/update", container.id), data={"NanoCpus": int(round(cpus * 1e9))})
    api._result(response, True)


def pause_container(container) -> str:
    """Freeze a container; return the method used, "freezer" or "sigstop".

    `docker pause` uses the cgroup freezer. Where the freezer fails (seen on a nested VM with
    cgroup v1: "OCI runtime pause failed: unable to freeze"), the worker process gets SIGSTOP
    from the host instead. The worker is the container's only process, so the effect on its
    requests is the same: they wait until resume.
    """
    import docker.errors

    try:
        container.pause()
        return "freezer"
    except docker.errors.APIError as error:
        if "freeze" not in str(error):
            raise
        log.warning("docker pause failed (%s); stopping the worker with SIGSTOP instead", error)
    container.kill(signal="SIGSTOP")
    return "sigstop"


def note_start(coordinator: Coordinator, name: str) -> None:
    """Record a container's start time after the scenario started it anew, so that the monitor does not take it for an outside restart."""
    started_at = getattr(coordinator.cluster, "started_at", None)
    if started_at is not None:
        container = coordinator.cluster.containers[name]
        container.reload()
        started_at[name] = container.attrs.get("State", {}).get("StartedAt")


def reshape(coordinator: Coordinator, name: str) -> None:
    """Shape a node's link again after its container started anew, which resets its qdiscs."""
    shapes = getattr(coordinator.cluster, "shapes", None)
    if shapes and name in shapes:
        coordinator.cluster.apply_shaping(name)


def apply_action(coordinator: Coordinator, name: str, action: str, cpus: float | None) -> None:
    import docker.errors

    container = coordinator.cluster.containers[name]
    node = coordinator.table[name]
    log.info("dynamics: %s node %s at %.2f s", action, name, coordinator.now_s())
    try:
        if action == "fail":
            mark_down(coordinator, name, f"failed at {coordinator.now_s():.2f} s")
            container.kill()
        elif action == "leave":
            mark_down(coordinator, name, f"left at {coordinator.now_s():.2f} s")
            container.stop(timeout=STOP_TIMEOUT_S)
        elif action in ("recover", "join"):
            container.reload()
            if container.status == "paused":
                container.unpause()
            if container.status != "running":
                container.start()
                note_start(coordinator, name)
                reshape(coordinator, name)
            bring_up(coordinator, name)
        elif action == "restart":
            mark_down(coordinator, name, f"restarting at {coordinator.now_s():.2f} s")
            container.restart(timeout=STOP_TIMEOUT_S)
            note_start(coordinator, name)
            reshape(coordinator, name)
            bring_up(coordinator, name)
        elif action == "pause":
            node.pause_method = pause_container(container)
            with coordinator.table.lock:
                node.paused = True
        elif action == "resume":
            if node.pause_method == "sigstop":
                container.kill(signal="SIGCONT")
            else:
                container.unpause()
            with coordinator.table.lock:
                node.paused = False
        elif action == "set_cpus":
            set_nano_cpus(container, cpus)
            with coordinator.table.lock:
                node.cpus = cpus
        else:
            raise DockerError(f"unknown dynamics action {action!r}")
    except docker.errors.APIError as error:
        raise DockerError(f"{action} on node {name} failed: {error}") from error
