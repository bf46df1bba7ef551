"""`amp4ec bench real`: what real mode adds to a hop, and how close pipelined replay gets to capacity.

Two figures, each against a reference measured in the same run:

- Per-hop overhead. A worker echoes 1-D float32 payloads of 10 KB to 1.5 MB. One hop is half
  of the round trip outside the worker's forward call. A straight line fitted over the sizes
  gives the bytes/bandwidth part (its slope), and the overhead at a size is the measured hop
  minus that part. The reference is a pyzmq REQ/REP echo between two threads of this process
  over loopback, which is the transport without Docker, JSON headers or torch. The same fit
  is made for forwarded hops: an echo route coordinator -> worker -> worker -> coordinator,
  whose three hops each carry the payload once.
- Pipelined throughput over the capacity bound. A scenario is replayed closed-loop with
  several clients so its stages overlap. The capacity bound is total CPU quota / CPU time per
  request, where CPU time is the cgroup CPU time of all workers over completed requests. No
  schedule can beat the bound.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import zmq

HOP_PAYLOAD_BYTES = (10_000, 100_000, 400_000, 1_500_000)
HOP_REPEATS = 30
TARGET_OVERHEAD_MS_AT_100KB = 0.5
TARGET_CAPACITY_RATIO = 0.90


def _median_hops_ms(send: Callable[[np.ndarray], float], sizes: tuple[int, ...], repeats: int) -> np.ndarray:
    medians = []
    for n_bytes in sizes:
        payload = np.zeros(n_bytes // 4, dtype=np.float32)
        send(payload)
        medians.append(float(np.median([send(payload) for _ in range(repeats)])))
    return np.array(medians)


def loopback_hops_ms(sizes: tuple[int, ...], repeats: int) -> np.ndarray:
    """Return the median one-way time per size of a bare pyzmq REQ/REP echo over loopback."""
    context = zmq.Context.instance()
    server = context.socket(zmq.REP)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if server.poll(100):
                server.send_multipart(server.recv_multipart(copy=False), copy=False)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = context.socket(zmq.REQ)
    client.connect(f"tcp://127.0.0.1:{port}")

    def send(payload: np.ndarray) -> float:
        started = time.perf_counter()
        client.send_multipart([b"{}", memoryview(payload).cast("B")], copy=False)
        client.recv_multipart()
        return (time.perf_counter() - started) * 1e3 / 2

    try:
        return _median_hops_ms(send, sizes, repeats)
    finally:
        stop.set()
        thread.join()
        client.close(linger=0)
        server.close(linger=0)


def worker_hops_ms(worker, echo_blob: bytes, sizes: tuple[int, ...], repeats: int) -> np.ndarray:
    """Return the median one-way time per size between the host and a worker container."""
    worker.load("echo", echo_blob)

    def send(payload: np.ndarray) -> float:
        started = time.perf_counter()
        _, timing = worker.run("echo", [payload])
        round_trip_ms = (time.perf_counter() - started) * 1e3
        return max(0.0, round_trip_ms - timing["wall_ms"]) / 2

    try:
        return _median_hops_ms(send, sizes, repeats)
    finally:
        worker.unload("echo")


def forward_hops_ms(links, addresses: dict[str, str], sizes: tuple[int, ...], repeats: int) -> np.ndarray:
    """Return the median time per hop of a forwarded echo route, coordinator -> a -> b -> coordinator.

    The route has three hops that each carry the payload once; the workers' forward calls
    are subtracted.
    """
    from amp4ec.real.client import encode_arrays

    route = [{"segment": "echo", "node": name, "address": address} for name, address in addresses.items()]
    first = route[0]["node"]

    def send(payload: np.ndarray) -> float:
        specs, frames = encode_arrays([payload])
        header = {"route": route, "hop": 0, "inputs": specs, "timings": []}
        started = time.perf_counter()
        reply, _ = links.forward(first, header, frames, timeout_s=60)
        round_trip_ms = (time.perf_counter() - started) * 1e3
        exec_ms = sum(timing["wall_ms"] for timing in reply["timings"])
        return max(0.0, round_trip_ms - exec_ms) / (len(route) + 1)

    return _median_hops_ms(send, sizes, repeats)


def overhead_beyond_bandwidth(sizes: tuple[int, ...], hops_ms: np.ndarray) -> tuple[np.ndarray, float]:
    """Return the per-size overhead (hop minus bytes/bandwidth) and the fitted bandwidth in bit/s."""
    slope_ms_per_byte, _ = np.polyfit(np.asarray(sizes, dtype=float), hops_ms, 1)
    slope_ms_per_byte = max(slope_ms_per_byte, 1e-12)
    overhead_ms = hops_ms - np.asarray(sizes) * slope_ms_per_byte
    return overhead_ms, 8.0 / (slope_ms_per_byte / 1e3)


def bench_hops(*, repeats: int = HOP_REPEATS, base_image: str | None = None, log: Callable[[str], None] = print) -> dict:
    from amp4ec.calibrate.run import export_echo
    from amp4ec.real.containers import NodeSpec, WorkerCluster, docker_client
    from amp4ec.real.image import ensure_worker_image

    client = docker_client()
    image = ensure_worker_image(client, base_image=base_image, log=log)
    echo_blob = export_echo()
    reference_ms = loopback_hops_ms(HOP_PAYLOAD_BYTES, repeats)
    from amp4ec.real.links import WorkerLinks

    # 0.8 CPUs each stays under the oversubscription warning on a 2-core host.
    nodes = [NodeSpec("bench", 0.8, 512 * 2**20, 1), NodeSpec("bench2", 0.8, 512 * 2**20, 1)]
    with WorkerCluster(client, nodes, image=image) as cluster:
        worker_ms = worker_hops_ms(cluster["bench"], echo_blob, HOP_PAYLOAD_BYTES, repeats)
        for node in nodes:
            cluster[node.name].load("echo", echo_blob)
        # Monitor pushes are off (one per hour), so only the echo traffic is timed.
        links = WorkerLinks(lambda node, stats: None, monitor_period_s=3600.0)
        try:
            for node in nodes:
                links.connect(node.name, cluster.addresses[node.name])
            forwarded_ms = forward_hops_ms(links, {n.name: cluster.addresses[n.name] for n in nodes}, HOP_PAYLOAD_BYTES, repeats)
        finally:
            links.close()
    overhead_ms, bandwidth_bps = overhead_beyond_bandwidth(HOP_PAYLOAD_BYTES, worker_ms)
    forwarded_overhead_ms, forwarded_bandwidth_bps = overhead_beyond_bandwidth(HOP_PAYLOAD_BYTES, forwarded_ms)
    reference_overhead_ms, _ = overhead_beyond_bandwidth(HOP_PAYLOAD_BYTES, reference_ms)
    rows = [
        {
            "bytes": n_bytes,
            "hop_ms": float(hop),
            "overhead_ms": float(over),
            "loopback_hop_ms": float(ref),
            "hop_over_loopback": float(hop / ref) if ref > 0 else None,
        }
        for n_bytes, hop, over, ref in zip(HOP_PAYLOAD_BYTES, worker_ms, overhead_ms, reference_ms)
    ]
    forward_rows = [
        {"bytes": n_bytes, "hop_ms": float(hop), "overhead_ms": float(over)}
        for n_bytes, hop, over in zip(HOP_PAYLOAD_BYTES, forwarded_ms, forwarded_overhead_ms)
    ]
    at_100kb = rows[HOP_PAYLOAD_BYTES.index(100_000)]["overhead_ms"]
    forwarded_at_100kb = forward_rows[HOP_PAYLOAD_BYTES.index(100_000)]["overhead_ms"]
    return {
        "rows": rows,
        "forward_rows": forward_rows,
        "forward_fitted_bandwidth_bps": forwarded_bandwidth_bps,
        "forward_overhead_ms_at_100kb": forwarded_at_100kb,
        "forward_passed": forwarded_at_100kb < TARGET_OVERHEAD_MS_AT_100KB,
        "fitted_bandwidth_bps": bandwidth_bps,
        "loopback_overhead_ms": [float(v) for v in reference_overhead_ms],
        "overhead_ms_at_100kb": at_100kb,
        "target_ms": TARGET_OVERHEAD_MS_AT_100KB,
        "passed": at_100kb < TARGET_OVERHEAD_MS_AT_100KB,
    }


def capacity_ratio(summary: dict) -> dict:
    """Return a run summary's throughput, its capacity bound and their ratio (None without completions)."""
    completed = summary["requests"]["completed"]
    total_cpus = sum(node["cpus"] for node in summary["nodes"].values())
    cpu_ms = sum(node["busy_cpu_ms"] for node in summary["nodes"].values())
    throughput = summary["throughput_rps"]
    if not completed or not cpu_ms or throughput is None:
        return {"completed": completed, "ratio": None}
    cpu_s_per_request = cpu_ms / completed / 1e3
    bound_rps = total_cpus / cpu_s_per_request
    return {
        "completed": completed,
        "failed": summary["requests"]["failed"],
        "throughput_rps": throughput,
        "cpu_ms_per_request": cpu_s_per_request * 1e3,
        "total_cpus": total_cpus,
        "capacity_bound_rps": bound_rps,
        "ratio": throughput / bound_rps,
    }


