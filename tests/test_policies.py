import math

import numpy as np
import pytest

from amp4ec.costs import CostModel
from amp4ec.monitor import NodeState
from amp4ec.partition import Monolithic, Plan, Ralos, Segment, ralos_bounds
from amp4ec.scenario import NodeSpec
from amp4ec.schedule import Amp4ecScheduler, NoNodeAvailable, RoundRobin, StageTask

from synthetic import make_calibration

NODES = [NodeSpec(name="a", cpus=1.0, memory_mb=1024), NodeSpec(name="b", cpus=0.6, memory_mb=512)]


def state(name: str, **overrides) -> NodeState:
    values = dict(
        name=name, time_s=0.0, cpus=1.0, memory_bytes=2**30, cpu_utilisation=0.0,
        memory_used_bytes=0, link_latency_ms=0.2, alive=True,
    )
    values.update(overrides)
    return NodeState(**values)


def task(request_id: int = 0) -> StageTask:
    return StageTask(request_id=request_id, segment=Segment(0, 0, 1), cpu_needed=0.1, memory_needed_bytes=10**6)


def test_ralos_closes_partition_at_target():
    # total 12, target 4 per part: [1,3] reaches 4, [2,2] reaches 4, leftover [4].
    assert ralos_bounds([1, 3, 2, 2, 4], 3) == [0, 2, 4, 5]


def test_ralos_leftover_joins_last_partition():
    # Trailing zero-cost units never form a partition of their own.
    assert ralos_bounds([5, 5, 0, 0], 2) == [0, 1, 4]


def test_ralos_one_part_is_whole_model():
    assert ralos_bounds([1, 2, 3], 1) == [0, 3]


def test_ralos_large_unit_gives_fewer_parts():
    assert ralos_bounds([100, 1, 1], 3) == [0, 1, 3]
    assert ralos_bounds([1, 1, 100], 3) == [0, 3]


def test_ralos_partitioner_uses_published_cost():
    costs = CostModel(make_calibration([1.0, 1.0, 1.0, 1.0]))
    graph = costs.graph
    plan = Ralos().partition(graph, NODES, costs, 2)
    plan.validate(graph.n_units)
    assert plan.bounds == [0, 2, 4]


def test_monolithic_is_one_segment():
    costs = CostModel(make_calibration([1.0, 2.0]))
    assert Monolithic().partition(costs.graph, NODES, costs, 3).bounds == [0, 2]


def test_plan_validate_rejects_gap():
    plan = Plan("bad", (Segment(0, 0, 2), Segment(1, 3, 4)))
    with pytest.raises(ValueError, match="expected it to start at unit 2"):
        plan.validate(4)


def test_plan_validate_rejects_short_plan():
    with pytest.raises(ValueError, match="graph has 5 units"):
        Plan("bad", (Segment(0, 0, 4),)).validate(5)


def test_round_robin_cycles_live_nodes():
    scheduler = RoundRobin(np.random.default_rng(0))
    states = {"a": state("a"), "b": state("b", alive=False), "c": state("c")}
    assert [scheduler.select(task(), states) for _ in range(4)] == ["a", "c", "a", "c"]


def test_round_robin_no_live_node():
    with pytest.raises(NoNodeAvailable):
        RoundRobin(np.random.default_rng(0)).select(task(), {"a": state("a", alive=False)})


def test_amp4ec_balance_term_spreads_tasks():
    scheduler = Amp4ecScheduler(np.random.default_rng(0))
    states = {"a": state("a"), "b": state("b")}
    chosen = [scheduler.select(task(i), states) for i in range(10)]
    assert chosen.count("a") == 5
    assert chosen.count("b") == 5


def test_amp4ec_skips_overloaded_node():
    scheduler = Amp4ecScheduler(np.random.default_rng(0))
    for _ in range(5):
        scheduler.observe("a", 95.0)  # load 0.95 > 0.8
    states = {"a": state("a"), "b": state("b")}
    assert {scheduler.select(task(i), states) for i in range(5)} == {"b"}


def test_amp4ec_skips_node_without_memory():
    scheduler = Amp4ecScheduler(np.random.default_rng(0))
    states = {"a": state("a", memory_used_bytes=2**30), "b": state("b")}
    assert scheduler.select(task(), states) == "b"


