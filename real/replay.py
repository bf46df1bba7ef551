"""`amp4ec replay`: a scenario and its policies on real worker containers.

The coordinator runs on the host. It builds the same plan and scheduler the simulator builds,
exports the plan's segments with torch.export and deploys them where the plan puts them, as
the simulator does: on the assigned nodes, or on every worker when the plan assigns none. It drives the requests through the stages,
relaying each activation through itself. A monitor thread samples each worker's own cgroup
counters every ``monitor.period_s``; the scheduler sees only those samples.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np

from amp4ec import policies
from amp4ec.errors import UsageError, WorkerError
from amp4ec.metrics import RequestRecord, summarise, write_run
from amp4ec.monitor import NodeState
from amp4ec.rundir import RunInfo, check_output_dir, staged_output
from amp4ec.runs import PreparedRun, prepare_run
from amp4ec.schedule import NoNodeAvailable, StageTask
from amp4ec.workload import rng_for

# Same CPU request per stage as the simulator's AMP4EC node filter.
DEFAULT_CPU_NEEDED = 0.1
# Tolerance of the end-to-end output check against the unsplit model on the host.
OUTPUT_ATOL = 1e-4


class StatsMonitor:
    """Samples every worker's cgroup counters on its own sockets and publishes NodeStates."""

    def __init__(self, prepared: PreparedRun, addresses: dict[str, str], hop_latency_ms: float):
        from amp4ec.real.client import WorkerClient

        self.scenario = prepared.scenario
        self.hop_latency_ms = hop_latency_ms
        self._clients = {
            name: WorkerClient(address, node=name, timeout_s=max(2.0, self.scenario.monitor.period_s))
            for name, address in addresses.items()
        }
        self._previous: dict[str, tuple[float, int]] = {}
        self._published: dict[str, NodeState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="amp4ec-monitor", daemon=True)
        self.first_usage_ns: dict[str, int] = {}
        self.last_usage_ns: dict[str, int] = {}

    def start(self) -> None:
        self._publish(self._sample())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._publish(self._sample())
        for client in self._clients.values():
            client.close()

    def snapshot(self) -> dict[str, NodeState]:
        with self._lock:
            return dict(self._published)

    def _publish(self, sample: dict[str, NodeState]) -> None:
        with self._lock:
            self._published = sample

    def _sample(self) -> dict[str, NodeState]:
        states = {}
        for spec in self.scenario.nodes:
            name = spec.name
            try:
                stats = self._clients[name].stats()
            except WorkerError:
                states[name] = NodeState(name, time.time(), spec.cpus, spec.memory_bytes, 1.0, spec.memory_bytes, math.inf, alive=False)
                continue
            now = stats.get("time_s") or time.time()
            usage_ns = int(stats.get("cpu_usage_ns") or 0)
            self.first_usage_ns.setdefault(name, usage_ns)
            self.last_usage_ns[name] = usage_ns
            previous = self._previous.get(name)
            utilisation = 0.0
            if previous is not None and now > previous[0]:
                utilisation = (usage_ns - previous[1]) / 1e9 / ((now - previous[0]) * spec.cpus)
            self._previous[name] = (now, usage_ns)
            states[name] = NodeState(
                name=name,
                time_s=now,
                cpus=spec.cpus,
                memory_bytes=spec.memory_bytes,
                cpu_utilisation=min(1.0, max(0.0, utilisation)),
                memory_used_bytes=int(stats.get("memory_usage_bytes") or 0),
                link_latency_ms=self.hop_latency_ms,
            )
        return states

    def _loop(self) -> None:
        period_s = self.scenario.monitor.period_s
        delay_s = self.scenario.monitor.delay_s
        while not self._stop.wait(period_s):
            sample = self._sample()
            if delay_s > 0:
                threading.Timer(delay_s, self._publish, args=(sample,)).start()
            else:
                self._publish(sample)


