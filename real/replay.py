"""`amp4ec replay`: a scenario and its policies on real worker containers.

The coordinator runs on the host. It builds the same plan and scheduler the simulator builds,
exports the plan's segments with torch.export, and deploys them where the plan puts them, as
the simulator does: on the assigned nodes, or on every worker when the plan assigns none. The
coordinator in coordinator.py then drives the requests through the stages, many at a time,
forwarding activations worker to worker or relaying them through itself
(``[replay] transport``). Each worker pushes its own cgroup counters every
``monitor.period_s``, and the scheduler sees only those samples.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np

from amp4ec import policies
from amp4ec.adapt import Adapter
from amp4ec.errors import UsageError, WorkerError
from amp4ec.metrics import RequestRecord, summarise, write_run
from amp4ec.rundir import RunInfo, check_output_dir, staged_output
from amp4ec.runs import PreparedRun, prepare_run
from amp4ec.timeline import check_supported, first_kinds, ordered_events
from amp4ec.workload import open_loop_arrivals_s, request_count, rng_for

# Threads an open-loop replay uses at most; arrivals beyond this many in flight wait for one.
OPEN_LOOP_MAX_THREADS = 64
# Tolerance of the end-to-end output check against the unsplit model on the host.
OUTPUT_ATOL = 1e-4
TRANSPORT_DETAILS = {
    "forward": "each worker sends its outputs straight to the next stage's worker, the last one to the coordinator",
    "relay": "every stage's input and output pass through the coordinator",
}
# The coordinator's container actions for event kinds whose name differs.
REPLAY_ACTIONS = {"cpu": "set_cpus"}


@dataclass(frozen=True)
class ContainerAction:
    """One timeline event as the dynamics runner applies it to a container."""

    at_s: float
    node: str
    action: str
    cpus: float | None = None


def container_actions(scenario) -> list[ContainerAction]:
    """Map the scenario's events, in timeline order, to container actions (kinds replay supports only)."""
    return [
        ContainerAction(event.time_s, event.node, REPLAY_ACTIONS.get(event.kind, event.kind), event.cpus)
        for event in ordered_events(scenario)
    ]


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
    workload_overrides: dict | None = None,
) -> dict:
    """Replay a scenario file on containers and write records.parquet, summary.json and run.json.

    ``run_id`` labels the run's containers and network; a random one is made when it is None.
    ``workload_overrides`` replaces fields of the scenario's workload (benchmarks use it).
    """
    check_output_dir(out, force=force)
    prepared = prepare_run(scenario_path, calibration)
    if workload_overrides:
        prepared.scenario = prepared.scenario.with_workload(**workload_overrides)
    scenario = prepared.scenario
    # Events replay cannot carry out are rejected before torch is loaded or a container starts.
    check_supported(scenario, "real", source=str(scenario_path))
    try:
        import torch

        from amp4ec.torchgraph import load_model, trace_model
    except ImportError as exc:
        raise UsageError("replay needs torch and torchvision on the host: pip install 'amp4ec[torch,docker]'") from exc
    from amp4ec.real.containers import NodeSpec as ContainerSpec
    from amp4ec.real.containers import WorkerCluster, docker_client
    from amp4ec.real.coordinator import STOP_TIMEOUT_S, Coordinator, DynamicsRunner, NodeRuntime, NodeTable, deploy_segments, mark_down
    from amp4ec.real.adapt import ReplayAdaptation
    from amp4ec.real.engines import default_engine_url
    from amp4ec.real.image import ensure_worker_image
    from amp4ec.real.shaping import delay_sender_clients, link_shapes, sender_delays_s

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

    client = docker_client()
    check_fits_docker_host(scenario, client.info())
    image = ensure_worker_image(client, base_image=base_image, log=log)
    containers = [
        ContainerSpec(n.name, n.cpus, n.memory_bytes, n.torch_threads, scenario.engine_url(n.name)) for n in scenario.nodes
    ]
    run_id = run_id or f"replay-{uuid.uuid4().hex[:8]}"
    warnings: list[str] = []
    shapes = link_shapes(scenario) if scenario.network.shaping else None
    if shapes is None and _network_configured(scenario):
        warnings.append("bandwidth_mbps and latency_ms were not applied because network.shaping is off; the Docker bridge ran unshaped")

    with staged_output(out, force=force) as staging, WorkerCluster(
        client, containers, image=image, run_id=run_id, shapes=shapes
    ) as cluster:
        workers = f"{len(containers)} worker{'s' if len(containers) != 1 else ''}"
        segments = f"{len(blobs)} segment{'s' if len(blobs) != 1 else ''}"
        log(f"run {run_id}: {workers} ready; deploying {segments} where the plan puts them")
        for node in scenario.nodes:
            deploy_segments(cluster[node.name], node.name, plan, graph, blobs)
        table = NodeTable([NodeRuntime(n.name, n.cpus, n.memory_bytes, cluster.addresses[n.name]) for n in scenario.nodes])
        coordinator = Coordinator(scenario, plan, graph, scheduler, cluster, blobs, table, hop_latency_ms)
        cluster.on_signal.append(coordinator.abort)
        sender_delays = sender_delays_s(cluster.shaping.values())
        if any(delay_s > 0 for delay_s in sender_delays.values()) and coordinator.transport == "forward":
            # Sender-side delay wraps the coordinator's clients, which forwarded hops bypass.
            coordinator.transport = "relay"
            warnings.append(
                "the kernel has no netem, so the coordinator adds the links' delay itself and relays every "
                "activation; set [replay] transport = \"relay\" to say so in the scenario"
            )
        delay_sender_clients(coordinator, sender_delays)
        # A node whose first event is join is absent until it joins.
        for name in _late_joiners(scenario):
            mark_down(coordinator, name, "not joined yet")
            cluster.containers[name].stop(timeout=STOP_TIMEOUT_S)
        dynamics = DynamicsRunner(coordinator, container_actions(scenario))
        adaptation = None
        if scenario.adaptation.enabled:
            adapter = Adapter(scenario, prepared.costs, plan, bandwidth_bps=scenario.network.bandwidth_mbps * 1e6, hop_latency_ms=hop_latency_ms)
            adaptation = ReplayAdaptation(coordinator, adapter, traced, deploy_segments)
        coordinator.monitor.start()
        coordinator.t0 = time.perf_counter()
        log(
            f"run {run_id}: replaying {request_count(scenario.workload)} requests "
            f"({scenario.workload.kind} workload, {coordinator.transport} transport)"
        )
        dynamics.start()
        if adaptation is not None:
            adaptation.start()
        try:
            context = progress if progress is not None else _no_progress()
            with context as update:
                results = drive_workload(coordinator, scenario, input_shape, update)
        finally:
            if adaptation is not None:
                adaptation.stop()
            dynamics.stop()
            coordinator.monitor.stop()
            coordinator.close()
        total_requests = request_count(scenario.workload)
        records = [results[i][0] for i in range(total_requests)]
        # The first and the last request are checked, so a plan adopted during the run is too.
        output_errors = {}
        for request_id in sorted({0, total_requests - 1}):
            output = results[request_id][1]
            if output is None:
                continue
            with torch.no_grad():
                expected = model(torch.from_numpy(request_input(scenario.seed, request_id, input_shape))).numpy()
            output_errors[request_id] = float(np.max(np.abs(expected - output)))
        output_error = max(output_errors.values()) if output_errors else None
        busy_cpu_ms = {name: table[name].busy_cpu_ns / 1e6 for name in table.names()}
        summary = summarise(records, busy_cpu_ms, {n.name: n.cpus for n in scenario.nodes})
        # The plan in use at the end, as the simulator reports it after adaptations.
        final_plan = coordinator.plan
        summary["plan"] = {"partitioner": final_plan.partitioner, "bounds": final_plan.bounds}
        if any(s.nodes for s in final_plan.segments):
            summary["plan"]["nodes"] = [list(s.nodes) for s in final_plan.segments]
        summary["output_check"] = {
            "max_abs_error": output_error,
            "atol": OUTPUT_ATOL,
            "passed": output_error is not None and output_error <= OUTPUT_ATOL,
            "requests": sorted(output_errors),
        }
        if output_error is not None and output_error > OUTPUT_ATOL:
            warnings.append(f"the partitioned output differs from the unsplit model by {output_error:.2e} (atol {OUTPUT_ATOL})")
        summary["retries"] = sum(record.retries for record in records)
        if adaptation is not None:
            summary["adaptations"] = adaptation.adapter.history
            warnings.extend(adaptation.warnings)
        failed_events = [e for e in dynamics.applied if e.error]
        for event in failed_events:
            warnings.append(f"dynamics: {event.action} on node {event.node} at {event.at_s:g} s failed: {event.error}")
        warnings.extend(cluster.host_warnings)
        warnings.extend(coordinator.stopped_outside)
        for name in (n.name for n in scenario.nodes):
            if cluster.oom_killed(name):
                warnings.append(f"node {name} was OOM-killed at its {scenario.node(name).memory_mb:g} MiB limit")
        summary["warnings"] = warnings
        write_run(staging, records, summary)
        info.write(
            staging,
            {
                "run_id": run_id,
                "image": image,
                "network": "docker bridge, shaped" if shapes else "docker bridge, unshaped",
                "shaping": {name: result.as_dict() for name, result in cluster.shaping.items()},
                "engines": {n.name: scenario.engine_url(n.name) or default_engine_url() for n in scenario.nodes},
                "transport": {
                    "activations": coordinator.transport,
                    "detail": TRANSPORT_DETAILS[coordinator.transport],
                    "max_in_flight": max_in_flight(scenario),
                    "dropped_replies": coordinator.links.dropped_replies,
                },
                "monitor": {
                    "method": coordinator.monitor.method,
                    "period_s": scenario.monitor.period_s,
                    "pushes": coordinator.monitor.pushes,
                    "samples": coordinator.monitor.samples,
                    "missed": coordinator.monitor.missed,
                    "silent_nodes": sorted(coordinator.monitor.silent),
                    "silences": dict(sorted(coordinator.monitor.silences.items())),
                },
                "dynamics": [event.as_dict() for event in dynamics.applied],
                "adaptations": adaptation.adapter.history if adaptation is not None else [],
            },
        )
    return summary


