"""Replay with many requests in flight, faults from the dynamics timeline, and signal cleanup."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from amp4ec.errors import UsageError
from amp4ec.scenario import parse_scenario
from amp4ec.workload import open_loop_arrivals_s

from conftest import require_torch

TWO_NODES = """
[[nodes]]
name = "high"
cpus = 0.6
memory_mb = 512

[[nodes]]
name = "low"
cpus = 0.4
memory_mb = 512
"""


def labelled(client, run_id: str) -> tuple[list, list]:
    selector = {"label": [f"amp4ec.run={run_id}"]}
    return client.containers.list(all=True, filters=selector), client.networks.list(filters=selector)


def base_scenario(**dynamics_and_more) -> dict:
    data = {
        "name": "x",
        "nodes": [{"name": "a", "cpus": 1.0, "memory_mb": 512}, {"name": "b", "cpus": 0.5, "memory_mb": 512}],
    }
    data.update(dynamics_and_more)
    return data


def test_dynamics_parse_and_validate():
    # [[dynamics]] is the deprecated form of [[events]]; it still loads, translated.
    with pytest.warns(FutureWarning):
        scenario = parse_scenario(
            base_scenario(dynamics=[{"at_s": 1.0, "node": "a", "action": "fail"}, {"at_s": 2.0, "node": "b", "action": "set_cpus", "cpus": 0.25}])
        )
    assert [e.kind for e in scenario.events] == ["fail", "cpu"]
    assert scenario.events[1].cpus == 0.25
    assert scenario.resolved()["dynamics"] == []
    assert scenario.resolved()["events"][0] == {"time_s": 1.0, "kind": "fail", "node": "a", "cpus": None, "bandwidth_mbps": None, "latency_ms": None}


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"at_s": 1.0, "node": "c", "action": "fail"}, "dynamics\\[0\\].node: unknown node 'c'"),
        ({"at_s": 1.0, "node": "a", "action": "explode"}, "dynamics\\[0\\].action"),
        ({"at_s": 1.0, "node": "a", "action": "set_cpus"}, "needs cpus"),
        ({"at_s": 1.0, "node": "a", "action": "pause", "cpus": 1.0}, "applies to set_cpus only"),
        ({"at_s": -1.0, "node": "a", "action": "fail"}, "dynamics\\[0\\].at_s"),
    ],
)
def test_dynamics_rejects_bad_event(event, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(UsageError, match=message):
            parse_scenario(base_scenario(dynamics=[event]))


def test_retries_must_not_be_negative():
    with pytest.raises(UsageError, match="policy.retries"):
        parse_scenario(base_scenario(policy={"retries": -1}))


@pytest.mark.docker
@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["relay", "forward"])
def test_faults_end_every_request_once(tmp_path, docker_client, worker_image, transport):
    require_torch()
    from amp4ec.real.replay import run_replay

    scenario_path = tmp_path / "faults.toml"
    scenario_path.write_text(
        """
name = "faults"
seed = 3
[policy]
scheduler = "round_robin"
on_failure = "retry"
max_retries = 1
[workload]
kind = "poisson"
rate_rps = 1.5
requests = 30
[monitor]
period_s = 0.5
[replay]
transport = "%s"
"""
        % transport
        + TWO_NODES
        + """
