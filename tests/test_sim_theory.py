"""The engine against queueing theory, each check at a stated confidence.

Batch means turn correlated per-request latencies into nearly independent batch averages, so a
Student t interval on them is valid. Every check uses a 99% interval, so with a new seed each
test fails by chance about once in a hundred runs.
"""

import math

import numpy as np
import pytest
from scipy import stats

from amp4ec.costs import CostModel
from amp4ec.scenario import parse_scenario
from amp4ec.sim.engine import simulate

from synthetic import make_calibration

CONFIDENCE = 0.99
BATCHES = 30


def scenario(nodes, *, workload, partitioner="monolithic", scheduler="round_robin", seed=1, policy=None, service="exponential", **extra):
    return parse_scenario(
        {
            "name": "theory",
            "seed": seed,
            "model": {"name": "synthetic", "service": service},
            "policy": {"partitioner": partitioner, "scheduler": scheduler, **(policy or {})},
            "workload": workload,
            "network": {"latency_ms": 0.0, "bandwidth_mbps": 1e9},
            "nodes": nodes,
            **extra,
        }
    )


def node(name, cpus=1.0):
    return {"name": name, "cpus": cpus, "memory_mb": 1024}


def mean_ci_ms(result, *, warmup=500):
    latencies = np.array([r.latency_ms for r in result.records])[warmup:]
    batches = latencies[: len(latencies) // BATCHES * BATCHES].reshape(BATCHES, -1).mean(axis=1)
    half_width = stats.t.ppf(0.5 + CONFIDENCE / 2, BATCHES - 1) * batches.std(ddof=1) / math.sqrt(BATCHES)
    return batches.mean(), half_width


def assert_littles_law(result):
    law = result.summary["littles_law"]
    assert law["in_system_at_end"] == 0
    assert law["L"] == pytest.approx(law["lambda_W"], rel=1e-9)
    assert not any("Little" in w for w in result.warnings)


def test_mm1_sojourn_time_matches_closed_form():
    # Exponential service with mean 10 ms at one CPU (never throttled), Poisson arrivals at 60/s.
    rate, mean_service_s = 60.0, 0.010
    costs = CostModel(make_calibration([mean_service_s * 1e3]))
    workload = {"kind": "poisson", "requests": 40_000, "rate_rps": rate}
    result = simulate(scenario([node("a")], workload=workload, seed=11), costs)
    expected_ms = 1e3 / (1 / mean_service_s - rate)
    mean_ms, half_width = mean_ci_ms(result)
    assert abs(mean_ms - expected_ms) < half_width, (mean_ms, half_width, expected_ms)
    assert_littles_law(result)


def erlang_c_wait_s(servers: int, rate: float, service_rate: float) -> float:
    a = rate / service_rate
    rho = a / servers
    tail = a**servers / math.factorial(servers) / (1 - rho)
    p_wait = tail / (sum(a**k / math.factorial(k) for k in range(servers)) + tail)
    return p_wait / (servers * service_rate - rate)


def test_mmc_sojourn_time_matches_erlang_c():
    # Three identical nodes taking stages from one queue (pull dispatch): M/M/3 at rho = 0.8.
    servers, rate, mean_service_s = 3, 240.0, 0.010
    costs = CostModel(make_calibration([mean_service_s * 1e3]))
    workload = {"kind": "poisson", "requests": 60_000, "rate_rps": rate}
    nodes = [node(f"n{i}") for i in range(servers)]
    result = simulate(scenario(nodes, workload=workload, seed=12, policy={"dispatch": "pull"}), costs)
    expected_ms = (erlang_c_wait_s(servers, rate, 1 / mean_service_s) + mean_service_s) * 1e3
    mean_ms, half_width = mean_ci_ms(result)
    assert abs(mean_ms - expected_ms) < half_width, (mean_ms, half_width, expected_ms)
    # The pull queue must keep all three busy: each serves about a third of the stages.
    stages = [result.summary["nodes"][f"n{i}"]["stages"] for i in range(servers)]
    assert min(stages) > 0.3 * sum(stages)
    assert_littles_law(result)


def test_tandem_of_queues_matches_jackson_network():
    # Two segments pinned to two nodes: a tandem of M/M/1 queues, W = sum 1 / (mu_i - lambda).
    rate, service_s = 80.0, (0.008, 0.005)
    costs = CostModel(make_calibration([service_s[0] * 1e3, service_s[1] * 1e3]))
    workload = {"kind": "poisson", "requests": 40_000, "rate_rps": rate}
    result = simulate(
        scenario([node("a"), node("b")], workload=workload, partitioner="ralos", scheduler="pinned", seed=13), costs
    )
    assert result.summary["plan"]["bounds"] == [0, 1, 2]
    assert {tuple(r.stage_nodes) for r in result.records} == {("a", "b")}
    expected_ms = sum(1e3 / (1 / s - rate) for s in service_s)
    mean_ms, half_width = mean_ci_ms(result)
    assert abs(mean_ms - expected_ms) < half_width, (mean_ms, half_width, expected_ms)
    assert_littles_law(result)


def test_md1_with_calibrated_service_still_matches():
    # The default service is deterministic, so the same queue is M/D/1 (Pollaczek-Khinchine).
    rate, service_s = 60.0, 0.010
    costs = CostModel(make_calibration([service_s * 1e3]))
    workload = {"kind": "poisson", "requests": 30_000, "rate_rps": rate}
    result = simulate(scenario([node("a")], workload=workload, seed=14, service="calibrated"), costs)
    rho = rate * service_s
    expected_ms = (service_s + rho * service_s / (2 * (1 - rho))) * 1e3
    mean_ms, half_width = mean_ci_ms(result)
    assert abs(mean_ms - expected_ms) < half_width, (mean_ms, half_width, expected_ms)
    assert_littles_law(result)


@pytest.mark.parametrize(
    "workload",
    [
        {"kind": "closed", "requests": 300, "clients": 4, "think_time_ms": 5.0},
        {"kind": "poisson", "requests": 2000, "rate_rps": 150.0},
        {"kind": "bursty", "requests": 2000, "rate_rps": 400.0, "off_rate_rps": 20.0, "on_s": 0.5, "off_s": 1.0},
        {"kind": "diurnal", "requests": 2000, "rate_rps": 100.0, "amplitude": 0.9, "period_s": 5.0},
    ],
    ids=["closed", "poisson", "bursty", "diurnal"],
)
def test_littles_law_holds_for_every_workload_and_with_failures(workload):
    costs = CostModel(make_calibration([2.0, 3.0, 1.0]))
    events = [
        {"time_s": 0.5, "kind": "fail", "node": "b"},
        {"time_s": 1.5, "kind": "recover", "node": "b"},
        {"time_s": 1.0, "kind": "background_load", "node": "a", "cpus": 0.5},
    ]
    result = simulate(
        scenario(
            [node("a"), node("b"), node("c", cpus=0.6)],
            workload=workload,
            partitioner="ralos",
            scheduler="amp4ec",
            policy={"on_failure": "retry"},
            events=events,
        ),
        costs,
    )
    assert_littles_law(result)