def test_amp4ec_score_matches_published_formula():
    scheduler = Amp4ecScheduler(np.random.default_rng(0), noise=0.0)
    scheduler.observe("a", 50.0)
    scheduler.tasks_assigned["a"] = 1
    score = scheduler.score(task(), state("a", cpu_utilisation=0.5))
    # S_R = 1 (clamped), S_L = 1 - 0.5, S_P = 1 / (1 + 0.05 s), S_B = 1 / 3.
    expected = 0.2 * 1.0 + 0.2 * 0.5 + 0.1 / 1.05 + 0.5 / 3
    assert score == pytest.approx(expected)


def test_amp4ec_unclamped_resource_ratio():
    scheduler = Amp4ecScheduler(np.random.default_rng(0), clamp=False)
    score = scheduler.score(task(), state("a"))
    clamped = Amp4ecScheduler(np.random.default_rng(0)).score(task(), state("a"))
    assert score > clamped


def test_amp4ec_falls_back_to_least_loaded():
    scheduler = Amp4ecScheduler(np.random.default_rng(0))
    for _ in range(5):
        scheduler.observe("a", 90.0)
        scheduler.observe("b", 99.0)
    assert scheduler.select(task(), {"a": state("a"), "b": state("b")}) == "a"


def test_amp4ec_noise_is_seeded():
    def picks(seed):
        scheduler = Amp4ecScheduler(np.random.default_rng(seed))
        states = {name: state(name) for name in "abcd"}
        return [scheduler.select(task(i), states) for i in range(20)]

    assert picks(3) == picks(3)


def uniform_draws(rng):
    """Yield the generator's uniform draws, taken in blocks of 4,096 as Amp4ecScheduler takes them."""
    while True:
        yield from rng.random(4096).tolist()


def expected_amp4ec_choice(scheduler, task, states, draws):
    """Apply the AMP4EC rule through score() and eligible(), taking uniform draws from ``draws``."""
    live = [state for state in states.values() if state.alive]
    if task.segment.nodes:
        live = [state for state in live if state.name in task.segment.nodes]
    if len(live) > scheduler.max_candidates:
        picks = [live[int(next(draws) * len(live))] for _ in range(scheduler.max_candidates)]
        live = list({state.name: state for state in picks}.values())
    best, best_score = None, -math.inf
    for state in live:
        if not scheduler.eligible(task, state):
            continue
        noisy = scheduler.score(task, state) * (1.0 + scheduler.noise * next(draws))
        if noisy > best_score:
            best, best_score = state.name, noisy
    if best is None:
        best = min(live, key=lambda state: scheduler.load(state.name)).name
    return best


def test_amp4ec_select_matches_score():
    # select() keeps the terms of the score precomputed. Every choice must still equal the
    # argmax of score() and eligible() under the same draws, for sampled, assigned and small
    # node sets.
    rng = np.random.default_rng(7)
    scheduler = Amp4ecScheduler(np.random.default_rng(11), max_candidates=4)
    draws = uniform_draws(np.random.default_rng(11))
    names = [f"n{i}" for i in range(12)]
    segments = [Segment(0, 0, 1), Segment(1, 1, 2, ("n1", "n3", "n5")), Segment(2, 2, 3, tuple(names[3:]))]
    chosen = set()

    for _ in range(40):
        states = {
            name: state(
                name,
                cpu_utilisation=float(rng.uniform(0.0, 1.0)),
                memory_used_bytes=int(rng.choice([0, 2**29, 2**30])),
                link_latency_ms=float(rng.choice([0.2, 150.0], p=[0.9, 0.1])),
                alive=bool(rng.random() > 0.1),
            )
            for name in names
        }

        for decision in range(15):
            segment = segments[decision % len(segments)]
            task = StageTask(request_id=decision, segment=segment, cpu_needed=0.1, memory_needed_bytes=10**6)
            expected = expected_amp4ec_choice(scheduler, task, states, draws)
            assert scheduler.select(task, states) == expected
            chosen.add(expected)
            scheduler.observe(expected, float(rng.uniform(1.0, 160.0)))

    # The cases above reached most nodes, so the check covered more than one branch.
    assert len(chosen) > 8
