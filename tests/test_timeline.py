"""The one events timeline: its schema, the deprecated forms it reads, and the new kinds in simulation."""

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from amp4ec.cli import main
from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.scenario import parse_scenario
from amp4ec.sim.engine import Simulation, simulate
from amp4ec.timeline import EVENT_KINDS, SUPPORTED_KINDS, check_supported

from synthetic import make_calibration


def scenario_data(events=(), policy=None, **extra) -> dict:
    return {
        "name": "timeline",
        "model": {"name": "synthetic"},
        "policy": {"partitioner": "monolithic", "scheduler": "round_robin", **(policy or {})},
        "workload": {"kind": "closed", "requests": 100},
        "network": {"latency_ms": 0.0, "bandwidth_mbps": 1e9},
        "nodes": [{"name": "a", "cpus": 1.0, "memory_mb": 1024}, {"name": "b", "cpus": 1.0, "memory_mb": 1024}],
        "events": list(events),
        **extra,
    }


def parse_quietly(data: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return parse_scenario(data)


# Schema and the deprecated forms.


def test_dynamics_read_as_events():
    dynamics = [
        {"at_s": 1.0, "node": "a", "action": "fail"},
        {"at_s": 2.0, "node": "b", "action": "set_cpus", "cpus": 0.25},
        {"at_s": 3.0, "node": "a", "action": "recover"},
    ]
    with pytest.warns(FutureWarning, match=r"\[\[dynamics\]\] is deprecated"):
        scenario = parse_scenario(scenario_data(dynamics=dynamics))
    assert [(e.time_s, e.kind, e.node, e.cpus) for e in scenario.events] == [
        (1.0, "fail", "a", None),
        (2.0, "cpu", "b", 0.25),
        (3.0, "recover", "a", None),
    ]
    assert scenario.dynamics == []
    assert scenario.event_origins() == ["dynamics[0]", "dynamics[1]", "dynamics[2]"]
    # The resolved form is the new one and parses again without a note.
    again = parse_quietly(scenario.resolved())
    assert again.events == scenario.events


def test_dynamics_appended_after_events():
    with pytest.warns(FutureWarning):
        scenario = parse_scenario(
            scenario_data(events=[{"time_s": 5.0, "kind": "pause", "node": "a"}], dynamics=[{"at_s": 1.0, "node": "b", "action": "leave"}])
        )
    assert [e.kind for e in scenario.events] == ["pause", "leave"]
    assert scenario.event_origins() == ["events[0]", "dynamics[0]"]


def test_dynamics_unknown_node_named_by_origin():
    with pytest.warns(FutureWarning), pytest.raises(UsageError, match=r"dynamics\[0\]\.node: unknown node 'c'"):
        parse_scenario(scenario_data(dynamics=[{"at_s": 1.0, "node": "c", "action": "fail"}]))


def test_policy_retries_read_as_max_retries():
    with pytest.warns(FutureWarning, match="policy.retries = 2 is deprecated"):
        scenario = parse_scenario(scenario_data(policy={"retries": 2}))
    assert scenario.policy.on_failure == "retry"
    assert scenario.policy.max_retries == 2
    assert scenario.policy.retries is None
    with pytest.warns(FutureWarning):
        zero = parse_scenario(scenario_data(policy={"retries": 0}))
    assert zero.policy.on_failure == "fail"
    assert parse_quietly(scenario.resolved()).policy == scenario.policy


def test_policy_retries_with_max_retries_rejected():
    with pytest.raises(UsageError, match="give either retries or those two"):
        parse_scenario(scenario_data(policy={"retries": 2, "max_retries": 1}))


def test_old_kind_names_renamed():
    with pytest.warns(FutureWarning, match="kind = 'background' is deprecated"):
        scenario = parse_scenario(scenario_data(events=[{"time_s": 1.0, "kind": "background", "node": "a", "cpus": 0.5}]))
    assert scenario.events[0].kind == "background_load"


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"time_s": 1.0, "kind": "cpu", "node": "a"}, "a cpu event needs cpus >= 0.01"),
        ({"time_s": 1.0, "kind": "cpu", "node": "a", "cpus": 0.0}, "a cpu event needs cpus >= 0.01"),
        ({"time_s": 1.0, "kind": "pause", "node": "a", "cpus": 0.5}, "cpus applies to cpu and background_load"),
        ({"time_s": 1.0, "kind": "fail", "node": "a", "bandwidth_mbps": 5.0}, "apply to link_bandwidth events only"),
        ({"time_s": 1.0, "kind": "link_bandwidth", "node": "a"}, "needs bandwidth_mbps or latency_ms"),
        ({"time_s": 1.0, "kind": "explode", "node": "a"}, r"events\[0\]\.kind"),
        ({"time_s": -1.0, "kind": "fail", "node": "a"}, r"events\[0\]\.time_s"),
    ],
    ids=["cpu-missing", "cpu-zero", "cpus-on-pause", "bandwidth-on-fail", "bandwidth-empty", "unknown-kind", "negative-time"],
)
def test_bad_event_rejected(event, message):
    with pytest.raises(UsageError, match=message):
        parse_scenario(scenario_data(events=[event]))


