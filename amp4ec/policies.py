"""The registry of partitioners and schedulers that scenarios name.

Each simulation or replay builds fresh policy objects from this table, so two runs in one
process never share state.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from amp4ec.errors import UsageError
from amp4ec.partition import Monolithic, Partitioner, Plan, Ralos, Uniform
from amp4ec.placement import Hybrid, Optimal, Replicate, check_plan_fits
from amp4ec.schedule import Amp4ecScheduler, Pinned, RoundRobin, Scheduler
from amp4ec.schedule_baselines import CacheAware, LeastLoaded, RandomScheduler, ShortestExpectedCompletion

if TYPE_CHECKING:
    from amp4ec.costs import CostModel
    from amp4ec.graph import ModelGraph
    from amp4ec.scenario import Scenario

PARTITIONERS: dict[str, Callable[..., Partitioner]] = {
    "monolithic": Monolithic,
    "ralos": Ralos,
    "uniform": Uniform,
    "optimal": Optimal,
    "replicate": Replicate,
    "hybrid": Hybrid,
}

SCHEDULERS: dict[str, Callable[..., Scheduler]] = {
    "round_robin": RoundRobin,
    "amp4ec": Amp4ecScheduler,
    "pinned": Pinned,
    "random": RandomScheduler,
    "least_loaded": LeastLoaded,
    "shortest_expected_completion": ShortestExpectedCompletion,
    "cache_aware": CacheAware,
}
# Each of these raises NoNodeAvailable only when no live node may run the stage. A plug-in may
# raise it for reasons of its own.
BUILT_IN_SCHEDULERS = frozenset(SCHEDULERS.values())


def check_policy_names(scenario: "Scenario", *, source: str) -> None:
    policy = scenario.policy
    resolve_policy(policy.partitioner, "partitioner", source=source)
    resolve_policy(policy.scheduler, "scheduler", source=source)
    # Build both once so a bad parameter is reported before the run starts.
    make_partitioner(scenario, source=source)
    make_scheduler(scenario, np.random.default_rng(0), source=source)


def _parameter_hint(factory: Callable[..., Any], positional: int) -> str:
    """Return, for an error message, the keyword parameters ``factory`` accepts after its first ``positional`` ones.

    When ``factory`` cannot take ``positional`` arguments at all (a scheduler plug-in without
    ``rng``), the hint says so.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return ""
    parameters = list(signature.parameters.values())[positional:]
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    hint = f"; it accepts {', '.join(names)}" if names else "; it accepts no parameters"
    try:
        signature.bind_partial(*([None] * positional))
    except TypeError:
        hint += "; a scheduler's constructor must take the random generator rng as its first argument (see docs/policies.md)"
    return hint


def _construct(factory: Callable[..., Any], field: str, source: str, *args: Any, **params: Any) -> Any:
    try:
        return factory(*args, **params)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid parameters {params!r}: {exc}{_parameter_hint(factory, len(args))}", field=field, source=source) from exc


# Methods each kind of policy must have; a plug-in without them is rejected before a run.
REQUIRED_METHODS = {"partitioner": ("partition",), "scheduler": ("select", "observe")}


def resolve_policy(name: str, kind: str, *, source: str = "scenario") -> Callable[..., Any]:
    """Return the factory of a registered policy or of a ``package.module:Class`` plug-in."""
    registry = PARTITIONERS if kind == "partitioner" else SCHEDULERS
    field = f"policy.{kind}"
    if name in registry:
        return registry[name]
    if ":" not in name:
        raise UsageError(
            f"unknown {kind} {name!r}; choose one of {', '.join(sorted(registry))}, "
            "or name a plug-in as package.module:Class",
            field=field,
            source=source,
        )
    factory = _import_plugin(name, kind, field, source)
    missing = [m for m in REQUIRED_METHODS[kind] if not callable(getattr(factory, m, None))]
    if not callable(factory) or missing:
        raise UsageError(
            f"{kind} plug-in {name!r} does not implement the {kind} interface: "
            + (f"it lacks {', '.join(missing)}()" if missing else "it is not callable")
            + "; see docs/policies.md",
            field=field,
            source=source,
        )
    return factory


def _import_plugin(name: str, kind: str, field: str, source: str) -> Any:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        # A plug-in is user code, so any error while importing it is the user's to fix.
        raise UsageError(
            f"{kind} plug-in {name!r} cannot be imported ({type(exc).__name__}: {exc}); "
            f"check that {module_name!r} is on PYTHONPATH and imports cleanly",
            field=field,
            source=source,
        ) from exc
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise UsageError(
                f"{kind} plug-in {name!r}: module {module_name!r} has no attribute {attribute!r}",
                field=field,
                source=source,
            )
    return factory


def make_partitioner(scenario: "Scenario", *, source: str = "scenario") -> Partitioner:
    policy = scenario.policy
    factory = resolve_policy(policy.partitioner, "partitioner", source=source)
    params = dict(policy.partitioner_params)
    if getattr(factory, "uses_network", False):
        # Partitioners that predict transfers see the scenario's network unless given one.
        params.setdefault("bandwidth_mbps", scenario.network.bandwidth_mbps)
        params.setdefault("hop_latency_ms", scenario.network.latency_ms)
        params.setdefault("cache", policy.cache)
    try:
        return factory(**params)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"invalid parameters {policy.partitioner_params!r} for partitioner {policy.partitioner!r}: {exc}"
            f"{_parameter_hint(factory, 0)}",
            field="policy.partitioner_params",
            source=source,
        ) from exc


def make_scheduler(scenario: "Scenario", rng: np.random.Generator, *, source: str = "scenario") -> Scheduler:
    policy = scenario.policy
    factory = resolve_policy(policy.scheduler, "scheduler", source=source)
    return _construct(factory, "policy.scheduler_params", source, rng, **policy.scheduler_params)


def build_plan(scenario: "Scenario", graph: "ModelGraph", costs: "CostModel", *, source: str = "scenario") -> Plan:
    """Partition the model for the scenario's nodes, check the plan and that it fits their memory.

    Every error (bad parameters, an invalid plan, a plan over the memory limits) is a UsageError
    naming the partitioner, raised before anything is deployed.
    """
    name = scenario.policy.partitioner
    partitioner = make_partitioner(scenario, source=source)
    parts = scenario.policy.partitions or len(scenario.nodes)
    if scenario.policy.partitions is not None and parts > graph.n_units:
        raise UsageError(
            f"policy.partitions is {parts} but the model has {graph.n_units} units, and every segment needs at least one unit; "
            f"give at most {graph.n_units}, or calibrate at leaf granularity for more units",
            field="policy.partitions",
            source=source,
        )
    try:
        plan = partitioner.partition(graph, scenario.nodes, costs, parts)
    except ValueError as exc:
        raise UsageError(f"partitioner {name!r} failed: {exc}", field="policy.partitioner", source=source) from exc
    if not isinstance(plan, Plan):
        raise UsageError(
            f"partitioner {name!r} returned {type(plan).__name__}, expected amp4ec.partition.Plan; see docs/policies.md",
            field="policy.partitioner",
            source=source,
        )
    try:
        plan.validate(graph.n_units)
    except ValueError as exc:
        raise UsageError(str(exc), field="policy.partitioner", source=source) from exc
    check_plan_fits(plan, scenario.nodes, costs, source=source)
    return plan
