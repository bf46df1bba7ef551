"""`amp4ec simulate`: one scenario through the SimPy engine into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager

from amp4ec.metrics import write_run
from amp4ec.rundir import RunInfo, check_output_dir, staged_output
from amp4ec.runs import prepare_run
from amp4ec.sim.engine import simulate


def run_simulation(
    scenario_path: Path,
    out: Path,
    *,
    force: bool = False,
    calibration: Path | None = None,
    progress: ContextManager[Callable[[int, int], None]] | None = None,
) -> dict:
    """Simulate a scenario file and write records.parquet, summary.json and run.json to ``out``."""
    check_output_dir(out, force=force)
    prepared = prepare_run(scenario_path, calibration)
    info = RunInfo("sim", prepared.scenario.resolved(), prepared.calibration_path)
    with staged_output(out, force=force) as staging:
        if progress is None:
            result = simulate(prepared.scenario, prepared.costs)
        else:
            with progress as update:
                result = simulate(prepared.scenario, prepared.costs, progress=update)
        write_run(staging, result.records, result.summary)
        info.write(staging)
    return result.summary
