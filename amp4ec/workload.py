"""Request arrivals from a scenario and seed, identical for simulation and real mode.

Random streams are derived from the scenario seed by purpose, so the arrival times do not
change when a scheduler draws more or fewer random numbers.
"""

from __future__ import annotations

import zlib

import numpy as np

from amp4ec.errors import UsageError
from amp4ec.scenario import WorkloadSpec


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """Return an independent generator for one purpose ("workload", "scheduler", "inputs", ...)."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def open_loop_arrivals_s(workload: WorkloadSpec, seed: int) -> np.ndarray | None:
    """Return arrival times in seconds for open-loop workloads, or None for a closed loop.

    A closed loop has no arrival times fixed in advance: each client sends its next request
    ``think_time_ms`` after the previous reply. Every other kind yields ``workload.requests``
    non-decreasing times (a trace yields its own rows, at most ``requests`` of them when that
    field is set).
    """
    if workload.kind == "closed":
        return None
    rng = rng_for(seed, "workload")
    if workload.kind == "poisson":
        gaps_s = rng.exponential(1.0 / workload.rate_rps, size=workload.requests)
        return np.cumsum(gaps_s)
    if workload.kind == "bursty":
        return _mmpp2_arrivals_s(workload, rng)
    if workload.kind == "diurnal":
        return _diurnal_arrivals_s(workload, rng)
    if workload.kind == "trace":
        arrivals_s = read_trace_s(workload.trace)
        if "requests" in workload.model_fields_set:
            arrivals_s = arrivals_s[: workload.requests]
        return arrivals_s
    raise ValueError(f"unknown workload kind {workload.kind!r}")


def request_count(workload: WorkloadSpec) -> int:
    """Number of requests a workload sends (a trace's rows unless ``requests`` caps them)."""
    if workload.kind == "trace":
        rows = len(read_trace_s(workload.trace))
        return min(rows, workload.requests) if "requests" in workload.model_fields_set else rows
    return workload.requests


def _mmpp2_arrivals_s(workload: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    """Arrivals of a two-state MMPP that starts in the on state.

    Within each sojourn the arrivals are a Poisson process at that state's rate; by the
    memoryless property, drawing the next gap afresh after a state change is exact.
    """
    rates = (workload.rate_rps, workload.off_rate_rps)
    means_s = (workload.on_s, workload.off_s)
    out = np.empty(workload.requests)
    n = 0
    time_s = 0.0
    state = 0
    while n < workload.requests:
        sojourn_end_s = time_s + rng.exponential(means_s[state])
        rate = rates[state]
        if rate > 0:
            # Draw gaps in blocks; keep those that fall inside this sojourn.
            while n < workload.requests:
                block = time_s + np.cumsum(rng.exponential(1.0 / rate, size=min(4096, workload.requests - n)))
                inside = block[block < sojourn_end_s]
                out[n : n + len(inside)] = inside
                n += len(inside)
                if len(inside) < len(block):
                    break
                time_s = float(block[-1])
        time_s = sojourn_end_s
        state = 1 - state
    return out


def _diurnal_arrivals_s(workload: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    """Arrivals of a Poisson process with a sinusoidal rate, by thinning (Lewis and Shedler).

    Candidates come at the peak rate ``rate_rps * (1 + amplitude)``; each is kept with
    probability rate(t) / peak.
    """
    peak = workload.rate_rps * (1.0 + workload.amplitude)
    out = np.empty(workload.requests)
    n = 0
    time_s = 0.0
    while n < workload.requests:
        candidates = time_s + np.cumsum(rng.exponential(1.0 / peak, size=8192))
        rate = workload.rate_rps * (
            1.0 + workload.amplitude * np.sin(2.0 * np.pi * (candidates + workload.phase_s) / workload.period_s)
        )
        kept = candidates[rng.uniform(0.0, peak, size=len(candidates)) < rate]
        take = min(len(kept), workload.requests - n)
        out[n : n + take] = kept[:take]
        n += take
        time_s = float(candidates[-1])
    return out


def read_trace_s(path: str | None) -> np.ndarray:
    """Read arrival times in seconds from a CSV file with an ``arrival_s`` column.

    Times are replayed as written, without shifting the first arrival to zero.
    """
    import pandas as pd

    if path is None:
        raise UsageError("a trace workload needs trace, the path of a CSV file", field="workload.trace")
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError as exc:
        raise UsageError(f"trace file {path!r} not found; give the path of a CSV file", field="workload.trace") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UsageError(f"trace file {path!r} is not a readable CSV file: {exc}", field="workload.trace") from exc
    if "arrival_s" not in frame.columns:
        raise UsageError(
            f"trace file {path!r} has columns {list(frame.columns)}; it needs an arrival_s column (seconds)",
            field="workload.trace",
        )
    arrivals_s = pd.to_numeric(frame["arrival_s"], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(arrivals_s) | (arrivals_s < 0))
    if len(bad):
        raise UsageError(
            f"trace file {path!r}: row {int(bad[0]) + 2} has arrival_s {str(frame['arrival_s'].iloc[bad[0]])!r}; "
            "arrival times must be non-negative numbers of seconds",
            field="workload.trace",
        )
    if len(arrivals_s) == 0:
        raise UsageError(f"trace file {path!r} has no rows", field="workload.trace")
    if np.any(np.diff(arrivals_s) < 0):
        row = int(np.flatnonzero(np.diff(arrivals_s) < 0)[0]) + 3
        raise UsageError(
            f"trace file {path!r}: arrival_s decreases at row {row}; sort the trace by arrival time",
            field="workload.trace",
        )
    return arrivals_s
