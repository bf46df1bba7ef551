"""`amp4ec sweep`: simulate a grid of scenario variants over several seeds.

Every point of the grid and every seed is one simulation, run in its own process (a local
process pool, or the workers of a Dask distributed cluster), so a crash or an invalid point
is kept as data instead of stopping the sweep. The result is two tidy tables: one row per run,
and one row per grid point with the mean and 95 % confidence half-width of each metric over
seeds (Student's t, so a handful of seeds gives honest, wide intervals).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
import tomllib
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
from scipy import stats

from amp4ec.errors import UsageError
from amp4ec.scenario import parse_scenario, read_scenario_data

METRICS = (
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "throughput_rps",
    "completed",
    "failed",
)
_PATH_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


# A sweep's run list is built in memory up front, one row per run.
MAX_RUNS = 1_000_000
# Processes of the local pool per core; more only adds start-up cost and memory.
MAX_WORKERS_PER_CORE = 4

def parse_value(text: str) -> Any:
    """Parse one grid value as TOML would (numbers, booleans, quoted strings); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_grid(specs: Iterable[str]) -> dict[str, list[Any]]:
    """Parse ``key=v1,v2,...`` options into an ordered mapping of dotted keys to values."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UsageError(f"grid entry {spec!r} is not KEY=V1,V2,...; e.g. workload.rate_rps=10,20", field="--grid")
        if key in grid:
            raise UsageError(f"grid key {key!r} appears twice; give all its values in one --grid", field="--grid")
        grid[key] = [parse_value(v.strip()) for v in values.split(",")]
    return grid


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``value`` at a dotted path such as ``workload.rate_rps`` or ``nodes[0].cpus``."""
    target: Any = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        match = _PATH_PART.match(part)
        if match is None:
            raise UsageError(f"grid key {key!r} has an invalid part {part!r}", field="--grid")
        name, index = match.group(1), match.group(2)
        last = depth == len(parts) - 1
        if index is None:
            if last:
                target[name] = value
                return
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise UsageError(f"grid key {key!r}: {name!r} is not a table", field="--grid")
            continue
        items = target.get(name)
        if not isinstance(items, list) or int(index) >= len(items):
            raise UsageError(f"grid key {key!r}: the scenario has no {name}[{index}]", field="--grid")
        if last:
            items[int(index)] = value
            return
        target = items[int(index)]


def grid_points(base: dict[str, Any], grid: dict[str, list[Any]], source: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Return (grid values, scenario data) for every point, each validated before any run starts."""
    points = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        data = copy.deepcopy(base)
        assignment = dict(zip(keys, values))
        for key, value in assignment.items():
            set_path(data, key, value)
        label = ", ".join(f"{k}={v}" for k, v in assignment.items()) or "base scenario"
        parse_scenario(data, source=f"{source} with {label}")
        points.append((assignment, data))
    return points


_CALIBRATIONS: dict[str, Any] = {}


def run_point(data: dict[str, Any], seed: int) -> dict[str, Any]:
    """Simulate one scenario variant with one seed and return its metrics as a flat row."""
    from amp4ec.costs import CostModel, load_calibration
    from amp4ec.sim.engine import simulate

    data = dict(data, seed=seed)
    try:
        scenario = parse_scenario(data)
        if scenario.calibration not in _CALIBRATIONS:
            _CALIBRATIONS[scenario.calibration] = CostModel(load_calibration(scenario.calibration))
        summary = simulate(scenario, _CALIBRATIONS[scenario.calibration]).summary
    except Exception as exc:  # kept as data: one bad point must not stop the sweep
        return {"seed": seed, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    latency = summary["latency_ms"]
    return {
        "seed": seed,
        "error": None,
        "traceback": None,
        "latency_mean_ms": latency["mean"],
        "latency_p50_ms": latency["p50"],
        "latency_p95_ms": latency["p95"],
        "latency_p99_ms": latency["p99"],
        "throughput_rps": summary["throughput_rps"],
        "completed": summary["requests"]["completed"],
        "failed": summary["requests"]["failed"],
    }


def confidence_table(runs: pd.DataFrame, keys: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """Aggregate runs per grid point: mean, sample count and t-based half-width of each metric."""
    ok = runs[runs["error"].isna()]
    rows = []
    groups = ok.groupby(keys, dropna=False, sort=False) if keys else [((), ok)]
    for key_values, group in groups:
        key_values = key_values if isinstance(key_values, tuple) else (key_values,)
        row: dict[str, Any] = dict(zip(keys, key_values))
        row["seeds"] = len(group)
        for metric in METRICS:
            values = group[metric].dropna().astype(float)
            n = len(values)
            row[f"{metric}"] = values.mean() if n else math.nan
            if n >= 2:
                half_width = stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
            else:
                half_width = math.nan
            row[f"{metric}_ci95"] = half_width
        rows.append(row)
    return pd.DataFrame(rows)


def run_sweep(
    scenario_path: Path,
    grid_specs: Iterable[str],
    seeds: int,
    *,
    workers: int | None = None,
    dask_address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every grid point with ``seeds`` seeds; return (runs, points with confidence intervals).

    The seeds are the scenario's own seed and the ``seeds - 1`` integers after it.
    """
    if seeds < 1:
        raise UsageError(f"must be at least 1, got {seeds}", field="--seeds")
    grid = parse_grid(grid_specs)
    base = read_scenario_data(scenario_path)
    points = grid_points(base, grid, str(scenario_path))
    if len(points) * seeds > MAX_RUNS:
        raise UsageError(
            f"{len(points)} grid points x {seeds} seeds = {len(points) * seeds:,} runs, more than {MAX_RUNS:,}; "
            "use fewer seeds or grid values, or split the sweep",
            field="--seeds",
        )
    cores = os.cpu_count() or 1
    if workers is not None and workers > MAX_WORKERS_PER_CORE * cores:
        raise UsageError(
            f"--workers {workers} is more than {MAX_WORKERS_PER_CORE} processes per core on this {cores}-core machine; "
            "each run is CPU-bound, so use at most the number of cores",
            field="--workers",
        )
    first_seed = int(base.get("seed", 0))
    jobs = [(assignment, data, first_seed + i) for assignment, data in points for i in range(seeds)]
    results: list[dict[str, Any]] = [{} for _ in jobs]
    done = 0

    def record(index: int, row: dict[str, Any]) -> None:
        nonlocal done
        results[index] = {**jobs[index][0], **row}
        done += 1
        if progress:
            progress(done, len(jobs))

    if dask_address:
        try:
            from distributed import Client, as_completed as dask_completed
        except ImportError as exc:
            raise UsageError("--dask needs the distributed package: pip install 'amp4ec[dask]'") from exc
        with Client(dask_address) as client:
            futures = {client.submit(run_point, data, seed, pure=False): i for i, (_, data, seed) in enumerate(jobs)}
            for future in dask_completed(futures):
                record(futures[future], future.result())
    else:
        # No more processes than runs: each process costs a Python start-up and an import of amp4ec.
        with ProcessPoolExecutor(max_workers=min(workers or cores, len(jobs))) as pool:
            futures = {pool.submit(run_point, data, seed): i for i, (_, data, seed) in enumerate(jobs)}
            for future in as_completed(futures):
                record(futures[future], future.result())
    runs = pd.DataFrame(results)
    for metric in METRICS:
        if metric not in runs:
            runs[metric] = math.nan
    return runs, confidence_table(runs, list(grid))
