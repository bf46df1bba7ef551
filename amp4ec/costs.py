"""The calibration file and the cost model the simulator reads from it.

A calibration file contains the model graph and, per container profile (CPU quota, memory limit,
torch threads), what each unit cost when run inside such a container: CPU time and the
wall-time distribution with requests spaced apart, so the quota was not exhausted. The cost
model keeps the CPU time (the work) and the parallelism (CPU time over unthrottled wall time)
and leaves throttling to the simulator's CFS model, which is what lets one calibration predict
containers with quotas it was not measured at.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from typing import Annotated, Sequence

from pydantic import BaseModel, Field, ValidationError, model_validator

from amp4ec.errors import FileFormatError, UsageError, validation_problems
from amp4ec.graph import ModelGraph, read_json, write_text_atomic

CALIBRATION_SCHEMA = "amp4ec.calibration/6"
# Version 2 only adds optional fields (raw samples, throttling counters, drift, memory search,
# a container-to-container link), version 3 adds the drift series of an interleaved run and
# version 4 the turns of a back-to-back window, version 5 the whole model after short pauses and
# version 6 the provenance of a memory search run apart from the timings, so older files still load.
READABLE_CALIBRATION_SCHEMAS = tuple(f"amp4ec.calibration/{version}" for version in range(1, 6)) + (CALIBRATION_SCHEMA,)
DEFAULT_CALIBRATION = "calibration-mobilenet_v2.json"
DEFAULT_HOP_LATENCY_MS = 0.2
# A CPU time sample above this many times its series' median is a stall of the host, not the
# unit's work, so CPU means leave it out. On a shared VM a few runs of a 1 ms unit read over
# 100 ms. Throttling cannot cause it, because it delays the wall clock, not CPU time.
STALL_FACTOR = 10.0


class TimingStats(BaseModel):
    mean_ms: float = Field(ge=0)
    p50_ms: float = Field(ge=0)
    p95_ms: float = Field(ge=0)
    samples: int = Field(ge=1)


class CpuStatDelta(BaseModel):
    """Change of the container's cgroup cpu.stat counters over the timed runs of one regime."""

    nr_periods: int | None = None
    nr_throttled: int | None = None
    throttled_ms: float | None = None


Sample = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Measurement(BaseModel):
    """Every timed run of one unit in one regime, and when the repetition stopped."""

    gap_ms: float = Field(ge=0, description="pause before each run; 0 is back to back (saturated)")
    wall_ms: list[Sample] = Field(min_length=1)
    cpu_ms: list[Sample] = Field(min_length=1, description="one per run, in the order of wall_ms")
    ci95_rel: float = Field(
        ge=0,
        description="95 % confidence half-width of the mean over the mean (the larger of wall and CPU time); "
        "for runs measured in turns, that of the mean across turns",
    )
    converged: bool = Field(description="ci95_rel reached the target before the maximum count")
    cpu_stat: CpuStatDelta | None = None
    peak_rss_bytes: int | None = Field(default=None, description="worker's peak resident set size so far")
    turns: list[Annotated[int, Field(strict=True, gt=0)]] | None = Field(
        default=None,
        description="runs of each turn in order, when the window was measured in turns across profiles (schema 4); "
        "runs of one turn share the machine's speed of that moment",
    )

    @model_validator(mode="after")
    def _one_cpu_time_per_run(self) -> "Measurement":
        if len(self.cpu_ms) != len(self.wall_ms):
            raise ValueError(f"wall_ms has {len(self.wall_ms)} runs but cpu_ms has {len(self.cpu_ms)}; each run needs both")
        if self.turns is not None and sum(self.turns) != len(self.wall_ms):
            raise ValueError(f"turns add up to {sum(self.turns)} runs but wall_ms has {len(self.wall_ms)}; they must be equal")
        return self


def not_stalled(cpu_ms: np.ndarray) -> np.ndarray:
    """Return which CPU time samples are at most STALL_FACTOR times the median, i.e. not host stalls."""
    return cpu_ms <= STALL_FACTOR * np.median(cpu_ms)


def mean_without_stalls(samples: list[float]) -> float:
    """Return the mean of CPU time samples, leaving out host stalls."""
    values = np.asarray(samples, dtype=float)
    return float(values[not_stalled(values)].mean())


