"""A cost model fitted to a calibration, and its leave-one-profile-out validation.

The model separates the work from the way the kernel hands out CPU time:

- work: a unit's CPU time per forward, fitted as ``w_unit,threads * cpus ** beta_threads`` per
  regime (:class:`amp4ec.costs.WorkFit`, the fit the simulator uses), since a smaller quota can
  make the same forward cost more CPU (caches go cold while the container is throttled). A
  thread count calibrated at two or more quotas has its own ``beta``. One calibrated at a
  single quota takes the ``beta`` pooled over all profiles, so that it can still be predicted
  at another quota. The spread of single runs around the mean is kept as measured (relative
  samples, resampled), from the profiles with the thread count.
- rate: CPU time over wall time of an unthrottled run, per regime, how fast a forward drains
  the quota.
- throttling: sim/cfs.py, the CFS bandwidth model the simulator uses. Spaced runs start with
  a full quota at a random phase of the period; back-to-back runs share one quota in sequence.

So the wall-time distribution of a unit is predicted for any CPU quota from the work and rate
fitted on other profiles. A memory limit below the smallest one found by the memory search
predicts an OOM kill; the thread count selects the profiles the work and rate come from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from amp4ec.calibrate.measure import BACK_TO_BACK_PARTS, DEFAULT_MIN_WINDOW_MS, RepeatPolicy
from amp4ec.costs import Calibration, Measurement, ProfileCalibration, UnitTiming, WorkFit, not_stalled
from amp4ec.errors import UsageError
from amp4ec.sim.cfs import CfsCpu

REGIMES = ("spaced", "saturated")
# The worker's loop between two back-to-back forwards (two clock reads and list appends).
BETWEEN_RUNS_MS = 0.02
PREDICTION_SAMPLES = 2000
# A predicted back-to-back chain is as long as one part of the measured window.
SATURATED_CHAIN_MS = DEFAULT_MIN_WINDOW_MS / BACK_TO_BACK_PARTS
MAX_SATURATED_CHAINS = 60
SATURATED_WARMUP_RUNS = 5
# The fewest timed runs of one part of the measured window (the default --repeats over the parts).
SATURATED_MIN_RUNS = math.ceil(RepeatPolicy.min_repeats / BACK_TO_BACK_PARTS)
# Files before schema 4 do not record their turns: they measured each window in three.
UNRECORDED_TURNS = 3
# A back-to-back run this much longer than the median waited for the next CFS period. Waits
# last from the quota's exhaustion to the period's end, tens of ms at the calibrated quotas.
THROTTLE_WAIT_MS = 5.0
# A back-to-back run reaches the end of its period's quota with a probability of about its CPU
# time over the quota. The back-to-back rate therefore comes only from profiles where a unit's
# mean CPU time is at most this share of the quota, so that most of its runs were not throttled.
SATURATED_RATE_QUOTA_SHARE = 0.2


def chain_design(measurement: Measurement) -> dict[str, float | int]:
    """Return the ``window_ms`` and ``min_runs`` of a predicted back-to-back chain matching the turns of ``measurement``."""
    parts = len(measurement.turns) if measurement.turns else UNRECORDED_TURNS
    return {"window_ms": float(np.sum(measurement.wall_ms)) / parts, "min_runs": math.ceil(RepeatPolicy.min_repeats / parts)}


def unit_samples(timing: UnitTiming, regime: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (cpu_ms, wall_ms) samples of one regime; a schema-1 file only has the means."""
    measurement: Measurement | None = timing.spaced if regime == "spaced" else timing.saturated
    if measurement is not None:
        return np.asarray(measurement.cpu_ms, dtype=float), np.asarray(measurement.wall_ms, dtype=float)
    if regime == "spaced":
        return np.array([timing.cpu_ms]), np.array([timing.wall.mean_ms])
    return np.array([timing.warm_cpu_ms]), np.array([timing.warm_wall.mean_ms])


