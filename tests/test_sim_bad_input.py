"""Scenarios the simulator must reject before the run: exit status 2, the field named, no output."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from amp4ec.cli import main
from amp4ec.cluster import check_host
from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.scenario import HostSpec, LinkTimes, MonitorSpec, check_run_length, parse_scenario
from amp4ec.sim import engine

from synthetic import make_calibration

GROUP_SCENARIO = """
name = "host"
[host]
cpus = 2.0
memory_mb = 4096
[[nodes]]
name = "fits"
cpus = 2.0
memory_mb = 1024
[[node_groups]]
prefix = "edge"
count = 50
profiles = [{ cpus = 1.0, memory_mb = 1024 }, { cpus = 0.6, memory_mb = {memory_mb} }]
"""


def simulate(tmp_path: Path, text: str):
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(text)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["simulate", str(scenario), "--out", str(out), "--quiet"], catch_exceptions=False)
    return result, out


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        (
            'name = "x"\n[host]\ncpus = 2.0\n[[nodes]]\nname = "big"\ncpus = 4.0\nmemory_mb = 1024\n',
            ["nodes[0].cpus", "host has 2 CPUs"],
        ),
        (
            'name = "x"\n[policy]\npartitions = 50\n[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            ["policy.partitions is 50 but the model has 20 units", "give at most 20"],
        ),
        (
            'name = "x"\n[monitor]\nperiod_s = 1e-9\n[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            ["monitor.period_s", "greater than or equal to 0.001"],
        ),
        (
            'name = "x"\n[network]\nbandwidth_mbps = 1e-9\n[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            ["network.bandwidth_mbps", "greater than or equal to 0.001"],
        ),
        (
            'name = "x"\n[workload]\nrequests = 30\nthink_time_ms = 1e300\n[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            ["the run lasts at least 2.9e+298 s of simulated time", "more than 1e+09 s", "check that the times are in seconds"],
        ),
        (
            'name = "x"\n[workload]\nkind = "poisson"\nrequests = 30\nrate_rps = 5e-324\n[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            ["the run would never end in simulated time (the last drawn arrival at inf s)"],
        ),
        (
            'name = "x"\n[monitor]\nperiod_s = 0.01\n[workload]\nkind = "poisson"\nrequests = 100\nrate_rps = 0.01\n'
            '[[node_groups]]\nprefix = "g"\ncount = 1000\nprofiles = [{ cpus = 1.0, memory_mb = 1024 }]\n',
            ["the last drawn arrival at", "would sample 1000 nodes", "more than 1e+08 node samples"],
        ),
        (
            'name = "x"\n[network]\nlatency_ms = 1e300\n[workload]\nkind = "poisson"\nrate_rps = 10.0\n'
            '[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            ["the run lasts at least 2e+297 s", "more than 1e+09 s"],
        ),
        (
            'name = "x"\n[network]\nbandwidth_mbps = 0.001\n[monitor]\nperiod_s = 0.001\n'
            '[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            [
                "100 rounds of workload.think_time_ms = 0, with at least 4.85e+03 s per request on links of 0.001 Mbps at most",
                "raise monitor.period_s to at least 0.00485, raise the links' bandwidth_mbps, or shorten the run",
            ],
        ),
        (
            'name = "x"\n[network]\nbandwidth_mbps = 0.001\n[monitor]\nperiod_s = 0.001\n'
            '[workload]\nkind = "poisson"\nrequests = 100\nrate_rps = 100.0\n'
            '[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            [
                "at least 4.82e+05 s of simulated time (the transfers of every request, through links of 0.001 Mbps in total)",
                "raise monitor.period_s to at least 0.00482,",
            ],
        ),
        (
            'name = "x"\n[workload]\nkind = "bursty"\nrequests = 30\nrate_rps = 10.0\non_s = 1e-9\noff_s = 1e-9\n'
            '[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            ["30 requests need about 6e+09 on and off periods", "make on_s or off_s longer"],
        ),
        (
            'name = "x"\n[workload]\nkind = "bursty"\nrequests = 10\nrate_rps = 1.0\non_s = 1e308\noff_s = 1e308\n'
            '[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n',
            ["periods too long to add up"],
        ),
    ],
    ids=[
        "node larger than host cpus",
        "more partitions than units",
        "monitor period below a millisecond",
        "link below 1 kbit/s",
        "think time of ages",
        "rate below the smallest float",
        "monitor sampling a thousand nodes",
        "hop of ages",
        "closed loop on a 1 kbit/s link",
        "open loop on a 1 kbit/s link",
        "bursty periods of nanoseconds",
        "bursty periods beyond floats",
    ],
)
def test_scenario_rejected_before_run(tmp_path, text, messages):
    result, out = simulate(tmp_path, text)
    assert result.exit_code == 2
    for message in messages:
        assert message in result.output
    assert not out.exists()


def test_group_profile_larger_than_host_memory(tmp_path):
    result, out = simulate(tmp_path, GROUP_SCENARIO.replace("{memory_mb}", "8192"))
    assert result.exit_code == 2
    assert "node_groups[0].profiles[1].memory_mb" in result.output
    assert "raise host.memory_mb" in result.output
    assert not out.exists()


def test_nodes_within_host_are_accepted():
    data = {
        "name": "x",
        "host": {"cpus": 2.0, "memory_mb": 1024},
        "nodes": [{"name": "a", "cpus": 2.0, "memory_mb": 1024}],
    }
    assert parse_scenario(data).host.cpus == 2.0


def test_no_host_means_no_check():
    data = {"name": "x", "nodes": [{"name": "a", "cpus": 64.0, "memory_mb": 10**6}]}
    assert parse_scenario(data).host is None


def test_check_host_against_docker_figures():
    # Real mode passes the Docker host's CPU count and memory instead of the scenario's.
    scenario = parse_scenario({"name": "x", "nodes": [{"name": "a", "cpus": 3.0, "memory_mb": 512}]})
    check_host(scenario, HostSpec(cpus=4.0, memory_mb=2048))
    with pytest.raises(UsageError) as caught:
        check_host(scenario, HostSpec(cpus=2.0, memory_mb=2048))
    assert caught.value.field == "nodes[0].cpus"


def test_parse_keeps_field_of_host_error():
    data = {"name": "x", "host": {"memory_mb": 512}, "nodes": [{"name": "a", "cpus": 1.0, "memory_mb": 1024}]}
    with pytest.raises(UsageError) as caught:
        parse_scenario(data, source="s.toml")
    assert caught.value.field == "nodes[0].memory_mb"
    assert caught.value.exit_status == 2


def test_too_many_requests_for_memory(tmp_path, monkeypatch):
    # With 1 GiB available, 10 million 3-stage requests (about 6 GiB of records) cannot fit.
    monkeypatch.setattr(engine, "available_memory_bytes", lambda: 2**30)
    text = Path(__file__).resolve().parents[1].joinpath("scenarios/scale/10-nodes.toml").read_text()
    text = text.replace("requests = 20_000", "requests = 10_000_000")
    result, out = simulate(tmp_path, text)
    assert result.exit_code == 2
    assert "workload.requests" in result.output
    assert "lower workload.requests" in result.output
    assert not out.exists()


def test_too_many_nodes_for_memory(monkeypatch):
    monkeypatch.setattr(engine, "available_memory_bytes", lambda: 2**30)
    with pytest.raises(UsageError) as caught:
        engine.check_fits_in_memory(requests=1000, stages=3, nodes=1_000_000)
    assert caught.value.field == "nodes"


def test_estimate_grows_with_nodes_and_requests():
    small = engine.estimated_run_bytes(10, 1000, 3)
    assert engine.estimated_run_bytes(10_000, 1000, 3) > small
    assert engine.estimated_run_bytes(10, 1_000_000, 3) > small
    assert engine.estimated_run_bytes(10, 1000, 6) > small


@pytest.mark.parametrize(("cpus", "bound"), [("0.004", "greater than or equal to 0.01"), ("1e300", "less than or equal to 1024")])
def test_quota_outside_docker_range_rejected(tmp_path, cpus, bound):
    # Both once ran for hours: cold work that outgrew a tiny quota, and work extrapolated to a huge one.
    text = f'name = "x"\n[[nodes]]\nname = "n"\ncpus = {cpus}\nmemory_mb = 1024\n'
    result, out = simulate(tmp_path, text)
    assert result.exit_code == 2
    assert "nodes[0].cpus" in result.output
    assert bound in result.output
    assert not out.exists()


def test_scenario_without_nodes_names_the_fix(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text('name = "empty"\n[model]\nname = "mobilenet_v2"\n')
    result = CliRunner().invoke(main, ["simulate", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "(top level): the scenario has no nodes; add [[nodes]] or [[node_groups]]" in result.output
    assert "Value error" not in result.output
    assert "{'name'" not in result.output



def test_one_scenario_error_on_one_line(tmp_path):
    result, out = simulate(tmp_path, 'name = "x"\n[monitor]\nperiod_s = 1e-9\n[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n')
    assert result.exit_code == 2
    expected = "invalid scenario: monitor.period_s: Input should be greater than or equal to 0.001 (got 1e-09)"
    assert result.output.strip() == f"error: {tmp_path / 'scenario.toml'}: {expected}"
    assert not out.exists()


def test_several_scenario_errors_one_per_line():
    data = {"name": "x", "monitor": {"period_s": 1e-9}, "nodes": [{"name": "n", "cpus": 1.0, "memory_mb": -1}]}
    with pytest.raises(UsageError) as caught:
        parse_scenario(data, source="s.toml")
    assert str(caught.value).splitlines() == [
        "s.toml: invalid scenario:",
        "  monitor.period_s: Input should be greater than or equal to 0.001 (got 1e-09)",
        "  nodes[0].memory_mb: Input should be greater than 0 (got -1)",
    ]


def test_clients_beyond_requests_are_not_started(tmp_path):
    """A billion clients for five requests: only five ever send one, so the run ends at once."""
    result, out = simulate(tmp_path, 'name = "x"\n[workload]\nrequests = 5\nclients = 1000000000\n[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n')
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").exists()


def test_trace_too_long_for_monitor(tmp_path):
    """A trace's length is known once it is read, so the run is rejected then, before any request."""
    (tmp_path / "far.csv").write_text("arrival_s\n0\n1e9\n")
    result, out = simulate(tmp_path, 'name = "x"\n[workload]\nkind = "trace"\ntrace = "far.csv"\n[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n')
    assert result.exit_code == 2
    assert "the trace's last arrival at 1e+09 s" in " ".join(result.output.split())
    assert not out.exists()


