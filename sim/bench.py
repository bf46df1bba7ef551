"""`amp4ec bench sim`: the engine's speed against bare SimPy, and its cost at scale.

Every figure comes from the same invocation on the same machine, so the ratios hold even
when the machine's speed drifts between runs. Each scenario runs in a child process so its
peak memory (maximum resident set size) is its own.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import simpy

from amp4ec.errors import UsageError

SCALE_DIR = Path(__file__).resolve().parents[1] / "scenarios" / "scale"


def bare_simpy_mm1_jobs_per_s(jobs: int, seed: int = 0) -> float:
    """Jobs per wall second of the textbook SimPy M/M/1: a source, a Resource, a process per job."""
    rng = np.random.default_rng(seed)
    gaps_s = rng.exponential(1 / 0.8, size=jobs).tolist()
    services_s = rng.exponential(1.0, size=jobs).tolist()
    env = simpy.Environment()
    server = simpy.Resource(env, capacity=1)

    def job(service_s: float):
        with server.request() as slot:
            yield slot
            yield env.timeout(service_s)

    def source():
        for gap_s, service_s in zip(gaps_s, services_s):
            yield env.timeout(gap_s)
            env.process(job(service_s))

    started = time.perf_counter()
    env.process(source())
    env.run()
    return jobs / (time.perf_counter() - started)


def run_scenario_child(scenario: str, requests: int | None) -> dict:
    """Simulate one scenario in this process, write its records to a temporary directory, return its figures."""
    import tempfile

    from amp4ec.metrics import write_run
    from amp4ec.runs import prepare_run
    from amp4ec.sim.engine import Simulation

    started = time.perf_counter()
    prepared = prepare_run(Path(scenario))
    scenario_model = prepared.scenario
    if requests is not None:
        workload = scenario_model.workload.model_copy(update={"requests": requests})
        scenario_model = scenario_model.model_copy(update={"workload": workload})
    simulation = Simulation(scenario_model, prepared.costs)
    run_started = time.perf_counter()
    result = simulation.run()
    finished = time.perf_counter()
    # A user's run also builds and writes records.parquet, so the wall time and peak memory include it.
    with tempfile.TemporaryDirectory() as directory:
        write_run(Path(directory), result.records, result.summary)
    written = time.perf_counter()
    completed = result.summary["requests"]["completed"] + result.summary["requests"]["failed"]
    return {
        "scenario": scenario,
        "nodes": len(scenario_model.nodes),
        "requests": completed,
        "stages": len(simulation.plan.segments),
        "wall_s": written - started,
        "run_wall_s": finished - run_started,
        "write_wall_s": written - finished,
        "requests_per_s": completed / (finished - run_started),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "littles_law_error": result.summary["littles_law"]["relative_error"],
    }


def run_scenario(scenario: Path, requests: int | None) -> dict:
    # -P: the child must import the installed amp4ec, not a checkout's amp4ec/ folder in the
    # working directory, which lacks amp4ec.sim on a non-editable install.
    command = [sys.executable, "-P", "-m", "amp4ec.sim.bench", str(scenario)]
    if requests is not None:
        command.append(str(requests))
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark run of {scenario} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def bench_sim(*, pipeline_requests: int, mm1_jobs: int, scale_requests: int, small_requests: int, log) -> dict:
    """Run the benchmark and return its figures; ``log`` receives one line per finished part."""
    if not SCALE_DIR.is_dir():
        raise UsageError(
            f"bench sim runs the scenarios of the repository's scenarios/scale, which this installation "
            f"does not have ({SCALE_DIR}); run it from a checkout installed with pip install -e ."
        )
    mm1_rate = bare_simpy_mm1_jobs_per_s(mm1_jobs)
    log(f"bare SimPy M/M/1: {mm1_rate:,.0f} jobs/s ({mm1_jobs:,} jobs)")
    pipeline = run_scenario(SCALE_DIR / "3-stage-pipeline.toml", pipeline_requests)
    log(f"3-stage pipeline: {pipeline['requests_per_s']:,.0f} requests/s ({pipeline['requests']:,} requests)")
    small = run_scenario(SCALE_DIR / "10-nodes.toml", small_requests)
    log(f"10 nodes: {small['run_wall_s'] / small['requests'] * 1e6:,.1f} us per request")
    large = run_scenario(SCALE_DIR / "10k-nodes.toml", scale_requests)
    log(f"10,000 nodes: {large['wall_s']:.1f} s, peak {large['peak_rss_bytes'] / 2**30:.2f} GiB")
    small_cost_us = small["run_wall_s"] / small["requests"] * 1e6
    large_cost_us = large["run_wall_s"] / large["requests"] * 1e6
    return {
        "pipeline_requests_per_s": pipeline["requests_per_s"],
        "bare_simpy_mm1_jobs_per_s": mm1_rate,
        "ratio": pipeline["requests_per_s"] / mm1_rate,
        "scale": large,
        "cost_per_request_us": {"10_nodes": small_cost_us, "10000_nodes": large_cost_us},
        "cost_ratio": large_cost_us / small_cost_us,
        "targets": {"ratio": ">= 0.30", "scale_wall_s": "< 60 (1,000,000 requests)", "scale_peak": "< 4 GiB", "cost_ratio": "<= 2"},
    }


if __name__ == "__main__":
    print(json.dumps(run_scenario_child(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)))
