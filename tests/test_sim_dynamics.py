"""Workloads, the dynamics timeline, node groups and bad input, on synthetic calibrations."""

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from amp4ec.cli import main
from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.cluster import expand_groups
from amp4ec.scenario import NodeGroupSpec, NodeSpec, WorkloadSpec, load_scenario, parse_scenario
from amp4ec.sim.engine import simulate
from amp4ec.workload import open_loop_arrivals_s

from synthetic import make_calibration

ROOT = Path(__file__).resolve().parents[1]


def scenario(nodes, *, workload, events=(), policy=None, scheduler="round_robin", seed=1, partitioner="ralos"):
    return parse_scenario(
        {
            "name": "dynamics",
            "seed": seed,
            "model": {"name": "synthetic"},
            "policy": {"partitioner": partitioner, "scheduler": scheduler, **(policy or {})},
            "workload": workload,
            "network": {"latency_ms": 0.0, "bandwidth_mbps": 1e9},
            "nodes": nodes,
            "events": list(events),
        }
    )


def node(name, cpus=1.0, **extra):
    return {"name": name, "cpus": cpus, "memory_mb": 1024, **extra}


def assert_every_fate_recorded_once(result, total):
    ids = [r.request_id for r in result.records]
    assert sorted(ids) == list(range(total))
    assert {r.outcome for r in result.records} <= {"completed", "failed"}
    requests = result.summary["requests"]
    assert requests["completed"] + requests["failed"] == total
    assert result.summary["littles_law"]["in_system_at_end"] == 0


# Workloads.


def test_bursty_mean_rate_is_the_mmpp_average():
    workload = WorkloadSpec(kind="bursty", requests=100_000, rate_rps=100.0, off_rate_rps=10.0, on_s=1.0, off_s=3.0)
    arrivals = open_loop_arrivals_s(workload, seed=3)
    assert len(arrivals) == 100_000
    assert np.all(np.diff(arrivals) >= 0)
    assert len(arrivals) / arrivals[-1] == pytest.approx((100 * 1 + 10 * 3) / 4, rel=0.05)
    # Bursts make the counts per second overdispersed: a Poisson stream has variance = mean.
    counts = np.bincount(arrivals.astype(int))
    assert counts.var() > 3 * counts.mean()


def test_diurnal_rate_follows_the_sine():
    workload = WorkloadSpec(kind="diurnal", requests=200_000, rate_rps=100.0, amplitude=0.8, period_s=100.0)
    arrivals = open_loop_arrivals_s(workload, seed=4)
    phase = (arrivals % 100.0) / 100.0
    cycles = arrivals[-1] / 100.0
    # The peak falls in the first quarter of each cycle, the trough in the third.
    peak = np.mean((phase > 0.2) & (phase < 0.3)) * len(arrivals) / cycles / 10.0
    trough = np.mean((phase > 0.7) & (phase < 0.8)) * len(arrivals) / cycles / 10.0
    assert peak == pytest.approx(100 * (1 + 0.8 * np.sin(np.pi / 2)), rel=0.1)
    assert trough == pytest.approx(100 * (1 - 0.8), rel=0.25)


def test_trace_arrivals_are_replayed_as_written(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s\n0.0\n0.010\n0.010\n0.5\n")
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "t"\n[model]\nname = "synthetic"\n[workload]\nkind = "trace"\ntrace = "trace.csv"\n'
        '[[nodes]]\nname = "a"\ncpus = 1.0\nmemory_mb = 1024\n'
    )
    loaded = load_scenario(path)
    assert open_loop_arrivals_s(loaded.workload, seed=0).tolist() == [0.0, 0.01, 0.01, 0.5]
    result = simulate(loaded, CostModel(make_calibration([2.0])))
    assert [r.arrival_s for r in result.records] == [0.0, 0.01, 0.01, 0.5]
    assert result.summary["requests"]["completed"] == 4


