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
from amp4ec.calibrate.link import LINK_PAYLOAD_BYTES, LINK_REPEATS, fit_hops, measure_container_link
from amp4ec.calibrate.measure import DEFAULT_MIN_WINDOW_MS, DEFAULT_TARGET_CI_REL, RepeatPolicy, measure, timing_stats
from amp4ec.costs import CALIBRATION_SCHEMA, Calibration, LinkCalibration, ProfileCalibration, Provenance, UnitTiming
from amp4ec.errors import DockerError, UsageError, WorkerError
from amp4ec.scenario import NodeSpec

DEFAULT_PROFILES = ("high:1.0:1024", "medium:0.6:512", "low:0.4:512")
REFERENCE_REPEATS = 20
DEFAULT_MAX_REPEATS = 60
# The two containers of the hop fit run at once; this CPU limit each keeps both under the
# oversubscription threshold of a 2-core host.
LINK_CONTAINER_CPUS = 0.8
# Whole-model CPU time that moves more than this between the start and the end of a profile,
# or between profiles, means the machine changed speed during the calibration.
DRIFT_WARNING_SHARE = 0.10
# Below this difference a move is timer and scheduling noise, even when it is a large share.
DRIFT_WARNING_MIN_MS = 0.5


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


def host_cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time_unit(worker, name: str, blob: bytes, inputs: list[np.ndarray], *, warmup: int, gap_ms: float, policy: RepeatPolicy) -> UnitTiming:
    """Time one exported program in two regimes: runs spaced ``gap_ms`` apart, and back to back.

    Spaced runs start with cold caches and a refilled CFS quota (the container idled in
    between); back-to-back runs find the program's weights still cached, which is how a unit
    runs inside a longer segment, and drain the quota, so the kernel throttles them.
    """
    segment_id = "unit"
    worker.load(segment_id, blob)
    try:
        spaced = measure(worker, segment_id, inputs, gap_ms=gap_ms, warmup=warmup, policy=policy)
        saturated = measure(worker, segment_id, inputs, gap_ms=0.0, warmup=warmup, policy=policy)
    finally:
        worker.unload(segment_id)
    return UnitTiming(
        name=name,
        cpu_ms=float(np.mean(spaced.cpu_ms)),
        wall=timing_stats(spaced.wall_ms),
        warm_cpu_ms=float(np.mean(saturated.cpu_ms)),
        warm_wall=timing_stats(saturated.wall_ms),
        spaced=spaced,
        saturated=saturated,
    )


