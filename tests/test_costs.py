import json

import numpy as np
import pytest

from amp4ec.costs import CostModel, load_calibration
from amp4ec.errors import FileFormatError

from synthetic import make_calibration


def test_segment_cost_sums_units():
    costs = CostModel(make_calibration([1.0, 2.0, 3.0]))
    cost = costs.segment_cost(0, 2, threads=1)
    assert cost.cpu_ms == pytest.approx(3.0)
    assert cost.parallelism == pytest.approx(1.0)


def test_segment_cost_rejects_empty_segment():
    costs = CostModel(make_calibration([1.0, 2.0]))
    with pytest.raises(ValueError, match="outside"):
        costs.segment_cost(1, 1, threads=1)


def test_transfer_time():
    assert CostModel.transfer_ms(1_000_000, 1e9, 0.5) == pytest.approx(8.5)


def test_calibration_round_trip(tmp_path):
    path = tmp_path / "c.json"
    make_calibration([1.0, 2.0]).save(path)
    assert load_calibration(path).graph.n_units == 2


def test_corrupt_calibration_rejected(tmp_path):
    path = tmp_path / "c.json"
    make_calibration([1.0, 2.0]).save(path)
    path.write_text(path.read_text()[:100])
    with pytest.raises(FileFormatError, match="corrupt or truncated"):
        load_calibration(path)


def test_other_schema_version_rejected(tmp_path):
    path = tmp_path / "c.json"
    make_calibration([1.0]).save(path)
    data = json.loads(path.read_text())
    data["schema"] = "amp4ec.calibration/99"
    path.write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match="upgrade amp4ec"):
        load_calibration(path)
    data["schema"] = "something/1"
    path.write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match="recalibrate"):
        load_calibration(path)


def test_default_calibration_is_measured():
    calibration = load_calibration("default")
    assert calibration.graph.model == "mobilenet_v2"
    assert {p.name for p in calibration.profiles} >= {"high", "medium", "low"}
    assert calibration.provenance.worker_torch.startswith("2.13")
    for profile in calibration.profiles:
        assert all(u.wall.samples >= 5 for u in profile.units)


def test_segment_cost_pays_call_overhead_and_cold_start_once():
    calibration = make_calibration([3.0, 3.0, 3.0])
    for profile in calibration.profiles:
        profile.model.warm_cpu_ms = 7.0  # 9 ms one by one, so each extra call costs 1 ms
        profile.model.cpu_ms = 7.5  # spaced apart, the whole model pays one cold start
        for unit in profile.units:
            unit.cpu_ms = unit.warm_cpu_ms + 0.5  # spaced runs pay 0.5 ms for cold caches
    costs = CostModel(calibration)
    assert costs.call_overhead(1).cpu_ms == pytest.approx(1.0)
    assert costs.cold_start(1).cpu_ms == pytest.approx(0.5)
    assert costs.segment_cost(0, 3, 1).cpu_ms == pytest.approx(7.5)
    assert costs.segment_cost(0, 1, 1).cpu_ms == pytest.approx(3.5)
    # Splitting a model costs one more call overhead and one more cold start per extra segment.
    split = costs.segment_cost(0, 1, 1).cpu_ms + costs.segment_cost(1, 3, 1).cpu_ms
    assert split == pytest.approx(7.5 + 1.5)


def test_cold_start_is_first_units_own():
    calibration = make_calibration([3.0, 3.0, 3.0])
    for profile in calibration.profiles:
        profile.model.warm_cpu_ms = 9.0
        profile.model.cpu_ms = 9.2
        for unit, penalty in zip(profile.units, (0.2, 0.8, 0.5)):
            unit.cpu_ms = unit.warm_cpu_ms + penalty
    costs = CostModel(calibration)
    assert costs.cold_start(1).cpu_ms == pytest.approx(0.5)
    assert costs.cold_start(1, first=1).cpu_ms == pytest.approx(0.8)
    assert costs.segment_cost(1, 3, 1).cpu_ms == pytest.approx(6.8)
    assert costs.segment_cost(0, 1, 1).cpu_ms == pytest.approx(3.2)
    # The planner's vectorised stage costs add the same first-unit penalty.
    from amp4ec.placement import StageModel
    from amp4ec.scenario import NodeSpec

    node = NodeSpec(name="n", cpus=1.0, memory_mb=1024)
    assert StageModel(calibration.graph, costs).exec_ms(1, 3, node) == pytest.approx(6.8)