def test_batch_size_multiplies_the_work():
    costs = CostModel(make_calibration([2.0, 3.0]))
    one = simulate(scenario([node("a")], workload={"kind": "closed", "requests": 20}), costs)
    four = simulate(scenario([node("a")], workload={"kind": "closed", "requests": 20, "batch": 4}), costs)
    assert four.summary["latency_ms"]["mean"] == pytest.approx(4 * one.summary["latency_ms"]["mean"], rel=1e-6)
    assert four.records[0].bytes_moved == 4 * one.records[0].bytes_moved


# The dynamics timeline.


def test_failure_without_retry_fails_the_stages_in_flight():
    costs = CostModel(make_calibration([5.0]))
    workload = {"kind": "poisson", "requests": 2000, "rate_rps": 150.0}
    events = [{"time_s": 2.5, "kind": "fail", "node": "b"}, {"time_s": 4.0, "kind": "recover", "node": "b"}]
    result = simulate(scenario([node("a"), node("b")], workload=workload, events=events, partitioner="monolithic"), costs)
    assert_every_fate_recorded_once(result, 2000)
    failed = [r for r in result.records if r.outcome == "failed"]
    assert failed, "a failure under load must cost some requests"
    assert all("node b" in r.reason for r in failed)
    # Stages dispatched to b before the monitor noticed, or in flight at the failure.
    assert all(2.4 < r.end_s < 3.1 for r in failed)
    # After recovering, b serves again.
    assert any("b" in r.stage_nodes and r.arrival_s > 5.5 for r in result.records)


def test_failure_with_retry_completes_everything_elsewhere():
    costs = CostModel(make_calibration([5.0]))
    workload = {"kind": "poisson", "requests": 2000, "rate_rps": 150.0}
    events = [{"time_s": 2.5, "kind": "fail", "node": "b"}]
    result = simulate(
        scenario(
            [node("a"), node("b"), node("c")],
            workload=workload,
            events=events,
            partitioner="monolithic",
            policy={"on_failure": "retry", "max_retries": 5},
        ),
        costs,
    )
    assert_every_fate_recorded_once(result, 2000)
    assert result.summary["requests"]["failed"] == 0
    assert result.summary["retries"] > 0
    assert sum(r.retries for r in result.records) == result.summary["retries"]
    # A retried request ran its stage once, on a live node.
    assert all(len(r.stage_nodes) == 1 for r in result.records)
    assert not any(r.stage_nodes == ["b"] and r.stage_start_s[0] > 3.0 for r in result.records)


def test_join_and_leave_change_where_stages_go():
    costs = CostModel(make_calibration([2.0]))
    workload = {"kind": "poisson", "requests": 1000, "rate_rps": 100.0}
    events = [{"time_s": 3.0, "kind": "join", "node": "late"}, {"time_s": 6.0, "kind": "leave", "node": "a"}]
    result = simulate(
        scenario(
            [node("a"), node("b"), node("late", present=False)],
            workload=workload,
            events=events,
            partitioner="monolithic",
            policy={"on_failure": "retry"},
        ),
        costs,
    )
    assert_every_fate_recorded_once(result, 1000)
    # The monitor samples each second, so each change is seen within one period.
    assert not any("late" in r.stage_nodes and r.stage_start_s[0] < 3.0 for r in result.records)
    assert any("late" in r.stage_nodes for r in result.records)
    assert not any("a" in r.stage_nodes and r.stage_start_s[0] > 7.0 for r in result.records)


def test_background_load_slows_the_node():
    costs = CostModel(make_calibration([20.0]))
    workload = {"kind": "closed", "requests": 200}
    events = [{"time_s": 1.0, "kind": "background_load", "node": "a", "cpus": 0.6}]
    result = simulate(scenario([node("a")], workload=workload, events=events, partitioner="monolithic"), costs)
    before = [r.latency_ms for r in result.records if r.end_s < 1.0]
    after = [r.latency_ms for r in result.records if r.start_s > 1.2]
    assert np.mean(before) == pytest.approx(20.0)
    # 0.4 CPU left: 20 ms of work takes 50 ms on average (quota 40 ms per 100 ms period).
    assert np.mean(after) == pytest.approx(50.0, rel=0.1)