class UnitTiming(BaseModel):
    """One unit (or the whole model) measured in one profile, spaced apart and back to back."""

    name: str
    cpu_ms: float = Field(ge=0, description="mean CPU time of one forward, all threads, runs spaced apart")
    wall: TimingStats
    warm_cpu_ms: float = Field(ge=0, description="mean CPU time of one forward, runs back to back")
    warm_wall: TimingStats
    spaced: Measurement | None = Field(default=None, description="raw samples, runs spaced apart (schema 2)")
    saturated: Measurement | None = Field(default=None, description="raw samples, runs back to back (schema 2)")

    @model_validator(mode="after")
    def _turns_back_to_back_only(self) -> "UnitTiming":
        if self.spaced is not None and self.spaced.turns is not None:
            raise ValueError("spaced.turns is set, but only back-to-back (saturated) measurements are taken in turns; remove it")
        return self

    def typical_cpu_ms(self, regime: str) -> float:
        """Return the mean CPU time of one regime ("spaced", or "warm" for back to back) without host stalls."""
        measurement = self.spaced if regime == "spaced" else self.saturated
        if measurement is not None:
            return mean_without_stalls(measurement.cpu_ms)
        return self.cpu_ms if regime == "spaced" else self.warm_cpu_ms


class MemoryProbe(BaseModel):
    """The outcome of running one segment in a container with one memory limit."""

    segment: str
    memory_bytes: int = Field(gt=0)
    ran: bool
    oom_killed: bool
    detail: str = ""


class MemorySearch(BaseModel):
    """Smallest memory limit at which a segment loaded and ran, found by bisection."""

    segment: str
    min_memory_bytes: int | None = Field(description="None when it did not run even at the upper bound")
    resolution_bytes: int = Field(gt=0)
    probes: list[MemoryProbe]


class ProfileCalibration(BaseModel):
    name: str
    cpus: float = Field(gt=0)
    memory_bytes: int = Field(gt=0)
    threads: int = Field(ge=1)
    cfs_period_us: int = Field(default=100_000, gt=0)
    gap_ms: float = Field(ge=0, description="pause between repetitions; long enough that the quota refills")
    runtime_rss_bytes: int = Field(ge=0, description="resident memory of an idle worker with torch imported")
    units: list[UnitTiming]
    model: UnitTiming | None = Field(default=None, description="the unsplit model, for comparison")
    reference_cpu_ms: list[float] = Field(
        default_factory=list,
        description="whole-model CPU time back to back, measured at the start and the end of this profile, to detect drift",
    )
    warnings: list[str] = Field(default_factory=list)
    memory_search: list[MemorySearch] = Field(default_factory=list)
    idle_gaps: list[Measurement] = Field(
        default_factory=list,
        description="the whole model timed with a short pause before every run, one measurement per pause (schema 5): "
        "how a forward's cost moves from back to back towards spaced as the container idles longer",
    )

    @model_validator(mode="after")
    def _pauses_between_regimes(self) -> "ProfileCalibration":
        if self.idle_gaps and self.model is None:
            raise ValueError("idle_gaps is set but model is missing, and the pauses time the whole model; remove idle_gaps")
        pauses = [m.gap_ms for m in self.idle_gaps]
        for pause in pauses:
            if not 0 < pause < self.gap_ms:
                raise ValueError(
                    f"idle_gaps has a pause of {pause:g} ms, outside the range between back to back (0) and "
                    f"the profile's spaced gap_ms ({self.gap_ms:g}); remove it"
                )
        repeated = sorted({pause for pause in pauses if pauses.count(pause) > 1})
        if repeated:
            raise ValueError(f"idle_gaps has the pause {repeated[0]:g} ms more than once; keep one measurement per pause")
        return self


class LinkCalibration(BaseModel):
    """Time per hop between containers, fitted as fixed_ms + bytes * 8 / bandwidth_bps."""

    fixed_ms: float = Field(ge=0)
    bandwidth_bps: float = Field(gt=0)
    samples: int = Field(ge=1)
    transport: str


class DriftSample(BaseModel):
    """The whole model's CPU time on the reference container at one moment of the calibration."""

    time_s: float = Field(ge=0, description="seconds since the calibration started")
    after: str = Field(description="the unit measured just before this sample")
    cpu_ms: float = Field(ge=0, description="median CPU time of a few back-to-back forwards")


class Provenance(BaseModel):
    date: str
    amp4ec_version: str
    host_cpu: str
    host_cores: int
    host_torch: str
    worker_torch: str
    image: str
    command: str
    warmup: int
    repeats: int


class MemoryProvenance(BaseModel):
    """Origin of a memory search that `amp4ec calibrate memory` added to a calibration measured earlier: date, host and image."""

    date: str
    amp4ec_version: str
    host_cpu: str
    image: str
    command: str


