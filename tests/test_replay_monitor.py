"""The replay monitor stops offering a node that has stopped pushing its stats."""

from __future__ import annotations

import time
from types import SimpleNamespace

from amp4ec.real.coordinator import NodeRuntime, NodeTable, StatsMonitor


def monitor_with(period_s: float) -> StatsMonitor:
    scenario = SimpleNamespace(monitor=SimpleNamespace(period_s=period_s, delay_s=0.0))
    table = NodeTable([NodeRuntime("a", 1.0, 2**30, "a:5555"), NodeRuntime("b", 1.0, 2**30, "b:5555")])
    return StatsMonitor(scenario, table, hop_latency_ms=0.2)


def push(monitor: StatsMonitor, name: str) -> None:
    monitor.on_stats(name, {"time_s": time.time(), "cpu_usage_ns": 0, "memory_usage_bytes": 1})


def test_a_node_that_stops_pushing_is_published_as_not_alive():
    monitor = monitor_with(period_s=0.1)
    push(monitor, "a")
    push(monitor, "b")
    sample = monitor._sample()
    assert sample["a"].alive and sample["b"].alive

    # b's last push is now older than the 1 s floor (three periods are only 0.3 s).
    received_s, state = monitor._latest["b"]
    monitor._latest["b"] = (received_s - 1.5, state)
    push(monitor, "a")
    sample = monitor._sample()
    assert sample["a"].alive
    assert not sample["b"].alive
    assert monitor.silent == {"b"}

    # A fresh push brings it back.
    push(monitor, "b")
    assert monitor._sample()["b"].alive


def test_a_push_within_three_periods_keeps_the_node():
    monitor = monitor_with(period_s=1.0)
    push(monitor, "a")
    received_s, state = monitor._latest["a"]
    monitor._latest["a"] = (received_s - 2.5, state)
    assert monitor._sample()["a"].alive
    assert monitor.silent == set()
