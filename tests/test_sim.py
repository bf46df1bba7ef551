import math

import numpy as np
import pytest
from scipy import stats

from amp4ec.costs import CostModel
from amp4ec.scenario import parse_scenario
from amp4ec.sim.engine import simulate

from synthetic import make_calibration


def scenario(nodes, *, partitioner="ralos", scheduler="round_robin", workload=None, seed=1, **network):
    return parse_scenario(
        {
            "name": "test",
            "seed": seed,
            "model": {"name": "synthetic"},
            "policy": {"partitioner": partitioner, "scheduler": scheduler},
            "workload": workload or {"kind": "closed", "requests": 50},
            "network": network or {"latency_ms": 0.0, "bandwidth_mbps": 1e9},
            "nodes": nodes,
        }
    )


def node(name, cpus=1.0, memory_mb=1024):
    return {"name": name, "cpus": cpus, "memory_mb": memory_mb}


def test_closed_loop_latency_is_sum_of_stages():
    costs = CostModel(make_calibration([2.0, 2.0, 3.0, 1.0]))
    result = simulate(scenario([node("a"), node("b")]), costs)
    summary = result.summary
    assert summary["requests"]["completed"] == 50
    assert summary["latency_ms"]["mean"] == pytest.approx(8.0, rel=1e-6)
    assert summary["throughput_rps"] == pytest.approx(1000 / 8.0, rel=1e-6)
    assert summary["plan"]["bounds"] == [0, 2, 4]


def test_transfers_add_hop_cost_per_direction():
    costs = CostModel(make_calibration([2.0, 2.0]))
    # 4000-byte cuts at 8 Mbit/s take 4 ms, plus 1 ms per hop; 2 stages x 2 hops.
    result = simulate(scenario([node("a"), node("b")], latency_ms=1.0, bandwidth_mbps=8.0), costs)
    assert result.summary["latency_ms"]["mean"] == pytest.approx(4.0 + 4 * 5.0)
    assert result.records[0].bytes_moved == 4 * 4000


def test_low_quota_throttles_back_to_back_requests():
    costs = CostModel(make_calibration([20.0]))
    result = simulate(scenario([node("low", cpus=0.4)], partitioner="monolithic"), costs)
    latencies = [r.latency_ms for r in result.records]
    # The first requests depend on where the run starts within a CFS period; then the
    # pattern settles to alternating 20 ms (quota left) and 80 ms (wait for the next period).
    assert sorted({round(x) for x in latencies[4:]}) == [20, 80]
    assert np.mean(latencies[4:]) == pytest.approx(50.0, rel=0.05)


def test_throttle_wait_makes_stage_resume_cold():
    calibration = make_calibration([30.0])
    for profile in calibration.profiles:
        # Runs after an idle gap cost 2 ms more than back to back.
        for timing in [*profile.units, profile.model]:
            timing.cpu_ms = timing.warm_cpu_ms + 2.0
    costs = CostModel(calibration)
    workload = {"kind": "closed", "requests": 200}
    result = simulate(scenario([node("low", cpus=0.4)], partitioner="monolithic", workload=workload), costs)
    summary = result.summary
    cpu_per_request = summary["nodes"]["low"]["busy_cpu_ms"] / summary["requests"]["completed"]
    # 32 ms per call with its cold start; a stage that waits for the 40 ms quota in mid-run pays 2 ms more.
    assert 32.5 < cpu_per_request <= 34.0
    assert summary["latency_ms"]["mean"] == pytest.approx(cpu_per_request / 0.4, rel=0.02)


def test_same_seed_gives_identical_records():
    costs = CostModel(make_calibration([1.0, 2.0, 3.0]))
    nodes = [node("a"), node("b", cpus=0.6), node("c", cpus=0.4)]
    workload = {"kind": "poisson", "requests": 300, "rate_rps": 40.0}
    first = simulate(scenario(nodes, scheduler="amp4ec", workload=workload), costs)
    second = simulate(scenario(nodes, scheduler="amp4ec", workload=workload), costs)
    other = simulate(scenario(nodes, scheduler="amp4ec", workload=workload, seed=2), costs)
    assert [r.end_s for r in first.records] == [r.end_s for r in second.records]
    assert [r.stage_nodes for r in first.records] == [r.stage_nodes for r in second.records]
    assert [r.arrival_s for r in first.records] != [r.arrival_s for r in other.records]


def test_node_over_memory_limit_is_oom_killed():
    costs = CostModel(make_calibration([1.0, 1.0], runtime_rss_bytes=300 * 2**20))
    result = simulate(scenario([node("a"), node("small", memory_mb=256)]), costs)
    assert any("small is OOM-killed" in w for w in result.warnings)
    assert all("small" not in r.stage_nodes for r in result.records)


def test_md1_waiting_time_matches_closed_form():
    # One node, deterministic 10 ms service, Poisson arrivals at 60/s: M/D/1 with rho = 0.6.
    service_s, rate = 0.010, 60.0
    costs = CostModel(make_calibration([service_s * 1e3]))
    workload = {"kind": "poisson", "requests": 20_000, "rate_rps": rate}
    result = simulate(scenario([node("a")], partitioner="monolithic", workload=workload, seed=7), costs)
    rho = rate * service_s
    expected_ms = (service_s + rho * service_s / (2 * (1 - rho))) * 1e3
    latencies = np.array([r.latency_ms for r in result.records])
    # Batch means give a confidence interval that accounts for correlation between requests.
    batches = latencies[: len(latencies) // 20 * 20].reshape(20, -1).mean(axis=1)
    half_width = stats.t.ppf(0.995, len(batches) - 1) * batches.std(ddof=1) / math.sqrt(len(batches))
    assert abs(batches.mean() - expected_ms) < max(half_width, 0.02 * expected_ms)


def test_open_loop_throughput_follows_arrival_rate():
    costs = CostModel(make_calibration([3.0, 4.0]))
    workload = {"kind": "poisson", "requests": 5000, "rate_rps": 100.0}
    result = simulate(scenario([node("a"), node("b")], workload=workload), costs)
    assert result.summary["requests"]["completed"] == 5000
    assert result.summary["throughput_rps"] == pytest.approx(100.0, rel=0.05)


def test_stage_work_follows_idle_time():
    from amp4ec.costs import Measurement

    calibration = make_calibration([30.0])
    for profile in calibration.profiles:
        # 30 ms back to back, 32 ms after an idle gap, halfway after a 10 ms pause.
        for timing in [*profile.units, profile.model]:
            timing.cpu_ms = 32.0
        profile.idle_gaps = [Measurement(gap_ms=10.0, wall_ms=[31.0] * 5, cpu_ms=[31.0] * 5, ci95_rel=0.0, converged=True)]
    costs = CostModel(calibration)
    monolithic = {"partitioner": "monolithic"}
    # A closed loop without network time starts every request as the last one ends.
    busy = simulate(scenario([node("a")], workload={"kind": "closed", "requests": 50}, **monolithic), costs).summary
    assert busy["nodes"]["a"]["busy_cpu_ms"] / 50 == pytest.approx(30.0 + 2.0 / 50, rel=1e-6)
    # After the first request, a pause of 5 ms pays a quarter of the difference, one of a second all of it.
    for think_time_ms, mean_ms in ((5.0, (32.0 + 19 * 30.5) / 20), (1000.0, 32.0)):
        workload = {"kind": "closed", "requests": 20, "think_time_ms": think_time_ms}
        paused = simulate(scenario([node("a")], workload=workload, **monolithic), costs).summary
        assert paused["latency_ms"]["mean"] == pytest.approx(mean_ms, rel=1e-6)