def test_cpu_event_below_background_rejected():
    events = [
        {"time_s": 1.0, "kind": "background_load", "node": "a", "cpus": 0.4},
        {"time_s": 2.0, "kind": "cpu", "node": "a", "cpus": 0.3},
    ]
    with pytest.raises(UsageError, match=r"events\[1\]\.cpus: background cpus = 0.4 would take all of node a's 0.3 CPUs"):
        parse_scenario(scenario_data(events=events))


def test_replay_rejects_kinds_it_cannot_do():
    assert SUPPORTED_KINDS["sim"] == frozenset(EVENT_KINDS)
    scenario = parse_scenario(
        scenario_data(
            events=[
                {"time_s": 1.0, "kind": "cpu", "node": "a", "cpus": 0.5},
                {"time_s": 2.0, "kind": "link_bandwidth", "node": "b", "bandwidth_mbps": 10.0},
            ]
        )
    )
    check_supported(scenario, "sim")
    with pytest.raises(UsageError, match=r"events\[1\]\.kind: kind 'link_bandwidth' cannot be carried out by replay"):
        check_supported(scenario, "real")


def test_replay_cli_unsupported_kind_exit_2(tmp_path):
    path = tmp_path / "load.toml"
    path.write_text(
        'name = "load"\n[[nodes]]\nname = "a"\ncpus = 0.5\nmemory_mb = 768\n'
        '[[events]]\ntime_s = 1.0\nkind = "fail"\nnode = "a"\n'
        '[[events]]\ntime_s = 2.0\nkind = "background_load"\nnode = "a"\ncpus = 0.2\n'
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["replay", str(path), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "events[1].kind" in result.output
    assert "background_load" in result.output
    assert not out.exists()


# The kinds the simulator gained.


def costs_20ms():
    return CostModel(make_calibration([20.0]))


def test_pause_delays_but_loses_nothing():
    events = [{"time_s": 1.0, "kind": "pause", "node": "a"}, {"time_s": 1.5, "kind": "resume", "node": "a"}]
    data = scenario_data(events=events, policy={"on_failure": "fail"})
    data["nodes"] = data["nodes"][:1]
    result = simulate(parse_scenario(data), costs_20ms())
    assert result.summary["requests"]["failed"] == 0
    assert result.summary["requests"]["completed"] == 100
    # The request in flight at the pause ends half a second late; none ends while paused.
    latencies = [r.latency_ms for r in result.records]
    assert max(latencies) == pytest.approx(520.0, abs=1.0)
    assert not any(1.0 < r.end_s < 1.5 for r in result.records)
    assert result.summary["littles_law"]["in_system_at_end"] == 0


def test_pause_hidden_from_monitor():
    events = [{"time_s": 0.5, "kind": "pause", "node": "b"}, {"time_s": 3.5, "kind": "resume", "node": "b"}]
    data = scenario_data(events=events, workload={"kind": "poisson", "rate_rps": 20.0, "requests": 100})
    simulation = Simulation(parse_scenario(data), costs_20ms())
    result = simulation.run()
    assert result.summary["requests"]["failed"] == 0
    # After the first sample that saw b paused (at 1 s), stages go to a only, until b resumes.
    assert not any(r.stage_nodes == ["b"] and 1.05 < r.stage_start_s[0] < 3.5 for r in result.records)
    # Stages sent to b between the pause and that sample waited for the resume.
    waited = [r for r in result.records if r.stage_nodes == ["b"] and 0.5 < r.stage_start_s[0] < 1.0]
    assert waited and all(r.end_s > 3.5 for r in waited)


def test_fail_while_paused_loses_stages():
    events = [
        {"time_s": 1.0, "kind": "pause", "node": "a"},
        {"time_s": 1.2, "kind": "fail", "node": "a"},
        {"time_s": 1.4, "kind": "recover", "node": "a"},
    ]
    data = scenario_data(events=events, workload={"kind": "poisson", "rate_rps": 20.0, "requests": 100})
    data["nodes"] = data["nodes"][:1]
    result = simulate(parse_scenario(data), costs_20ms())
    failed = [r for r in result.records if r.outcome == "failed"]
    # Stages sent to the paused node wait, and are lost at the failure. Until the recover, the
    # stale snapshot still shows a alive, so the next requests are refused at once.
    waited = [r for r in failed if "failed during stage" in r.reason]
    assert waited and all(1.0 <= r.arrival_s < 1.2 and r.end_s == pytest.approx(1.2) for r in waited)
    assert all(1.2 <= r.end_s <= 1.4 + 1e-9 for r in failed)
    assert any(r.outcome == "completed" and r.start_s >= 1.4 for r in result.records)
    assert result.summary["requests"]["completed"] + len(failed) == 100


def test_cpu_event_changes_quota_and_monitor():
    events = [{"time_s": 1.0, "kind": "cpu", "node": "a", "cpus": 0.5}]
    data = scenario_data(events=events, workload={"kind": "closed", "requests": 200})
    data["nodes"] = data["nodes"][:1]
    simulation = Simulation(parse_scenario(data), costs_20ms())
    result = simulation.run()
    before = [r.latency_ms for r in result.records if r.end_s < 1.0]
    after = [r.latency_ms for r in result.records if r.start_s > 1.2]
    assert np.mean(before) == pytest.approx(20.0)
    # 20 ms of work back to back under a 50 ms quota per 100 ms period: 2.5 per period.
    assert np.mean(after) == pytest.approx(40.0, rel=0.1)
    assert simulation._published["a"].cpus == 0.5


def test_restart_loses_in_flight_and_comes_back():
    events = [{"time_s": 1.01, "kind": "restart", "node": "a"}]
    data = scenario_data(events=events, workload={"kind": "poisson", "rate_rps": 40.0, "requests": 100})
    data["nodes"] = data["nodes"][:1]
    result = simulate(parse_scenario(data), costs_20ms())
    failed = [r for r in result.records if r.outcome == "failed"]
    # The stage in flight is lost; requests sent before the new container is deployed are refused.
    assert failed and failed[0].arrival_s < 1.01
    assert all(r.end_s == pytest.approx(1.01) for r in failed)
    assert any(r.outcome == "completed" and r.start_s > 1.01 for r in result.records)


def test_first_join_means_absent_until_then():
    events = [{"time_s": 2.0, "kind": "join", "node": "b"}]
    data = scenario_data(events=events, workload={"kind": "poisson", "rate_rps": 20.0, "requests": 100})
    result = simulate(parse_scenario(data), costs_20ms())
    assert result.summary["requests"]["failed"] == 0
    assert not any(r.stage_nodes == ["b"] and r.stage_start_s[0] < 2.0 for r in result.records)
    assert any(r.stage_nodes == ["b"] for r in result.records)


@pytest.mark.parametrize("ending", ["leave", "recover"])
def test_paused_node_leaving_or_recovering_thaws(ending):
    events = [{"time_s": 1.0, "kind": "pause", "node": "a"}, {"time_s": 1.3, "kind": ending, "node": "a"}]
    data = scenario_data(events=events, workload={"kind": "poisson", "rate_rps": 20.0, "requests": 60})
    result = simulate(parse_scenario(data), costs_20ms())
    # No stage stays frozen: every request ends, and none of them on a lost stage.
    assert result.summary["littles_law"]["in_system_at_end"] == 0
    assert sorted(r.request_id for r in result.records) == list(range(60))
    assert not any("failed during stage" in r.reason for r in result.records)


def test_pause_without_resume_times_out():
    # Replay's request to a frozen worker times out; the simulator's stage does the same
    # instead of waiting for ever.
    events = [{"time_s": 1.0, "kind": "pause", "node": "a"}]
    data = scenario_data(events=events, workload={"kind": "poisson", "rate_rps": 20.0, "requests": 60})
    data["nodes"] = data["nodes"][:1]
    result = simulate(parse_scenario(data), costs_20ms())
    timed_out = [r for r in result.records if "did not reply within 60 s" in r.reason]
    assert timed_out
    assert all(r.end_s == pytest.approx(r.start_s + 60.0) for r in timed_out)
    assert result.summary["littles_law"]["in_system_at_end"] == 0
    assert sorted(r.request_id for r in result.records) == list(range(60))


def test_pause_timeout_retries_elsewhere():
    events = [{"time_s": 0.5, "kind": "pause", "node": "a"}]
    data = scenario_data(
        events=events,
        policy={"on_failure": "retry", "max_retries": 2},
        workload={"kind": "poisson", "rate_rps": 20.0, "requests": 100},
    )
    result = simulate(parse_scenario(data), costs_20ms())
    retried = [r for r in result.records if r.retries]
    assert result.summary["requests"]["failed"] == 0
    assert retried
    # The retry leaves out the paused node that lost the stage.
    assert all(r.stage_nodes == ["b"] for r in retried)
    assert all(r.end_s >= r.start_s + 60.0 for r in retried)


def test_pause_timeout_under_pull_dispatch():
    # A stage that times out before the paused worker was booked gives the node back, so the
    # node takes (and times out) further stages instead of being lost to the pull queue.
    events = [{"time_s": 0.5, "kind": "pause", "node": "a"}]
    data = scenario_data(
        events=events,
        policy={"dispatch": "pull", "on_failure": "fail"},
        workload={"kind": "poisson", "rate_rps": 20.0, "requests": 3000},
    )
    result = simulate(parse_scenario(data), costs_20ms())
    timed_out = [r for r in result.records if "did not reply within 60 s" in r.reason]
    assert len(timed_out) >= 3
    assert result.summary["requests"]["completed"] + len(timed_out) == 3000
    assert result.summary["littles_law"]["in_system_at_end"] == 0


def test_retry_excludes_failed_node():
    # The faster node a fails. Until the next sample the snapshot still shows it alive, so a
    # stage sent to it is refused, and only the exclusion keeps the retry off node a.
    events = [{"time_s": 1.01, "kind": "fail", "node": "a"}]
    data = scenario_data(
        events=events,
        policy={"scheduler": "amp4ec", "on_failure": "retry", "max_retries": 1},
        workload={"kind": "closed", "requests": 100},
    )
    data["nodes"][0]["cpus"] = 2.0
    result = simulate(parse_scenario(data), costs_20ms())
    retried = [r for r in result.records if r.retries]
    assert retried
    assert all(r.outcome == "completed" for r in retried)
    assert all(r.stage_nodes == ["b"] for r in retried)


def test_pause_shifts_stages_on_shared_link():
    events = [{"time_s": 1.0, "kind": "pause", "node": "a"}, {"time_s": 1.5, "kind": "resume", "node": "a"}]
    network = {"latency_ms": 1.0, "bandwidth_mbps": 10.0}
    plain = scenario_data(network=network)
    plain["nodes"] = plain["nodes"][:1]
    paused = dict(plain, events=events)
    base = simulate(parse_scenario(plain), costs_20ms())
    result = simulate(parse_scenario(paused), costs_20ms())
    # The request in flight at the pause ends half a second later than without it.
    assert max(r.latency_ms for r in result.records) == pytest.approx(max(r.latency_ms for r in base.records) + 500.0)
    assert not any(1.0 < r.end_s < 1.5 for r in result.records)
    assert result.summary["requests"]["completed"] == 100
