"""`amp4ec calibrate`: time every unit of a model inside containers limited like edge devices.

For each profile one worker container starts with that profile's CPU quota and memory limit;
each unit is exported with torch.export, shipped to the worker, and timed there with requests
spaced ``gap_ms`` apart so the CFS quota refills between runs. The fixed cost and bandwidth of
one hop between the host and a worker are fitted from echo round trips over the same transport
real mode uses.
"""

from __future__ import annotations

import platform
import shlex
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from amp4ec import __version__
from amp4ec.costs import CALIBRATION_SCHEMA, Calibration, LinkCalibration, ProfileCalibration, Provenance, TimingStats, UnitTiming
from amp4ec.errors import UsageError
from amp4ec.scenario import NodeSpec

DEFAULT_PROFILES = ("high:1.0:1024", "medium:0.6:512", "low:0.4:512")
# Payload sizes for the hop fit, from a small activation to the largest MobileNetV2 cut.
LINK_PAYLOAD_BYTES = (10_000, 100_000, 400_000, 1_600_000)
LINK_REPEATS = 15


def parse_profiles(specs: Sequence[str]) -> list[NodeSpec]:
    """Parse ``NAME:CPUS:MEMORY_MB[:THREADS]`` strings into node specs."""
    profiles = []
    for spec in specs or DEFAULT_PROFILES:
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise UsageError(f"profile {spec!r} is not NAME:CPUS:MEMORY_MB[:THREADS], e.g. low:0.4:512", field="--profile")
        try:
            cpus = float(parts[1])
            memory_mb = float(parts[2])
            threads = int(parts[3]) if len(parts) == 4 else None
            profiles.append(NodeSpec(name=parts[0], cpus=cpus, memory_mb=memory_mb, threads=threads))
        except ValueError as exc:
            raise UsageError(f"profile {spec!r} is invalid: {exc}", field="--profile") from exc
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise UsageError(f"profile names must be unique, got {names}", field="--profile")
    return profiles


def timing_stats(samples_ms: Sequence[float]) -> TimingStats:
    values = np.asarray(samples_ms, dtype=float)
    return TimingStats(
        mean_ms=float(values.mean()),
        p50_ms=float(np.percentile(values, 50)),
        p95_ms=float(np.percentile(values, 95)),
        samples=len(values),
    )


def host_cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time_unit(worker, name: str, blob: bytes, inputs: list[np.ndarray], *, warmup: int, repeats: int, gap_ms: float) -> UnitTiming:
    """Time one exported program in two regimes: runs spaced ``gap_ms`` apart, and back to back.

    Spaced runs start with cold caches (the container idled in between); back-to-back runs
    find the program's weights still cached, which is how a unit runs inside a longer segment.
    """
    segment_id = "unit"
    worker.load(segment_id, blob)
    try:
        spaced = worker.profile(segment_id, inputs, warmup=warmup, repeats=repeats, gap_ms=gap_ms)
        warm = worker.profile(segment_id, inputs, warmup=warmup, repeats=repeats, gap_ms=0.0)
    finally:
        worker.unload(segment_id)
    return UnitTiming(
        name=name,
        cpu_ms=float(np.mean(spaced["cpu_ms"])),
        wall=timing_stats(spaced["wall_ms"]),
        warm_cpu_ms=float(np.mean(warm["cpu_ms"])),
        warm_wall=timing_stats(warm["wall_ms"]),
    )