def _network_configured(scenario) -> bool:
    """Tell whether the scenario asks for a link slower than the default or an added delay."""
    network = scenario.network
    if network.bandwidth_mbps < 1000 or network.latency_ms:
        return True
    return any(n.bandwidth_mbps is not None or n.latency_ms for n in scenario.nodes)


def check_fits_docker_host(scenario, info: dict) -> None:
    """Reject a node on the default engine that asks for more cores or memory than that engine's host has.

    ``info`` is the engine's ``docker info``. Docker refuses such a container only once the run
    has started; this says which node and field before anything starts. Nodes on other engines
    are not checked here.
    """
    cores = info.get("NCPU")
    memory_mb = (info.get("MemTotal") or 0) / 2**20
    for index, node in enumerate(scenario.nodes):
        if scenario.engine_url(node.name) is not None:
            continue
        if cores and node.cpus > cores:
            raise UsageError(
                f"node {node.name} asks for cpus = {node.cpus:g} but the Docker host has {cores} cores; "
                "lower the node's cpus, or run it on a larger machine's engine with the node's engine field",
                field=f"nodes[{index}].cpus",
            )
        if memory_mb and node.memory_mb > memory_mb:
            raise UsageError(
                f"node {node.name} asks for memory_mb = {node.memory_mb:g} but the Docker host has {memory_mb:.0f} MiB; "
                "lower the node's memory_mb, or run it on a larger machine's engine with the node's engine field",
                field=f"nodes[{index}].memory_mb",
            )