def bench_pipeline(
    scenario_path: Path,
    *,
    requests: int,
    clients: int | None = None,
    base_image: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Replay a scenario closed-loop with many clients and compare its throughput to the capacity bound.

    The simulator runs the same scenario and workload first. Its ratio is what the plan and
    the scheduler allow on ideal machinery (a schedule that leaves a node idle cannot reach
    the bound), so the replay's ratio over it is the share the real machinery keeps.
    """
    from amp4ec.real.replay import run_replay
    from amp4ec.runs import prepare_run
    from amp4ec.sim.engine import simulate

    prepared = prepare_run(scenario_path)
    if clients is None:
        # Two requests per stage keep every stage's node busy while a transfer is under way.
        clients = 2 * len(prepared.scenario.nodes)
    overrides = {"kind": "closed", "requests": requests, "clients": clients, "think_time_ms": 0.0}
    simulated = capacity_ratio(simulate(prepared.scenario.with_workload(**overrides), prepared.costs).summary)
    with tempfile.TemporaryDirectory(prefix="amp4ec-bench-") as directory:
        summary = run_replay(
            scenario_path,
            Path(directory) / "run",
            base_image=base_image,
            log=log,
            workload_overrides=overrides,
        )
    result = capacity_ratio(summary)
    result["target"] = TARGET_CAPACITY_RATIO
    result["passed"] = result["ratio"] is not None and result["ratio"] >= TARGET_CAPACITY_RATIO
    result["simulated_ratio"] = simulated["ratio"]
    result["ratio_over_simulated"] = (
        result["ratio"] / simulated["ratio"] if result["ratio"] is not None and simulated["ratio"] else None
    )
    return result
