"""`amp4ec bench calibrate`: how long calibrating a model takes, and where the timed runs go."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from rich.table import Table

from amp4ec.calibrate.fit import profile_timings
from amp4ec.calibrate.run import DEFAULT_PROFILES, parse_profiles, run_calibration

# The time a researcher should wait for the default calibration of MobileNetV2 on a 2-core machine.
TARGET_S = 300.0


def bench_calibrate(*, model: str, repeats: int, max_repeats: int, out: Path | None, log: Callable[[str], None]) -> Table:
    """Calibrate ``model`` on the default profiles and return a table of the time it took and the runs per unit."""
    with tempfile.TemporaryDirectory(prefix="amp4ec-bench-") as scratch:
        path = out or Path(scratch) / "calibration.json"
        started = time.perf_counter()
        calibration = run_calibration(
            model=model,
            granularity="block",
            profiles=parse_profiles(DEFAULT_PROFILES),
            repeats=repeats,
            warmup=3,
            gap_ms=100.0,
            out=path,
            base_image=None,
            log=log,
            max_repeats=max_repeats,
        )
        elapsed_s = time.perf_counter() - started

    # The reference measured in the same run: the time spent inside the timed runs plus the
    # spaced regime's gaps, which no scheduling of the calibration could avoid. The profiles
    # take turns inside one gap, so a unit's gaps count once, for its longest spaced series.
    timed_s = 0.0
    runs: dict[str, list[int]] = {}
    longest_spaced: dict[str, int] = {}
    for profile in calibration.profiles:
        for timing in profile_timings(profile):
            for measurement in (timing.spaced, timing.saturated):
                timed_s += sum(measurement.wall_ms) / 1e3
                runs.setdefault(timing.name, []).append(len(measurement.wall_ms))
            longest_spaced[timing.name] = max(longest_spaced.get(timing.name, 0), len(timing.spaced.wall_ms))
    gap_ms = calibration.profiles[0].gap_ms
    timed_s += sum(longest_spaced.values()) * gap_ms / 1e3
    total_runs = sum(sum(v) for v in runs.values())

    table = Table(title=f"calibrating {model} on {', '.join(p.name for p in calibration.profiles)}")
    table.add_column("unit")
    table.add_column("timed runs (spaced | back to back, per profile)", justify="right")
    table.add_column("share of all runs", justify="right")
    for name, counts in runs.items():
        pairs = " ; ".join(f"{counts[i]}|{counts[i + 1]}" for i in range(0, len(counts), 2))
        table.add_row(name, pairs, f"{sum(counts) / total_runs:.1%}")
    converged = sum(1 for p in calibration.profiles for t in profile_timings(p) for m in (t.spaced, t.saturated) if m.converged)
    measurements = sum(2 * len(profile_timings(p)) for p in calibration.profiles)
    table.caption = (
        f"total {elapsed_s:.0f} s = {elapsed_s / TARGET_S:.2f} x the {TARGET_S:.0f} s target; "
        f"timed runs and their gaps {timed_s:.0f} s = {timed_s / elapsed_s:.0%} of the total; "
        f"{total_runs} timed runs; {converged}/{measurements} measurements reached the precision target"
    )
    drift = [sample.cpu_ms for sample in calibration.drift]
    if drift:
        table.caption += (
            f"; drift reference ({calibration.drift_profile}): whole model {min(drift):.1f} to {max(drift):.1f} ms CPU "
            f"over {len(drift)} samples"
        )
    return table
