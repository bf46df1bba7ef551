"""`amp4ec calibrate`: time every unit of a model inside containers limited like edge devices.

One worker container per profile starts with that profile's CPU quota and memory limit, all
at once. Each unit is exported with torch.export, shipped to every worker, and timed on all
of them in turn before the next unit, so machine drift during the run affects every profile
alike. The fixed cost and bandwidth of one hop between the host and a worker, and between two
workers, are fitted from echo round trips over the same transport real mode uses.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydantic import ValidationError

from amp4ec import __version__
from amp4ec.calibrate.link import LINK_PAYLOAD_BYTES, LINK_REPEATS, fit_hops, measure_container_link
from amp4ec.calibrate.measure import (
    BACK_TO_BACK_PARTS,
    DEFAULT_MIN_WINDOW_MS,
    DEFAULT_TARGET_CI_REL,
    IDLE_GAPS_MS,
    RepeatPolicy,
    measure_back_to_back_interleaved,
    measure_idle_gaps,
    measure_spaced_interleaved,
    timing_stats,
)
from amp4ec.costs import (
    CALIBRATION_SCHEMA,
    Calibration,
    DriftSample,
    LinkCalibration,
    Measurement,
    MemorySearch,
    ProfileCalibration,
    Provenance,
    UnitTiming,
    mean_without_stalls,
)
from amp4ec.errors import UsageError, WorkerError, validation_problems
from amp4ec.graph import ModelGraph, check_output_file
from amp4ec.scenario import NodeSpec

DEFAULT_PROFILES = ("high:1.0:1024", "medium:0.6:512", "low:0.4:512")
REFERENCE_REPEATS = 20
DEFAULT_MAX_REPEATS = 40
# The two containers of the hop fit run at once; this CPU limit each keeps both under the
# oversubscription threshold of a 2-core host.
LINK_CONTAINER_CPUS = 0.8
# Whole-model CPU time that moves more than this between the start and the end of a profile,
# or between profiles, means the machine changed speed during the calibration.
DRIFT_WARNING_SHARE = 0.10
# Below this difference a move is timer and scheduling noise, even when it is a large share.
DRIFT_WARNING_MIN_MS = 0.5
# The whole model stays loaded under this id on every worker for the whole run, because
# loading it takes seconds under a small CPU quota. It serves the reference runs at the start
# and end of the run, the whole-model measurement, and the drift reference, which times it this
# many times back to back after every unit on one container.
REFERENCE_SEGMENT = "reference"
DRIFT_REPEATS = 5


def parse_profiles(specs: Sequence[str]) -> list[NodeSpec]:
    """Parse ``NAME:CPUS:MEMORY_MB[:THREADS]`` strings into node specs."""
    profiles = []
    for spec in specs or DEFAULT_PROFILES:
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise UsageError(f"profile {spec!r} is not NAME:CPUS:MEMORY_MB[:THREADS], e.g. low:0.4:512", field="--profile")
        fields: dict[str, object] = {"name": parts[0]}
        for field, text, kind in zip(("cpus", "memory_mb", "threads"), parts[1:], (float, float, int)):
            try:
                fields[field] = kind(text)
            except ValueError:
                expected = "a whole number" if kind is int else "a number"
                raise UsageError(f"profile {spec!r} is invalid: {field} is {text!r}, expected {expected}", field="--profile") from None
        try:
            profile = NodeSpec(**fields)
        except ValidationError as exc:
            raise UsageError(f"profile {spec!r} is invalid: {validation_problems(exc)}", field="--profile") from exc
        host_cpus = os.cpu_count() or 1
        if profile.cpus > host_cpus:
            raise UsageError(
                f"profile {spec!r} asks for {profile.cpus:g} CPUs but this host has {host_cpus}; "
                f"give at most {host_cpus} CPUs, as Docker cannot grant more",
                field="--profile",
            )
        if profile.torch_threads > host_cpus:
            raise UsageError(
                f"profile {spec!r} asks for {profile.torch_threads} torch threads but this host has {host_cpus} cores; "
                f"threads beyond the cores only take turns on them, so give at most {host_cpus}",
                field="--profile",
            )
        host_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        if profile.memory_mb > host_mib:
            raise UsageError(
                f"profile {spec!r} asks for {profile.memory_mb:g} MiB but this host has {host_mib:.0f} MiB; "
                f"give at most {host_mib:.0f} MiB, as a larger limit would never be reached",
                field="--profile",
            )
        profiles.append(profile)
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


def _unit_timing(name: str, spaced: Measurement, saturated: Measurement) -> UnitTiming:
    """Combine the two regimes of one unit in one profile.

    Spaced runs start with cold caches and a refilled CFS quota (the container idled in
    between). Back-to-back runs find the program's weights still cached, which is how a unit
    runs inside a longer segment, and drain the quota, so the kernel throttles them.
    """
    return UnitTiming(
        name=name,
        cpu_ms=mean_without_stalls(spaced.cpu_ms),
        wall=timing_stats(spaced.wall_ms),
        warm_cpu_ms=mean_without_stalls(saturated.cpu_ms),
        warm_wall=timing_stats(saturated.wall_ms),
        spaced=spaced,
        saturated=saturated,
    )


def _reference_cpu_ms(worker, inputs: list[np.ndarray]) -> float:
    """Return the median back-to-back CPU time of the whole model (loaded as ``REFERENCE_SEGMENT``), the yardstick for drift."""
    reply = worker.profile(REFERENCE_SEGMENT, inputs, warmup=3, repeats=REFERENCE_REPEATS, gap_ms=0.0)
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
    max_turns: int = BACK_TO_BACK_PARTS,
    run_id: str | None = None,
) -> Calibration:
    """Measure the model in every profile and write the calibration file ``out`` atomically.

    Each unit runs at least ``repeats`` times per regime and more, in batches, until the 95 %
    confidence half-width of its mean is at most ``target_ci_rel`` of the mean or it ran
    ``max_repeats`` times. Back to back, the precision is that of the mean across turns, and a
    profile takes more turns until it meets the target or has taken ``max_turns``. Nothing is
    written unless every profile was measured.
    """
    from amp4ec.torchgraph import load_model
    from amp4ec.real.containers import docker_client
    from amp4ec.real.image import ensure_worker_image

    import torch

    check_output_file(out, field="--out")
    for profile in profiles:
        _check_above_runtime(profile.name, profile.memory_bytes, fix="raise it", field="--profile")
    policy = RepeatPolicy(
        min_repeats=max(2, repeats),
        max_repeats=max(max(2, repeats), max_repeats or DEFAULT_MAX_REPEATS),
        target_ci_rel=target_ci_rel,
        min_window_ms=min_window_ms,
        max_turns=max_turns,
    )
    started = time.perf_counter()
    module = load_model(model)
    # Reach the engine before the slow tracing, so a stopped Docker fails within seconds.
    client = docker_client()
    image = ensure_worker_image(client, base_image=base_image, log=log)
    run_id = _announce_run_id(run_id, log)

    def export_model() -> ExportedModel:
        return export_units(module, model, granularity, input_shape, log)

    exported, session = _measure_interleaved(
        client, image, run_id, profiles, export_model,
        warmup=warmup, gap_ms=gap_ms, policy=policy, container_link=container_link, started=started, log=log,
    )  # fmt: skip
    graph, segments = exported.graph, exported.segments
    measured = session.profiles
    if memory_search:
        session.warnings.extend(_memory_search(client, image, run_id, profiles, measured, segments, graph, log))

    calibration = Calibration(
        schema=CALIBRATION_SCHEMA,
        graph=graph,
        profiles=measured,
        link=session.link,
        container_link=session.container_link,
        warnings=session.warnings,
        drift_profile=session.drift_profile,
        drift=session.drift,
        provenance=Provenance(
            date=datetime.now(timezone.utc).isoformat(),
            amp4ec_version=__version__,
            host_cpu=host_cpu_model(),
            host_cores=_host_cores(),
            host_torch=torch.__version__,
            worker_torch=session.worker_torch,
            image=image,
            command=shlex.join(["amp4ec", *sys.argv[1:]]),
            warmup=warmup,
            repeats=policy.min_repeats,
        ),
    )
    calibration.save(out)
    log(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return calibration


def export_units(module, model: str, granularity: str, input_shape: Sequence[int] | None, log: Callable[[str], None]) -> ExportedModel:
    """Trace ``module`` and export each unit and the whole model with example inputs drawn from seed 0."""
    from amp4ec.torchgraph import example_inputs, trace_model

    started = time.perf_counter()
    log(f"tracing {model} at {granularity} granularity")
    trace_options = {} if input_shape is None else {"input_shape": list(input_shape)}
    traced = trace_model(module, model, granularity=granularity, **trace_options)
    graph = traced.graph
    n_units = graph.n_units
    blobs = [traced.export_segment(i, i + 1) for i in range(n_units)]
    model_blob = traced.export_segment(0, n_units)
    inputs = [[t.numpy() for t in example_inputs(graph, i, seed=0)] for i in range(n_units + 1)]
    log(f"exported {n_units} units in {time.perf_counter() - started:.1f} s")
    segments = [(graph.units[i].name, blobs[i], inputs[i]) for i in range(n_units)] + [("model", model_blob, inputs[0])]
    return ExportedModel(graph=graph, segments=segments, echo_blob=export_echo())


def add_memory_search(*, file: Path, out: Path, base_image: str | None, log: Callable[[str], None]) -> Calibration:
    """Bisect the memory limits of the model in calibration ``file`` and write the file with them to ``out`` atomically.

    The timings stay as measured. The search replaces any earlier one, with its warnings, and
    ``memory_provenance`` records this run. The model is traced again from the file's graph
    (model, granularity and input shape), and the new graph must have the file's units.
    """
    from amp4ec.costs import MemoryProvenance, load_calibration
    from amp4ec.real.containers import docker_client
    from amp4ec.real.image import ensure_worker_image
    from amp4ec.torchgraph import load_model

    check_output_file(out, field="--out")
    calibration = load_calibration(file)
    for profile in calibration.profiles:
        _check_above_runtime(profile.name, profile.memory_bytes, fix="no probe could start, so restore the limit it was measured with", source=str(file))
    graph = calibration.graph
    started = time.perf_counter()
    # Traced before Docker is reached, so that a file the model no longer matches fails without containers.
    exported = export_units(load_model(graph.model), graph.model, graph.granularity, graph.input_shape, log)
    traced_units = [unit.name for unit in exported.graph.units]
    if traced_units != [unit.name for unit in graph.units]:
        raise UsageError(
            f"tracing {graph.model} at {graph.granularity} granularity gives the units {', '.join(traced_units)}, "
            f"not the file's {', '.join(unit.name for unit in graph.units)}; the model code has changed since "
            "the calibration, so calibrate again with --memory-search",
            source=str(file),
        )
    client = docker_client()
    image = ensure_worker_image(client, base_image=base_image, log=log)
    if image != calibration.provenance.image:
        message = (
            f"memory search: worker image {image} is not {calibration.provenance.image}, the image the timings were "
            "measured with, so the memory limits may not be those of the timed workers"
        )
        log(f"warning: {message}")
        calibration.warnings.append(message)
    profiles = [_profile_spec(profile) for profile in calibration.profiles]
    earlier = {_memory_warning(spec, search) for spec, profile in zip(profiles, calibration.profiles) for search in profile.memory_search}
    calibration.warnings = [message for message in calibration.warnings if message not in earlier]
    for profile in calibration.profiles:
        profile.warnings = [message for message in profile.warnings if message not in earlier]
    run_id = _announce_run_id(None, log)
    calibration.warnings.extend(_memory_search(client, image, run_id, profiles, calibration.profiles, exported.segments, graph, log))
    calibration.schema_ = CALIBRATION_SCHEMA
    calibration.memory_provenance = MemoryProvenance(
        date=datetime.now(timezone.utc).isoformat(),
        amp4ec_version=__version__,
        host_cpu=host_cpu_model(),
        image=image,
        command=shlex.join(["amp4ec", *sys.argv[1:]]),
    )
    calibration.save(out)
    log(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return calibration


def _check_above_runtime(name: str, memory_bytes: int, *, fix: str, field: str | None = None, source: str | None = None) -> None:
    """Raise UsageError when profile ``name``'s memory limit is below what the worker's torch runtime needs."""
    from amp4ec.real.containers import TORCH_RUNTIME_BYTES

    if memory_bytes < TORCH_RUNTIME_BYTES:
        raise UsageError(
            f"profile {name} has a memory limit of {memory_bytes / 2**20:g} MiB, below the "
            f"{TORCH_RUNTIME_BYTES / 2**20:.0f} MiB the worker's torch runtime needs; {fix}",
            field=field,
            source=source,
        )


def _announce_run_id(run_id: str | None, log: Callable[[str], None]) -> str:
    """Return ``run_id``, or a new calibration run id, after logging how to remove what an interrupted run leaves."""
    run_id = run_id or f"calibrate-{uuid.uuid4().hex[:8]}"
    log(f"run id {run_id}; `amp4ec clean --run {run_id}` removes containers an interrupted run may leave")
    return run_id


def _profile_spec(profile: ProfileCalibration) -> NodeSpec:
    """Return the container profile a calibrated profile was measured in."""
    return NodeSpec(name=profile.name, cpus=profile.cpus, memory_mb=profile.memory_bytes / 2**20, threads=profile.threads)


def _memory_warning(profile: NodeSpec, search: MemorySearch) -> str | None:
    """Return the warning for a segment whose smallest memory limit is above ``profile``'s, else None."""
    if search.min_memory_bytes is None or search.min_memory_bytes <= profile.memory_bytes:
        return None
    return (
        f"profile {profile.name}: segment {search.segment} needs at least "
        f"{search.min_memory_bytes / 2**20:.0f} MiB, above the profile's limit of {profile.memory_mb:g} MiB"
    )