def test_profiles_for_threads_picks_nearest():
    costs = CostModel(make_calibration([2.0], profiles=(("one", 1.0, 1), ("two", 2.0, 2))))
    assert costs.profiles_for_threads(3)[0] == 2
    assert costs.profiles_for_threads(1)[0] == 1


def power_law_calibration(base_ms, *, beta, gamma, parallelism_2, profiles):
    """A calibration whose CPU times follow base * cpus**beta * threads**gamma exactly; ``beta`` may map thread counts to exponents."""
    calibration = make_calibration(base_ms, profiles=profiles)
    for profile in calibration.profiles:
        exponent = beta[profile.threads] if isinstance(beta, dict) else beta
        factor = profile.cpus**exponent * profile.threads**gamma
        parallelism = parallelism_2 if profile.threads == 2 else 1.0
        for unit, base in [*zip(profile.units, base_ms), (profile.model, sum(base_ms) - 1.0)]:
            unit.warm_cpu_ms = base * factor
            unit.cpu_ms = (base + 0.5) * factor
            unit.warm_wall.p50_ms = unit.warm_cpu_ms / parallelism
    return calibration


def test_fit_predicts_unmeasured_quota():
    profiles = (("high", 1.0, 1), ("medium", 0.6, 1), ("low", 0.4, 1))
    costs = CostModel(power_law_calibration([2.0, 4.0, 6.0], beta=-0.1, gamma=0.0, parallelism_2=1.0, profiles=profiles))
    assert costs.fit.slopes["warm"]["beta"] == pytest.approx(-0.1)
    assert costs.work_ms("warm", 1, cpus=0.8) == pytest.approx([v * 0.8**-0.1 for v in (2.0, 4.0, 6.0, 11.0)])
    # One call of all units costs the whole model's warm work (11 ms) plus one cold start (0.5 ms).
    expected = (11.0 + 0.5) * 0.8**-0.1
    assert costs.segment_cost(0, 3, 1, cpus=0.8).cpu_ms == pytest.approx(expected)
    assert costs.segment_cost(0, 3, 1, cpus=0.5).cpu_ms > costs.segment_cost(0, 3, 1, cpus=0.8).cpu_ms


def test_fit_predicts_unmeasured_thread_count():
    profiles = (("high", 1.0, 1), ("low", 0.4, 1), ("double", 2.0, 2))
    costs = CostModel(power_law_calibration([2.0, 4.0], beta=-0.05, gamma=0.3, parallelism_2=1.6, profiles=profiles))
    assert costs.fit.slopes["warm"]["gamma"] == pytest.approx(0.3)
    assert costs.fit.slopes["warm"]["beta"] == pytest.approx(-0.05)
    assert costs.work_ms("warm", 3, cpus=3.0) == pytest.approx([v * 3.0**-0.05 * 3**0.3 for v in (2.0, 4.0, 5.0)])
    assert costs.parallelism(0, 2) == pytest.approx(1.6)
    assert costs.parallelism(0, 3) == pytest.approx(3 ** (np.log(1.6) / np.log(2)))


def test_work_fit_beta_per_thread_count():
    profiles = (("high", 1.0, 1), ("low", 0.4, 1), ("double", 2.0, 2), ("pair", 1.0, 2))
    costs = CostModel(power_law_calibration([2.0, 4.0], beta={1: 0.0, 2: -0.3}, gamma=0.5, parallelism_2=1.6, profiles=profiles))
    assert costs.fit.beta("warm", 1) == pytest.approx(0.0, abs=1e-6)
    assert costs.fit.beta("warm", 2) == pytest.approx(-0.3)
    assert costs.work_ms("warm", 2, cpus=1.5) == pytest.approx([v * 1.5**-0.3 * 2**0.5 for v in (2.0, 4.0, 5.0)])
    assert costs.work_ms("warm", 1, cpus=0.7) == pytest.approx([2.0, 4.0, 5.0])