class Calibration(BaseModel):
    schema_: str = Field(alias="schema")
    graph: ModelGraph
    profiles: list[ProfileCalibration] = Field(min_length=1)
    link: LinkCalibration | None = None
    provenance: Provenance
    container_link: LinkCalibration | None = Field(default=None, description="one hop between two worker containers (schema 2)")
    warnings: list[str] = Field(default_factory=list)
    drift_profile: str | None = Field(default=None, description="the profile whose container the drift samples come from (schema 3)")
    drift: list[DriftSample] = Field(default_factory=list, description="the same fixed work measured at intervals, to show machine drift (schema 3)")
    memory_provenance: MemoryProvenance | None = Field(
        default=None, description="the memory search's own run, when it was added to the file later (schema 6)"
    )

    @model_validator(mode="after")
    def _unique_profile_names(self) -> "Calibration":
        names = [p.name for p in self.profiles]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"profile names must be unique, but {', '.join(repeated)} appears more than once")
        return self

    model_config = {"populate_by_name": True}

    def profile(self, name: str) -> ProfileCalibration:
        for profile in self.profiles:
            if profile.name == name:
                return profile
        raise KeyError(name)

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.model_dump_json(by_alias=True, indent=1))


def default_calibration_path() -> Path:
    return Path(str(resources.files("amp4ec") / "data" / DEFAULT_CALIBRATION))


def _schema_version(schema: object) -> int:
    """Return N of "amp4ec.calibration/N", or 0 for anything else."""
    prefix = "amp4ec.calibration/"
    if isinstance(schema, str) and schema.startswith(prefix) and schema[len(prefix) :].isdigit():
        return int(schema[len(prefix) :])
    return 0


def _calibration_location(data: dict, loc: tuple) -> str:
    """Return a validation error's location with profiles and units named, e.g. ``profile 'low' unit 'features.3' spaced.cpu_ms.0``."""
    parts: list[str] = []
    rest = list(loc)
    profiles = data.get("profiles")
    if len(rest) >= 2 and rest[0] == "profiles" and isinstance(rest[1], int) and isinstance(profiles, list) and rest[1] < len(profiles):
        profile = profiles[rest[1]]
        parts.append(f"profile {profile.get('name')!r}" if isinstance(profile, dict) else f"profiles.{rest[1]}")
        rest = rest[2:]
        units = profile.get("units") if isinstance(profile, dict) else None
        if len(rest) >= 2 and rest[0] == "units" and isinstance(rest[1], int) and isinstance(units, list) and rest[1] < len(units):
            unit = units[rest[1]]
            parts.append(f"unit {unit.get('name')!r}" if isinstance(unit, dict) else f"units.{rest[1]}")
            rest = rest[2:]
    if rest:
        parts.append(".".join(map(str, rest)))
    return " ".join(parts) or "(top level)"


def load_calibration(path: str | Path) -> Calibration:
    """Load a calibration file; ``"default"`` names the file shipped with the package."""
    path = default_calibration_path() if str(path) == "default" else Path(path)
    data = read_json(path)
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema not in READABLE_CALIBRATION_SCHEMAS:
        advice = "recalibrate with `amp4ec calibrate` from this version of amp4ec"
        if _schema_version(schema) > _schema_version(CALIBRATION_SCHEMA):
            advice = "the file is newer than this amp4ec; upgrade amp4ec to read it"
        raise FileFormatError(
            f"schema is {schema!r}, expected one of {', '.join(map(repr, READABLE_CALIBRATION_SCHEMAS))}; {advice}",
            source=str(path),
        )
    try:
        calibration = Calibration.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, locate=lambda loc: _calibration_location(data, loc))
        raise FileFormatError(f"invalid calibration file: {problems}; recalibrate or restore the file", source=str(path)) from exc
    version = _schema_version(schema)
    if version < 6 and calibration.memory_provenance is not None:
        raise FileFormatError(
            f"invalid calibration file: it has memory_provenance, which {schema} files do not have; "
            f"set schema to {CALIBRATION_SCHEMA!r} or remove it",
            source=str(path),
        )
    for profile in calibration.profiles:
        newer = []
        if version < 4:
            newer += [
                f"unit {timing.name!r} has saturated.turns"
                for timing in [*profile.units, *([profile.model] if profile.model is not None else [])]
                if timing.saturated is not None and timing.saturated.turns is not None
            ]
        if version < 5 and profile.idle_gaps:
            newer.append("has idle_gaps")
        if newer:
            raise FileFormatError(
                f"invalid calibration file: profile {profile.name!r} {newer[0]}, which {schema} files do not have; "
                f"set schema to {CALIBRATION_SCHEMA!r} or remove it",
                source=str(path),
            )
    n_units = calibration.graph.n_units
    for profile in calibration.profiles:
        if len(profile.units) != n_units:
            raise FileFormatError(
                f"profile {profile.name!r} times {len(profile.units)} units but the graph has {n_units}",
                source=str(path),
            )
    return calibration