def export_echo() -> bytes:
    """Export a program that returns a copy of its 1-D input, of any length, for the hop fit."""
    import io

    import torch

    class Echo(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

    length = torch.export.Dim("length", min=2, max=2**24)
    program = torch.export.export(Echo(), (torch.zeros(1024),), dynamic_shapes={"x": {0: length}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def fit_link(worker, echo_blob: bytes, log: Callable[[str], None]) -> LinkCalibration:
    """Fit one hop as fixed_ms + bytes * 8 / bandwidth_bps from echo round trips to a worker.

    A round trip carries the payload twice (request and reply), so half of the round-trip time
    outside the worker's own compute is one hop.
    """
    from scipy import stats

    worker.load("echo", echo_blob)
    sizes, hops_ms = [], []
    try:
        for n_bytes in LINK_PAYLOAD_BYTES:
            payload = np.zeros(n_bytes // 4, dtype=np.float32)
            worker.run("echo", [payload])
            for _ in range(LINK_REPEATS):
                t0 = time.perf_counter()
                _, timing = worker.run("echo", [payload])
                round_trip_ms = (time.perf_counter() - t0) * 1e3
                sizes.append(payload.nbytes)
                hops_ms.append(max(0.0, round_trip_ms - timing["wall_ms"]) / 2)
    finally:
        worker.unload("echo")
    # The median per size resists the odd scheduling hiccup on a shared machine.
    sizes_arr, hops_arr = np.asarray(sizes), np.asarray(hops_ms)
    unique_sizes = np.unique(sizes_arr)
    medians = np.array([np.median(hops_arr[sizes_arr == s]) for s in unique_sizes])
    fit = stats.linregress(unique_sizes, medians)
    slope_ms_per_byte = max(fit.slope, 1e-12)
    link = LinkCalibration(
        fixed_ms=max(0.0, float(fit.intercept)),
        bandwidth_bps=8.0 / (slope_ms_per_byte / 1e3),
        samples=len(sizes),
        transport="zeromq REQ/REP over TCP, host to container on a Docker bridge network",
    )
    log(f"hop: {link.fixed_ms:.3f} ms + bytes at {link.bandwidth_bps / 1e9:.2f} Gbit/s")
    return link


def run_calibration(
    *,
    model: str,
    granularity: str,
    profiles: list[NodeSpec],
    repeats: int,
    warmup: int,
    gap_ms: float,
    out: Path,
    base_image: str | None,
    log: Callable[[str], None],
    run_id: str | None = None,
) -> Calibration:
    """Measure the model in every profile and write the calibration file ``out`` atomically."""
    from amp4ec.torchgraph import example_inputs, load_model, trace_model
    from amp4ec.real.containers import NodeSpec as ContainerSpec
    from amp4ec.real.containers import WorkerCluster, docker_client
    from amp4ec.real.image import ensure_worker_image

    import torch

    if out.exists() and out.is_dir():
        raise UsageError("is a directory; give the path of the calibration file to write", source=str(out), field="--out")
    started = time.perf_counter()
    log(f"tracing {model} at {granularity} granularity")
    traced = trace_model(load_model(model), model, granularity=granularity)
    graph = traced.graph
    n_units = graph.n_units
    blobs = [traced.export_segment(i, i + 1) for i in range(n_units)]
    model_blob = traced.export_segment(0, n_units)
    inputs = [[t.numpy() for t in example_inputs(graph, i, seed=0)] for i in range(n_units + 1)]
    log(f"exported {n_units} units in {time.perf_counter() - started:.1f} s")

    client = docker_client()
    image = ensure_worker_image(client, base_image=base_image, log=log)
    run_id = run_id or f"calibrate-{uuid.uuid4().hex[:8]}"
    echo_blob = export_echo()
    measured: list[ProfileCalibration] = []
    link = None
    worker_torch = "unknown"
    fastest = max(profiles, key=lambda p: p.cpus)
    # One container at a time, so profiles never compete for the host's cores.
    for profile in profiles:
        container = ContainerSpec(profile.name, profile.cpus, profile.memory_bytes, profile.torch_threads)
        with WorkerCluster(client, [container], image=image, run_id=f"{run_id}-{profile.name}") as cluster:
            worker = cluster[profile.name]
            info = worker.ping()
            worker_torch = info.get("torch", worker_torch)
            units = [
                _time_unit(worker, graph.units[i].name, blobs[i], inputs[i], warmup=warmup, repeats=repeats, gap_ms=gap_ms)
                for i in range(n_units)
            ]
            whole = _time_unit(worker, "model", model_blob, inputs[0], warmup=warmup, repeats=repeats, gap_ms=gap_ms)
            log(
                f"profile {profile.name} ({profile.cpus:g} CPU, {profile.memory_mb:g} MiB, {profile.torch_threads} threads): "
                f"units {sum(u.cpu_ms for u in units):.1f} ms CPU spaced, {sum(u.warm_cpu_ms for u in units):.1f} ms "
                f"back to back; whole model {whole.cpu_ms:.1f} ms spaced, {whole.warm_cpu_ms:.1f} ms back to back"
            )
            measured.append(
                ProfileCalibration(
                    name=profile.name,
                    cpus=profile.cpus,
                    memory_bytes=profile.memory_bytes,
                    threads=profile.torch_threads,
                    gap_ms=gap_ms,
                    runtime_rss_bytes=int(info.get("runtime_rss_bytes") or 0),
                    units=units,
                    model=whole,
                )
            )
            if profile is fastest:
                link = fit_link(worker, echo_blob, log)

    calibration = Calibration(
        schema=CALIBRATION_SCHEMA,
        graph=graph,
        profiles=measured,
        link=link,
        provenance=Provenance(
            date=datetime.now(timezone.utc).isoformat(),
            amp4ec_version=__version__,
            host_cpu=host_cpu_model(),
            host_cores=_host_cores(),
            host_torch=torch.__version__,
            worker_torch=worker_torch,
            image=image,
            command=shlex.join(["amp4ec", *sys.argv[1:]]),
            warmup=warmup,
            repeats=repeats,
        ),
    )
    calibration.save(out)
    log(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return calibration


def _host_cores() -> int:
    import os

    return len(os.sched_getaffinity(0))
