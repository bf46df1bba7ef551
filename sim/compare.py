"""`amp4ec compare-policies`: every partitioner variant with every scheduler, in simulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from amp4ec import policies
from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.scenario import Scenario, check_run_length
from amp4ec.sim.engine import simulate

# Partitioner settings the sweep compares, as (label, name, params). Every registered
# partitioner appears at least once; RALOS and optimal appear with each of their variants.
PARTITIONER_VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("monolithic", "monolithic", {}),
    ("uniform", "uniform", {}),
    ("ralos", "ralos", {}),
    ("ralos cost=macs", "ralos", {"cost": "macs"}),
    ("ralos cost=time", "ralos", {"cost": "time"}),
    ("ralos weighting=capability", "ralos", {"weighting": "capability"}),
    ("optimal objective=latency", "optimal", {"objective": "latency"}),
    ("optimal objective=bottleneck", "optimal", {"objective": "bottleneck"}),
    ("replicate", "replicate", {}),
    ("hybrid", "hybrid", {}),
]


@dataclass
class PairResult:
    partitioner: str
    scheduler: str
    bounds: list[int] | None = None
    latency_mean_ms: float | None = None
    latency_p95_ms: float | None = None
    throughput_rps: float | None = None
    failed: int = 0
    error: str | None = None


def with_policy(scenario: Scenario, partitioner: str, partitioner_params: dict, scheduler: str, **workload: Any) -> Scenario:
    policy = scenario.policy.model_copy(
        update={
            "partitioner": partitioner,
            "partitioner_params": partitioner_params,
            "scheduler": scheduler,
            "scheduler_params": scenario.policy.scheduler_params if scheduler == scenario.policy.scheduler else {},
        }
    )
    update: dict[str, Any] = {"policy": policy}
    if workload:
        update["workload"] = scenario.workload.model_copy(update=workload)
    return scenario.model_copy(update=update)


def compare_policies(
    scenario: Scenario,
    costs: CostModel,
    *,
    requests: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[PairResult]:
    """Simulate every partitioner variant with every scheduler; return results, best latency first.

    The scenario's own partitioner (a plug-in included) joins the sweep with its parameters.
    A pair whose plan cannot be built (for example one that does not fit memory) is kept
    with its error, last in the list. When no pair can run, the first pair's error is raised.
    """
    variants = list(PARTITIONER_VARIANTS)
    own = (scenario.policy.partitioner, scenario.policy.partitioner_params)
    if all((name, params) != own for _, name, params in variants):
        variants.append((f"{own[0]} (scenario)", own[0], dict(own[1])))
    schedulers = list(policies.SCHEDULERS)
    if scenario.policy.scheduler not in schedulers:
        schedulers.append(scenario.policy.scheduler)
    workload = {"requests": requests} if requests is not None else {}
    # The copies with --requests are not validated again, so their length is checked once here.
    try:
        check_run_length(with_policy(scenario, *own, scenario.policy.scheduler, **workload))
    except ValueError as error:
        raise UsageError(str(error), field="--requests") from None
    total = len(variants) * len(schedulers)
    results = []
    for label, name, params in variants:
        for scheduler in schedulers:
            pair = PairResult(label, scheduler)
            try:
                summary = simulate(with_policy(scenario, name, params, scheduler, **workload), costs).summary
            except UsageError as exc:
                pair.error = str(exc)
            else:
                pair.bounds = summary["plan"]["bounds"]
                pair.latency_mean_ms = summary["latency_ms"]["mean"]
                pair.latency_p95_ms = summary["latency_ms"]["p95"]
                pair.throughput_rps = summary["throughput_rps"]
                pair.failed = summary["requests"]["failed"]
            results.append(pair)
            if progress:
                progress(len(results), total)
    if all(pair.error is not None for pair in results):
        # Nothing to compare: the scenario itself is at fault, as for simulate.
        raise UsageError(f"no partitioner and scheduler pair could run; the first, {results[0].partitioner} with {results[0].scheduler}: {results[0].error}")
    results.sort(key=_rank)
    return results


def _rank(pair: PairResult) -> tuple:
    if pair.error is not None or pair.latency_mean_ms is None:
        return (2, 0.0, 0.0)
    return (1 if pair.failed else 0, pair.latency_mean_ms, -(pair.throughput_rps or 0.0))