def _reference_cpu_ms(worker, blob: bytes, inputs: list[np.ndarray]) -> float:
    """Mean CPU time of the whole model, back to back: the yardstick for drift within a run."""
    worker.load("reference", blob)
    try:
        reply = worker.profile("reference", inputs, warmup=3, repeats=REFERENCE_REPEATS, gap_ms=0.0)
    finally:
        worker.unload("reference")
    return float(np.median(reply["cpu_ms"]))


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
    link = fit_hops(sizes, hops_ms, transport="zeromq REQ/REP over TCP, host to container on a Docker bridge network")
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
    max_repeats: int | None = None,
    target_ci_rel: float = DEFAULT_TARGET_CI_REL,
    input_shape: Sequence[int] | None = None,
    memory_search: bool = False,
    container_link: bool = True,
    min_window_ms: float = DEFAULT_MIN_WINDOW_MS,
    run_id: str | None = None,
) -> Calibration:
    """Measure the model in every profile and write the calibration file ``out`` atomically.

    Each unit runs at least ``repeats`` times per regime and more, in batches, until the 95 %
    confidence half-width of its mean is at most ``target_ci_rel`` of the mean or it ran
    ``max_repeats`` times. Nothing is written unless every profile was measured.
    """
    from amp4ec.torchgraph import example_inputs, load_model, trace_model
    from amp4ec.real.containers import TORCH_RUNTIME_BYTES
    from amp4ec.real.containers import NodeSpec as ContainerSpec
    from amp4ec.real.containers import WorkerCluster, docker_client
    from amp4ec.real.image import ensure_worker_image

    import torch

    if out.exists() and out.is_dir():
        raise UsageError("is a directory; give the path of the calibration file to write", source=str(out), field="--out")
    if not out.parent.exists():
        raise UsageError(f"directory {out.parent} does not exist; create it first", source=str(out), field="--out")
    for profile in profiles:
        if profile.memory_bytes < TORCH_RUNTIME_BYTES:
            raise UsageError(
                f"profile {profile.name} has a memory limit of {profile.memory_mb:g} MiB, below the "
                f"{TORCH_RUNTIME_BYTES / 2**20:.0f} MiB the worker's torch runtime needs; raise it",
                field="--profile",
            )
    policy = RepeatPolicy(
        min_repeats=max(2, repeats),
        max_repeats=max(max(2, repeats), max_repeats or DEFAULT_MAX_REPEATS),
        target_ci_rel=target_ci_rel,
        min_window_ms=min_window_ms,
    )
    started = time.perf_counter()
    module = load_model(model)
    # Reach the engine before the slow tracing, so a stopped Docker fails within seconds.
    client = docker_client()
    log(f"tracing {model} at {granularity} granularity")
    trace_options = {} if input_shape is None else {"input_shape": list(input_shape)}
    traced = trace_model(module, model, granularity=granularity, **trace_options)
    graph = traced.graph
    n_units = graph.n_units
    blobs = [traced.export_segment(i, i + 1) for i in range(n_units)]
    model_blob = traced.export_segment(0, n_units)
    inputs = [[t.numpy() for t in example_inputs(graph, i, seed=0)] for i in range(n_units + 1)]
    log(f"exported {n_units} units in {time.perf_counter() - started:.1f} s")

    image = ensure_worker_image(client, base_image=base_image, log=log)
    run_id = run_id or f"calibrate-{uuid.uuid4().hex[:8]}"
    log(f"run id {run_id}; `amp4ec clean --run {run_id}` removes containers an interrupted run may leave")
    echo_blob = export_echo()
    measured: list[ProfileCalibration] = []
    warnings: list[str] = []
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
            current = "the reference run"
            try:
                reference = [_reference_cpu_ms(worker, model_blob, inputs[0])]
                units = []
                for i in range(n_units):
                    current = f"unit {graph.units[i].name}"
                    units.append(_time_unit(worker, graph.units[i].name, blobs[i], inputs[i], warmup=warmup, gap_ms=gap_ms, policy=policy))
                current = "the whole model"
                whole = _time_unit(worker, "model", model_blob, inputs[0], warmup=warmup, gap_ms=gap_ms, policy=policy)
                reference.append(_reference_cpu_ms(worker, model_blob, inputs[0]))
                if profile is fastest:
                    current = "the hop fit"
                    link = fit_link(worker, echo_blob, log)
            except WorkerError as error:
                if cluster.oom_killed(profile.name):
                    raise UsageError(
                        f"profile {profile.name}: the kernel OOM-killed the worker at a memory limit of "
                        f"{profile.memory_mb:g} MiB while running {current}; raise the profile's memory limit "
                        "(`--memory-search` finds the smallest limit each segment needs)",
                        field="--profile",
                    ) from error
                raise
            profile_warnings = _drift_warnings(profile.name, reference, measured)
            for warning in profile_warnings:
                log(f"warning: {warning}")
            not_converged = sum(1 for u in [*units, whole] for m in (u.spaced, u.saturated) if not m.converged)
            if not_converged:
                profile_warnings.append(
                    f"profile {profile.name}: {not_converged} of {2 * (n_units + 1)} measurements stopped at "
                    f"{policy.max_repeats} runs before their 95 % confidence half-width reached {policy.target_ci_rel:.0%}"
                )
            samples = sum(len(m.wall_ms) for u in [*units, whole] for m in (u.spaced, u.saturated))
            log(
                f"profile {profile.name} ({profile.cpus:g} CPU, {profile.memory_mb:g} MiB, {profile.torch_threads} threads): "
                f"units {sum(u.cpu_ms for u in units):.1f} ms CPU spaced, {sum(u.warm_cpu_ms for u in units):.1f} ms "
                f"back to back; whole model {whole.cpu_ms:.1f} ms spaced, {whole.warm_cpu_ms:.1f} ms back to back; "
                f"{samples} timed runs, {not_converged} not converged"
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
                reference_cpu_ms=reference,
                warnings=profile_warnings,
            )
        )
        warnings.extend(profile_warnings)

    container_hop = None
    if container_link:
        container_hop = _measure_container_link(client, image, run_id, fastest, echo_blob, log)
    if memory_search:
        segments = [(graph.units[i].name, blobs[i], inputs[i]) for i in range(n_units)] + [("model", model_blob, inputs[0])]
        for profile, result in zip(profiles, measured):
            result.memory_search = _memory_search(client, image, run_id, profile, segments, int(result.runtime_rss_bytes), log)

    calibration = Calibration(
        schema=CALIBRATION_SCHEMA,
        graph=graph,
        profiles=measured,
        link=link,
        container_link=container_hop,
        warnings=warnings,
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
            repeats=policy.min_repeats,
        ),
    )
    calibration.save(out)
    log(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return calibration


def _drift_warnings(name: str, reference: list[float], earlier: list[ProfileCalibration]) -> list[str]:
    """Compare the whole model's reference CPU time at the end of a profile with its start and with earlier profiles."""
    warnings = []
    start, end = reference[0], reference[-1]
    if start > 0 and abs(end / start - 1) > DRIFT_WARNING_SHARE and abs(end - start) > DRIFT_WARNING_MIN_MS:
        warnings.append(
            f"profile {name}: the whole model's CPU time moved from {start:.1f} ms to {end:.1f} ms during the "
            "profile; the machine changed speed, so this profile's times are less reliable"
        )
    for other in earlier:
        if other.threads == 1 and other.reference_cpu_ms:
            before = float(np.mean(other.reference_cpu_ms))
            now = float(np.mean(reference))
            if before > 0 and abs(now / before - 1) > DRIFT_WARNING_SHARE and abs(now - before) > DRIFT_WARNING_MIN_MS:
                warnings.append(
                    f"profile {name}: the whole model's CPU time ({now:.1f} ms) differs from profile "
                    f"{other.name}'s ({before:.1f} ms) by more than {DRIFT_WARNING_SHARE:.0%}; either the quota "
                    "changes the work or the machine drifted between profiles"
                )
                break
    return warnings


def _measure_container_link(client, image: str, run_id: str, profile: NodeSpec, echo_blob: bytes, log: Callable[[str], None]) -> LinkCalibration:
    """Start two workers like ``profile`` (CPU capped so both fit the host) and fit the hop between them."""
    from amp4ec.real.containers import NodeSpec as ContainerSpec
    from amp4ec.real.containers import WorkerCluster

    cpus = min(profile.cpus, LINK_CONTAINER_CPUS)
    nodes = [ContainerSpec(name, cpus, profile.memory_bytes, 1) for name in ("sender", "receiver")]
    with WorkerCluster(client, nodes, image=image, run_id=f"{run_id}-link") as cluster:
        return measure_container_link(cluster, "sender", "receiver", echo_blob, log)


def _memory_search(client, image: str, run_id: str, profile: NodeSpec, segments, runtime_rss_bytes: int, log: Callable[[str], None]):
    from amp4ec.calibrate.memory import MIB, search_min_memory

    results = []
    low_bytes = max(runtime_rss_bytes // MIB * MIB, 64 * MIB)
    for name, blob, segment_inputs in segments:
        results.append(
            search_min_memory(
                client, image, f"{run_id}-mem-{profile.name}-{len(results)}", profile, name, blob, segment_inputs,
                low_bytes=low_bytes, high_bytes=profile.memory_bytes, log=log,
            )  # fmt: skip
        )
    return results


def _host_cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def parse_input_shape(text: str | None) -> list[int] | None:
    """Parse ``1,3,64,64`` into a list of positive integers; None keeps the model's default."""
    if text is None:
        return None
    try:
        shape = [int(part) for part in text.replace("x", ",").split(",")]
    except ValueError:
        shape = []
    if not shape or any(size < 1 for size in shape):
        raise UsageError(f"input shape {text!r} is not a list of positive integers such as 1,3,224,224", field="--input-shape")
    return shape