def after_throttle(wall_ms: np.ndarray) -> np.ndarray:
    """Return which back-to-back runs directly follow a run that waited for the CFS quota.

    A run that took THROTTLE_WAIT_MS longer than the median waited for the next period.
    """
    waited = wall_ms > np.median(wall_ms) + THROTTLE_WAIT_MS
    return np.concatenate([[False], waited[:-1]])


def warm_cpu_samples(timing: UnitTiming, regime: str) -> np.ndarray:
    """Return the CPU time samples of one regime, without host stalls and back-to-back runs after a throttle wait.

    A throttle wait is an idle gap, so the run after it starts with cold caches and costs about
    a spaced run's CPU time. The sample model adds that cost itself where its CFS model throttles.
    """
    cpu_ms, wall_ms = unit_samples(timing, regime)
    # Host stalls are left out as in the calibration's own means.
    typical = not_stalled(cpu_ms)
    if regime == "spaced" or len(cpu_ms) < 3:
        return cpu_ms[typical]
    return cpu_ms[typical & ~after_throttle(wall_ms)]


def profile_timings(profile: ProfileCalibration) -> list[UnitTiming]:
    """Return the units of a profile followed by the whole model (when measured)."""
    return [*profile.units, *([profile.model] if profile.model is not None else [])]


