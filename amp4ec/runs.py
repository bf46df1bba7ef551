"""Run preparation shared by simulate and replay: the validated scenario and its costs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amp4ec.costs import Calibration, CostModel, check_model_matches, load_calibration
from amp4ec.errors import UsageError
from amp4ec.scenario import Scenario, load_scenario


@dataclass
class PreparedRun:
    scenario: Scenario
    scenario_path: Path
    calibration_path: str
    calibration: Calibration
    costs: CostModel


def prepare_run(scenario_path: Path, calibration: Path | None = None) -> PreparedRun:
    """Load and check everything a run needs, so bad input fails before any output exists."""
    scenario = load_scenario(scenario_path)
    calibration_path = str(calibration) if calibration is not None else scenario.calibration
    loaded = load_calibration(calibration_path)
    check_model_matches(loaded, scenario.model.name, scenario.model.granularity, source=str(scenario_path))
    costs = CostModel(loaded, batch=scenario.workload.batch)
    runtime_bytes = costs.runtime_bytes
    for node in scenario.nodes:
        if node.memory_bytes < runtime_bytes:
            raise UsageError(
                f"memory_mb = {node.memory_mb:g} is below the {runtime_bytes / 2**20:.0f} MiB the torch "
                "runtime needs before any segment is loaded; raise the node's memory_mb",
                field=f"nodes.{node.name}.memory_mb",
                source=str(scenario_path),
            )
    # Build the plan once here so a plan that cannot be built or cannot fit the nodes' memory
    # is reported with the scenario's path before any output or container exists.
    from amp4ec import policies  # late import: the registry imports the policy modules

    policies.build_plan(scenario, costs.graph, costs, source=str(scenario_path))
    return PreparedRun(scenario, scenario_path, calibration_path, loaded, costs)

