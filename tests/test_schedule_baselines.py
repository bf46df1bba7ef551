"""Baseline schedulers, plan assignments, and policy plug-ins."""

import sys
import textwrap

import numpy as np
import pytest

from amp4ec import policies
from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.monitor import NodeState
from amp4ec.partition import Segment
from amp4ec.scenario import parse_scenario
from amp4ec.schedule import Amp4ecScheduler, NoNodeAvailable, RoundRobin, StageTask
from amp4ec.schedule_baselines import CacheAware, LeastLoaded, RandomScheduler, ShortestExpectedCompletion
from amp4ec.sim.engine import simulate

from synthetic import make_calibration


def state(name: str, cpus: float = 1.0, **overrides) -> NodeState:
    values = dict(
        name=name, time_s=0.0, cpus=cpus, memory_bytes=2**30, cpu_utilisation=0.0,
        memory_used_bytes=0, link_latency_ms=0.2, alive=True,
    )
    values.update(overrides)
    return NodeState(**values)


def task(request_id: int = 0, nodes: tuple[str, ...] = (), index: int = 0) -> StageTask:
    return StageTask(request_id, Segment(index, 0, 1, nodes), cpu_needed=0.1, memory_needed_bytes=10**6)


ALL_SCHEDULERS = [RoundRobin, Amp4ecScheduler, RandomScheduler, LeastLoaded, ShortestExpectedCompletion, CacheAware]


@pytest.mark.parametrize("factory", ALL_SCHEDULERS)
def test_scheduler_keeps_to_assignment(factory):
    scheduler = factory(np.random.default_rng(0))
    states = {name: state(name) for name in "abc"}
    chosen = {scheduler.select(task(i, nodes=("b", "c")), states) for i in range(20)}
    assert chosen <= {"b", "c"}


@pytest.mark.parametrize("factory", ALL_SCHEDULERS)
def test_scheduler_no_live_assigned_node(factory):
    scheduler = factory(np.random.default_rng(0))
    states = {"a": state("a"), "b": state("b", alive=False)}
    with pytest.raises(NoNodeAvailable, match="among its assigned nodes b"):
        scheduler.select(task(nodes=("b",)), states)


def test_random_is_seeded():
    states = {name: state(name) for name in "abcd"}

    def picks(seed):
        scheduler = RandomScheduler(np.random.default_rng(seed))
        return [scheduler.select(task(i), states) for i in range(30)]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)
    assert set(picks(1)) == set("abcd")


def test_least_loaded_counts_queued_stages():
    scheduler = LeastLoaded(np.random.default_rng(0))
    states = {"a": state("a"), "b": state("b")}
    assert [scheduler.select(task(i), states) for i in range(4)] == ["a", "b", "a", "b"]
    scheduler.observe("a", 5.0)
    scheduler.observe("a", 5.0)
    assert scheduler.select(task(5), states) == "a"


def test_least_loaded_weighs_by_cpus():
    scheduler = LeastLoaded(np.random.default_rng(0))
    states = {"big": state("big", cpus=2.0), "small": state("small", cpus=0.5)}
    chosen = [scheduler.select(task(i), states) for i in range(5)]
    assert chosen.count("big") == 4


def test_shortest_expected_completion_routes_by_speed():
    scheduler = ShortestExpectedCompletion(np.random.default_rng(0))
    states = {"fast": state("fast"), "slow": state("slow", cpus=0.25)}
    # Observed: fast runs the segment in 10 ms, slow in 40 ms.
    scheduler.select(task(0), states)
    scheduler.observe("fast", 10.0)
    assert scheduler.expected_exec_ms("s0", states["slow"]) == pytest.approx(40.0)
    chosen = [scheduler.select(task(i), states) for i in range(1, 6)]
    # Fast finishes after 10, 20, 30, 40 ms as its queue grows, and a tie at 40 keeps the first
    # node. With four stages queued there, 50 ms on fast loses to 40 ms on slow.
    assert chosen == ["fast", "fast", "fast", "fast", "slow"]


def test_cache_aware_keeps_segment_home():
    scheduler = CacheAware(np.random.default_rng(0), slack=3.0)
    states = {"a": state("a"), "b": state("b")}
    assert [scheduler.select(task(i), states) for i in range(3)] == ["a", "a", "a"]
    # Four queued stages at home cost 4 units against 1 elsewhere, beyond the slack of 3.
    assert scheduler.select(task(3), states) == "b"
    assert scheduler.home["s0"] == "b"


def test_cache_aware_rejects_small_slack():
    with pytest.raises(ValueError, match="slack must be at least 1.0"):
        CacheAware(np.random.default_rng(0), slack=0.5)


# ----------------------------------------------------------------------------- registry and plug-ins


def scenario_data(partitioner="ralos", scheduler="round_robin", **policy):
    return {
        "name": "t",
        "model": {"name": "synthetic"},
        "policy": {"partitioner": partitioner, "scheduler": scheduler, **policy},
        "workload": {"kind": "closed", "requests": 20, "clients": 2},
        "network": {"latency_ms": 0.0, "bandwidth_mbps": 1e9},
        "nodes": [
            {"name": "a", "cpus": 1.0, "memory_mb": 1024},
            {"name": "b", "cpus": 0.6, "memory_mb": 512},
            {"name": "c", "cpus": 0.4, "memory_mb": 512},
        ],
    }


