"""The replay monitor stops offering a node that has stopped pushing its stats."""

from __future__ import annotations

import time
from types import SimpleNamespace

from amp4ec.real.coordinator import RECHECK_SILENT_S, NodeRuntime, NodeTable, StatsMonitor


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


def make_stale(monitor: StatsMonitor, name: str) -> None:
    received_s, state = monitor._latest[name]
    monitor._latest[name] = (received_s - 1.5, state)


def test_second_silence_is_checked_again():
    """A node that reports again and then falls silent once more (paused, then killed) is checked both times."""
    monitor = monitor_with(period_s=0.1)
    checked = []
    monitor.on_silent = checked.append
    push(monitor, "a")
    push(monitor, "b")
    make_stale(monitor, "b")
    monitor._sample()
    assert checked == ["b"]

    push(monitor, "b")
    assert monitor._sample()["b"].alive
    assert monitor.silent == set()

    make_stale(monitor, "b")
    monitor._sample()
    # Still silent at the next sample: no second check within RECHECK_SILENT_S.
    monitor._sample()
    assert checked == ["b", "b"]
    assert monitor.silences == {"b": 2}
    assert monitor.silent == {"b"}

    # A second later its container is inspected again (a paused one may have been killed since),
    # within the same spell.
    monitor._checked_at["b"] -= RECHECK_SILENT_S
    monitor._sample()
    assert checked == ["b", "b", "b"]
    assert monitor.silences == {"b": 2}


def test_a_push_within_three_periods_keeps_the_node():
    monitor = monitor_with(period_s=1.0)
    push(monitor, "a")
    received_s, state = monitor._latest["a"]
    monitor._latest["a"] = (received_s - 2.5, state)
    assert monitor._sample()["a"].alive
    assert monitor.silent == set()


def test_utilisation_needs_half_a_period():
    """Two pushes milliseconds apart (connect, then start) must not read as a busy node."""
    monitor = monitor_with(period_s=1.0)
    node = monitor.table["a"]
    t0 = 1000.0
    first = monitor._state_from_stats(node, {"time_s": t0, "cpu_usage_ns": 0})
    # 5 ms of CPU time in a 5 ms window: 100 % over a window far shorter than a period.
    start = monitor._state_from_stats(node, {"time_s": t0 + 0.005, "cpu_usage_ns": 5_000_000})
    assert first.cpu_utilisation == 0.0
    assert start.cpu_utilisation == 0.0
    # A window of 0.6 s with 0.3 s of CPU time on 1 CPU: half busy.
    later = monitor._state_from_stats(node, {"time_s": t0 + 0.6, "cpu_usage_ns": 300_000_000})
    assert abs(later.cpu_utilisation - 0.5) < 0.01
    # A push shortly after keeps the last full window's figure.
    soon = monitor._state_from_stats(node, {"time_s": t0 + 0.61, "cpu_usage_ns": 310_000_000})
    assert abs(soon.cpu_utilisation - 0.5) < 0.01


def test_final_sample_keeps_replying_node():
    """A paused node keeps the final stats request waiting, and the node that replied at once is not silent."""
    monitor = monitor_with(period_s=0.1)

    def request_stats(names, *, period_s, timeout_s):
        if period_s > 0:
            # At the start both nodes reply.
            push(monitor, "a")
            push(monitor, "b")
            return ["a", "b"]
        push(monitor, "a")
        # a's reply arrived at once, and b kept the request waiting for its whole timeout.
        received_s, state = monitor._latest["a"]
        monitor._latest["a"] = (received_s - timeout_s, state)
        received_s, state = monitor._latest["b"]
        monitor._latest["b"] = (received_s - timeout_s, state)
        return ["a"]

    monitor.links = SimpleNamespace(request_stats=request_stats)
    monitor.start()
    monitor.stop()
    assert monitor.silent == {"b"}
    sample = monitor.snapshot()
    assert sample["a"].alive and not sample["b"].alive
    assert monitor.missed >= 1