def _check_graph(prepared: PreparedRun, traced_graph) -> None:
    calibrated = [u.name for u in prepared.calibration.graph.units]
    traced = [u.name for u in traced_graph.units]
    if calibrated != traced:
        raise UsageError(
            f"the calibration's units ({len(calibrated)}) differ from the traced model's ({len(traced)}); "
            "recalibrate with this version of amp4ec and torchvision",
            field="calibration",
        )


def run_replay(
    scenario_path: Path,
    out: Path,
    *,
    force: bool = False,
    calibration: Path | None = None,
    base_image: str | None = None,
    progress: ContextManager[Callable[[int, int], None]] | None = None,
    log: Callable[[str], None] = print,
    run_id: str | None = None,
) -> dict:
    """Replay a scenario file on containers and write records.parquet, summary.json and run.json.

    ``run_id`` labels the run's containers and network; a random one is made when it is None.
    """
    check_output_dir(out, force=force)
    prepared = prepare_run(scenario_path, calibration)
    scenario = prepared.scenario
    if scenario.workload.clients != 1 or scenario.workload.kind != "closed":
        raise UsageError(
            "replay runs the closed loop with one client only so far; set workload.kind = \"closed\" and clients = 1",
            field="workload",
            source=str(scenario_path),
        )
    try:
        import torch

        from amp4ec.torchgraph import load_model, trace_model
    except ImportError as exc:
        raise UsageError("replay needs torch and torchvision on the host: pip install 'amp4ec[torch,docker]'") from exc
    from amp4ec.real.containers import NodeSpec as ContainerSpec
    from amp4ec.real.containers import WorkerCluster, docker_client
    from amp4ec.real.image import ensure_worker_image

    info = RunInfo("real", scenario.resolved(), prepared.calibration_path)
    log(f"tracing {scenario.model.name} and exporting the plan's segments")
    model = load_model(scenario.model.name)
    # Exported segments have fixed shapes, so the model is traced at the workload's batch size.
    input_shape = [scenario.workload.batch, *prepared.calibration.graph.input_shape[1:]]
    traced = trace_model(model, scenario.model.name, input_shape=tuple(input_shape), granularity=scenario.model.granularity)
    _check_graph(prepared, traced.graph)
    graph = traced.graph
    plan = policies.build_plan(scenario, graph, prepared.costs, source=str(scenario_path))
    blobs = {segment.id: traced.export_segment(segment.start, segment.stop) for segment in plan.segments}
    scheduler = policies.make_scheduler(scenario, rng_for(scenario.seed, "scheduler"))
    hop_latency_ms = prepared.costs.hop_latency_ms(scenario.network.latency_ms)
    inputs_rng = rng_for(scenario.seed, "inputs")

    client = docker_client()
    image = ensure_worker_image(client, base_image=base_image, log=log)
    containers = [ContainerSpec(n.name, n.cpus, n.memory_bytes, n.torch_threads) for n in scenario.nodes]
    run_id = run_id or f"replay-{uuid.uuid4().hex[:8]}"
    warnings: list[str] = []
    if scenario.network.bandwidth_mbps < 1000 or scenario.network.latency_ms:
        warnings.append("network.bandwidth_mbps and latency_ms are not shaped in real mode yet; the Docker bridge ran unshaped")

    with staged_output(out, force=force) as staging, WorkerCluster(client, containers, image=image, run_id=run_id) as cluster:
        log(f"run {run_id}: {len(containers)} workers ready; deploying {len(blobs)} segments where the plan puts them")
        # One untimed call per segment and worker takes lazy initialisation out of the
        # measurement; without it the first request on each node looks many times slower, and
        # a scheduler that remembers execution times (AMP4EC's load) may never pick that node again.
        for node in scenario.nodes:
            for segment in plan.segments_on(node.name):
                cluster[node.name].load(segment.id, blobs[segment.id])
                zeros = [np.zeros(t.shape, dtype=t.dtype) for t in graph.cuts[segment.start].tensors]
                cluster[node.name].run(segment.id, zeros)
        monitor = StatsMonitor(prepared, dict(cluster.addresses), hop_latency_ms)
        monitor.start()
        records: list[RequestRecord] = []
        output_error = None
        t0 = time.perf_counter()
        try:
            context = progress if progress is not None else _no_progress()
            with context as update:
                for request_id in range(scenario.workload.requests):
                    x = inputs_rng.standard_normal(input_shape, dtype=np.float32)
                    record, output = _run_request(request_id, x, plan, graph, scenario, scheduler, monitor, cluster, t0)
                    records.append(record)
                    if request_id == 0 and output is not None:
                        with torch.no_grad():
                            expected = model(torch.from_numpy(x)).numpy()
                        output_error = float(np.max(np.abs(expected - output)))
                    update(request_id + 1, scenario.workload.requests)
                    if scenario.workload.think_time_ms > 0:
                        time.sleep(scenario.workload.think_time_ms / 1e3)
        finally:
            monitor.stop()
        busy_cpu_ms = {
            name: (monitor.last_usage_ns.get(name, 0) - monitor.first_usage_ns.get(name, 0)) / 1e6
            for name in (n.name for n in scenario.nodes)
        }
        summary = summarise(records, busy_cpu_ms, {n.name: n.cpus for n in scenario.nodes})
        summary["plan"] = {"partitioner": plan.partitioner, "bounds": plan.bounds}
        if any(s.nodes for s in plan.segments):
            summary["plan"]["nodes"] = [list(s.nodes) for s in plan.segments]
        summary["output_check"] = {
            "max_abs_error": output_error,
            "atol": OUTPUT_ATOL,
            "passed": output_error is not None and output_error <= OUTPUT_ATOL,
        }
        if output_error is not None and output_error > OUTPUT_ATOL:
            warnings.append(f"the partitioned output differs from the unsplit model by {output_error:.2e} (atol {OUTPUT_ATOL})")
        for name in (n.name for n in scenario.nodes):
            if cluster.oom_killed(name):
                warnings.append(f"node {name} was OOM-killed at its {scenario.node(name).memory_mb:g} MiB limit")
        summary["warnings"] = warnings
        write_run(staging, records, summary)
        info.write(staging, {"run_id": run_id, "image": image, "network": "docker bridge, unshaped, relayed through the coordinator"})
    return summary