def _late_joiners(scenario) -> list[str]:
    """Return the nodes absent at the start: present = false, or a join as their first event."""
    first = first_kinds(scenario)
    return [node.name for node in scenario.nodes if not node.present or first.get(node.name) == "join"]


def request_input(seed: int, request_id: int, input_shape) -> np.ndarray:
    """Return request ``request_id``'s input, the same whichever thread or order sends it."""
    return rng_for(seed, f"inputs:{request_id}").standard_normal(input_shape, dtype=np.float32)


def max_in_flight(scenario) -> int:
    workload = scenario.workload
    if workload.kind == "closed":
        return min(workload.clients, workload.requests)
    return min(request_count(workload), OPEN_LOOP_MAX_THREADS)


def drive_workload(coordinator, scenario, input_shape, update: Callable[[int, int], None]) -> dict[int, tuple]:
    """Run every request of the workload at real time; return {request_id: (record, output)}.

    Closed loop: ``clients`` threads, client c sending requests c, c + clients, ... as the
    simulator's clients do. Poisson: each request starts at the arrival time
    amp4ec.workload gives the simulator for the same seed, in a pool of threads.
    Every request id gets exactly one record: an unexpected error in a request's thread
    becomes a failed record with the error as reason.
    """
    workload = scenario.workload
    # A trace sends its rows, which may be fewer than workload.requests.
    total = request_count(workload)
    results: dict[int, tuple] = {}
    duplicates: list[int] = []
    usage_errors: list[UsageError] = []
    lock = threading.Lock()

    def run_one(request_id: int, arrival_s: float) -> None:
        x = request_input(scenario.seed, request_id, input_shape)
        try:
            record, output = coordinator.run_request(request_id, x, arrival_s)
        except UsageError as error:
            # A mistake in the scenario, such as a plug-in choosing no node of it, ends the replay.
            usage_errors.append(error)
            coordinator.abort()
            record = RequestRecord(request_id=request_id, arrival_s=arrival_s)
            record.fail(coordinator.now_s(), str(error))
            output = None
        except Exception as error:  # noqa: BLE001 - every request must end with a record
            record = RequestRecord(request_id=request_id, arrival_s=arrival_s)
            record.fail(coordinator.now_s(), f"coordinator error: {type(error).__name__}: {error}")
            output = None
        with lock:
            if request_id in results:
                duplicates.append(request_id)
                return
            results[request_id] = (record, output if request_id in (0, total - 1) else None)
            done = len(results)
        update(done, total)

    arrivals_s = open_loop_arrivals_s(workload, scenario.seed)
    if arrivals_s is None:
        think_s = workload.think_time_ms / 1e3

        def client_loop(first: int) -> None:
            for request_id in range(first, total, workload.clients):
                run_one(request_id, coordinator.now_s())
                if think_s > 0:
                    time.sleep(think_s)

        threads = [
            threading.Thread(target=client_loop, args=(c,), name=f"amp4ec-client-{c}", daemon=True)
            for c in range(min(workload.clients, total))
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException:
            # A signal or Ctrl-C: cancel the stages in flight so the threads end promptly.
            coordinator.abort()
            raise
    else:
        pool = ThreadPoolExecutor(max_workers=max_in_flight(scenario), thread_name_prefix="amp4ec-request")
        try:
            for request_id, arrival_s in enumerate(arrivals_s):
                wait_s = arrival_s - coordinator.now_s()
                if wait_s > 0:
                    time.sleep(wait_s)
                pool.submit(run_one, request_id, float(arrival_s))
        except BaseException:
            coordinator.abort()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    if usage_errors:
        raise usage_errors[0]
    missing = [i for i in range(total) if i not in results]
    if duplicates:
        raise WorkerError(f"requests {duplicates[:10]} ended twice; this is a bug in the coordinator")
    if missing:
        raise WorkerError(f"requests {missing[:10]} ended without a record; this is a bug in the coordinator")
    return results


class _no_progress:
    def __enter__(self):
        return lambda done, total: None

    def __exit__(self, *exc_info):
        return False
