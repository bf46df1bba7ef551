"""Plans that assign segments to nodes, adaptation and the dynamics timeline in the fast engine."""

import numpy as np
import pytest

from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.monitor import NodeState
from amp4ec.partition import plan_from_bounds
from amp4ec.scenario import parse_scenario
from amp4ec.schedule import Amp4ecScheduler, Pinned, RoundRobin, StageTask
from amp4ec.sim.engine import Simulation, simulate

from synthetic import make_calibration


def state(name, alive=True):
    return NodeState(
        name=name,
        time_s=0.0,
        cpus=1.0,
        memory_bytes=2**30,
        cpu_utilisation=0.0,
        memory_used_bytes=0,
        link_latency_ms=0.0,
        alive=alive,
    )


@pytest.mark.parametrize("make", [lambda rng: Amp4ecScheduler(rng, max_candidates=4), RoundRobin, Pinned])
def test_schedulers_keep_assigned_segments_on_their_nodes_among_many(make):
    # Twenty live nodes, more than max_candidates: the unassigned segment is sampled across
    # the cluster, the assigned one only ever goes to its live assigned nodes.
    states = {f"n{i}": state(f"n{i}", alive=(i != 7)) for i in range(20)}
    plan = plan_from_bounds("test", [0, 2, 4], [("n3", "n7", "n11"), ()])
    scheduler = make(np.random.default_rng(0))
    chosen = {0: set(), 1: set()}
    for segment in plan.segments:
        for request_id in range(200):
            task = StageTask(request_id=request_id, segment=segment, cpu_needed=0.1, memory_needed_bytes=1)
            name = scheduler.select(task, states)
            scheduler.observe(name, 10.0)
            chosen[segment.index].add(name)
    if isinstance(scheduler, Pinned):
        # Segment i goes to the i-th live node of those it may use.
        assert chosen == {0: {"n3"}, 1: {"n1"}}
    else:
        assert chosen[0] == {"n3", "n11"}
        assert len(chosen[1]) > 4


def timeline_scenario(*, capacity_changes=(), events=(), adaptation=False, dispatch="push", partitioner="monolithic", params=None, scheduler="round_robin", nodes=None, requests=200):
    return parse_scenario(
        {
            "name": "plans",
            "model": {"name": "synthetic"},
            "policy": {"partitioner": partitioner, "scheduler": scheduler, "dispatch": dispatch, "partitioner_params": params or {}},
            "workload": {"kind": "closed", "requests": requests},
            "network": {"latency_ms": 0.0, "bandwidth_mbps": 1e9},
            "monitor": {"period_s": 0.1},
            "adaptation": {"enabled": adaptation, "capacity_changes": list(capacity_changes)},
            "nodes": nodes or [{"name": "a", "cpus": 1.0, "memory_mb": 1024}],
            "events": list(events),
        }
    )


def test_capacity_change_and_background_share_one_quota():
    # The quota drops to 0.5 CPU at 1 s; background work then takes 0.2 of it at 2 s, leaving
    # 0.3 CPU, not the 0.8 the node's spec would leave.
    scenario = timeline_scenario(
        capacity_changes=[{"time_s": 1.0, "node": "a", "cpus": 0.5}],
        events=[{"time_s": 2.0, "kind": "background_load", "node": "a", "cpus": 0.2}],
    )
    result = simulate(scenario, CostModel(make_calibration([20.0])))
    before = [r.latency_ms for r in result.records if r.end_s < 1.0]
    halved = [r.latency_ms for r in result.records if 1.2 < r.start_s and r.end_s < 1.9]
    after = [r.latency_ms for r in result.records if r.start_s > 2.2]
    assert np.mean(before) == pytest.approx(20.0)
    # 20 ms of work back to back under a 50 ms quota per 100 ms period: 2.5 per period.
    assert np.mean(halved) == pytest.approx(40.0, rel=0.1)
    # Under a 30 ms quota per period: 1.5 per period.
    assert np.mean(after) == pytest.approx(100.0 / 1.5, rel=0.1)


def test_monitor_reports_the_changed_quota():
    scenario = timeline_scenario(
        capacity_changes=[{"time_s": 0.35, "node": "a", "cpus": 0.5}],
        events=[{"time_s": 0.35, "kind": "background_load", "node": "a", "cpus": 0.2}],
        requests=50,
    )
    simulation = Simulation(scenario, CostModel(make_calibration([20.0])))
    simulation.run()
    assert simulation._published["a"].cpus == 0.5
    # Background work shows as use of the quota, at least its share of it.
    assert simulation._published["a"].cpu_utilisation >= 0.2 / 0.5


@pytest.mark.parametrize(
    "capacity_time_s, background_time_s, field",
    [(1.0, 2.0, "events[0].cpus"), (2.0, 1.0, "adaptation.capacity_changes[0].cpus")],
    ids=["background-above-lowered-quota", "quota-lowered-below-background"],
)
def test_background_must_leave_quota_after_a_capacity_change(capacity_time_s, background_time_s, field):
    with pytest.raises(UsageError, match="would take all of node a's 0.5 CPUs") as caught:
        timeline_scenario(
            capacity_changes=[{"time_s": capacity_time_s, "node": "a", "cpus": 0.5}],
            events=[{"time_s": background_time_s, "kind": "background_load", "node": "a", "cpus": 0.6}],
        )
    assert f"{field}: background cpus" in str(caught.value)


def test_adaptation_rebuilds_the_stage_table_and_memory():
    nodes = [{"name": "a", "cpus": 1.0, "memory_mb": 1024}, {"name": "b", "cpus": 1.0, "memory_mb": 1024}]
    scenario = timeline_scenario(
        capacity_changes=[{"time_s": 0.55, "node": "b", "cpus": 0.25}],
        adaptation=True,
        partitioner="ralos",
        params={"weighting": "capability", "cost": "time"},
        nodes=nodes,
    )
    simulation = Simulation(scenario, CostModel(make_calibration([1.0] * 8)))
    result = simulation.run()
    bounds = result.summary["plan"]["bounds"]
    assert result.summary["adaptations"][0]["old_bounds"] == [0, 4, 8]
    assert bounds != [0, 4, 8]
    stages = simulation._stages
    assert [stage[0].start for stage in stages] + [stages[-1][0].stop] == bounds
    # Every request completes across the change of plan.
    assert result.summary["requests"]["completed"] == 200
    assert simulation.nodes["a"].memory_used_bytes == simulation._deployed_bytes("a")


def test_pull_dispatch_follows_the_plan_assignment():
    nodes = [{"name": "high", "cpus": 1.0, "memory_mb": 1024}, {"name": "low", "cpus": 0.4, "memory_mb": 1024}]
    scenario = timeline_scenario(dispatch="pull", partitioner="optimal", params={"objective": "bottleneck"}, nodes=nodes)
    result = simulate(scenario, CostModel(make_calibration([2.0, 3.0, 1.0, 4.0])))
    assigned = result.summary["plan"]["nodes"]
    assert result.summary["requests"]["completed"] == 200
    for record in result.records:
        assert all(name in allowed for name, allowed in zip(record.stage_nodes, assigned))
    assert result.summary["littles_law"]["in_system_at_end"] == 0