@dataclass
class FittedCostModel:
    """Work, spread and rate per unit, fitted on some profiles of one calibration."""

    names: list[str]
    threads: int
    host_cores: int
    period_ms: float
    work_threads: int = 1
    """the calibrated thread count whose work, spread and rate predict ``threads``"""
    work: WorkFit | None = None
    """per regime: mean CPU time of every unit (and the whole model last) against the quota"""
    spread: dict[str, list[np.ndarray]] = field(default_factory=dict)
    """per regime and unit: single-run CPU time over its profile's mean"""
    rate: dict[str, np.ndarray] = field(default_factory=dict)
    """per regime and unit: median CPU ms per wall ms while not throttled"""
    rate_samples: dict[str, list[np.ndarray]] = field(default_factory=dict)
    """per regime and unit: CPU ms per wall ms of every unthrottled run"""
    min_memory_bytes: dict[str, int] = field(default_factory=dict)
    reference_cpu_ms: float | None = None
    """with normalise: the training profiles' mean whole-model reference CPU time"""
    _cpu_ms: dict[tuple[str, float], np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def fit(cls, profiles: Sequence[ProfileCalibration], *, threads: int, host_cores: int, normalise: bool = False) -> FittedCostModel:
        """Fit on ``profiles`` with ``threads`` torch threads (or the nearest calibrated count).

        With ``normalise`` every profile's CPU times are divided by its whole-model reference
        time over the training profiles' mean reference, which removes machine speed drift
        between profiles; predictions then need the target container's reference time.
        """
        if not profiles:
            raise UsageError("no profiles to fit the cost model on; the calibration needs at least two profiles")
        same = [p for p in profiles if p.threads == threads]
        if not same:
            nearest = min({p.threads for p in profiles}, key=lambda t: (abs(t - threads), t))
            same = [p for p in profiles if p.threads == nearest]
        names = [t.name for t in profile_timings(same[0])]
        n_units = len(names)
        model = cls(names=names, threads=threads, host_cores=host_cores, period_ms=same[0].cfs_period_us / 1e3, work_threads=same[0].threads)
        # Every profile whose timings cover the same units takes part in the work fit.
        training = [p for p in profiles if len(profile_timings(p)) >= n_units]
        scale = np.ones(len(training))
        if normalise:
            groups = sorted({p.threads for p in training})
            group = np.array([groups.index(p.threads) for p in training])
            target = groups.index(same[0].threads)
            if not all(p.reference_cpu_ms for p in training):
                raise UsageError("normalising needs the whole-model reference times of schema 2; recalibrate with this version of amp4ec")
            # A reference time depends on the thread count, so each profile is scaled to its own thread count's mean.
            references = np.array([np.mean(p.reference_cpu_ms) for p in training])
            group_means = np.array([references[group == g].mean() for g in range(len(groups))])
            model.reference_cpu_ms = float(group_means[target])
            scale = references / group_means[group]
        means = {
            regime: np.array([[warm_cpu_samples(t, regime).mean() for t in profile_timings(p)[:n_units]] for p in training]) / scale[:, None]
            for regime in REGIMES
        }
        model.work = WorkFit(means, [p.cpus for p in training], [p.threads for p in training])
        for regime in REGIMES:
            model.spread[regime] = [
                np.concatenate(
                    [
                        warm_cpu_samples(profile_timings(p)[u], regime) / (means[regime][i, u] * scale[i])
                        for i, p in enumerate(training)
                        if p.threads == same[0].threads
                    ]
                )
                for u in range(n_units)
            ]
        # Each regime keeps its own rate. A 2-thread forward after an idle gap keeps about one core
        # busy, while back to back its threads are awake and some units keep up to 1.4 cores busy.
        for regime in REGIMES:
            model.rate_samples[regime] = []
            for u in range(len(names)):
                ratios = []
                for p in same:
                    cpu, wall = unit_samples(profile_timings(p)[u], regime)
                    quota_ms = p.cpus * model.period_ms
                    # Runs that used more CPU than one period's quota were throttled for sure.
                    keep = (wall > 0) & (cpu < quota_ms)
                    if regime == "saturated":
                        if np.mean(cpu) > SATURATED_RATE_QUOTA_SHARE * quota_ms:
                            continue
                        # Back-to-back runs that waited for the next period were throttled too.
                        keep &= wall <= np.median(wall) + THROTTLE_WAIT_MS
                    ratios.append(cpu[keep] / wall[keep])
                pooled = np.concatenate(ratios) if ratios else np.ones(0)
                if regime == "saturated":
                    # A back-to-back run throttled for less than THROTTLE_WAIT_MS still counts above,
                    # so single runs keep the spread of the spaced ones, moved to this regime's median.
                    spaced = model.rate_samples["spaced"][u]
                    pooled = spaced * (np.median(pooled) / np.median(spaced) if len(pooled) else 1.0)
                elif len(pooled) == 0:
                    pooled = np.ones(1)
                # Single runs keep their own rate: on a shared host some runs also wait for a core.
                model.rate_samples[regime].append(np.clip(pooled, 1e-3, float(max(1, threads))))
            model.rate[regime] = np.array([float(np.median(samples)) for samples in model.rate_samples[regime]])
        for p in same:
            for search in p.memory_search:
                if search.min_memory_bytes is not None:
                    model.min_memory_bytes[search.segment] = max(model.min_memory_bytes.get(search.segment, 0), search.min_memory_bytes)
        return model

    def cpu_ms(self, regime: str, cpus: float) -> np.ndarray:
        """Return the fitted mean CPU time of every unit (and the whole model last) at ``cpus``."""
        # A predicted back-to-back chain draws one run at a time, so the means are computed once per quota.
        key = (regime, cpus)
        if key not in self._cpu_ms:
            self._cpu_ms[key] = self.work.cpu_ms(regime, cpus, self.work_threads)
        return self._cpu_ms[key]

    def work_samples(self, unit: int, regime: str, cpus: float, n: int, rng: np.random.Generator, speed: float = 1.0) -> np.ndarray:
        mean_ms = speed * self.cpu_ms(regime, cpus)[unit]
        return mean_ms * rng.choice(self.spread[regime][unit], size=n)

    def predict_wall(
        self,
        unit: int,
        regime: str,
        *,
        cpus: float,
        memory_bytes: int | None = None,
        seed: int = 0,
        reference_cpu_ms: float | None = None,
        window_ms: float = SATURATED_CHAIN_MS,
        min_runs: int = SATURATED_MIN_RUNS,
    ) -> np.ndarray | None:
        """Return sampled wall times (ms) of unit ``unit`` in a container with ``cpus``; None predicts an OOM kill.

        ``reference_cpu_ms`` is the target container's whole-model reference time, used only by a
        normalised fit. ``window_ms`` is how long each chain of back-to-back runs lasts, and
        ``min_runs`` how many timed runs it has at least.
        """
        name = self.names[unit]
        speed = 1.0
        if self.reference_cpu_ms is not None and reference_cpu_ms is not None:
            speed = reference_cpu_ms / self.reference_cpu_ms
        if memory_bytes is not None and self.min_memory_bytes.get(name, 0) > memory_bytes:
            return None
        rng = np.random.default_rng(seed)
        rates = self.rate_samples[regime][unit]
        if regime == "spaced":
            work = self.work_samples(unit, regime, cpus, PREDICTION_SAMPLES, rng, speed)
            phases = rng.uniform(0, self.period_ms, size=len(work))
            run_rates = rng.choice(rates, size=len(work))
            walls = []
            for w, phase, rate in zip(work, phases, run_rates):
                cpu = CfsCpu(cpus, period_ms=self.period_ms, cores=self.host_cores, phase_ms=phase)
                walls.append(cpu.run(0.0, w, float(rate)))
            return np.asarray(walls)
        # The extra work of a run after a throttle wait: a spaced run's over a back-to-back one's.
        cold_ms = speed * max(0.0, self.cpu_ms("spaced", cpus)[unit] - self.cpu_ms(regime, cpus)[unit])
        walls: list[float] = []
        for _ in range(MAX_SATURATED_CHAINS):
            # Each chain starts at a random phase of the period with a full quota, as each part
            # of the measurement's back-to-back window does: untimed warm-up runs, then timed
            # runs until they span the window and number at least SATURATED_MIN_RUNS.
            cpu = CfsCpu(cpus, period_ms=self.period_ms, cores=self.host_cores, phase_ms=rng.uniform(0, self.period_ms))
            now_ms = 0.0
            index = 0
            timed_ms = 0.0
            cold = False
            while timed_ms < window_ms or index < SATURATED_WARMUP_RUNS + min_runs:
                work = float(self.work_samples(unit, regime, cpus, 1, rng, speed)[0]) + (cold_ms if cold else 0.0)
                rate = float(rng.choice(rates))
                end_ms = cpu.run(now_ms, work, rate)
                # A run that waited for the quota leaves the next one to start cold.
                cold = end_ms - now_ms > work / rate + THROTTLE_WAIT_MS
                if index >= SATURATED_WARMUP_RUNS:
                    walls.append(end_ms - now_ms)
                    timed_ms += end_ms - now_ms
                now_ms = end_ms + BETWEEN_RUNS_MS
                index += 1
            if len(walls) >= PREDICTION_SAMPLES:
                break
        return np.asarray(walls)


@dataclass
class Comparison:
    profile: str
    unit: str
    regime: str
    statistic: str
    measured_ms: float
    predicted_ms: float
    measured_ci_rel: float | None = None
    """95 % bootstrap confidence half-width of the measured statistic over its value: the
    measurement's own precision, below which no prediction error can be resolved"""

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1 if self.measured_ms > 0 else math.inf


# A measured statistic known to this fraction (95 % half-width) leaves room to resolve a 5 % error.
PRECISE_MEASUREMENT = 0.025
STATISTICS = {"mean": np.mean, "p95": lambda values, axis=-1: np.percentile(values, 95, axis=axis)}
BOOTSTRAP_RESAMPLES = 300


def measured_ci_rel(samples: np.ndarray, statistic: str, seed: int, turns: Sequence[int] | None = None) -> float | None:
    """Return the 95 % bootstrap confidence half-width of ``statistic`` of ``samples`` over its value.

    Runs measured in turns (``turns`` lists each turn's run count, in order) are resampled a
    whole turn at a time. The runs of one turn share the machine's speed of that moment, so
    resampling single runs would claim a precision the window does not have.
    """
    from scipy import stats

    value = float(STATISTICS[statistic](samples))
    if len(samples) < 2 or value <= 0:
        return None
    rng = np.random.default_rng(seed)
    if turns is not None and len(turns) > 1:
        groups = np.split(samples, np.cumsum(turns)[:-1])
        picks = rng.integers(len(groups), size=(BOOTSTRAP_RESAMPLES, len(groups)))
        values = [float(STATISTICS[statistic](np.concatenate([groups[i] for i in pick]))) for pick in picks]
        low, high = np.percentile(values, [2.5, 97.5])
    else:
        result = stats.bootstrap((samples,), STATISTICS[statistic], n_resamples=BOOTSTRAP_RESAMPLES, method="percentile", random_state=rng)
        low, high = result.confidence_interval
    return float((high - low) / 2 / value)


def _require_two_profiles(calibration: Calibration) -> None:
    if len(calibration.profiles) < 2:
        raise UsageError(
            f"the calibration has {len(calibration.profiles)} profile; leaving one out needs at least two. "
            "Calibrate with more --profile options"
        )


def leave_one_out(calibration: Calibration, *, normalise: bool = False) -> list[Comparison]:
    """Predict every profile from the others; compare mean and p95 wall time per unit and regime.

    With ``normalise`` the held-out profile's own whole-model reference time sets the machine speed.
    """
    _require_two_profiles(calibration)
    comparisons = []
    for held_out in calibration.profiles:
        others = [p for p in calibration.profiles if p is not held_out]
        model = FittedCostModel.fit(others, threads=held_out.threads, host_cores=calibration.provenance.host_cores, normalise=normalise)
        reference = float(np.mean(held_out.reference_cpu_ms)) if held_out.reference_cpu_ms else None
        for index, timing in enumerate(profile_timings(held_out)):
            if index >= len(model.names):
                break
            for regime in REGIMES:
                _, measured = unit_samples(timing, regime)
                measurement = timing.spaced if regime == "spaced" else timing.saturated
                turns = measurement.turns if measurement is not None else None
                chain = chain_design(measurement) if regime == "saturated" and measurement is not None else {}
                predicted = model.predict_wall(
                    index, regime, cpus=held_out.cpus, memory_bytes=held_out.memory_bytes, seed=index, reference_cpu_ms=reference, **chain
                )
                if predicted is None:
                    continue
                for statistic, reduce in STATISTICS.items():
                    comparisons.append(
                        Comparison(
                            held_out.name,
                            timing.name,
                            regime,
                            statistic,
                            float(reduce(measured)),
                            float(reduce(predicted)),
                            measured_ci_rel(measured, statistic, seed=index, turns=turns),
                        )
                    )
    return comparisons


def accuracy(items: Sequence[Comparison]) -> dict:
    """Return the share of predictions within 5 % and 10 % of the measurement, the median and largest error,
    and how precise the measurements themselves were (when their confidence intervals are known)."""
    errors = np.abs([c.error for c in items])
    if len(errors) == 0:
        return {"predictions": 0}
    block = {
        "predictions": len(errors),
        "within_5pct": float(np.mean(errors <= 0.05)),
        "within_10pct": float(np.mean(errors <= 0.10)),
        "median_abs_error": float(np.median(errors)),
        "max_abs_error": float(np.max(errors)),
    }
    precisions = [c.measured_ci_rel for c in items if c.measured_ci_rel is not None]
    if precisions:
        block["median_measured_ci_rel"] = float(np.median(precisions))
        block["measured_within_5pct"] = float(np.mean(np.asarray(precisions) <= 0.05))
    return block


def summarise(comparisons: Sequence[Comparison]) -> dict:
    """Share of predictions within 5 % and 10 %, and error summaries, overall and per group."""
    block = accuracy
    summary = {"all": block(comparisons)}
    for statistic in ("mean", "p95"):
        summary[statistic] = block([c for c in comparisons if c.statistic == statistic])
    for regime in REGIMES:
        summary[regime] = block([c for c in comparisons if c.regime == regime])
    summary["whole model"] = block([c for c in comparisons if c.unit == "model"])
    summary["precisely measured"] = block(
        [c for c in comparisons if c.measured_ci_rel is not None and c.measured_ci_rel <= PRECISE_MEASUREMENT]
    )
    summary["per profile"] = {p: block([c for c in comparisons if c.profile == p]) for p in dict.fromkeys(c.profile for c in comparisons)}
    summary["comparisons"] = [asdict(c) | {"error": c.error} for c in comparisons]
    return summary


def simulator_leave_one_out(calibration: Calibration, *, phases: int = 200) -> list[Comparison]:
    """Predict every profile with the simulator's cost model fitted on the others.

    The segments are every single unit and the whole model. For each, :meth:`CostModel.segment_cost`
    predicts the CPU time of one call after an idle gap, which is compared with the measured
    spaced CPU time. The wall time of that call under the held-out profile's CFS quota, averaged
    over ``phases`` evenly spread start phases of the period, is compared with the measured
    spaced wall time. These comparisons have the regime ``"simulator"``. The whole model's CPU
    time is also predicted back to back (:meth:`CostModel.busy_segment_cost`, regime
    ``"simulator busy"``) and after each pause the profile was timed with (between the two by
    :meth:`CostModel.idle_curve`, regime ``"simulator pause"``, unit ``"model after N ms"``).
    """
    from amp4ec.costs import CostModel, mean_without_stalls

    _require_two_profiles(calibration)
    n_units = calibration.graph.n_units
    comparisons = []
    for held_out in calibration.profiles:
        others = [p for p in calibration.profiles if p is not held_out]
        costs = CostModel(calibration.model_copy(update={"profiles": others}))
        segments = [(i, i + 1, held_out.units[i]) for i in range(n_units)]
        if held_out.model is not None:
            segments.append((0, n_units, held_out.model))
        for start, stop, timing in segments:
            cost = costs.segment_cost(start, stop, held_out.threads, cpus=held_out.cpus)
            walls = []
            period_ms = held_out.cfs_period_us / 1e3
            for k in range(phases):
                cpu = CfsCpu(held_out.cpus, period_ms=period_ms, cores=calibration.provenance.host_cores, phase_ms=k * period_ms / phases)
                walls.append(cpu.run(0.0, cost.cpu_ms, cost.parallelism))
            name = timing.name
            comparisons.append(Comparison(held_out.name, name, "simulator", "cpu mean", timing.cpu_ms, cost.cpu_ms))
            comparisons.append(Comparison(held_out.name, name, "simulator", "wall mean", timing.wall.mean_ms, float(np.mean(walls))))
        if held_out.model is None:
            continue
        busy_ms = costs.busy_segment_cost(0, n_units, held_out.threads, cpus=held_out.cpus).cpu_ms
        comparisons.append(Comparison(held_out.name, "model", "simulator busy", "cpu mean", held_out.model.typical_cpu_ms("warm"), busy_ms))
        for measurement in held_out.idle_gaps:
            predicted = costs.paused_cpu_ms(0, n_units, held_out.threads, held_out.cpus, measurement.gap_ms)
            measured = mean_without_stalls(measurement.cpu_ms)
            comparisons.append(Comparison(held_out.name, f"model after {measurement.gap_ms:g} ms", "simulator pause", "cpu mean", measured, predicted))
    return comparisons


def cpu_leave_one_out(calibration: Calibration) -> list[Comparison]:
    """Predict every profile's mean CPU time per unit and regime from the work fitted on the others.

    CPU time is the part of the cost that the quota should hardly change, so these
    comparisons separate the fit of the work from host contention, which shows only in
    wall time. Their statistic is ``"cpu mean"``.
    """
    _require_two_profiles(calibration)
    comparisons = []
    for held_out in calibration.profiles:
        others = [p for p in calibration.profiles if p is not held_out]
        model = FittedCostModel.fit(others, threads=held_out.threads, host_cores=calibration.provenance.host_cores)
        for index, timing in enumerate(profile_timings(held_out)[: len(model.names)]):
            for regime in REGIMES:
                measured, _ = unit_samples(timing, regime)
                predicted = model.cpu_ms(regime, held_out.cpus)[index]
                comparisons.append(Comparison(held_out.name, timing.name, regime, "cpu mean", float(np.mean(measured)), float(predicted)))
    return comparisons
