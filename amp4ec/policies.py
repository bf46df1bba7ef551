"""The registry of partitioners and schedulers that scenarios name.

Each simulation or replay builds fresh policy objects from this table, so two runs in one
process never share state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from amp4ec.errors import UsageError
from amp4ec.partition import Monolithic, Partitioner, Ralos
from amp4ec.schedule import Amp4ecScheduler, Pinned, RoundRobin, Scheduler

if TYPE_CHECKING:
    from amp4ec.scenario import Scenario

PARTITIONERS: dict[str, Callable[..., Partitioner]] = {
    "monolithic": Monolithic,
    "ralos": Ralos,
}

SCHEDULERS: dict[str, Callable[..., Scheduler]] = {
    "round_robin": RoundRobin,
    "amp4ec": Amp4ecScheduler,
    "pinned": Pinned,
}


def check_policy_names(scenario: "Scenario", *, source: str) -> None:
    policy = scenario.policy
    if policy.partitioner not in PARTITIONERS:
        raise UsageError(
            f"unknown partitioner {policy.partitioner!r}; choose one of {', '.join(sorted(PARTITIONERS))}",
            field="policy.partitioner",
            source=source,
        )
    if policy.scheduler not in SCHEDULERS:
        raise UsageError(
            f"unknown scheduler {policy.scheduler!r}; choose one of {', '.join(sorted(SCHEDULERS))}",
            field="policy.scheduler",
            source=source,
        )
    # Build both once so a bad parameter is reported before the run starts.
    make_partitioner(scenario, source=source)
    make_scheduler(scenario, np.random.default_rng(0), source=source)


def _construct(factory: Callable[..., Any], field: str, source: str, *args: Any, **params: Any) -> Any:
    try:
        return factory(*args, **params)
    except TypeError as exc:
        raise UsageError(f"invalid parameters {params!r}: {exc}", field=field, source=source) from exc


def make_partitioner(scenario: "Scenario", *, source: str = "scenario") -> Partitioner:
    policy = scenario.policy
    return _construct(PARTITIONERS[policy.partitioner], "policy.partitioner_params", source, **policy.partitioner_params)


def make_scheduler(scenario: "Scenario", rng: np.random.Generator, *, source: str = "scenario") -> Scheduler:
    policy = scenario.policy
    return _construct(SCHEDULERS[policy.scheduler], "policy.scheduler_params", source, rng, **policy.scheduler_params)