def test_fit_without_variation_keeps_measured_work():
    # Quota and threads rise together, so the fit cannot separate them and keeps only threads.
    costs = CostModel(make_calibration([2.0, 3.0], profiles=(("one", 1.0, 1), ("two", 2.0, 2))))
    assert costs.fit.terms == ["gamma"]
    assert costs.work_ms("warm", 1, cpus=0.3) == pytest.approx([2.0, 3.0, 5.0])
    assert costs.parallelism(0, 4) == 1.0


def three_unit_calibration(model_warm_ms: float, model_spaced_ms: float):
    """Three units of 3 ms back to back and 3.5 ms after an idle gap, with the whole model's CPU time in both regimes."""
    calibration = make_calibration([3.0, 3.0, 3.0])
    for profile in calibration.profiles:
        profile.model.warm_cpu_ms = model_warm_ms
        profile.model.cpu_ms = model_spaced_ms
        for unit in profile.units:
            unit.cpu_ms = 3.5
    return calibration


def two_thread_like_calibration():
    """Three 3 ms units whose whole model costs 9 ms back to back but 7 ms after an idle gap, as 2-thread forwards do."""
    return three_unit_calibration(9.0, 7.0)


def test_chain_scale_matches_spaced_whole_model():
    from amp4ec.placement import StageModel
    from amp4ec.scenario import NodeSpec

    costs = CostModel(two_thread_like_calibration())
    # After its first unit's 3.5 ms, the spaced whole model spends 3.5 ms on 6 ms of back-to-back work.
    assert costs.chain_scale(1) == pytest.approx(3.5 / 6.0)
    assert costs.segment_cost(0, 3, 1).cpu_ms == pytest.approx(7.0)
    assert costs.segment_cost(1, 3, 1).cpu_ms == pytest.approx(3.5 + 3.5 / 2)
    assert costs.busy_segment_cost(0, 3, 1).cpu_ms == pytest.approx(9.0)
    node = NodeSpec(name="n", cpus=1.0, memory_mb=1024)
    assert StageModel(costs.graph, costs).exec_ms(1, 3, node) == pytest.approx(3.5 + 3.5 / 2)


def test_busy_scale_when_units_add_up_to_less():
    from amp4ec.placement import StageModel
    from amp4ec.scenario import NodeSpec

    # The whole model costs 10 ms back to back and 11 ms after an idle gap, because inside the
    # model each unit finds its caches evicted by the units before it.
    costs = CostModel(three_unit_calibration(10.0, 11.0))

    assert costs.call_overhead(1).cpu_ms == 0.0
    assert costs.busy_scale(1) == pytest.approx(7.0 / 6.0)
    assert costs.busy_segment_cost(0, 3, 1).cpu_ms == pytest.approx(10.0)
    assert costs.busy_segment_cost(1, 3, 1).cpu_ms == pytest.approx(3.0 + 3.0 * 7.0 / 6.0)
    assert costs.busy_segment_cost(2, 3, 1).cpu_ms == pytest.approx(3.0)
    # After its first unit's 3.5 ms, the spaced whole model spends 7.5 ms on 6 ms of back-to-back work.
    assert costs.chain_scale(1) == pytest.approx(7.5 / 6.0)
    assert costs.segment_cost(0, 3, 1).cpu_ms == pytest.approx(11.0)
    assert costs.segment_cost(2, 3, 1).cpu_ms == pytest.approx(3.5)
    node = NodeSpec(name="n", cpus=1.0, memory_mb=1024)
    assert StageModel(costs.graph, costs).exec_ms(1, 3, node) == pytest.approx(3.5 + 3.0 * 7.5 / 6.0)