@pytest.mark.parametrize("partitioner", sorted(policies.PARTITIONERS))
@pytest.mark.parametrize("scheduler", sorted(policies.SCHEDULERS))
def test_every_pair_simulates(partitioner, scheduler):
    costs = CostModel(make_calibration([2.0, 2.0, 3.0, 1.0, 5.0]))
    result = simulate(parse_scenario(scenario_data(partitioner, scheduler)), costs)
    assert result.summary["requests"]["completed"] == 20
    plan_nodes = result.summary["plan"].get("nodes")
    for record in result.records:
        for stage, node in enumerate(record.stage_nodes):
            if plan_nodes:
                assert node in plan_nodes[stage]


def test_optimal_plan_deploys_only_assigned_segments():
    costs = CostModel(make_calibration([2.0, 2.0, 3.0], runtime_rss_bytes=300 * 2**20))
    result = simulate(parse_scenario(scenario_data("optimal", "amp4ec", partitioner_params={"objective": "bottleneck"})), costs)
    assert not result.warnings
    assert len(result.summary["plan"]["nodes"]) == len(result.summary["plan"]["bounds"]) - 1


def test_unknown_partitioner_param_is_usage_error():
    with pytest.raises(UsageError, match="policy.partitioner_params: invalid parameters"):
        parse_scenario(scenario_data("optimal", partitioner_params={"objective": "fastest"}))


def test_plan_over_memory_is_usage_error():
    costs = CostModel(make_calibration([1.0, 1.0], runtime_rss_bytes=1100 * 2**20))
    with pytest.raises(UsageError, match="partitioner 'replicate' failed: no plan fits the nodes' memory"):
        simulate(parse_scenario(scenario_data("replicate")), costs)


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(
        textwrap.dedent(
            """
            from amp4ec.partition import plan_from_bounds

            class FirstUnitAlone:
                name = "first_unit_alone"

                def partition(self, graph, nodes, costs, parts):
                    return plan_from_bounds(self.name, [0, 1, graph.n_units])

            class NoSelect:
                def __init__(self, rng):
                    pass

                def observe(self, node, exec_ms):
                    pass

            class ReturnsList:
                def partition(self, graph, nodes, costs, parts):
                    return [0, graph.n_units]

            class NoRng:
                def select(self, task, states):
                    return None

                def observe(self, node, exec_ms):
                    pass

            class ChoosesUnknownNode:
                def __init__(self, rng):
                    pass

                def select(self, task, states):
                    return "no-such-node"

                def observe(self, node, exec_ms):
                    pass

            class Raises(ChoosesUnknownNode):
                def select(self, task, states):
                    raise RuntimeError("boom")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_plugins"
    sys.modules.pop("my_plugins", None)


def test_plugin_partitioner_runs(plugin_module):
    costs = CostModel(make_calibration([1.0, 2.0, 3.0]))
    result = simulate(parse_scenario(scenario_data(f"{plugin_module}:FirstUnitAlone")), costs)
    assert result.summary["plan"] == {"partitioner": "first_unit_alone", "bounds": [0, 1, 3]}


@pytest.mark.parametrize(
    ("field", "name", "expected"),
    [
        ("partitioner", "no_such_module_xyz:Thing", "cannot be imported"),
        ("partitioner", "my_plugins:Missing", "has no attribute 'Missing'"),
        ("scheduler", "my_plugins:NoSelect", "does not implement the scheduler interface: it lacks select()"),
        ("partitioner", "my_plugins:NoSelect", "does not implement the partitioner interface: it lacks partition()"),
        ("scheduler", "fastest", "unknown scheduler 'fastest'"),
    ],
)
def test_bad_plugin_rejected_at_load(plugin_module, field, name, expected):
    data = scenario_data(**{field: name})
    with pytest.raises(UsageError, match=f"policy.{field}: .*{expected}") as error:
        parse_scenario(data)
    assert name in str(error.value)


def test_plugin_returning_wrong_type(plugin_module):
    costs = CostModel(make_calibration([1.0, 2.0]))
    with pytest.raises(UsageError, match="returned list, expected amp4ec.partition.Plan"):
        simulate(parse_scenario(scenario_data(f"{plugin_module}:ReturnsList")), costs)


def test_plugin_choosing_unknown_node(plugin_module):
    costs = CostModel(make_calibration([1.0, 2.0]))
    with pytest.raises(UsageError, match="chose 'no-such-node', which is not a node of the scenario"):
        simulate(parse_scenario(scenario_data(scheduler=f"{plugin_module}:ChoosesUnknownNode")), costs)


def test_plugin_select_raising_is_usage_error(plugin_module):
    costs = CostModel(make_calibration([1.0, 2.0]))
    with pytest.raises(UsageError, match=r"policy.scheduler: scheduler '.*:Raises' failed: RuntimeError: boom"):
        simulate(parse_scenario(scenario_data(scheduler=f"{plugin_module}:Raises")), costs)


def test_scheduler_without_rng_is_explained(plugin_module):
    costs = CostModel(make_calibration([1.0, 2.0]))
    with pytest.raises(UsageError, match="must take the random generator rng as its first argument"):
        simulate(parse_scenario(scenario_data(scheduler=f"{plugin_module}:NoRng")), costs)


def test_unknown_scheduler_parameter_lists_accepted(plugin_module):
    data = scenario_data(scheduler="amp4ec")
    data["policy"]["scheduler_params"] = {"bogus": 1}
    costs = CostModel(make_calibration([1.0, 2.0]))
    with pytest.raises(UsageError, match="it accepts w_resources, w_load") as error:
        simulate(parse_scenario(data), costs)
    assert "rng" not in str(error.value)