def link_scenario(**changes):
    """Two nodes on 8 Mbit/s links with a 1 ms hop, where each 4000-byte cut takes 4 ms to cross."""
    data = {
        "name": "links",
        "model": {"name": "synthetic"},
        "policy": {"partitioner": "ralos", "scheduler": "round_robin"},
        "workload": {"kind": "closed", "requests": 40},
        "network": {"latency_ms": 1.0, "bandwidth_mbps": 8.0},
        "monitor": {"period_s": 0.01},
        "nodes": [{"name": "a", "cpus": 1.0, "memory_mb": 1024}, {"name": "b", "cpus": 0.5, "memory_mb": 1024}],
    }
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_scenario(data)


def test_link_times_of_two_stages():
    # Two stages, each with a 4000-byte input and output: 4 transfers of 4 ms and 4 hops of 1 ms.
    sim = engine.Simulation(link_scenario(), CostModel(make_calibration([2.0, 2.0])))
    links = sim.link_times()
    assert links.request_s == pytest.approx(0.020)
    assert links.all_requests_s == pytest.approx(40 * 8000 * 8 / 16e6)
    assert links.max_bandwidth_mbps == 8.0
    assert links.total_bandwidth_mbps == 16.0


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"workload": {"clients": 8}},
        {"workload": {"kind": "poisson", "requests": 200, "rate_rps": 2000.0}},
        {"policy": {"cache": False, "dispatch": "pull"}},
        {
            "policy": {"scheduler": "amp4ec"},
            "nodes": [{"name": "a", "cpus": 1.0, "memory_mb": 1024, "bandwidth_mbps": 80.0}, {"name": "b", "cpus": 0.5, "memory_mb": 1024}],
        },
        {"events": [{"time_s": 0.05, "kind": "link_bandwidth", "node": "a", "bandwidth_mbps": 40.0, "latency_ms": 0.5}]},
    ],
    ids=["closed loop", "eight clients", "poisson burst", "no cache, pull", "amp4ec, one fast link", "faster link later"],
)
def test_link_times_never_exceed_run(changes):
    """Both bounds must hold in every run, or the run-length check would reject valid scenarios."""
    sim = engine.Simulation(link_scenario(**changes), CostModel(make_calibration([2.0, 2.0, 1.0])))
    links = sim.link_times()
    result = sim.run()
    arrival_s = result.records.float_column("arrival_s")
    end_s = result.records.float_column("end_s")
    assert result.summary["requests"]["completed"] == len(arrival_s)
    assert min(end_s - arrival_s) >= links.request_s
    assert max(end_s) >= links.all_requests_s


