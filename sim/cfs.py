"""CPU time as the kernel's CFS bandwidth control hands it out.

``docker run --cpus=c`` grants a quota of ``c * period`` CPU time per period (100 ms by
default), not a slower processor: a job on an idle container runs at full core speed until
the period's quota is spent, then waits for the next period. A job that keeps ``p`` threads
busy drains the quota ``p`` times as fast. This module computes, without stepping through
time, when a job finishes given the quota already spent in the current period.
"""

from __future__ import annotations

import math

_EPSILON_MS = 1e-9


class CfsCpu:
    """One container's CPU under a CFS quota; it serves one job at a time.

    Periods start at ``phase_ms + k * period_ms``. Quota that a period leaves unused is lost
    (cgroup v1 without burst).
    """

    def __init__(self, cpus: float, *, period_ms: float = 100.0, cores: int = 1, phase_ms: float = 0.0):
        if cpus <= 0:
            raise ValueError(f"cpus must be positive, got {cpus}")
        if cores < 1:
            raise ValueError(f"cores must be at least 1, got {cores}")
        self.cpus = cpus
        self.period_ms = period_ms
        self.quota_ms = cpus * period_ms
        self.cores = cores
        self.phase_ms = phase_ms % period_ms
        self._period_index = -math.inf
        self._used_ms = 0.0
        self.throttled_jobs = 0
        """jobs that had to wait for a new period at least once"""
        self.last_cold_ms = 0.0
        """CPU ms that the last run added after its waits for a new period"""

    def save_state(self) -> tuple[float, float, int]:
        """Return the accounting that :meth:`run` changes, for :meth:`restore_state`."""
        return (self._period_index, self._used_ms, self.throttled_jobs)

    def restore_state(self, state: tuple[float, float, int]) -> None:
        """Undo the runs booked since :meth:`save_state` returned ``state``."""
        self._period_index, self._used_ms, self.throttled_jobs = state

    def _period_of(self, time_ms: float) -> int:
        return math.floor((time_ms - self.phase_ms) / self.period_ms + _EPSILON_MS)

    def run(self, start_ms: float, work_ms: float, parallelism: float = 1.0, cold_ms: float = 0.0) -> float:
        """Run ``work_ms`` of CPU time from ``start_ms`` on ``parallelism`` threads; return the end time.

        Parallelism above the core count or the quota cannot be used: a job never runs faster
        than ``min(parallelism, cores)`` CPU-ms per ms. Each wait for a new period after the job
        has started adds ``cold_ms`` to the work left, because the job resumes after an idle gap
        with cold caches.
        """
        rate = max(1e-9, min(parallelism, float(self.cores)))
        time_ms = start_ms
        remaining_ms = work_ms
        throttled = False
        # A job that waits before its first step pays no extra: its own cold start covers that.
        started = False
        waits_after_start = 0
        while remaining_ms > _EPSILON_MS:
            period = self._period_of(time_ms)
            if period != self._period_index:
                self._period_index = period
                self._used_ms = 0.0
            period_end_ms = self.phase_ms + (period + 1) * self.period_ms
            available_ms = self.quota_ms - self._used_ms
            if available_ms <= _EPSILON_MS:
                throttled = True
                time_ms = period_end_ms
                if started:
                    # At most half a period's quota, so that a quota smaller than the cold
                    # work (under about 0.01 CPUs) still lets the job advance.
                    remaining_ms += min(cold_ms, self.quota_ms / 2)
                    waits_after_start += 1
                continue
            if remaining_ms / rate <= _EPSILON_MS:
                # The work left takes no measurable time at this rate (a huge core count).
                time_ms += remaining_ms / rate
                break
            step_ms = min(remaining_ms / rate, available_ms / rate, period_end_ms - time_ms)
            if step_ms <= _EPSILON_MS:
                time_ms = period_end_ms
                continue
            time_ms += step_ms
            self._used_ms += step_ms * rate
            remaining_ms -= step_ms * rate
            started = True
        if throttled:
            self.throttled_jobs += 1
        self.last_cold_ms = min(cold_ms, self.quota_ms / 2) * waits_after_start
        return time_ms