@dataclass(frozen=True, slots=True)
class SegmentCost:
    """The work of one segment on one node."""

    cpu_ms: float
    """CPU time of one batch-1 forward, summed over threads"""
    parallelism: float
    """CPU time over unthrottled wall time: how many cores the forward keeps busy"""


def fit_log_columns(log_means: np.ndarray, design: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``log_means[p, j] = a[j] + design[p] @ s`` and return ``(a, s)``.

    The loss is soft L1 on the logarithms (scipy least squares), so one unit that a host stall
    moved by more than about 5 % pulls the shared slopes ``s`` less than the rest.
    """
    n_rows, n_columns = log_means.shape
    n_slopes = design.shape[1]
    if n_slopes == 0:
        return log_means.mean(axis=0), np.zeros(0)
    from scipy import optimize

    def residuals(x: np.ndarray) -> np.ndarray:
        return (x[:n_columns] + (design @ x[n_columns:])[:, None] - log_means).ravel()

    # The plain least-squares solution starts the robust fit.
    linear = np.zeros((n_rows * n_columns, n_columns + n_slopes))
    for i in range(n_rows):
        rows = slice(i * n_columns, (i + 1) * n_columns)
        linear[rows, :n_columns] = np.eye(n_columns)
        linear[rows, n_columns:] = design[i]
    start, *_ = np.linalg.lstsq(linear, log_means.ravel(), rcond=None)
    solution = optimize.least_squares(residuals, start, loss="soft_l1", f_scale=0.05).x
    return solution[:n_columns], solution[n_columns:]


class WorkFit:
    """Mean CPU time of every column (each unit, then the whole model) as a power law of the CPU quota.

    Per regime, a thread count calibrated at two or more quotas has its own fit
    ``log c[p, j] = a[t, j] + beta[t] * log(cpus[p])``, because a quota can change a 2-thread
    forward's work differently from a 1-thread one's (cold caches while throttled, threads that
    wait for each other). A thread count calibrated at one quota keeps its own ``a[t, j]`` and
    takes ``beta`` from a fit pooled over every profile,
    ``log c[p, j] = a[j] + beta * log(cpus[p]) + gamma * log(threads[p])``, which also predicts
    thread counts that no profile has. A pooled term is left out (set to 0) when the profiles do
    not vary in it, or when quota and thread count vary together so that the profiles cannot
    separate them. In that last case the threads keep their term, because a forward's CPU time
    depends on its thread count far more than on its quota.
    """

    def __init__(self, means: dict[str, np.ndarray], cpus: Sequence[float], threads: Sequence[int], *, has_model: bool = True):
        """``means[regime][p, j]`` is the mean CPU time of column ``j`` in the profile with ``cpus[p]`` and ``threads[p]``;
        with ``has_model`` the last column is the whole model."""
        self.has_model = has_model
        log_cpus = np.log(np.asarray(cpus, dtype=float))
        threads = np.asarray(threads)
        log_threads = np.log(threads.astype(float))
        terms = {"beta": log_cpus, "gamma": log_threads}
        varying = self.pooled_terms(cpus, threads)
        self.terms = varying
        self.log_columns: dict[str, np.ndarray] = {}
        self.slopes: dict[str, dict[str, float]] = {}
        self.by_threads: dict[str, dict[int, tuple[np.ndarray, float]]] = {}
        """per regime and calibrated thread count: the log intercepts a[t, j] and beta[t]"""
        for regime, values in means.items():
            log_means = np.log(np.maximum(np.asarray(values, dtype=float), 1e-6))
            design = np.column_stack([terms[name] for name in varying]) if varying else np.zeros((len(log_cpus), 0))
            intercepts, slopes = fit_log_columns(log_means, design)
            self.log_columns[regime] = intercepts
            self.slopes[regime] = {name: 0.0 for name in terms} | {name: float(slopes[k]) for k, name in enumerate(varying)}
            self.by_threads[regime] = {}
            for count in sorted(set(threads.tolist())):
                rows = threads == count
                if np.ptp(log_cpus[rows]) > 1e-12:
                    own, slope = fit_log_columns(log_means[rows], log_cpus[rows, None])
                    self.by_threads[regime][count] = (own, float(slope[0]))
                else:
                    beta = self.slopes[regime]["beta"]
                    self.by_threads[regime][count] = ((log_means[rows] - beta * log_cpus[rows, None]).mean(axis=0), beta)

    @staticmethod
    def pooled_terms(cpus: Sequence[float], threads: Sequence[int]) -> list[str]:
        """Return the terms of the pooled fit that profiles with these quotas and thread counts can separate."""
        log_cpus = np.log(np.asarray(cpus, dtype=float))
        log_threads = np.log(np.asarray(threads, dtype=float))
        columns = {"beta": log_cpus, "gamma": log_threads}
        varying = [name for name, values in columns.items() if np.ptp(values) > 1e-12]
        if len(varying) == 2 and np.linalg.matrix_rank(np.column_stack([np.ones(len(log_cpus)), log_cpus, log_threads])) < 3:
            varying = ["gamma"]
        return varying

    @classmethod
    def from_profiles(cls, profiles: list[ProfileCalibration]) -> WorkFit:
        """Fit the ``"warm"`` (back to back) and ``"spaced"`` (after an idle gap) means of every profile."""
        # NOTE: one profile without a timed whole model (a hand-edited or schema-1 file) leaves
        # the model column out of every profile's fit, so the call overhead and chain scale are 0 and 1.
        has_model = all(p.model is not None for p in profiles)
        means = {
            regime: np.array([[timing.typical_cpu_ms(regime) for timing in [*p.units, *([p.model] if has_model else [])]] for p in profiles])
            for regime in ("warm", "spaced")
        }
        return cls(means, [p.cpus for p in profiles], [p.threads for p in profiles], has_model=has_model)

    def beta(self, regime: str, threads: int) -> float:
        """Return the quota exponent that applies to ``threads``."""
        if threads in self.by_threads[regime]:
            return self.by_threads[regime][threads][1]
        return self.slopes[regime]["beta"]

    def cpu_ms(self, regime: str, cpus: float, threads: int) -> np.ndarray:
        """Return the predicted mean CPU time of every column in one regime."""
        if threads in self.by_threads[regime]:
            intercepts, beta = self.by_threads[regime][threads]
            return np.exp(intercepts + beta * math.log(cpus))
        # NOTE: the pooled fit is not tied to the per-count ones, so at very small quotas a thread
        # count between two calibrated ones can cost slightly less than the one below it.
        slopes = self.slopes[regime]
        return np.exp(self.log_columns[regime] + slopes["beta"] * math.log(cpus) + slopes["gamma"] * math.log(threads))


class CostModel:
    """Per-unit CPU work and transfer time, fitted to a calibration.

    The work of a unit for a node's CPU quota and thread count comes from :class:`WorkFit`, so
    a node that no profile measured still gets its own prediction. The parallelism (CPU time
    over unthrottled wall time) comes from the profiles with the node's thread count, or is
    extrapolated from the calibrated thread counts as ``threads ** delta``.
    """

    def __init__(self, calibration: Calibration, *, batch: int = 1):
        """``batch`` is the scenario's workload.batch: inputs per request, which scales the activations in memory."""
        # Costs are looked up once per stage of every simulated request, so they are memoised.
        self.calibration = calibration
        self.batch = batch
        self.graph = calibration.graph
        self._by_threads: dict[int, list[ProfileCalibration]] = {}
        self._segment_costs: dict[tuple[int, int, int, float | None, bool], SegmentCost] = {}
        self._work: dict[tuple[str, float, int], list[float]] = {}
        self._idle_curves: dict[int, tuple[tuple[float, float], ...]] = {}
        self._memory_searched: dict[str, int] | None = None
        self._scales: dict[tuple[int, float | None, bool], float] = {}
        for profile in calibration.profiles:
            self._by_threads.setdefault(profile.threads, []).append(profile)
        self.fit = WorkFit.from_profiles(calibration.profiles)

    def profiles_for_threads(self, threads: int) -> tuple[int, list[ProfileCalibration]]:
        """Return the calibrated thread count nearest to ``threads`` and its profiles."""
        nearest = min(self._by_threads, key=lambda t: (abs(t - threads), t))
        return nearest, self._by_threads[nearest]

    def default_cpus(self, threads: int) -> float:
        """Return the CPU quota used when the caller gives none: the geometric mean over the nearest thread count's profiles."""
        _, profiles = self.profiles_for_threads(threads)
        return math.exp(statistics.fmean(math.log(p.cpus) for p in profiles))

    def work_ms(self, regime: str, threads: int, cpus: float | None = None) -> list[float]:
        """Return the fitted mean CPU time per unit (then the whole model, if timed) for this node."""
        cpus = self.default_cpus(threads) if cpus is None else cpus
        if cpus <= 0 or threads < 1:
            raise ValueError(f"a node needs cpus > 0 and threads >= 1, got cpus={cpus}, threads={threads}")
        key = (regime, cpus, threads)
        if key not in self._work:
            self._work[key] = [float(value) for value in self.fit.cpu_ms(regime, cpus, threads)]
        return self._work[key]

    def call_overhead(self, threads: int, cpus: float | None = None) -> SegmentCost:
        """Return the work a program call adds on top of its units' own work.

        Timed one by one and back to back, the units of a model add up to more than the whole
        model timed the same way. That difference, spread over the extra calls, is what each
        call costs beyond its units, and a segment pays it once.
        """
        n_units = self.graph.n_units
        if not self.fit.has_model or n_units < 2:
            return SegmentCost(cpu_ms=0.0, parallelism=1.0)
        warm = self.work_ms("warm", threads, cpus)
        cpu_ms = (sum(warm[:n_units]) - warm[n_units]) / (n_units - 1)
        return SegmentCost(cpu_ms=max(0.0, cpu_ms), parallelism=1.0)

    def cold_start(self, threads: int, cpus: float | None = None, first: int | None = None) -> SegmentCost:
        """Return the extra work of a call that starts with cold caches at unit ``first``.

        A unit run after an idle gap costs more than the same unit back to back, mostly
        because it refetches what the idle time evicted. Inside a segment only the first unit
        pays it: the whole model after a gap costs about one unit's penalty more than back to
        back, not one per unit. The penalty is the first unit's own spaced minus back-to-back CPU
        time, because units differ in it; without ``first`` it is the median over units.
        """
        n_units = self.graph.n_units
        warm, spaced = self.work_ms("warm", threads, cpus), self.work_ms("spaced", threads, cpus)
        if first is not None:
            return SegmentCost(cpu_ms=max(0.0, spaced[first] - warm[first]), parallelism=1.0)
        penalties = [spaced[i] - warm[i] for i in range(n_units)]
        return SegmentCost(cpu_ms=max(0.0, statistics.median(penalties)), parallelism=1.0)

    def parallelism(self, index: int, threads: int) -> float:
        """Return how many cores unit ``index`` keeps busy with ``threads`` torch threads.

        A calibrated thread count uses the profile with the largest quota, the least likely
        to have been throttled. Another count scales as ``threads ** delta``, with ``delta``
        averaged over the calibrated counts above one.
        """
        if threads in self._by_threads:
            fastest = max(self._by_threads[threads], key=lambda p: p.cpus)
            return _measured_parallelism(fastest, index)
        exponents = []
        for count, profiles in self._by_threads.items():
            if count > 1:
                measured = _measured_parallelism(max(profiles, key=lambda p: p.cpus), index)
                exponents.append(math.log(measured) / math.log(count))
        # NOTE: with only one-thread profiles there is nothing to extrapolate from, so a
        # multi-threaded node is predicted to keep one core busy.
        delta = statistics.fmean(exponents) if exponents else 0.0
        return min(max(threads**delta, 1.0), float(threads))

    def unit_cost(self, index: int, threads: int, cpus: float | None = None) -> SegmentCost:
        """Return the work of unit ``index`` inside a segment: warm caches, no call overhead."""
        warm = self.work_ms("warm", threads, cpus)
        cpu_ms = max(0.0, warm[index] - self.call_overhead(threads, cpus).cpu_ms)
        return SegmentCost(cpu_ms=cpu_ms, parallelism=self.parallelism(index, threads))

    def chain_scale(self, threads: int, cpus: float | None = None) -> float:
        """Return how much a call after an idle gap scales the back-to-back work of its units after the first.

        The whole model timed spaced apart is such a call: its first unit's spaced work, then
        the rest. On 2 threads the rest costs less CPU time than the same units back to back,
        on 1 thread about the same. Without a timed whole model the scale is 1.
        """
        n_units = self.graph.n_units
        if not self.fit.has_model or n_units < 2:
            return 1.0
        spaced = self.work_ms("spaced", threads, cpus)
        first_ms = self.call_overhead(threads, cpus).cpu_ms + self.unit_cost(0, threads, cpus).cpu_ms + self.cold_start(threads, cpus, first=0).cpu_ms
        return self._whole_model_scale(spaced[n_units] - first_ms, threads, cpus)

    def busy_scale(self, threads: int, cpus: float | None = None) -> float:
        """Return how much a call right after the previous one scales the back-to-back work of its units after the first.

        A unit repeated back to back keeps its weights and activations in the caches, which the
        units before it evict inside a model. So where the units add up to less than the whole
        model back to back, the call overhead is 0 and this scale, above 1, makes up the
        difference. Otherwise the overhead does, and the scale is 1.
        """
        n_units = self.graph.n_units
        if not self.fit.has_model or n_units < 2:
            return 1.0
        warm = self.work_ms("warm", threads, cpus)
        first_ms = self.call_overhead(threads, cpus).cpu_ms + self.unit_cost(0, threads, cpus).cpu_ms
        return self._whole_model_scale(warm[n_units] - first_ms, threads, cpus)

    def _whole_model_scale(self, rest_target_ms: float, threads: int, cpus: float | None) -> float:
        """Return the factor that makes units 1 to n-1, in a call of the whole model, cost ``rest_target_ms``."""
        rest_ms = sum(self.unit_cost(i, threads, cpus).cpu_ms for i in range(1, self.graph.n_units))
        return max(0.0, rest_target_ms / rest_ms) if rest_ms > 0 else 1.0

    def segment_cost(self, start: int, stop: int, threads: int, cpus: float | None = None) -> SegmentCost:
        """Return the work of one call of units ``start`` to ``stop - 1`` after an idle gap, on a node with ``threads`` and ``cpus``.

        That is one call overhead and the cold start of unit ``start``, plus the warm work of
        each unit, those after the first scaled by :meth:`chain_scale`. Without ``cpus`` the work
        is evaluated at :meth:`default_cpus`.
        """
        return self._segment_cost(start, stop, threads, cpus, idle=True)

    def busy_segment_cost(self, start: int, stop: int, threads: int, cpus: float | None = None) -> SegmentCost:
        """Return the work of one call of units ``start`` to ``stop - 1`` right after the node's previous call.

        That is one call overhead and the warm work of each unit, those after the first scaled
        by :meth:`busy_scale`: no cold start.
        """
        return self._segment_cost(start, stop, threads, cpus, idle=False)

    def _segment_cost(self, start: int, stop: int, threads: int, cpus: float | None, *, idle: bool) -> SegmentCost:
        if not 0 <= start < stop <= self.graph.n_units:
            raise ValueError(f"segment [{start}, {stop}) is outside the graph's {self.graph.n_units} units")
        key = (start, stop, threads, cpus, idle)
        cached = self._segment_costs.get(key)
        if cached is not None:
            return cached
        costs = [self.call_overhead(threads, cpus)] + [self.unit_cost(i, threads, cpus) for i in range(start, stop)]
        # Each scale sums every unit's cost, so it is computed once per node type, not per segment.
        scale_key = (threads, cpus, idle)
        scale = self._scales.get(scale_key)
        if scale is None:
            scale = self._scales[scale_key] = self.chain_scale(threads, cpus) if idle else self.busy_scale(threads, cpus)
        costs = costs[:2] + [SegmentCost(c.cpu_ms * scale, c.parallelism) for c in costs[2:]]
        if idle:
            costs.append(self.cold_start(threads, cpus, first=start))
        cpu_ms = sum(c.cpu_ms for c in costs)
        wall_ms = sum(c.cpu_ms / c.parallelism for c in costs)
        cost = SegmentCost(cpu_ms=cpu_ms, parallelism=cpu_ms / wall_ms if wall_ms > 0 else 1.0)
        self._segment_costs[key] = cost
        return cost

    def paused_cpu_ms(self, start: int, stop: int, threads: int, cpus: float | None, pause_ms: float) -> float:
        """Return the CPU time of one call of units ``start`` to ``stop - 1`` that follows the node's previous call by ``pause_ms``.

        The simulator's engine charges the same, from these terms precomputed per node.
        """
        busy_ms = self.busy_segment_cost(start, stop, threads, cpus).cpu_ms
        idle_ms = self.segment_cost(start, stop, threads, cpus).cpu_ms
        return busy_ms + (idle_ms - busy_ms) * idle_share(self.idle_curve(threads), pause_ms)

    def idle_curve(self, threads: int) -> tuple[tuple[float, float], ...]:
        """Return ``(pause_ms, share)`` points: how far a call after that pause has moved from its busy cost to its idle cost.

        The share is 0 right after the previous call (:meth:`busy_segment_cost`) and 1 after an
        idle gap (:meth:`segment_cost`). Each point is the calibration's whole model after that
        pause: ``(C - W) / (S - W)``, with C its CPU time after the pause, W back to back and S
        spaced. It is fitted by least squares over the profiles with the nearest thread count,
        kept between 0 and 1, then made non-decreasing in the pause. The last point is the
        spaced gap itself. Without pauses in the calibration every call counts as idle:
        ``((0.0, 1.0),)``.
        """
        nearest, profiles = self.profiles_for_threads(threads)
        cached = self._idle_curves.get(nearest)
        if cached is not None:
            return cached
        measured = [p for p in profiles if p.idle_gaps and p.model is not None]
        curve: tuple[tuple[float, float], ...] = ((0.0, 1.0),)
        if measured:
            # Least squares of C - W = share * (S - W) per pause, over the profiles.
            products: dict[float, float] = defaultdict(float)
            squares: dict[float, float] = defaultdict(float)
            for profile in measured:
                busy_ms, idle_ms = profile.model.typical_cpu_ms("warm"), profile.model.typical_cpu_ms("spaced")
                for measurement in profile.idle_gaps:
                    products[measurement.gap_ms] += (idle_ms - busy_ms) * (mean_without_stalls(measurement.cpu_ms) - busy_ms)
                    squares[measurement.gap_ms] += (idle_ms - busy_ms) ** 2
            gaps_ms = sorted(gap for gap in squares if squares[gap] > 0)
            shares = [min(1.0, max(0.0, products[gap] / squares[gap])) for gap in gaps_ms]
            # A longer pause leaves caches and threads no warmer, so the shares are fitted as
            # non-decreasing. A pause measured in a slow spell would otherwise make a dip.
            if shares:
                from scipy.optimize import isotonic_regression

                shares = [float(v) for v in isotonic_regression(shares, weights=[squares[gap] for gap in gaps_ms]).x]
            curve = ((0.0, 0.0), *zip(gaps_ms, shares), (max(p.gap_ms for p in measured), 1.0))
        self._idle_curves[nearest] = curve
        return curve

    @property
    def runtime_bytes(self) -> int:
        return max(p.runtime_rss_bytes for p in self.calibration.profiles)

    def segment_memory_bytes(self, start: int, stop: int) -> int:
        """Memory a segment adds to a worker: its weights and peak activations for a batch of ``self.batch`` inputs.

        The graph's estimate leaves out the loaded program and the allocator. So where the
        calibration's memory search ran a unit of the segment (or the whole model, for the whole
        model), the segment needs at least what that search measured above the runtime.
        """
        estimate = self.graph.segment_param_bytes(start, stop) + self.batch * self.graph.segment_peak_activation_bytes(start, stop)
        measured = self._measured_memory_bytes()
        names = [unit.name for unit in self.graph.units[start:stop]]
        if start == 0 and stop == self.graph.n_units:
            names.append("model")
        return max([estimate, *(measured[name] for name in names if name in measured)])

    def _measured_memory_bytes(self) -> dict[str, int]:
        """Return, per searched segment name, the smallest memory limit it ran at less the runtime, over all profiles."""
        if self._memory_searched is None:
            self._memory_searched = {}
            for profile in self.calibration.profiles:
                for search in profile.memory_search:
                    if search.min_memory_bytes is not None:
                        extra = max(0, search.min_memory_bytes - self.runtime_bytes)
                        self._memory_searched[search.segment] = max(self._memory_searched.get(search.segment, 0), extra)
        return self._memory_searched

    def hop_latency_ms(self, configured_ms: float | None) -> float:
        if configured_ms is not None:
            return configured_ms
        if self.calibration.link is not None:
            return self.calibration.link.fixed_ms
        return DEFAULT_HOP_LATENCY_MS

    @staticmethod
    def transfer_ms(n_bytes: int, bandwidth_bps: float, latency_ms: float) -> float:
        return latency_ms + n_bytes * 8.0 / bandwidth_bps * 1e3


def idle_share(curve: tuple[tuple[float, float], ...], pause_ms: float) -> float:
    """Return the share of a :meth:`CostModel.idle_curve` after ``pause_ms``, linear between its points."""
    last_ms, last_share = curve[-1]
    if pause_ms >= last_ms:
        return last_share
    previous_ms, previous_share = 0.0, 0.0
    for point_ms, share in curve:
        if pause_ms < point_ms:
            return previous_share + (share - previous_share) * (pause_ms - previous_ms) / (point_ms - previous_ms)
        previous_ms, previous_share = point_ms, share
    return last_share


def _measured_parallelism(profile: ProfileCalibration, index: int) -> float:
    """Return a unit's back-to-back CPU time over its median wall time, between 1 and the profile's threads."""
    unit = profile.units[index]
    wall_ms = unit.warm_wall.p50_ms
    parallelism = unit.warm_cpu_ms / wall_ms if wall_ms > 0 else 1.0
    return min(max(parallelism, 1.0), float(profile.threads))


def check_model_matches(calibration: Calibration, model_name: str, granularity: str, *, source: str) -> None:
    graph = calibration.graph
    if graph.model != model_name or graph.granularity != granularity:
        raise UsageError(
            f"the scenario asks for {model_name} at {granularity} granularity but the calibration "
            f"is of {graph.model} at {graph.granularity} granularity; calibrate that model with "
            f"`amp4ec calibrate --model {model_name} --granularity {granularity}`",
            field="model",
            source=source,
        )