def test_bandwidth_change_slows_transfers():
    costs = CostModel(make_calibration([1.0]))
    events = [{"time_s": 0.5, "kind": "link_bandwidth", "node": "a", "bandwidth_mbps": 8.0}]
    result = simulate(scenario([node("a")], workload={"kind": "closed", "requests": 1000}, events=events, partitioner="monolithic"), costs)
    before = [r.latency_ms for r in result.records if r.end_s < 0.5]
    after = [r.latency_ms for r in result.records if r.start_s > 0.5]
    # Two 4000-byte transfers at 8 Mbit/s add 8 ms.
    assert np.mean(after) - np.mean(before) == pytest.approx(8.0, rel=1e-6)


def test_same_seed_same_records_under_dynamics_and_different_seeds_independent():
    costs = CostModel(make_calibration([2.0, 3.0]))
    workload = {"kind": "bursty", "requests": 3000, "rate_rps": 300.0, "off_rate_rps": 30.0, "on_s": 0.5, "off_s": 0.5}
    events = [{"time_s": 1.0, "kind": "fail", "node": "b"}, {"time_s": 2.0, "kind": "recover", "node": "b"}]
    nodes = [node("a"), node("b"), node("c", cpus=0.6)]

    def run(seed):
        return simulate(
            scenario(nodes, workload=workload, events=events, scheduler="amp4ec", seed=seed, policy={"on_failure": "retry"}),
            costs,
        )

    first, second, other = run(5), run(5), run(6)
    keys = lambda result: [(r.arrival_s, r.end_s, r.outcome, tuple(r.stage_nodes), r.retries) for r in result.records]
    assert keys(first) == keys(second)
    gaps_first = np.diff([r.arrival_s for r in first.records])
    gaps_other = np.diff([r.arrival_s for r in other.records])
    # Independent streams: the gaps of two seeds are uncorrelated (|r| < 4 standard errors).
    assert abs(np.corrcoef(gaps_first, gaps_other)[0, 1]) < 4 / np.sqrt(len(gaps_first))


# Node groups.


def test_node_groups_expand_deterministically():
    data = {
        "name": "groups",
        "seed": 3,
        "policy": {"partitions": 3},
        "nodes": [{"name": "head", "cpus": 2.0, "memory_mb": 2048}],
        "node_groups": [
            {
                "prefix": "edge",
                "count": 10_000,
                "profiles": [{"cpus": 1.0, "memory_mb": 1024}, {"cpus": 0.4, "memory_mb": 512, "weight": 3}],
            }
        ],
    }
    first, second = parse_scenario(data), parse_scenario(data)
    assert len(first.nodes) == 10_001
    assert [n.cpus for n in first.nodes] == [n.cpus for n in second.nodes]
    small = sum(n.cpus == 0.4 for n in first.nodes)
    assert small / 10_000 == pytest.approx(0.75, abs=0.02)
    assert first.nodes[1].name == "edge0" and first.nodes[-1].name == "edge9999"


GROUP_PROFILES = [
    {"cpus": 1.0, "memory_mb": 1024.0},
    {"cpus": 0.5, "memory_mb": 512.0, "threads": 2, "weight": 2.0},
    {"cpus": 2.0, "memory_mb": 2048.0, "bandwidth_mbps": 50.0, "latency_ms": 3.5},
]


