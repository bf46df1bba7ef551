"""Processor sharing on a link: finish times against the closed forms of the PS queue."""

import pytest
import simpy

from amp4ec.costs import CostModel
from amp4ec.scenario import parse_scenario
from amp4ec.sim.engine import simulate
from amp4ec.sim.links import SharedLink

from synthetic import make_calibration

# 8 kbit/s: one byte takes 1 ms.
BANDWIDTH_BPS = 8e3


def run_transfers(transfers, *, bandwidth_bps=BANDWIDTH_BPS, changes=()):
    """Start (start_s, n_bytes, latency_ms) transfers on one link; return each one's finish time in s."""
    env = simpy.Environment()
    link = SharedLink(env, bandwidth_bps)
    finished = {}

    def start(index, n_bytes, latency_ms):
        link.send(n_bytes, latency_ms, lambda: finished.setdefault(index, env.now))

    for index, (start_s, n_bytes, latency_ms) in enumerate(transfers):
        env.timeout(start_s).callbacks.append(lambda _, i=index, b=n_bytes, l=latency_ms: start(i, b, l))
    for time_s, new_bps in changes:
        env.timeout(time_s).callbacks.append(lambda _, b=new_bps: link.set_bandwidth(b))
    env.run()
    return [finished[i] for i in range(len(transfers))]


def test_single_transfer_takes_latency_plus_bytes():
    assert run_transfers([(0.0, 100, 2.0)]) == [pytest.approx(0.102)]


def test_two_equal_transfers_take_twice_as_long():
    # Each gets half the bandwidth for the whole time: 2 x 100 ms.
    assert run_transfers([(0.0, 100, 0.0), (0.0, 100, 0.0)]) == [pytest.approx(0.2), pytest.approx(0.2)]


def test_late_transfer_finishes_as_ps_predicts():
    # A (100 bytes) alone for 50 ms moves 50 bytes. Then A and B share, so A's last 50 bytes
    # take 100 ms (finish 150 ms). B has moved 50 bytes by then and its last 50 run alone (200 ms).
    assert run_transfers([(0.0, 100, 0.0), (0.05, 100, 0.0)]) == [pytest.approx(0.15), pytest.approx(0.2)]


def test_short_transfer_overtakes_long_one():
    # B (10 bytes) joins at 10 ms, shares for 20 ms, finishes at 30 ms; A (100 bytes) lost 10 ms: 110 ms.
    assert run_transfers([(0.0, 100, 0.0), (0.01, 10, 0.0)]) == [pytest.approx(0.11), pytest.approx(0.03)]


def test_latency_delays_join_to_the_link():
    # B pays a 50 ms per-hop cost first, so its bits join at 50 ms, as in the late-start case.
    assert run_transfers([(0.0, 100, 0.0), (0.0, 100, 50.0)]) == [pytest.approx(0.15), pytest.approx(0.2)]


def test_three_transfers_share_by_thirds():
    # Three equal transfers: all finish at 3 x 100 ms; a fourth starting at 300 ms runs alone.
    finish = run_transfers([(0.0, 100, 0.0)] * 3 + [(0.3, 100, 0.0)])
    assert finish == [pytest.approx(0.3)] * 3 + [pytest.approx(0.4)]


def test_bandwidth_change_applies_to_transfers_under_way():
    # 50 bytes at 1 byte/ms, then the link halves: the last 50 bytes take 100 ms.
    assert run_transfers([(0.0, 100, 0.0)], changes=[(0.05, BANDWIDTH_BPS / 2)]) == [pytest.approx(0.15)]


def test_reset_drops_transfers():
    env = simpy.Environment()
    link = SharedLink(env, BANDWIDTH_BPS)
    finished = []
    link.send(100, 0.0, lambda: finished.append(env.now))
    env.timeout(0.05).callbacks.append(lambda _: link.reset())
    env.run()
    assert finished == []
    assert link.transfers == 0


def two_request_scenario(trace_path):
    return parse_scenario(
        {
            "name": "links",
            "seed": 3,
            "model": {"name": "synthetic"},
            "policy": {"partitioner": "monolithic", "scheduler": "round_robin"},
            "workload": {"kind": "trace", "trace": str(trace_path)},
            "network": {"latency_ms": 0.0, "bandwidth_mbps": 0.032},
            "nodes": [{"name": "a", "cpus": 1.0, "memory_mb": 1024}],
        }
    )


def test_engine_simultaneous_requests_share_links(tmp_path):
    # Each request sends a 4000-byte input and gets a 4000-byte output back at 4000 bytes/s,
    # 1 s each way when alone, with negligible CPU work. Arriving together, the two inputs
    # share the uplink and both arrive at 2 s, then both outputs share the downlink until 4 s.
    # First come, first served links would give 2 s and 3 s instead.
    trace = tmp_path / "arrivals.csv"
    trace.write_text("arrival_s\n0.0\n0.0\n")
    result = simulate(two_request_scenario(trace), CostModel(make_calibration([0.001])))
    latencies_s = [record.latency_ms / 1e3 for record in result.records]
    assert latencies_s == [pytest.approx(4.0, rel=1e-3), pytest.approx(4.0, rel=1e-3)]