class _no_progress:
    def __enter__(self):
        return lambda done, total: None

    def __exit__(self, *exc_info):
        return False


def _run_request(request_id, x, plan, graph, scenario, scheduler, monitor, cluster, t0):
    """Drive one request through every stage; return its record and the final output."""
    record = RequestRecord(request_id=request_id, arrival_s=time.perf_counter() - t0)
    tensors = [x]
    for segment in plan.segments:
        task = StageTask(
            request_id=request_id,
            segment=segment,
            cpu_needed=DEFAULT_CPU_NEEDED,
            memory_needed_bytes=graph.segment_param_bytes(segment.start, segment.stop)
            + graph.segment_peak_activation_bytes(segment.start, segment.stop),
        )
        try:
            name = scheduler.select(task, monitor.snapshot())
        except NoNodeAvailable:
            record.fail(time.perf_counter() - t0, "no live node")
            return record, None
        stage_start_s = time.perf_counter() - t0
        if math.isnan(record.start_s):
            record.start_s = stage_start_s
        in_bytes = sum(t.nbytes for t in tensors)
        try:
            tensors, timing = cluster[name].run(segment.id, tensors)
        except WorkerError as exc:
            record.fail(time.perf_counter() - t0, f"node {name}: {exc}")
            return record, None
        stage_end_s = time.perf_counter() - t0
        scheduler.observe(name, timing["wall_ms"])
        record.stage_nodes.append(name)
        record.stage_start_s.append(stage_start_s)
        record.stage_end_s.append(stage_end_s)
        record.stage_exec_ms.append(timing["wall_ms"])
        record.bytes_moved += in_bytes + sum(t.nbytes for t in tensors)
    record.complete(time.perf_counter() - t0)
    return record, tensors[0] if len(tensors) == 1 else None
