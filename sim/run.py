"""`amp4ec simulate`: one scenario through the SimPy engine into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager

from amp4ec.metrics import write_run
from amp4ec.rundir import RunInfo, check_output_dir, staged_output
from amp4ec.runs import prepare_run
from amp4ec.errors import UsageError
from amp4ec.sim.engine import Simulation


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
    # Building the simulation checks that the run fits in memory, before any output exists.
    try:
        simulation = Simulation(prepared.scenario, prepared.costs)
    except UsageError as error:
        if error.source is None:
            located = UsageError(str(error), source=str(scenario_path))
            located.field = error.field
            raise located from error
        raise
    with staged_output(out, force=force) as staging:
        if progress is None:
            result = simulation.run()
        else:
            with progress as update:
                simulation.progress = update
                result = simulation.run()
        write_run(staging, result.records, result.summary)
        info.write(staging)
    return result.summary
