"""Request arrivals from a scenario and seed, identical for simulation and real mode.

Random streams are derived from the scenario seed by purpose, so the arrival times do not
change when a scheduler draws more or fewer random numbers.
"""

from __future__ import annotations

import zlib

import numpy as np

from amp4ec.scenario import WorkloadSpec


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """Return an independent generator for one purpose ("workload", "scheduler", "inputs", ...)."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def open_loop_arrivals_s(workload: WorkloadSpec, seed: int) -> np.ndarray | None:
    """Return arrival times in seconds for open-loop workloads, or None for a closed loop.

    A closed loop has no arrival times fixed in advance: each client sends its next request
    ``think_time_ms`` after the previous reply.
    """
    if workload.kind == "closed":
        return None
    if workload.kind == "poisson":
        gaps_s = rng_for(seed, "workload").exponential(1.0 / workload.rate_rps, size=workload.requests)
        return np.cumsum(gaps_s)
    raise ValueError(f"unknown workload kind {workload.kind!r}")