@pytest.mark.parametrize(
    "changes",
    [
        {"nodes": [{"name": "a", "cpus": 1.0, "memory_mb": 1024}, {"name": "b", "cpus": 1.0, "memory_mb": 1024, "present": False}]},
        {"policy": {"scheduler": "amp4ec_test_plugin:Fussy"}},
        {"adaptation": {"enabled": True}, "events": [{"time_s": 0.05, "kind": "cpu", "node": "b", "cpus": 0.2}]},
    ],
    ids=["node absent", "plug-in scheduler", "adaptation redeploys"],
)
def test_link_times_absent_when_requests_can_fail(changes, tmp_path, monkeypatch):
    # A plug-in, a node down at the start, or a node deploying segments can fail a request before it crosses a link.
    (tmp_path / "amp4ec_test_plugin.py").write_text(
        "from amp4ec.schedule import NoNodeAvailable\n"
        "class Fussy:\n"
        "    def __init__(self, rng):\n"
        "        pass\n"
        "    def select(self, task, states):\n"
        "        raise NoNodeAvailable(task)\n"
        "    def observe(self, node, exec_ms):\n"
        "        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sim = engine.Simulation(link_scenario(**changes), CostModel(make_calibration([2.0, 2.0])))
    assert sim.link_times() is None


@pytest.mark.parametrize(
    "events",
    [
        [{"time_s": 0.05, "kind": "fail", "node": "a"}],
        [{"time_s": 0.05, "kind": "pause", "node": "b"}, {"time_s": 0.2, "kind": "resume", "node": "b"}],
        [{"time_s": 0.05, "kind": "leave", "node": "b"}, {"time_s": 0.03, "kind": "fail", "node": "a"}, {"time_s": 0.04, "kind": "recover", "node": "a"}],
    ],
    ids=["node fails", "node pauses", "first of several stops"],
)
def test_link_times_hold_until_first_stop(events):
    """Until a node may stop, the run is the one without stops, so it lasts at least the bounds or until that stop."""
    sim = engine.Simulation(
        link_scenario(events=events, policy={"on_failure": "retry", "max_retries": 3}), CostModel(make_calibration([2.0, 2.0, 1.0]))
    )
    links = sim.link_times()
    assert links.valid_until_s == min(event["time_s"] for event in events if event["kind"] != "resume" and event["kind"] != "recover")
    result = sim.run()
    arrival_s = result.records.float_column("arrival_s")
    end_s = result.records.float_column("end_s")
    assert max(end_s) >= min(links.valid_until_s, links.all_requests_s)
    before_stop = end_s <= links.valid_until_s
    assert before_stop.any()
    assert min((end_s - arrival_s)[before_stop]) >= links.request_s


def test_closed_loop_thinks_between_rounds_only():
    # Two rounds think once: 1e6 s at 0.0101 s per sample is under 1e8 samples of the one node.
    scenario = parse_scenario(
        {"name": "x", "monitor": {"period_s": 0.0101}, "workload": {"requests": 2, "think_time_ms": 1e9}, "nodes": [{"name": "n", "cpus": 1.0, "memory_mb": 1024}]}
    )
    check_run_length(scenario)
    check_run_length(scenario.with_workload(requests=1, think_time_ms=1e300))


def test_random_arrivals_bounded_by_drawn_last():
    # requests / rate is the mean length, not a bound, so a Poisson run is checked on its drawn arrivals only.
    scenario = link_scenario(monitor={"period_s": 0.001}, workload={"kind": "poisson", "requests": 100, "rate_rps": 0.001})
    check_run_length(scenario)
    with pytest.raises(ValueError) as caught:
        check_run_length(scenario, last_arrival_s=9e4)
    assert "the last drawn arrival at 90000 s" in str(caught.value)


def test_run_beyond_clock_resolution_rejected():
    scenario = link_scenario(monitor={"period_s": 1e15}, workload={"kind": "poisson", "requests": 2, "rate_rps": 1.0})
    with pytest.raises(ValueError) as caught:
        check_run_length(scenario, last_arrival_s=1e16)
    assert "more than 1e+09 s" in str(caught.value)
    assert "check that the times are in seconds" in str(caught.value)


def test_bandwidth_advised_only_when_links_matter():
    scenario = link_scenario(monitor={"period_s": 0.001}, workload={"kind": "poisson", "requests": 40, "rate_rps": 1.0})
    links = LinkTimes(request_s=10.0, all_requests_s=1.0, max_bandwidth_mbps=8.0, total_bandwidth_mbps=16.0)
    # The last arrival alone makes the run too long, so faster links would not help.
    with pytest.raises(ValueError) as caught:
        check_run_length(scenario, last_arrival_s=1e6, links=links)
    assert "bandwidth_mbps" not in str(caught.value)
    # Here the transfers do.
    with pytest.raises(ValueError) as caught:
        check_run_length(scenario, last_arrival_s=40.0, links=LinkTimes(request_s=1e6, all_requests_s=1.0, max_bandwidth_mbps=8.0, total_bandwidth_mbps=16.0))
    assert "raise the links' bandwidth_mbps" in str(caught.value)


def test_period_suggested_for_links_fits():
    scenario = link_scenario(monitor={"period_s": 0.001}, workload={"requests": 10**7})
    links = LinkTimes(request_s=0.02422, all_requests_s=1.0, max_bandwidth_mbps=8.0, total_bandwidth_mbps=16.0)
    with pytest.raises(ValueError) as caught:
        check_run_length(scenario, links=links)
    message = str(caught.value)
    assert "at least 0.0242 s per request on links of 8 Mbps at most" in message
    # 2.422e5 s x 2 nodes / 1e8 is 0.004844: the advice rounds up, never to a period that still fails.
    assert "raise monitor.period_s to at least 0.00485, raise the links' bandwidth_mbps" in message
    check_run_length(scenario.model_copy(update={"monitor": MonitorSpec(period_s=0.00485)}), links=links)
