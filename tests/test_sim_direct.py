"""Stages computed in one step give the same records, bit for bit, as stages carried by the links."""

import gc
from pathlib import Path

import pytest

from amp4ec.costs import CostModel
from amp4ec.runs import prepare_run
from amp4ec.scenario import parse_scenario
from amp4ec.sim.engine import Simulation

from synthetic import make_calibration

ROOT = Path(__file__).resolve().parents[1]



def timeline_events() -> list[dict]:
    """Return every kind of timeline event that changes a node's worker, CPU or links, many times over.

    Stages overlap on the nodes and the events come every 0.1 s, so many of them find a
    direct stage in flight, before or after its input arrives.
    """
    events = [
        {"time_s": 10.0, "kind": "fail", "node": "n1"},
        {"time_s": 12.0, "kind": "recover", "node": "n1"},
        {"time_s": 30.0, "kind": "restart", "node": "n0"},
        {"time_s": 45.0, "kind": "leave", "node": "n2"},
    ]
    for step in range(200):
        time_s = 15.0 + step * 0.1
        high = step % 2 == 0
        kind = step % 4
        if kind == 0:
            events.append({"time_s": time_s, "kind": "cpu", "node": "n0", "cpus": 0.5 if high else 1.0})
        elif kind == 1:
            events.append({"time_s": time_s, "kind": "background_load", "node": "n3", "cpus": 0.1 if high else 0.0})
        elif kind == 2:
            bandwidth_mbps = 0.5 if high else 1.0
            events.append({"time_s": time_s, "kind": "link_bandwidth", "node": "n1", "bandwidth_mbps": bandwidth_mbps})
        else:
            events.append({"time_s": time_s, "kind": "pause", "node": "n2"})
            events.append({"time_s": time_s + 0.05, "kind": "resume", "node": "n2"})
    return events


EVENTS = timeline_events()


class CountingSimulation(Simulation):
    """A simulation that notes, for each direct stage handed to the links, whether its input had arrived."""

    def __init__(self, *args, direct: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._direct_stages = direct and self._direct_stages
        self.settled_before_input: list[bool] = []

    def _settle_direct(self, node):
        if node.direct_flow is not None:
            self.settled_before_input.append(self.env.now < node.direct_flow.input_s)
        super()._settle_direct(node)


def synthetic_scenario(*, scheduler: str, workload: dict, events: list, service: str = "calibrated"):
    return parse_scenario(
        {
            "name": "direct",
            "seed": 3,
            "model": {"name": "synthetic", "service": service},
            "policy": {"partitioner": "ralos", "scheduler": scheduler, "partitions": 2, "on_failure": "retry", "max_retries": 2},
            "workload": workload,
            # 4,000-byte cuts take 32 ms at 1 Mbit/s, about the CPU time of a segment.
            "network": {"latency_ms": 1.0, "bandwidth_mbps": 1.0},
            "nodes": [{"name": f"n{i}", "cpus": cpus, "memory_mb": 1024} for i, cpus in enumerate((1.0, 0.6, 0.4, 0.4))],
            "events": events,
        }
    )


def run_both(scenario, costs):
    """Run the scenario with and without direct stages; return both simulations and results."""
    runs = []
    for direct in (True, False):
        simulation = CountingSimulation(scenario, costs, direct=direct)
        runs.append((simulation, simulation.run()))
    return runs


def assert_same_records(direct_result, links_result):
    direct_records, links_records = direct_result.records, links_result.records
    for column in (
        "arrival_s",
        "start_s",
        "end_s",
        "outcome",
        "bytes_moved",
        "retries",
        "stage_request",
        "stage_node",
        "stage_start_s",
        "stage_end_s",
        "stage_exec_ms",
    ):
        assert getattr(direct_records, column).tobytes() == getattr(links_records, column).tobytes(), column
    assert direct_records.reasons == links_records.reasons
    for summary in (direct_result.summary, links_result.summary):
        summary.pop("wall_time_s")
    assert direct_result.summary == links_result.summary


POISSON = {"kind": "poisson", "requests": 1500, "rate_rps": 30.0}
CLOSED = {"kind": "closed", "requests": 1500, "clients": 6, "think_time_ms": 20.0}


@pytest.mark.parametrize(
    ("scheduler", "workload", "events", "service"),
    [
        ("amp4ec", POISSON, EVENTS, "calibrated"),
        ("round_robin", POISSON, EVENTS, "exponential"),
        ("least_loaded", CLOSED, EVENTS, "calibrated"),
        ("amp4ec", CLOSED, [], "exponential"),
    ],
    ids=["amp4ec-poisson-events", "round-robin-exponential-events", "least-loaded-closed-events", "amp4ec-closed"],
)
def test_direct_stages_match_links(scheduler, workload, events, service):
    costs = CostModel(make_calibration([8.0, 8.0, 8.0, 8.0]))
    scenario = synthetic_scenario(scheduler=scheduler, workload=workload, events=events, service=service)
    (direct_sim, direct_result), (links_sim, links_result) = run_both(scenario, costs)
    assert_same_records(direct_result, links_result)
    # The stages overlapped often enough that direct stages were handed to the links both
    # before and after their input arrived, so both hand-overs were checked.
    assert True in direct_sim.settled_before_input
    assert False in direct_sim.settled_before_input
    assert links_sim.settled_before_input == []


@pytest.mark.parametrize("name", ["dynamics/adapt-cpu.toml", "dynamics/fail-recover.toml", "scale/dynamic-1k.toml"])
def test_direct_stages_match_links_in_shipped_scenarios(name):
    prepared = prepare_run(ROOT / "scenarios" / name)
    scenario = prepared.scenario
    if scenario.workload.kind != "trace":
        workload = scenario.workload.model_copy(update={"requests": min(scenario.workload.requests, 5000)})
        scenario = scenario.model_copy(update={"workload": workload})
    (_, direct_result), (_, links_result) = run_both(scenario, prepared.costs)
    assert_same_records(direct_result, links_result)


def test_run_leaves_no_reference_cycles():
    # The cyclic collector is off while a run goes on, so a reference cycle made per stage
    # (a flow and the event of its end, say) would stay in memory until the run ends.
    costs = CostModel(make_calibration([8.0, 8.0, 8.0, 8.0]))
    scenario = synthetic_scenario(scheduler="amp4ec", workload=POISSON, events=EVENTS)
    simulation = Simulation(scenario, costs)
    gc.collect()
    # Automatic collections after the run would hide the cycles, so they stay off until the check.
    gc.disable()
    try:
        simulation.run()
        assert gc.collect() == 0
    finally:
        gc.enable()