@dataclass
class ExportedModel:
    """The traced graph, each unit and the whole model as (name, exported program, example inputs), and the echo program."""

    graph: ModelGraph
    segments: list[tuple[str, bytes, list[np.ndarray]]]
    echo_blob: bytes

    @property
    def model_blob(self) -> bytes:
        return self.segments[-1][1]

    @property
    def model_inputs(self) -> list[np.ndarray]:
        return self.segments[-1][2]


@dataclass
class InterleavedMeasurement:
    """Everything one interleaved pass over the profiles measured."""

    profiles: list[ProfileCalibration]
    warnings: list[str]
    link: LinkCalibration | None
    container_link: LinkCalibration | None
    drift_profile: str
    drift: list[DriftSample]
    worker_torch: str


def _measure_interleaved(
    client,
    image: str,
    run_id: str,
    profiles: list[NodeSpec],
    export_model: Callable[[], ExportedModel],
    *,
    warmup: int,
    gap_ms: float,
    policy: RepeatPolicy,
    container_link: bool,
    started: float,
    log: Callable[[str], None],
) -> tuple[ExportedModel, InterleavedMeasurement]:
    """Start one container per profile at once and measure every segment on all of them in turn.

    Segment by segment, the spaced runs go round robin across the containers and the
    back-to-back windows follow one another, so all profiles of one segment are measured
    within seconds of each other, at the same machine speed. Only one container computes at
    any time. After every segment the whole model runs a few times back to back on the drift
    reference container (the profile with the largest CPU quota), and that series shows how
    the machine's speed moved during the calibration.

    ``export_model`` runs in a thread while the containers start, because tracing and
    exporting take about as long as the workers' torch import under small CPU quotas.
    """
    from amp4ec.real.containers import NodeSpec as ContainerSpec
    from amp4ec.real.containers import WorkerCluster

    specs = [ContainerSpec(p.name, p.cpus, p.memory_bytes, p.torch_threads) for p in profiles]
    reference_profile = max(profiles, key=lambda p: p.cpus)
    # The containers take turns, one request at a time, so their quotas never add up on the
    # host's cores.
    cluster = WorkerCluster(client, specs, image=image, run_id=run_id, check_cores=False)
    export_result: list[ExportedModel] = []
    export_error: list[BaseException] = []

    def run_export() -> None:
        try:
            export_result.append(export_model())
        except BaseException as error:  # re-raised in the main thread below
            export_error.append(error)

    # A daemon thread, so that an interrupted or failed start does not wait for the export.
    exporter = threading.Thread(target=run_export, name="amp4ec-export", daemon=True)
    exporter.start()
    cluster.start()
    phase_s = {"start": time.perf_counter() - started}
    # Loading is not timed, so all workers load a program at the same time, one thread per worker.
    loader = ThreadPoolExecutor(max_workers=len(profiles), thread_name_prefix="amp4ec-load")
    try:
        exporter.join()
        phase_s["start"] = time.perf_counter() - started
        if export_error:
            raise export_error[0]
        exported = export_result[0]
        segments, model_blob, model_inputs, echo_blob = exported.segments, exported.model_blob, exported.model_inputs, exported.echo_blob
        workers = {p.name: cluster[p.name] for p in profiles}
        infos = {name: worker.ping() for name, worker in workers.items()}
        reference_worker = workers[reference_profile.name]
        drift: list[DriftSample] = []
        timings: dict[str, list[UnitTiming]] = {name: [] for name in workers}
        link = container_hop = None
        current = "the reference run"

        def load_everywhere(segment_id: str, blob: bytes) -> None:
            mark = time.perf_counter()
            list(loader.map(lambda worker: worker.load(segment_id, blob), workers.values()))
            phase_s["loads"] = phase_s.get("loads", 0.0) + time.perf_counter() - mark

        def timed(phase: str, function, *args, **kwargs):
            mark = time.perf_counter()
            result = function(*args, **kwargs)
            phase_s[phase] = phase_s.get(phase, 0.0) + time.perf_counter() - mark
            return result

        try:
            load_everywhere(REFERENCE_SEGMENT, model_blob)
            reference_start = {name: timed("reference runs", _reference_cpu_ms, worker, model_inputs) for name, worker in workers.items()}

            def sample_drift(after: str) -> None:
                reply = timed("drift reference", reference_worker.profile, REFERENCE_SEGMENT, model_inputs, warmup=1, repeats=DRIFT_REPEATS, gap_ms=0.0)
                drift.append(DriftSample(time_s=time.perf_counter() - started, after=after, cpu_ms=float(np.median(reply["cpu_ms"]))))

            sample_drift("start")
            for index, (name, blob, segment_inputs) in enumerate(segments):
                current = "the whole model" if name == "model" else f"unit {name}"
                segment_id = REFERENCE_SEGMENT if name == "model" else "unit"
                if segment_id == "unit":
                    load_everywhere("unit", blob)
                spaced = timed("spaced", measure_spaced_interleaved, workers, segment_id, segment_inputs, gap_ms=gap_ms, warmup=warmup, policy=policy)
                # Rotate which profile starts, so that no profile always runs right after the spaced rounds.
                saturated = timed(
                    "back to back", measure_back_to_back_interleaved, workers, segment_id, segment_inputs, warmup=warmup, policy=policy, start=index
                )
                if segment_id == "unit":
                    for worker in workers.values():
                        worker.unload("unit")
                for profile_name in workers:
                    timings[profile_name].append(_unit_timing(name, spaced[profile_name], saturated[profile_name]))
                sample_drift(name)
                log(
                    f"{name}: {len(next(iter(spaced.values())).wall_ms)} spaced rounds; back to back "
                    + ", ".join(f"{p.name} {len(saturated[p.name].wall_ms)}" for p in profiles)
                    + f" runs; drift reference {drift[-1].cpu_ms:.1f} ms"
                )
            current = "the whole model after short pauses"
            # Only pauses shorter than the spaced gap lie between the two regimes.
            pauses_ms = [pause for pause in IDLE_GAPS_MS if pause < gap_ms]
            idle_gaps = timed("idle gaps", measure_idle_gaps, workers, REFERENCE_SEGMENT, model_inputs, gaps_ms=pauses_ms)
            log(
                "whole model after pauses of "
                + (", ".join(f"{pause:g}" for pause in pauses_ms) or "(none below --gap-ms)")
                + " ms: "
                + "; ".join(f"{name} " + ", ".join(f"{mean_without_stalls(m.cpu_ms):.1f}" for m in idle_gaps[name]) for name in workers)
                + " ms CPU"
            )
            current = "the reference run"
            reference_end = {name: timed("reference runs", _reference_cpu_ms, worker, model_inputs) for name, worker in workers.items()}
            for worker in workers.values():
                worker.unload(REFERENCE_SEGMENT)
            current = "the hop fit"
            link = timed("hop fits", fit_link, reference_worker, echo_blob, log)
            if container_link and len(profiles) > 1:
                # Reuse the running containers: the next largest quota sends to the reference container.
                sender = max((p for p in profiles if p is not reference_profile), key=lambda p: p.cpus)
                container_hop = timed("hop fits", measure_container_link, cluster, sender.name, reference_profile.name, echo_blob, log)
        except WorkerError as error:
            cluster.wait_for_stop([profile.name for profile in profiles], error)
            for profile in profiles:
                if cluster.oom_killed(profile.name):
                    raise UsageError(
                        f"profile {profile.name}: the kernel OOM-killed the worker at a memory limit of "
                        f"{profile.memory_mb:g} MiB while running {current}; raise the profile's memory limit. "
                        "The calibration's worker holds the whole model and loads every unit in turn, so it needs "
                        "more than the smallest limit `--memory-search` finds for any one segment",
                        field="--profile",
                    ) from error
            for profile in profiles:
                stopped = cluster.stopped_state(profile.name)
                if stopped is not None:
                    raise WorkerError(
                        f"profile {profile.name}: the worker container {stopped} while running {current}, "
                        "stopped by something outside amp4ec (docker kill, stop, restart or rm, the engine restarting); "
                        f"nothing was written, run the calibration again. ({error})"
                    ) from error
            raise
    finally:
        loader.shutdown(wait=False, cancel_futures=True)
        cluster.close()
    log(
        "time: export and container start "
        + ", ".join(f"{phase} {seconds:.0f} s" if phase != "start" else f"{seconds:.0f} s" for phase, seconds in phase_s.items())
    )
    if container_link and len(profiles) == 1:
        container_hop = _measure_container_link(client, image, run_id, reference_profile, echo_blob, log)

    measured: list[ProfileCalibration] = []
    all_warnings: list[str] = []
    for profile in profiles:
        units, whole = timings[profile.name][:-1], timings[profile.name][-1]
        reference = [reference_start[profile.name], reference_end[profile.name]]
        profile_warnings = _drift_warnings(profile.name, profile.torch_threads, reference, measured)
        for message in profile_warnings:
            log(f"warning: {message}")
        not_converged = sum(1 for u in timings[profile.name] for m in (u.spaced, u.saturated) if not m.converged)
        if not_converged:
            profile_warnings.append(
                f"profile {profile.name}: {not_converged} of {2 * len(timings[profile.name])} measurements ended before "
                f"their 95 % confidence half-width reached {policy.target_ci_rel:.0%} (spaced at {policy.max_repeats} runs, "
                f"back to back at {policy.max_turns} turns; --max-turns allows more)"
            )
        samples = sum(len(m.wall_ms) for u in timings[profile.name] for m in (u.spaced, u.saturated))
        log(
            f"profile {profile.name} ({profile.cpus:g} CPU, {profile.memory_mb:g} MiB, {profile.torch_threads} thread{'s' if profile.torch_threads != 1 else ''}): "
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
                runtime_rss_bytes=int(infos[profile.name].get("runtime_rss_bytes") or 0),
                units=units,
                model=whole,
                reference_cpu_ms=reference,
                warnings=profile_warnings,
                idle_gaps=idle_gaps[profile.name],
            )
        )
        all_warnings.extend(profile_warnings)
    drift_message = _drift_series_message(reference_profile.name, drift)
    log(drift_message)
    if _drift_share(drift) > DRIFT_WARNING_SHARE:
        all_warnings.append(drift_message)
    return exported, InterleavedMeasurement(
        profiles=measured,
        warnings=all_warnings,
        link=link,
        container_link=container_hop,
        drift_profile=reference_profile.name,
        drift=drift,
        worker_torch=next(iter(infos.values())).get("torch", "unknown"),
    )