[[events]]
time_s = 0.5
node = "high"
kind = "pause"
[[events]]
time_s = 0.9
node = "high"
kind = "resume"
[[events]]
time_s = 1.0
node = "low"
kind = "fail"
[[events]]
time_s = 1.3
node = "low"
kind = "recover"
[[events]]
time_s = 2.0
node = "high"
kind = "cpu"
cpus = 0.5
"""
    )
    out = tmp_path / "real"
    run_replay(scenario_path, out, log=print)

    records = pd.read_parquet(out / "records.parquet")
    assert sorted(records["request_id"]) == list(range(30))
    assert set(records["outcome"]) <= {"completed", "failed"}
    failed = records[records["outcome"] == "failed"]
    assert all(reason for reason in failed["reason"]), failed["reason"].tolist()
    completed = records[records["outcome"] == "completed"]
    assert len(completed) >= 15, records[["request_id", "outcome", "reason"]].to_string()
    assert all(len(nodes) == 2 for nodes in completed["stage_nodes"])
    # Arrivals are the simulator's, for the same seed.
    scenario = parse_scenario(json.loads((out / "run.json").read_text())["scenario"])
    assert np.allclose(records.sort_values("request_id")["arrival_s"], open_loop_arrivals_s(scenario.workload, scenario.seed))

    run = json.loads((out / "run.json").read_text())
    applied = run["dynamics"]
    assert [e["action"] for e in applied] == ["pause", "resume", "fail", "recover", "set_cpus"]
    assert [e["error"] for e in applied] == [""] * 5
    assert applied[0]["method"] in ("freezer", "sigstop")
    assert applied[1]["method"] == applied[0]["method"]
    # The recovered node served stages again once its segments were deployed anew.
    recovered_s = applied[3]["done_s"]
    after_recovery = [
        start
        for nodes, starts in zip(completed["stage_nodes"], completed["stage_start_s"])
        for node, start in zip(nodes, starts)
        if node == "low" and start > recovered_s
    ]
    last_arrival_s = records["arrival_s"].max()
    # Restarting torch in a 0.4-CPU container takes seconds (tens on a loaded machine), so
    # the check applies only when the node was back well before the last arrival.
    if recovered_s < last_arrival_s - 3.0:
        assert after_recovery, f"no stage ran on low after it recovered at {recovered_s:.2f} s"
    else:
        print(f"low recovered at {recovered_s:.2f} s, after the last arrival at {last_arrival_s:.2f} s")
    assert run["transport"]["activations"] == transport
    assert run["monitor"]["method"] == "push"
    assert run["monitor"]["pushes"] > 0
    containers, networks = labelled(docker_client, run["run_id"])
    assert containers == [] and networks == []


@pytest.mark.docker
@pytest.mark.torch
def test_closed_clients_overlap(tmp_path, docker_client, worker_image):
    require_torch()
    from amp4ec.real.replay import run_replay

    scenario_path = tmp_path / "clients.toml"
    scenario_path.write_text(
        'name = "clients"\nseed = 5\n[workload]\nkind = "closed"\nclients = 3\nrequests = 15\n' + TWO_NODES
    )
    run_replay(scenario_path, tmp_path / "real", log=print)
    records = pd.read_parquet(tmp_path / "real" / "records.parquet")
    assert list(records["outcome"]) == ["completed"] * 15
    events = sorted([(t, 1) for t in records["start_s"]] + [(t, -1) for t in records["end_s"]])
    in_flight = np.cumsum([delta for _, delta in events])
    assert in_flight.max() >= 2, "no two requests were ever in flight together"


@pytest.mark.docker
@pytest.mark.torch
@pytest.mark.parametrize(
    ("signals", "expected_status"),
    [([signal.SIGTERM], 128 + signal.SIGTERM), ([signal.SIGINT, signal.SIGINT], 130)],
    ids=["sigterm", "sigint-twice"],
)
def test_signal_mid_replay_removes_containers(tmp_path, docker_client, worker_image, signals, expected_status):
    require_torch()
    scenario_path = tmp_path / "long.toml"
    scenario_path.write_text('name = "long"\n[workload]\nrequests = 100000\nclients = 2\n' + TWO_NODES)
    out = tmp_path / "real"
    process = subprocess.Popen(
        [sys.executable, "-m", "amp4ec.cli", "replay", str(scenario_path), "--out", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    run_id = None
    try:
        deadline = time.monotonic() + 300
        for line in process.stderr:
            match = re.search(r"run (replay-[0-9a-f]{8}): \d+ workers ready", line)
            if match:
                run_id = match.group(1)
                break
            assert time.monotonic() < deadline, "the replay did not start its workers in time"
        assert run_id is not None, "the replay exited before its workers were ready"
        time.sleep(3.0)
        assert labelled(docker_client, run_id)[0], "no container of the run exists mid-replay"
        for signum in signals:
            # A second Ctrl-C lands while the first one's cleanup is removing containers.
            process.send_signal(signum)
            time.sleep(0.05)
        status = process.wait(timeout=90)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert status == expected_status
    # The replay's own cleanup is not reported as failed requests, dead containers or silent nodes.
    assert "went down" not in stderr
    assert "stopped outside the scenario's events" not in stderr
    assert "has sent no stats" not in stderr
    assert "sent no final stats" not in stderr
    containers, networks = labelled(docker_client, run_id)
    assert [c.name for c in containers] == [] and [n.name for n in networks] == []
    assert not out.exists()
    assert not list(tmp_path.glob(".real.partial-*"))


@pytest.mark.docker
@pytest.mark.torch
@pytest.mark.parametrize(
    ("action", "warning"),
    [
        ("kill", "node low: container stopped outside the scenario's events (exited, exit code 137)"),
        ("restart", "node low: container restarted outside the scenario's events"),
        ("pause", "node low: container paused outside the scenario's events"),
        ("pause-kill", "node low: container stopped outside the scenario's events (exited, exit code 137)"),
    ],
)
def test_stopped_worker_fails_over_quickly(tmp_path, docker_client, worker_image, run_id, action, warning):
    """A container killed or restarted outside the events is marked down once it falls silent, not after the stage timeout.

    One paused for a few seconds is named, and serves again once resumed. One killed while
    paused is found by the checks that go on while it stays silent.
    """
    require_torch()
    from amp4ec.real.replay import run_replay

    scenario_path = tmp_path / "kill.toml"
    scenario_path.write_text(
        'name = "kill"\nseed = 2\n[policy]\nscheduler = "round_robin"\non_failure = "retry"\nmax_retries = 2\n'
        '[workload]\nkind = "closed"\nclients = 2\nrequests = 60\nthink_time_ms = 100.0\n[monitor]\nperiod_s = 0.5\n'
        + TWO_NODES
    )
    replaying = threading.Event()
    outcome: dict = {}

    def log(message: str) -> None:
        print(message)
        if "replaying" in message:
            replaying.set()

    def replay() -> None:
        try:
            outcome["summary"] = run_replay(scenario_path, tmp_path / "real", log=log, run_id=run_id)
        except BaseException as error:  # reported by the assertions below
            outcome["error"] = error

    thread = threading.Thread(target=replay)
    thread.start()
    assert replaying.wait(timeout=300), "the replay did not start its workload"
    time.sleep(1.0)
    killed_s = time.monotonic()
    container = docker_client.containers.get(f"amp4ec-{run_id}-low")
    if action == "kill":
        container.kill()
    elif action == "restart":
        container.restart(timeout=1)
    elif action == "pause-kill":
        container.pause()
        time.sleep(3.0)
        container.kill()
    else:
        container.pause()
        # Three monitor periods (1.5 s) make it silent, and its stages in flight wait for the resume.
        time.sleep(4.0)
        container.unpause()
    thread.join(timeout=300)
    finished_s = time.monotonic()
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    # STAGE_TIMEOUT_S is 60 s per stage: far above the few seconds the monitor takes.
    assert finished_s - killed_s < 45, f"the replay took {finished_s - killed_s:.0f} s after the kill"
    records = pd.read_parquet(tmp_path / "real" / "records.parquet")
    assert sorted(records["request_id"]) == list(range(60))
    assert set(records["outcome"]) <= {"completed", "failed"}
    completed = records[records["outcome"] == "completed"]
    assert len(completed) >= 50
    run = json.loads((tmp_path / "real" / "run.json").read_text())
    # A resumed node reports again, so only the killed or restarted one is silent at the end.
    assert run["monitor"]["silent_nodes"] == ([] if action == "pause" else ["low"])
    assert run["monitor"]["silences"] == {"low": 1}
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert any(w.startswith(warning) for w in summary["warnings"]), summary["warnings"]
    containers, networks = labelled(docker_client, run_id)
    assert containers == []
    assert networks == []