def test_generated_nodes_read_as_written():
    """A generated node is the node [[nodes]] would give for its profile, and takes no more memory."""
    group = NodeGroupSpec(prefix="edge", count=3000, profiles=GROUP_PROFILES, engine="b")
    expand_groups([group], seed=5, taken=set())  # builds the cached validator before memory is traced
    tracemalloc.start()
    generated = expand_groups([group], seed=5, taken=set())
    generated_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    profile_of = {(p["cpus"], p["memory_mb"]): p for p in GROUP_PROFILES}
    tracemalloc.start()
    written = []
    for i, node in enumerate(generated):
        fields = {k: v for k, v in profile_of[(node.cpus, node.memory_mb)].items() if k != "weight"}
        written.append(NodeSpec.model_validate({"name": f"edge{i}", **fields, "engine": "b"}))
    written_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert generated == written
    assert [n.model_fields_set for n in generated] == [n.model_fields_set for n in written]
    # 3 % leaves room for the lists' spare capacity. Nodes whose fields_set listed every field took 12 % more.
    assert generated_bytes <= 1.03 * written_bytes


def test_group_name_clash_names_first_taken():
    profiles = [{"cpus": 1.0, "memory_mb": 1024}]
    data = {
        "name": "clash",
        "nodes": [{"name": "edge7", "cpus": 1.0, "memory_mb": 1024}],
        "node_groups": [{"prefix": "edge", "count": 20, "profiles": profiles}],
    }
    with pytest.raises(UsageError, match=r"node_groups\[0\]\.prefix: generated node name 'edge7' is already taken"):
        parse_scenario(data)
    data["nodes"] = []
    data["node_groups"].append({"prefix": "edge1", "count": 5, "profiles": profiles})
    with pytest.raises(UsageError, match=r"node_groups\[1\]\.prefix: generated node name 'edge10' is already taken"):
        parse_scenario(data)


# Bad input, through the command line: exit status 2, the field named, nothing written.


def run_cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


SCENARIO = """
name = "bad"
[workload]
{workload}
[[nodes]]
name = "a"
cpus = 1.0
memory_mb = 1024
{extra}
"""


