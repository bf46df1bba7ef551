"""The calibration file and the cost model the simulator reads from it.

A calibration file contains the model graph and, per container profile (CPU quota, memory limit,
torch threads), what each unit cost when run inside such a container: CPU time and the
wall-time distribution with requests spaced apart, so the quota was not exhausted. The cost
model keeps the CPU time (the work) and the parallelism (CPU time over unthrottled wall time)
and leaves throttling to the simulator's CFS model, which is what lets one calibration predict
containers with quotas it was not measured at.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from amp4ec.errors import FileFormatError, UsageError
from amp4ec.graph import ModelGraph, read_json, write_text_atomic

CALIBRATION_SCHEMA = "amp4ec.calibration/2"
# Version 2 only adds optional fields (raw samples, throttling counters, drift, memory search,
# a container-to-container link), so version 1 files still load.
READABLE_CALIBRATION_SCHEMAS = ("amp4ec.calibration/1", CALIBRATION_SCHEMA)
DEFAULT_CALIBRATION = "calibration-mobilenet_v2.json"
DEFAULT_HOP_LATENCY_MS = 0.2


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


class Measurement(BaseModel):
    """Every timed run of one unit in one regime, and when the repetition stopped."""

    gap_ms: float = Field(ge=0, description="pause before each run; 0 is back to back (saturated)")
    wall_ms: list[float] = Field(min_length=1)
    cpu_ms: list[float] = Field(min_length=1)
    ci95_rel: float = Field(ge=0, description="95 % confidence half-width of the mean over the mean (the larger of wall and CPU time)")
    converged: bool = Field(description="ci95_rel reached the target before the maximum count")
    cpu_stat: CpuStatDelta | None = None
    peak_rss_bytes: int | None = Field(default=None, description="worker's peak resident set size so far")


class UnitTiming(BaseModel):
    """One unit (or the whole model) measured in one profile, spaced apart and back to back."""

    name: str
    cpu_ms: float = Field(ge=0, description="mean CPU time of one forward, all threads, runs spaced apart")
    wall: TimingStats
    warm_cpu_ms: float = Field(ge=0, description="mean CPU time of one forward, runs back to back")
    warm_wall: TimingStats
    spaced: Measurement | None = Field(default=None, description="raw samples, runs spaced apart (schema 2)")
    saturated: Measurement | None = Field(default=None, description="raw samples, runs back to back (schema 2)")


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


class LinkCalibration(BaseModel):
    """Time per hop between containers, fitted as fixed_ms + bytes * 8 / bandwidth_bps."""

    fixed_ms: float = Field(ge=0)
    bandwidth_bps: float = Field(gt=0)
    samples: int = Field(ge=1)
    transport: str


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


class Calibration(BaseModel):
    schema_: str = Field(alias="schema")
    graph: ModelGraph
    profiles: list[ProfileCalibration] = Field(min_length=1)
    link: LinkCalibration | None = None
    provenance: Provenance
    container_link: LinkCalibration | None = Field(default=None, description="one hop between two worker containers (schema 2)")
    warnings: list[str] = Field(default_factory=list)

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


def load_calibration(path: str | Path) -> Calibration:
    """Load a calibration file; ``"default"`` names the file shipped with the package."""
    path = default_calibration_path() if str(path) == "default" else Path(path)
    data = read_json(path)
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema not in READABLE_CALIBRATION_SCHEMAS:
        raise FileFormatError(
            f"schema is {schema!r}, expected one of {', '.join(map(repr, READABLE_CALIBRATION_SCHEMAS))}; "
            "recalibrate with `amp4ec calibrate` from this version of amp4ec",
            source=str(path),
        )
    try:
        calibration = Calibration.model_validate(data)
    except ValidationError as exc:
        raise FileFormatError(f"invalid calibration file: {exc}", source=str(path)) from exc
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


class CostModel:
    """Per-unit CPU work and transfer time, read from a calibration."""

    def __init__(self, calibration: Calibration):
        # Costs are looked up once per stage of every simulated request, so they are memoised.
        self.calibration = calibration
        self.graph = calibration.graph
        self._by_threads: dict[int, list[ProfileCalibration]] = {}
        self._segment_costs: dict[tuple[int, int, int], SegmentCost] = {}
        for profile in calibration.profiles:
            self._by_threads.setdefault(profile.threads, []).append(profile)

    def profiles_for_threads(self, threads: int) -> tuple[int, list[ProfileCalibration]]:
        """Return the calibrated thread count nearest to ``threads`` and its profiles.

        NOTE: a thread count that was not calibrated borrows the nearest one's costs, so its
        speed-up is not predicted. Calibrate a profile with that many threads to predict it.
        """
        nearest = min(self._by_threads, key=lambda t: (abs(t - threads), t))
        return nearest, self._by_threads[nearest]

    def call_overhead(self, threads: int) -> SegmentCost:
        """Return the work a program call adds on top of its units' own work.

        Timed one by one and back to back, the units of a model add up to more than the whole
        model timed the same way. That difference, spread over the extra calls, is what each
        call costs beyond its units, and a segment pays it once.
        """
        _, profiles = self.profiles_for_threads(threads)
        n_units = self.graph.n_units
        per_call = []
        for p in profiles:
            if p.model is not None and n_units > 1:
                per_call.append((sum(u.warm_cpu_ms for u in p.units) - p.model.warm_cpu_ms) / (n_units - 1))
        cpu_ms = max(0.0, statistics.median(per_call)) if per_call else 0.0
        return SegmentCost(cpu_ms=cpu_ms, parallelism=1.0)

    def cold_start(self, threads: int) -> SegmentCost:
        """Return the extra work of a call that starts with cold caches.

        A unit run after an idle gap costs more than the same unit back to back, mostly
        because it refetches what the idle time evicted. Inside a segment only the first unit pays it.
        The estimate is the median over units of spaced minus back-to-back CPU time.
        """
        _, profiles = self.profiles_for_threads(threads)
        penalties = [u.cpu_ms - u.warm_cpu_ms for p in profiles for u in p.units]
        return SegmentCost(cpu_ms=max(0.0, statistics.median(penalties)), parallelism=1.0)

    def unit_cost(self, index: int, threads: int) -> SegmentCost:
        """Return the work of unit ``index`` inside a segment: warm caches, no call overhead."""
        _, profiles = self.profiles_for_threads(threads)
        cpu_ms = max(0.0, statistics.median(p.units[index].warm_cpu_ms for p in profiles) - self.call_overhead(threads).cpu_ms)
        # The profile with the largest quota is the least likely to have been throttled,
        # so its wall time is the best estimate of the unthrottled duration.
        fastest = max(profiles, key=lambda p: p.cpus)
        wall_ms = fastest.units[index].warm_wall.p50_ms
        parallelism = fastest.units[index].warm_cpu_ms / wall_ms if wall_ms > 0 else 1.0
        parallelism = min(max(parallelism, 1.0), float(fastest.threads))
        return SegmentCost(cpu_ms=cpu_ms, parallelism=parallelism)

    def segment_cost(self, start: int, stop: int, threads: int) -> SegmentCost:
        """Return the work of one call of units ``start`` to ``stop - 1``.

        That is one call overhead and one cold start, plus each unit's warm work.
        """
        if not 0 <= start < stop <= self.graph.n_units:
            raise ValueError(f"segment [{start}, {stop}) is outside the graph's {self.graph.n_units} units")
        key = (start, stop, threads)
        cached = self._segment_costs.get(key)
        if cached is not None:
            return cached
        costs = [self.call_overhead(threads), self.cold_start(threads)]
        costs += [self.unit_cost(i, threads) for i in range(start, stop)]
        cpu_ms = sum(c.cpu_ms for c in costs)
        wall_ms = sum(c.cpu_ms / c.parallelism for c in costs)
        cost = SegmentCost(cpu_ms=cpu_ms, parallelism=cpu_ms / wall_ms if wall_ms > 0 else 1.0)
        self._segment_costs[key] = cost
        return cost

    @property
    def runtime_bytes(self) -> int:
        return max(p.runtime_rss_bytes for p in self.calibration.profiles)

    def segment_memory_bytes(self, start: int, stop: int) -> int:
        """Memory a segment adds to a worker: its weights and peak activations (batch 1)."""
        return self.graph.segment_param_bytes(start, stop) + self.graph.segment_peak_activation_bytes(start, stop)

    def hop_latency_ms(self, configured_ms: float | None) -> float:
        if configured_ms is not None:
            return configured_ms
        if self.calibration.link is not None:
            return self.calibration.link.fixed_ms
        return DEFAULT_HOP_LATENCY_MS

    @staticmethod
    def transfer_ms(n_bytes: int, bandwidth_bps: float, latency_ms: float) -> float:
        return latency_ms + n_bytes * 8.0 / bandwidth_bps * 1e3


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