def test_memory_search_raises_segment_memory():
    from amp4ec.costs import MemoryProbe, MemorySearch

    calibration = make_calibration([1.0, 2.0, 3.0], runtime_rss_bytes=200 * 2**20)
    estimates = CostModel(calibration)
    whole_estimate = estimates.segment_memory_bytes(0, 3)
    # The searched unit u1 and the whole model ran only at limits well above runtime plus estimate.
    searches = {"u1": 260 * 2**20, "model": 290 * 2**20}
    calibration.profiles[1].memory_search = [
        MemorySearch(
            segment=name,
            min_memory_bytes=limit,
            resolution_bytes=2**22,
            probes=[MemoryProbe(segment=name, memory_bytes=limit - 2**22, ran=False, oom_killed=True)],
        )
        for name, limit in searches.items()
    ]
    costs = CostModel(calibration)

    assert costs.segment_memory_bytes(1, 2) == 60 * 2**20
    assert costs.segment_memory_bytes(0, 2) == 60 * 2**20
    assert costs.segment_memory_bytes(0, 3) == 90 * 2**20 > whole_estimate
    # Segments without a searched unit keep the graph's estimate.
    assert costs.segment_memory_bytes(2, 3) == estimates.segment_memory_bytes(2, 3)


def with_pauses(calibration, cpu_by_gap_ms):
    """Add the whole model timed after each pause, with the given CPU time, to every profile."""
    from amp4ec.costs import Measurement

    for profile in calibration.profiles:
        profile.idle_gaps = [
            Measurement(gap_ms=gap_ms, wall_ms=[cpu_ms] * 5, cpu_ms=[cpu_ms] * 5, ci95_rel=0.0, converged=True)
            for gap_ms, cpu_ms in cpu_by_gap_ms.items()
        ]
    return calibration


def test_idle_curve_runs_from_busy_to_idle():
    from amp4ec.costs import idle_share

    costs = CostModel(with_pauses(two_thread_like_calibration(), {1.0: 8.5, 10.0: 7.5, 30.0: 6.0}))
    # (C - W) / (S - W) with W = 9 and S = 7. Below 7 ms the share stays at 1.
    curve = costs.idle_curve(1)
    assert [gap_ms for gap_ms, _ in curve] == [0.0, 1.0, 10.0, 30.0, 100.0]
    assert [share for _, share in curve] == pytest.approx([0.0, 0.25, 0.75, 1.0, 1.0])
    assert idle_share(curve, 0.0) == 0.0
    assert idle_share(curve, 0.5) == pytest.approx(0.125)
    assert idle_share(curve, 5.5) == pytest.approx(0.5)
    assert idle_share(curve, 1e6) == 1.0
    # A calibration without pauses charges every call as idle.
    assert CostModel(two_thread_like_calibration()).idle_curve(1) == ((0.0, 1.0),)


def test_idle_curve_never_falls_with_longer_pauses():
    # The 30 ms pause was measured in a slow spell: alone it would make a dip after 10 ms.
    costs = CostModel(with_pauses(two_thread_like_calibration(), {1.0: 8.5, 10.0: 7.5, 30.0: 8.0}))
    shares = [share for _, share in costs.idle_curve(1)]
    assert shares == sorted(shares)
    # The 10 ms (0.75) and 30 ms (0.5) shares pool to their mean.
    assert shares[2] == pytest.approx(0.625)
    assert shares[3] == pytest.approx(0.625)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.idle_gaps.append(p.idle_gaps[0]), "has the pause 1 ms more than once"),
        (lambda p: setattr(p.idle_gaps[0], "gap_ms", 100.0), "a pause of 100 ms, outside the range"),
        (lambda p: setattr(p.idle_gaps[0], "gap_ms", float("inf")), "a pause of inf ms, outside the range"),
        (lambda p: setattr(p.idle_gaps[0], "gap_ms", 0.0), "a pause of 0 ms, outside the range"),
        (lambda p: setattr(p, "model", None), "model is missing"),
    ],
    ids=["repeated", "spaced-gap", "infinite", "back-to-back", "no-model"],
)
def test_invalid_pauses_rejected(tmp_path, change, message):
    calibration = with_pauses(two_thread_like_calibration(), {1.0: 8.5, 10.0: 7.5})
    change(calibration.profiles[0])
    path = tmp_path / "c.json"
    # json writes an infinite pause as Infinity, which the loader reads back.
    path.write_text(json.dumps(calibration.model_dump(by_alias=True)))
    with pytest.raises(FileFormatError, match=message) as caught:
        load_calibration(path)
    assert "profile 'high'" in str(caught.value)
