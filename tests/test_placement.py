"""Partitioners beyond published RALOS: RALOS variants, uniform, optimal, replicate, hybrid."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.partition import Plan, Ralos, Segment, Uniform, imbalance, node_scores, ralos_bounds, refine_bounds, weighted_bounds
from amp4ec.placement import (
    Hybrid,
    Optimal,
    Replicate,
    StageModel,
    brute_force_placement,
    check_plan_fits,
    optimal_placement,
    plan_objective,
)
from amp4ec.scenario import NodeSpec

from synthetic import make_calibration

MIB = 2**20
NODES = [
    NodeSpec(name="high", cpus=1.0, memory_mb=1024),
    NodeSpec(name="medium", cpus=0.6, memory_mb=512),
    NodeSpec(name="low", cpus=0.4, memory_mb=512),
]


def test_uniform_equal_unit_counts():
    costs = CostModel(make_calibration([1.0] * 7))
    assert Uniform().partition(costs.graph, NODES, costs, 3).bounds == [0, 3, 5, 7]


def test_uniform_caps_parts_at_units():
    costs = CostModel(make_calibration([1.0, 1.0]))
    assert Uniform().partition(costs.graph, NODES, costs, 5).bounds == [0, 1, 2]


def test_ralos_macs_cost_uses_flops():
    # The synthetic graph's FLOPs are 2 x its published cost, so both costs cut alike.
    costs = CostModel(make_calibration([1.0, 3.0, 2.0, 2.0, 4.0]))
    published = Ralos().partition(costs.graph, NODES, costs, 3)
    macs = Ralos(cost="macs").partition(costs.graph, NODES, costs, 3)
    assert macs.bounds == published.bounds == [0, 2, 4, 5]


def test_ralos_time_cost_uses_calibration():
    costs = CostModel(make_calibration([9.0, 1.0, 1.0, 1.0]))
    graph = costs.graph.model_copy(deep=True)
    for unit in graph.units:
        unit.leaves[0].ralos_cost = 1
    # Published cost is flat, so RALOS cuts in the middle; calibrated time puts the heavy unit alone.
    assert Ralos().partition(graph, NODES, costs, 2).bounds == [0, 2, 4]
    assert Ralos(cost="time").partition(graph, NODES, costs, 2).bounds == [0, 1, 4]


def test_ralos_rejects_unknown_cost():
    with pytest.raises(ValueError, match="unknown cost 'flops'"):
        Ralos(cost="flops")


def test_node_scores_match_published_formula():
    scores = node_scores(NODES)
    assert scores == pytest.approx([1.0, 0.6 * 0.6 + 0.4 * 0.5, 0.6 * 0.4 + 0.4 * 0.5])


def test_weighted_bounds_follow_shares():
    # Shares 0.5 / 0.3 / 0.2 of a total of 10.
    assert weighted_bounds([1.0] * 10, [0.5, 0.3, 0.2]) == [0, 5, 8, 10]


def test_weighted_bounds_leave_unit_per_partition():
    assert weighted_bounds([100.0, 1.0, 1.0], [0.9, 0.05, 0.05]) == [0, 1, 2, 3]


def test_refine_lowers_imbalance():
    unit_costs = [1.0] * 10
    shares = [0.5, 0.5]
    refined = refine_bounds(unit_costs, [0, 2, 10], shares)
    assert refined == [0, 5, 10]
    assert imbalance(unit_costs, refined, shares) == 0.0


def test_refine_keeps_balanced_bounds():
    assert refine_bounds([1.0, 2.0, 3.0], [0, 2, 3], [0.5, 0.5]) == [0, 2, 3]


def test_capability_weighted_ralos_assigns_nodes():
    costs = CostModel(make_calibration([1.0] * 20))
    plan = Ralos(weighting="capability").partition(costs.graph, NODES, costs, 3)
    plan.validate(costs.graph.n_units)
    sizes = [s.stop - s.start for s in plan.segments]
    assert sizes[0] > sizes[1] > sizes[2]
    assert [s.nodes for s in plan.segments] == [("high",), ("medium",), ("low",)]


def test_capability_weighted_uses_strongest_nodes():
    costs = CostModel(make_calibration([1.0] * 20))
    plan = Ralos(weighting="capability").partition(costs.graph, NODES, costs, 2)
    assert [s.nodes for s in plan.segments] == [("high",), ("medium",)]


# ----------------------------------------------------------------------------- optimal


def test_optimal_latency_avoids_transfers():
    costs = CostModel(make_calibration([2.0, 2.0, 2.0]))
    plan = Optimal(bandwidth_mbps=8.0, hop_latency_ms=1.0).partition(costs.graph, NODES, costs, 3)
    # One segment on the fastest node: every cut adds 2 x (1 ms + 4 ms).
    assert plan.bounds == [0, 3]
    assert plan.segments[0].nodes == ("high",)


def test_optimal_bottleneck_spreads_work():
    costs = CostModel(make_calibration([4.0, 4.0, 4.0, 4.0]))
    nodes = [NodeSpec(name="a", cpus=1.0, memory_mb=1024), NodeSpec(name="b", cpus=1.0, memory_mb=1024)]
    plan = Optimal(objective="bottleneck", bandwidth_mbps=1e9, hop_latency_ms=0.0).partition(costs.graph, nodes, costs, 2)
    assert plan.bounds == [0, 2, 4]
    assert {s.nodes for s in plan.segments} == {("a",), ("b",)}


def test_optimal_respects_memory_limit():
    # Runtime 200 MiB and 250 MiB of weights per unit, so no 480 MiB node fits two units.
    costs = CostModel(make_calibration([1.0, 1.0, 1.0], runtime_rss_bytes=200 * MIB))
    graph = costs.graph.model_copy(deep=True)
    for unit in graph.units:
        unit.param_bytes = 250 * MIB
    costs.graph = graph
    nodes = [NodeSpec(name=f"n{i}", cpus=1.0, memory_mb=480) for i in range(3)]
    plan = Optimal(hop_latency_ms=0.0).partition(graph, nodes, costs, 3)
    assert plan.bounds == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no plan fits the nodes' memory"):
        Optimal().partition(graph, nodes[:2], costs, 2)


def test_optimal_rejects_unknown_objective():
    with pytest.raises(ValueError, match="unknown objective 'fast'"):
        Optimal(objective="fast")


unit_ms = st.lists(st.floats(min_value=0.1, max_value=20.0), min_size=1, max_size=6)
node_specs = st.lists(
    st.tuples(st.sampled_from([0.2, 0.4, 0.6, 1.0, 1.5, 2.0]), st.integers(min_value=210, max_value=400)),
    min_size=1,
    max_size=3,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cpu_ms=unit_ms,
    specs=node_specs,
    parts=st.integers(min_value=1, max_value=3),
    objective=st.sampled_from(["latency", "bottleneck"]),
    bandwidth_mbps=st.sampled_from([1.0, 10.0, 1000.0]),
    param_mb=st.integers(min_value=0, max_value=60),
)
def test_optimal_matches_brute_force(cpu_ms, specs, parts, objective, bandwidth_mbps, param_mb):
    costs = CostModel(make_calibration(cpu_ms, runtime_rss_bytes=200 * MIB))
    graph = costs.graph.model_copy(deep=True)
    for unit in graph.units:
        unit.param_bytes = param_mb * MIB
    costs.graph = graph
    nodes = [NodeSpec(name=f"n{i}", cpus=cpus, memory_mb=memory) for i, (cpus, memory) in enumerate(specs)]
    model = StageModel(graph, costs, bandwidth_mbps=bandwidth_mbps, hop_latency_ms=0.5)
    expected = brute_force_placement(graph.n_units, nodes, parts, model, objective)
    partitioner = Optimal(objective=objective, bandwidth_mbps=bandwidth_mbps, hop_latency_ms=0.5)
    if expected is None:
        with pytest.raises(ValueError, match="no plan fits"):
            partitioner.partition(graph, nodes, costs, parts)
        return
    plan = partitioner.partition(graph, nodes, costs, parts)
    plan.validate(graph.n_units)
    assert len(plan.segments) <= parts
    by_name = {n.name: n for n in nodes}
    stages = [model.stage(s.start, s.stop, by_name[s.nodes[0]]) for s in plan.segments]
    assert plan_objective(stages, objective) == pytest.approx(expected, rel=1e-9)
    assert all(model.fits(s.start, s.stop, by_name[s.nodes[0]]) for s in plan.segments)
    assert len({s.nodes[0] for s in plan.segments}) == len(plan.segments)


def test_optimal_placement_none_when_nothing_fits():
    costs = CostModel(make_calibration([1.0], runtime_rss_bytes=600 * MIB))
    model = StageModel(costs.graph, costs)
    assert optimal_placement(1, NODES[1:], 2, model, "total", sum_costs=True) is None


def test_stage_model_exec_under_quota():
    costs = CostModel(make_calibration([4.0, 6.0]))
    model = StageModel(costs.graph, costs, bandwidth_mbps=8.0, hop_latency_ms=1.0)
    assert model.exec_ms(0, 2, NODES[2]) == pytest.approx(10.0 / 0.4)
    # 4000-byte cuts at 8 Mbit/s: 4 ms each, plus 1 ms per hop, in and out.
    assert model.transfer_ms(0, 2) == pytest.approx(10.0)
    assert model.exec_ms(0, 1, NODES[0]) == pytest.approx(4.0)


# ----------------------------------------------------------------------------- replicate, hybrid, fit


def test_replicate_puts_model_on_fitting_nodes():
    costs = CostModel(make_calibration([1.0, 1.0], runtime_rss_bytes=600 * MIB))
    plan = Replicate().partition(costs.graph, NODES, costs, 3)
    assert plan.bounds == [0, 2]
    assert plan.segments[0].nodes == ("high",)


def test_hybrid_groups_nodes_by_quota():
    costs = CostModel(make_calibration([1.0] * 12))
    nodes = NODES + [NodeSpec(name="high2", cpus=1.0, memory_mb=1024)]
    plan = Hybrid(stages=2).partition(costs.graph, nodes, costs, 4)
    plan.validate(costs.graph.n_units)
    assert [set(s.nodes) for s in plan.segments] == [{"high", "medium"}, {"high2", "low"}]
    assert plan.bounds == [0, 6, 12]


def test_check_plan_fits_names_node():
    costs = CostModel(make_calibration([1.0, 1.0], runtime_rss_bytes=600 * MIB))
    plan = Plan("mine", (Segment(0, 0, 1, ("low",)), Segment(1, 1, 2, ("high",))))
    with pytest.raises(UsageError, match="plan of partitioner 'mine' does not fit node 'low'"):
        check_plan_fits(plan, NODES, costs)


def test_check_plan_fits_unassigned_needs_one_node():
    costs = CostModel(make_calibration([1.0], runtime_rss_bytes=2000 * MIB))
    plan = Plan("ralos", (Segment(0, 0, 1),))
    with pytest.raises(UsageError, match="fits no node"):
        check_plan_fits(plan, NODES, costs)


def test_check_plan_fits_unknown_node():
    costs = CostModel(make_calibration([1.0]))
    with pytest.raises(UsageError, match="unknown node 'ghost'"):
        check_plan_fits(Plan("mine", (Segment(0, 0, 1, ("ghost",)),)), NODES, costs)


def test_ralos_bounds_unchanged():
    assert ralos_bounds([1, 3, 2, 2, 4], 3) == [0, 2, 4, 5]
    assert math.isclose(sum(node_scores(NODES[:1])), 1.0)