@pytest.mark.parametrize(
    "workload, extra, expected",
    [
        ('kind = "trace"\ntrace = "missing.csv"', "", "workload.trace: trace file"),
        ('kind = "trace"\ntrace = "."', "", "is a directory; give the path of a CSV file"),
        ('kind = "closed"', '[[events]]\ntime_s = 1.0\nkind = "fail"\nnode = "ghost"', "events[0].node: unknown node 'ghost'"),
        ('kind = "closed"', '[[events]]\ntime_s = 1.0\nkind = "background_load"\nnode = "a"\ncpus = 1.5', "events[0].cpus"),
        ('kind = "bursty"', "", "needs rate_rps"),
        ('kind = "closed"', '[[node_groups]]\nprefix = "a"\ncount = 0\nprofiles = [{ cpus = 1.0, memory_mb = 512 }]', "node_groups[0].count"),
    ],
    ids=["missing-trace", "trace-directory", "unknown-node", "background-too-large", "bursty-without-rate", "empty-group"],
)
def test_bad_scenarios_fail_before_the_run(tmp_path, workload, extra, expected):
    path = tmp_path / "bad.toml"
    path.write_text(SCENARIO.format(workload=workload, extra=extra))
    out = tmp_path / "out"
    result = run_cli("simulate", str(path), "--out", str(out), "--quiet")
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_trace_without_arrival_column_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("time\n1.0\n")
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO.format(workload='kind = "trace"\ntrace = "t.csv"', extra=""))
    result = run_cli("simulate", str(path), "--out", str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 2
    assert "arrival_s column" in result.output


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("0\n1\nabc\n", "row 4 has arrival_s 'abc'"),
        ("0\n-1\n", "row 3 has arrival_s '-1'"),
        ("0\n2\n1\n", "arrival_s decreases at row 4"),
    ],
    ids=["text", "negative", "decreasing"],
)
def test_trace_with_a_bad_row_names_it(tmp_path, rows, expected):
    (tmp_path / "t.csv").write_text("arrival_s\n" + rows)
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO.format(workload='kind = "trace"\ntrace = "t.csv"', extra=""))
    result = run_cli("simulate", str(path), "--out", str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 2
    assert expected in result.output


def test_scale_scenarios_validate():
    for path in sorted((ROOT / "scenarios" / "scale").glob("*.toml")):
        loaded = load_scenario(path)
        assert loaded.nodes, path
    assert len(load_scenario(ROOT / "scenarios" / "scale" / "10k-nodes.toml").nodes) == 10_000


def test_workload_too_large_for_memory_is_refused(tmp_path):
    path = tmp_path / "huge.toml"
    # At a million requests per second the run is short enough for the monitor; the records are not.
    path.write_text(SCENARIO.format(workload='kind = "poisson"\nrate_rps = 1e6\nrequests = 1_000_000_000_000', extra=""))
    out = tmp_path / "out"
    result = run_cli("simulate", str(path), "--out", str(out), "--quiet")
    assert result.exit_code == 2, result.output
    assert "workload.requests" in result.output and "GiB" in result.output
    assert not out.exists()


def test_joining_node_waits_for_its_deployment():
    # Weights: 4 bytes per cost unit, 2000 units -> 8000 bytes; at 8 Mbit/s 8 ms, plus 1 ms
    # latency and 500 ms to load.
    costs = CostModel(make_calibration([2.0]))
    data = {
        "name": "deploy",
        "model": {"name": "synthetic"},
        "policy": {"partitioner": "monolithic", "scheduler": "round_robin", "load_time_ms": 500.0},
        "workload": {"kind": "poisson", "requests": 600, "rate_rps": 100.0},
        "network": {"latency_ms": 1.0, "bandwidth_mbps": 8.0},
        "monitor": {"period_s": 0.1},
        "nodes": [node("a"), node("late", present=False)],
        "events": [{"time_s": 1.0, "kind": "join", "node": "late"}],
    }
    result = simulate(parse_scenario(data), costs)
    starts = [r.stage_start_s[0] for r in result.records if r.stage_nodes == ["late"]]
    assert starts
    assert min(starts) >= 1.0 + 0.509
    assert min(starts) < 1.0 + 0.509 + 0.2


@pytest.mark.parametrize(
    ("cpus", "warning"),
    [
        ("16.0", "such as high (cpus 16, 16 threads), exceed the calibrated profiles"),
        ("0.05", "such as high (cpus 0.05, 1 threads), have less CPU than every calibrated profile with 1 thread(s) (at least 0.4 CPUs)"),
    ],
)
def test_node_outside_calibration_warns(tmp_path, cpus, warning):
    path = tmp_path / "outside.toml"
    path.write_text((ROOT / "scenarios" / "paper" / "2-node.toml").read_text().replace("cpus = 1.0", f"cpus = {cpus}"))
    result = run_cli("simulate", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert warning in output


def test_batch_too_large_for_memory_is_rejected(tmp_path):
    path = tmp_path / "batch.toml"
    path.write_text((ROOT / "scenarios" / "paper" / "2-node.toml").read_text().replace("batch = 1\n", "batch = 100000\n"))
    out = tmp_path / "out"
    result = run_cli("simulate", str(path), "--out", str(out), "--quiet")
    assert result.exit_code == 2, result.output
    assert "the activations of a batch of 100000 count; lower workload.batch" in " ".join(result.output.split())
    assert not out.exists()


def test_trace_shorter_than_requests_warns(tmp_path):
    (tmp_path / "t.csv").write_text("arrival_s\n0\n0.5\n1.0\n")
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO.format(workload='kind = "trace"\ntrace = "t.csv"\nrequests = 10', extra=""))
    result = run_cli("simulate", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "workload.requests = 10 but the trace has 3 rows; 3 requests are simulated" in " ".join(result.output.split())