def _drift_share(drift: Sequence[DriftSample]) -> float:
    """Return the spread of the drift series, (max - min) / min, or 0 for an empty one."""
    values = [sample.cpu_ms for sample in drift if sample.cpu_ms > 0]
    return (max(values) - min(values)) / min(values) if values else 0.0


def _drift_series_message(profile: str, drift: Sequence[DriftSample]) -> str:
    values = [sample.cpu_ms for sample in drift]
    if not values:
        return f"drift reference {profile}: no samples"
    return (
        f"drift reference: the whole model on profile {profile} took {min(values):.1f} to {max(values):.1f} ms CPU "
        f"(median {float(np.median(values)):.1f} ms, spread {_drift_share(drift):.0%}) over {len(values)} samples; "
        "the profiles were measured in turn, unit by unit, so they share this drift"
    )


def _drift_warnings(name: str, threads: int, reference: list[float], earlier: list[ProfileCalibration]) -> list[str]:
    """Compare the whole model's reference CPU time at the end of a profile with its start and with earlier profiles.

    Only profiles with the same thread count are compared, since threads change the CPU time.
    """
    messages = []
    start, end = reference[0], reference[-1]
    if start > 0 and abs(end / start - 1) > DRIFT_WARNING_SHARE and abs(end - start) > DRIFT_WARNING_MIN_MS:
        messages.append(
            f"profile {name}: the whole model's CPU time moved from {start:.1f} ms to {end:.1f} ms during the "
            "profile; the machine changed speed, so this profile's times are less reliable"
        )
    for other in earlier:
        if other.threads == threads and other.reference_cpu_ms:
            before = float(np.mean(other.reference_cpu_ms))
            now = float(np.mean(reference))
            if before > 0 and abs(now / before - 1) > DRIFT_WARNING_SHARE and abs(now - before) > DRIFT_WARNING_MIN_MS:
                messages.append(
                    f"profile {name}: the whole model's CPU time ({now:.1f} ms) differs from profile "
                    f"{other.name}'s ({before:.1f} ms) by more than {DRIFT_WARNING_SHARE:.0%}; either the quota "
                    "changes the work or the machine drifted between profiles"
                )
                break
    return messages


