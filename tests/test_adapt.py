"""Adaptation in simulation: a quota change beyond the threshold repartitions and pays the redeploy."""

import pytest

from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.scenario import parse_scenario
from amp4ec.sim.engine import simulate

from synthetic import make_calibration


def scenario(*, enabled=True, to_cpus=0.25, threshold=0.2, load_ms_per_mb=0.0, node="b"):
    return parse_scenario(
        {
            "name": "adapt",
            "model": {"name": "synthetic"},
            "policy": {"partitioner": "ralos", "scheduler": "round_robin", "partitioner_params": {"weighting": "capability", "cost": "time"}},
            "workload": {"kind": "closed", "requests": 200},
            "network": {"latency_ms": 0.0, "bandwidth_mbps": 8.0},
            "monitor": {"period_s": 0.1},
            "adaptation": {
                "enabled": enabled,
                "threshold": threshold,
                "load_ms_per_mb": load_ms_per_mb,
            },
            "events": [{"time_s": 0.55, "kind": "cpu", "node": node, "cpus": to_cpus}],
            "nodes": [
                {"name": "a", "cpus": 1.0, "memory_mb": 1024},
                {"name": "b", "cpus": 1.0, "memory_mb": 1024},
            ],
        }
    )


def costs():
    return CostModel(make_calibration([1.0] * 8))


def test_quota_drop_triggers_repartition():
    result = simulate(scenario(), costs())
    adaptations = result.summary["adaptations"]
    assert len(adaptations) == 1
    first = adaptations[0]
    assert first["trigger"] == {"b": {"from_cpus": 1.0, "to_cpus": 0.25}}
    assert first["old_bounds"] == [0, 4, 8]
    # Node b keeps a share proportional to its lower score, so its segment shrinks.
    assert first["new_bounds"][1] > 4
    # The change at 0.55 s is seen at the next monitor sample.
    assert first["time_s"] == pytest.approx(0.6)
    assert result.summary["plan"]["bounds"] == first["new_bounds"]


def test_redeploy_cost_is_paid():
    result = simulate(scenario(load_ms_per_mb=1000.0), costs())
    redeploy_ms = result.summary["adaptations"][0]["redeploy_ms"]
    # Both segments get new bounds, so both nodes receive weights over an 8 Mbit/s link and load
    # them at 1000 ms per 10^6 bytes.
    assert set(redeploy_ms) == {"a", "b"}
    assert all(ms > 0 for ms in redeploy_ms.values())
    slowest = max(r.latency_ms for r in result.records)
    assert slowest >= max(redeploy_ms.values())
    free = simulate(scenario(load_ms_per_mb=0.0), costs())
    assert max(r.latency_ms for r in free.records) < slowest


def test_small_change_below_threshold():
    result = simulate(scenario(to_cpus=0.9), costs())
    assert result.summary["adaptations"] == []
    assert result.summary["plan"]["bounds"] == [0, 4, 8]


def test_adaptation_disabled_keeps_plan():
    result = simulate(scenario(enabled=False), costs())
    assert "adaptations" not in result.summary
    assert result.summary["plan"]["bounds"] == [0, 4, 8]


def test_cpu_event_unknown_node():
    with pytest.raises(UsageError, match="events\\[0\\].node: unknown node 'ghost'"):
        scenario(node="ghost")


def test_capacity_changes_still_trigger():
    # The deprecated [adaptation] capacity_changes is read as a cpu event.
    with pytest.warns(FutureWarning, match="capacity_changes is deprecated"):
        legacy = parse_scenario(
            {
                **scenario().resolved(),
                "events": [],
                "adaptation": {"enabled": True, "capacity_changes": [{"time_s": 0.55, "node": "b", "cpus": 0.25}]},
            }
        )
    assert [(e.kind, e.node, e.cpus) for e in legacy.events] == [("cpu", "b", 0.25)]
    result = simulate(legacy, costs())
    assert result.summary["adaptations"][0]["trigger"] == {"b": {"from_cpus": 1.0, "to_cpus": 0.25}}
