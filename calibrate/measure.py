"""Repeat a unit's timed runs inside a worker until the mean is known to a target precision.

A worker's `profile` op times a batch of runs; this module asks for batches until the 95 %
confidence half-width of the mean (Student's t) is at most ``target_ci_rel`` of the mean, for
both wall time and CPU time, or until ``max_repeats`` runs. It also sums the container's
cgroup cpu.stat counters over the batches, so the throttling the kernel did is recorded next
to the wall times it caused. Both regimes can also be measured on several workers at once,
the workers taking turns (:func:`measure_spaced_interleaved`,
:func:`measure_back_to_back_interleaved`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from amp4ec.costs import CpuStatDelta, Measurement, TimingStats

DEFAULT_TARGET_CI_REL = 0.02
# Back to back, a throttled unit waits for the next CFS period about once per period of runs,
# so the mean over a window of runs is off by up to one period's wait. Windows of at least
# 20 periods (100 ms each by default) keep that error under about 5 % of the throttled time;
# independent-sample confidence intervals cannot see this error, so it needs its own bound.
DEFAULT_MIN_WINDOW_MS = 2000.0
PROBE_WINDOW_MS = 200.0
# Back to back, the runs that fill a window are asked for in at least this many requests.
WINDOW_REQUESTS = 4
# Back to back, each profile's window is measured in this many parts, the profiles taking turns,
# so a slow spell of the shared host (0.1 to 0.5 s, about 40 % slower) reaches every profile.
# Each part starts at a random phase of the CFS period, so parts much shorter than 333 ms add noise.
BACK_TO_BACK_PARTS = 6
# Each turn takes 0.2 to 0.33 s per profile and unit, so this many take MobileNetV2's 21
# segments on three profiles about 1 to 2 hours.
MAX_TURNS = 300
# Beyond those parts, a profile takes more turns of the same length while the mean across its
# turns is less precise than the target, up to RepeatPolicy.max_turns.


@dataclass(frozen=True)
class RepeatPolicy:
    """How many timed runs to ask for: at least ``min_repeats``, in batches, at most ``max_repeats``."""

    min_repeats: int = 10
    max_repeats: int = 60
    batch: int = 10
    target_ci_rel: float = DEFAULT_TARGET_CI_REL
    min_window_ms: float = DEFAULT_MIN_WINDOW_MS
    """back to back only: least total wall time of the timed runs, see DEFAULT_MIN_WINDOW_MS"""
    max_window_repeats: int = 5000
    max_turns: int = BACK_TO_BACK_PARTS
    """back to back only: maximum turns per profile, each ``min_window_ms / BACK_TO_BACK_PARTS`` long"""

    def __post_init__(self) -> None:
        if self.min_repeats < 2 or self.max_repeats < self.min_repeats or self.batch < 1:
            raise ValueError(f"invalid repeat policy {self}: need 2 <= min_repeats <= max_repeats and batch >= 1")


def ci95_rel(samples: Sequence[float]) -> float:
    """Return the 95 % confidence half-width of the mean, relative to the mean (inf when undefined)."""
    from scipy import stats

    values = np.asarray(samples, dtype=float)
    n = len(values)
    mean = float(values.mean()) if n else 0.0
    if n < 2 or mean <= 0:
        return math.inf
    half_width = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return float(half_width / mean)


def turn_ci95_rel(samples: Sequence[float], turns: Sequence[int]) -> float:
    """Return the 95 % confidence half-width of the mean of runs measured in ``turns``, relative to the mean.

    The runs of one turn share the machine's speed of that moment, so the turns, not the runs,
    are the independent draws. The half-width is the cluster-robust standard error of the mean
    over all runs times Student's t for the number of turns, and inf with fewer than two turns.
    """
    from scipy import stats

    values = np.asarray(samples, dtype=float)
    counts = np.asarray(turns, dtype=float)
    k = len(counts)
    total = float(values.sum())
    if k < 2 or total <= 0:
        return math.inf
    mean = total / counts.sum()
    sums = np.add.reduceat(values, np.concatenate([[0], np.cumsum(turns)[:-1]]).astype(int))
    variance = k / (k - 1) * float(np.sum((sums - mean * counts) ** 2)) / float(counts.sum()) ** 2
    return float(stats.t.ppf(0.975, k - 1) * math.sqrt(variance) / mean)


def timing_stats(samples_ms: Sequence[float]) -> TimingStats:
    values = np.asarray(samples_ms, dtype=float)
    return TimingStats(
        mean_ms=float(values.mean()),
        p50_ms=float(np.percentile(values, 50)),
        p95_ms=float(np.percentile(values, 95)),
        samples=len(values),
    )


def _cpu_stat_delta(before: dict | None, after: dict | None) -> CpuStatDelta | None:
    if not before or not after:
        return None

    def delta(key: str) -> int | None:
        if before.get(key) is None or after.get(key) is None:
            return None
        return int(after[key]) - int(before[key])

    throttled_ns = delta("throttled_time")
    return CpuStatDelta(
        nr_periods=delta("nr_periods"),
        nr_throttled=delta("nr_throttled"),
        throttled_ms=None if throttled_ns is None else throttled_ns / 1e6,
    )


def _add(total: CpuStatDelta | None, part: CpuStatDelta | None) -> CpuStatDelta | None:
    if total is None:
        return part
    if part is None:
        return total

    def plus(a, b):
        return None if a is None or b is None else a + b

    return CpuStatDelta(
        nr_periods=plus(total.nr_periods, part.nr_periods),
        nr_throttled=plus(total.nr_throttled, part.nr_throttled),
        throttled_ms=plus(total.throttled_ms, part.throttled_ms),
    )


def measure(
    worker, segment_id: str, inputs: list[np.ndarray], *, gap_ms: float, warmup: int, policy: RepeatPolicy, throttled: bool = False
) -> Measurement:
    """Time ``segment_id`` (already loaded) with runs ``gap_ms`` apart until the mean is precise enough.

    With ``throttled`` (an earlier window of the same unit was throttled) a back-to-back window
    spans ``policy.min_window_ms`` even if its own first runs were not throttled.
    """
    wall_ms: list[float] = []
    cpu_ms: list[float] = []
    cpu_stat = None
    peak_rss_bytes = None
    first = True
    precision = math.inf
    # Back to back, two periods of runs always show whether the quota throttles this unit;
    # only a unit that was throttled needs the full window.
    probe_window_ms = min(policy.min_window_ms, PROBE_WINDOW_MS) if gap_ms == 0 else 0.0
    min_window_ms = policy.min_window_ms if gap_ms == 0 and throttled else probe_window_ms
    while True:
        window_short_ms = min_window_ms - sum(wall_ms)
        if first:
            requested = policy.min_repeats
        elif len(wall_ms) < policy.max_repeats:
            requested = min(policy.batch, policy.max_repeats - len(wall_ms))
        else:
            requested = policy.batch
        if not first and window_short_ms > 0:
            # Ask for the runs that fill the rest of the window at the mean wall time so far, but
            # for at most a quarter of the window at a time. Runs slow down once the quota starts
            # throttling them, and one request for the whole rest overshot the window 2.5 times at 0.4 CPU.
            fill_ms = min(window_short_ms, min_window_ms / WINDOW_REQUESTS)
            requested = max(requested, math.ceil(fill_ms / max(float(np.mean(wall_ms)), 1e-3)))
        requested = min(requested, policy.max_window_repeats - len(wall_ms))
        if not first and gap_ms:
            # The worker sleeps only between the runs of one request, so the first run of a
            # later batch would follow the previous batch's last run without a gap.
            time.sleep(gap_ms / 1e3)
        reply = worker.profile(segment_id, inputs, warmup=warmup if first else 0, repeats=requested, gap_ms=gap_ms)
        first = False
        wall_ms.extend(float(v) for v in reply["wall_ms"])
        cpu_ms.extend(float(v) for v in reply["cpu_ms"])
        cpu_stat = _add(cpu_stat, _cpu_stat_delta(reply.get("cpu_stat_before"), reply.get("cpu_stat_after")))
        peak_rss_bytes = reply.get("peak_rss_bytes", peak_rss_bytes)
        precision = max(ci95_rel(wall_ms), ci95_rel(cpu_ms))
        if gap_ms == 0 and cpu_stat is not None and (cpu_stat.nr_throttled or 0) > 0:
            min_window_ms = policy.min_window_ms
        window_full = sum(wall_ms) >= min_window_ms
        if window_full and (precision <= policy.target_ci_rel or len(wall_ms) >= policy.max_repeats):
            break
        if len(wall_ms) >= policy.max_window_repeats:
            break
    return Measurement(
        gap_ms=gap_ms,
        # Microsecond resolution is what perf_counter deltas of a forward carry on a shared host.
        wall_ms=[round(v, 3) for v in wall_ms],
        cpu_ms=[round(v, 3) for v in cpu_ms],
        ci95_rel=precision if math.isfinite(precision) else 1e9,
        converged=precision <= policy.target_ci_rel and sum(wall_ms) >= min_window_ms,
        cpu_stat=cpu_stat,
        peak_rss_bytes=peak_rss_bytes,
    )


def measure_back_to_back_interleaved(
    workers: Mapping[str, object],
    segment_id: str,
    inputs: list[np.ndarray],
    *,
    warmup: int,
    policy: RepeatPolicy,
    parts: int = BACK_TO_BACK_PARTS,
    start: int = 0,
) -> dict[str, Measurement]:
    """Time ``segment_id`` back to back on every worker, in turns of a ``parts``-th of the window each.

    Every worker measures ``parts`` shorter windows as :func:`measure` does (each after
    ``warmup`` untimed runs), and the workers take turns, the first one rotating from turn to
    turn and with ``start``. Machine speed changes over seconds on a shared host, and taking
    turns spreads such a change over all profiles instead of charging it to the one measured
    at that moment. Only one container computes at any time. After ``parts`` turns, the workers
    whose mean across turns (:func:`turn_ci95_rel`) is not yet within ``policy.target_ci_rel``
    take further turns, up to ``policy.max_turns`` in all.
    """
    names = list(workers)
    part_policy = replace(
        policy,
        min_repeats=max(2, math.ceil(policy.min_repeats / parts)),
        max_repeats=max(2, math.ceil(policy.max_repeats / parts)),
        min_window_ms=policy.min_window_ms / parts,
        max_window_repeats=max(2, math.ceil(policy.max_window_repeats / parts)),
    )
    measured: dict[str, list[Measurement]] = {name: [] for name in names}
    for turn in range(max(parts, policy.max_turns)):
        taking_turns = [name for name in names if turn < parts or _turn_precision(measured[name]) > policy.target_ci_rel]
        if not taking_turns:
            break
        for name in _rotated(taking_turns, start + turn):
            # Once a turn was throttled, every later turn of that profile spans the full part window.
            throttled = any(part.cpu_stat is not None and (part.cpu_stat.nr_throttled or 0) > 0 for part in measured[name])
            measured[name].append(
                measure(workers[name], segment_id, inputs, gap_ms=0.0, warmup=warmup, policy=part_policy, throttled=throttled)
            )
    return {name: _merge(measured[name], policy) for name in names}


def _turn_precision(parts: Sequence[Measurement]) -> float:
    """Return the larger of the wall and CPU time precision of the mean across ``parts``."""
    turns = [len(part.wall_ms) for part in parts]
    wall_ms = [v for part in parts for v in part.wall_ms]
    cpu_ms = [v for part in parts for v in part.cpu_ms]
    return max(turn_ci95_rel(wall_ms, turns), turn_ci95_rel(cpu_ms, turns))


def _rotated(names: list[str], start: int) -> list[str]:
    """Return ``names`` starting at index ``start`` (modulo their count) and wrapping around."""
    shift = start % len(names)
    return [*names[shift:], *names[:shift]]


def _merge(parts: Sequence[Measurement], policy: RepeatPolicy, *, gap_ms: float = 0.0) -> Measurement:
    """Return one measurement containing every run of ``parts``, with the precision of the mean across them."""
    wall_ms = [v for part in parts for v in part.wall_ms]
    cpu_ms = [v for part in parts for v in part.cpu_ms]
    cpu_stat = None
    for part in parts:
        cpu_stat = _add(cpu_stat, part.cpu_stat)
    turns = [len(part.wall_ms) for part in parts]
    throttled = cpu_stat is not None and (cpu_stat.nr_throttled or 0) > 0
    min_window_ms = policy.min_window_ms if throttled else min(policy.min_window_ms, PROBE_WINDOW_MS)
    precision = _turn_precision(parts) if len(parts) > 1 else max(ci95_rel(wall_ms), ci95_rel(cpu_ms))
    peaks = [part.peak_rss_bytes for part in parts if part.peak_rss_bytes is not None]
    return Measurement(
        gap_ms=gap_ms,
        wall_ms=wall_ms,
        cpu_ms=cpu_ms,
        ci95_rel=precision if math.isfinite(precision) else 1e9,
        converged=precision <= policy.target_ci_rel and sum(wall_ms) >= min_window_ms,
        cpu_stat=cpu_stat,
        peak_rss_bytes=max(peaks) if peaks else None,
        turns=turns if len(turns) > 1 else None,
    )


def measure_spaced_interleaved(
    workers: Mapping[str, object], segment_id: str, inputs: list[np.ndarray], *, gap_ms: float, warmup: int, policy: RepeatPolicy
) -> dict[str, Measurement]:
    """Time ``segment_id`` (loaded on every worker) spaced ``gap_ms`` apart, one run per worker in turn.

    Each round sends one single-run request to every worker in order, and a worker's next run
    waits until ``gap_ms`` have passed since its previous reply. The other workers' runs fill
    that gap, so a round costs about ``gap_ms`` whatever the number of workers, all
    profiles run at the same machine speed within a round, and the worker that starts a round
    rotates. Only one container computes at any
    time, so the profiles never compete for cores. Rounds stop when every worker's mean is
    precise to ``policy.target_ci_rel`` (checked every ``policy.batch`` rounds after
    ``policy.min_repeats``) or after ``policy.max_repeats`` rounds.
    """
    gap_s = gap_ms / 1e3
    wall_ms: dict[str, list[float]] = {name: [] for name in workers}
    cpu_ms: dict[str, list[float]] = {name: [] for name in workers}
    cpu_stat: dict[str, CpuStatDelta | None] = {name: None for name in workers}
    peak_rss_bytes: dict[str, int | None] = {name: None for name in workers}
    last_reply_s: dict[str, float] = {}
    for name, worker in workers.items():
        if warmup:
            # Back-to-back warmup runs are enough to trigger lazy initialisation. The gap
            # before the first timed run still makes that run start cold.
            worker.profile(segment_id, inputs, warmup=warmup - 1, repeats=1, gap_ms=0.0)
        last_reply_s[name] = time.perf_counter()

    def precision(name: str) -> float:
        return max(ci95_rel(wall_ms[name]), ci95_rel(cpu_ms[name]))

    names = list(workers)
    rounds = 0
    while True:
        # Each round starts with the next worker, because the round's first run follows an idle
        # machine and costs more. With a fixed order, the first profile read about 10 % more CPU
        # time per unit on a 2-core VM.
        for name in _rotated(names, rounds):
            worker = workers[name]
            wait_s = last_reply_s[name] + gap_s - time.perf_counter()
            if wait_s > 0:
                time.sleep(wait_s)
            reply = worker.profile(segment_id, inputs, warmup=0, repeats=1, gap_ms=0.0)
            last_reply_s[name] = time.perf_counter()
            wall_ms[name].extend(float(v) for v in reply["wall_ms"])
            cpu_ms[name].extend(float(v) for v in reply["cpu_ms"])
            cpu_stat[name] = _add(cpu_stat[name], _cpu_stat_delta(reply.get("cpu_stat_before"), reply.get("cpu_stat_after")))
            peak_rss_bytes[name] = reply.get("peak_rss_bytes", peak_rss_bytes[name])
        rounds += 1
        if rounds >= policy.max_repeats:
            break
        if rounds >= policy.min_repeats and (rounds - policy.min_repeats) % policy.batch == 0:
            if all(precision(name) <= policy.target_ci_rel for name in workers):
                break

    results = {}
    for name in workers:
        reached = precision(name)
        results[name] = Measurement(
            gap_ms=gap_ms,
            wall_ms=[round(v, 3) for v in wall_ms[name]],
            cpu_ms=[round(v, 3) for v in cpu_ms[name]],
            ci95_rel=reached if math.isfinite(reached) else 1e9,
            converged=reached <= policy.target_ci_rel,
            cpu_stat=cpu_stat[name],
            peak_rss_bytes=peak_rss_bytes[name],
        )
    return results


# A forward's cost moves from its back-to-back level to its spaced level as the pause before it
# grows. These pauses lie between the worker's loop (about 0.02 ms) and the spaced gap (100 ms).
# They are densest from 10 to 30 ms, where 2-thread MobileNetV2 forwards changed level on the
# 2-core VM the shipped calibration was measured on.
IDLE_GAPS_MS = (1.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0)
IDLE_GAP_RUNS = 30
IDLE_GAP_TURNS = 3


def measure_idle_gaps(
    workers: Mapping[str, object],
    segment_id: str,
    inputs: list[np.ndarray],
    *,
    gaps_ms: Sequence[float] = IDLE_GAPS_MS,
    runs: int = IDLE_GAP_RUNS,
    turns: int = IDLE_GAP_TURNS,
) -> dict[str, list[Measurement]]:
    """Time ``segment_id`` on every worker with each pause of ``gaps_ms`` before every run.

    Each worker times ``runs`` forwards per pause, in ``turns`` requests. The pauses and the
    workers take turns, both rotating, so a slow spell of the host spreads over all of them.
    The worker itself sleeps the pause, so it is not lengthened by the request's round trip.
    One untimed run opens every request, so its first timed run also follows a pause.
    """
    names = list(workers)
    per_turn = max(2, math.ceil(runs / turns))
    parts: dict[tuple[str, float], list[Measurement]] = {(name, gap): [] for name in names for gap in gaps_ms}
    for turn in range(turns):
        for gap in _rotated(list(gaps_ms), turn):
            for name in _rotated(names, turn):
                reply = workers[name].profile(segment_id, inputs, warmup=1, repeats=per_turn, gap_ms=gap)
                parts[name, gap].append(
                    Measurement(
                        gap_ms=gap,
                        wall_ms=[round(float(v), 3) for v in reply["wall_ms"]],
                        cpu_ms=[round(float(v), 3) for v in reply["cpu_ms"]],
                        ci95_rel=1e9,
                        converged=False,
                        cpu_stat=_cpu_stat_delta(reply.get("cpu_stat_before"), reply.get("cpu_stat_after")),
                    )
                )
    # No time window applies to these runs, only the precision target.
    policy = RepeatPolicy(min_window_ms=0.0)
    return {name: [_merge(parts[name, gap], policy, gap_ms=gap) for gap in gaps_ms] for name in names}