def _measure_container_link(client, image: str, run_id: str, profile: NodeSpec, echo_blob: bytes, log: Callable[[str], None]) -> LinkCalibration:
    """Start two workers like ``profile`` (CPU capped so both fit the host) and fit the hop between them."""
    from amp4ec.real.containers import NodeSpec as ContainerSpec
    from amp4ec.real.containers import WorkerCluster

    cpus = min(profile.cpus, LINK_CONTAINER_CPUS)
    nodes = [ContainerSpec(name, cpus, profile.memory_bytes, 1) for name in ("sender", "receiver")]
    with WorkerCluster(client, nodes, image=image, run_id=f"{run_id}-link") as cluster:
        return measure_container_link(cluster, "sender", "receiver", echo_blob, log)


# First guess of a segment's memory need on top of the idle runtime: its weights and peak
# activations times this factor, plus the slack below, which covers the allocator, the loaded
# program and the received input frames. A wrong guess costs one extra probe.
MEMORY_GUESS_FACTOR = 3
MEMORY_GUESS_SLACK_BYTES = 48 * 2**20


def _memory_search(
    client, image: str, run_id: str, profiles: list[NodeSpec], measured: list[ProfileCalibration], segments, graph, log: Callable[[str], None]
) -> list[str]:
    """Bisect each segment's smallest memory limit once per thread count and attach it to every profile with that count.

    Profiles that differ only in quota share one search, run in a container with the largest
    memory limit and CPU quota of the group, because a forward allocates the same tensors
    whatever the quota. NOTE: this assumes the allocator's peak does not depend on the quota,
    which no test checks. A profile whose own limit is below a segment's minimum gets a warning, and the
    warnings are returned.
    """
    from amp4ec.calibrate.memory import MIB, search_min_memory

    n_units = graph.n_units
    bounds = [(i, i + 1) for i in range(n_units)] + [(0, n_units)]
    messages = []
    for threads in sorted({p.torch_threads for p in profiles}):
        group = [(p, result) for p, result in zip(profiles, measured) if p.torch_threads == threads]
        largest = max((p for p, _ in group), key=lambda p: (p.memory_bytes, p.cpus))
        runtime_rss_bytes = max(int(result.runtime_rss_bytes) for _, result in group)
        low_bytes = max(runtime_rss_bytes // MIB * MIB, 64 * MIB)
        searches = []
        for (name, blob, segment_inputs), (start, stop) in zip(segments, bounds):
            need_bytes = graph.segment_param_bytes(start, stop) + graph.segment_peak_activation_bytes(start, stop)
            searches.append(
                search_min_memory(
                    client, image, f"{run_id}-mem-t{threads}-{len(searches)}", largest, name, blob, segment_inputs,
                    low_bytes=low_bytes, high_bytes=largest.memory_bytes,
                    guess_bytes=runtime_rss_bytes + MEMORY_GUESS_FACTOR * need_bytes + MEMORY_GUESS_SLACK_BYTES, log=log,
                )  # fmt: skip
            )
        for profile, result in group:
            result.memory_search = searches
            for search in searches:
                message = _memory_warning(profile, search)
                if message is not None:
                    log(f"warning: {message}")
                    result.warnings.append(message)
                    messages.append(message)
    return messages


def _host_cores() -> int:
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
