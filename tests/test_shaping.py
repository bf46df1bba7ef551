"""Link shaping: the scenario's links, the tc commands, and timed transfers through a shaped worker."""

from __future__ import annotations

import gzip
import io
import time
from pathlib import Path

import numpy as np
import pytest

from amp4ec.real.shaping import (
    METHOD_NETEM,
    METHOD_NONE,
    METHOD_SENDER,
    DelayedClient,
    LinkShape,
    ShapingResult,
    delay_sender_clients,
    link_shapes,
    qdisc_report,
    sender_delays_s,
    shaping_commands,
    tbf_arguments,
)
from amp4ec.scenario import parse_scenario

from conftest import new_test_run_id, require_torch

BANDWIDTH_BPS = 8e6  # 1,000,000 bytes/s
TRANSFER_BYTES = 1_500_000
SEGMENT_SHAPE = (1, TRANSFER_BYTES // 4)  # float32, so TRANSFER_BYTES per tensor
DELAY_MS = 40.0
# A shaped transfer of N bytes at B bytes/s must take N / B within this share, plus a fixed
# allowance for the request's own round trip and the worker's reply.
TRANSFER_TOLERANCE = 0.15
ROUND_TRIP_ALLOWANCE_S = 0.15


def scenario_with(network: dict, nodes: list[dict]):
    return parse_scenario({"name": "links", "network": network, "nodes": nodes})


def test_link_shapes_use_node_values_first():
    scenario = scenario_with(
        {"bandwidth_mbps": 100.0, "latency_ms": 5.0, "shaping": True},
        [
            {"name": "a", "cpus": 1.0, "memory_mb": 512},
            {"name": "b", "cpus": 1.0, "memory_mb": 512, "bandwidth_mbps": 8.0, "latency_ms": 20.0},
        ],
    )

    shapes = link_shapes(scenario)

    assert shapes["a"] == LinkShape("a", 100e6, 5.0)
    assert shapes["b"] == LinkShape("b", 8e6, 20.0)


def test_link_shapes_add_no_delay_without_latency():
    scenario = scenario_with({"shaping": True}, [{"name": "a", "cpus": 1.0, "memory_mb": 512}])

    assert link_shapes(scenario)["a"] == LinkShape("a", 1000e6, 0.0)


def test_shaping_defaults_to_off():
    scenario = scenario_with({}, [{"name": "a", "cpus": 1.0, "memory_mb": 512}])

    assert scenario.network.shaping is False


def test_tbf_burst_scales_with_rate():
    assert tbf_arguments(8e6) == "rate 8364641bit burst 65536 latency 500ms"
    assert tbf_arguments(1e9) == "rate 1045580110bit burst 130697 latency 500ms"


def test_commands_shape_both_directions():
    commands = shaping_commands(LinkShape("a", 8e6, 10.0), netem=False)

    assert "ip link add ifb0 type ifb" in commands
    assert any("mirred egress redirect dev ifb0" in c for c in commands)
    assert sum("root handle 1: tbf rate 8364641bit" in c for c in commands) == 2
    assert not any("netem" in c for c in commands)


def test_commands_add_netem_when_available():
    commands = shaping_commands(LinkShape("a", 8e6, 10.0), netem=True)

    netem = [c for c in commands if "netem" in c]
    assert netem == [
        "tc qdisc add dev eth0 parent 1:1 handle 10: netem delay 10ms",
        "tc qdisc add dev ifb0 parent 1:1 handle 10: netem delay 10ms",
    ]


def test_sender_delays_only_for_sender_method():
    results = [
        ShapingResult("a", 8e6, 10.0, "tc", METHOD_SENDER),
        ShapingResult("b", 8e6, 10.0, "tc", METHOD_NETEM),
        ShapingResult("c", 8e6, 0.0, "tc", METHOD_NONE),
    ]

    assert sender_delays_s(results) == {"a": 0.01}


class RecordingClient:
    def __init__(self):
        self.calls = []

    def run(self, segment_id, arrays):
        self.calls.append(("run", time.perf_counter()))
        return arrays, {"wall_ms": 0.0}

    def ping(self):
        self.calls.append(("ping", time.perf_counter()))
        return {"ok": True}


def test_delayed_client_waits_both_ways():
    inner = RecordingClient()
    client = DelayedClient(inner, 0.05)

    started = time.perf_counter()
    client.run("s0", [])
    elapsed_s = time.perf_counter() - started

    assert inner.calls[0][1] - started >= 0.05
    assert elapsed_s >= 0.1


def test_delayed_client_passes_other_calls():
    inner = RecordingClient()
    client = DelayedClient(inner, 0.2)

    started = time.perf_counter()
    client.ping()

    assert time.perf_counter() - started < 0.1
    assert inner.calls[0][0] == "ping"


def test_coordinator_lookup_delayed_per_node():
    class Coordinator:
        def client(self, name):
            return RecordingClient()

    coordinator = Coordinator()
    delay_sender_clients(coordinator, {"a": 0.01, "b": 0.0})

    assert isinstance(coordinator.client("a"), DelayedClient)
    assert isinstance(coordinator.client("b"), RecordingClient)


# Docker


def kernel_netem_config() -> str | None:
    """Return the kernel's CONFIG_NET_SCH_NETEM setting ("y", "m", "n"), or None if unknown."""
    config = Path("/proc/config.gz")
    if not config.is_file():
        return None
    text = gzip.decompress(config.read_bytes()).decode("utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("CONFIG_NET_SCH_NETEM="):
            return line.split("=", 1)[1]
        if line == "# CONFIG_NET_SCH_NETEM is not set":
            return "n"
    return "n"


@pytest.fixture(scope="module")
def identity_segment():
    """An exported segment that returns its input times one, so output bytes equal input bytes."""
    torch = require_torch()

    class Scale(torch.nn.Module):
        def forward(self, x):
            return x * 1.0

    buffer = io.BytesIO()
    torch.export.save(torch.export.export(Scale(), (torch.zeros(SEGMENT_SHAPE),)), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shaped_cluster(docker_client, worker_image):
    from amp4ec.real.containers import NodeSpec, WorkerCluster

    nodes = [NodeSpec("slow", 0.5, 512 * 2**20), NodeSpec("late", 0.5, 512 * 2**20)]
    shapes = {"slow": LinkShape("slow", BANDWIDTH_BPS, 0.0), "late": LinkShape("late", 1e9, DELAY_MS)}
    with WorkerCluster(docker_client, nodes, image=worker_image, run_id=new_test_run_id(), shapes=shapes) as cluster:
        yield cluster


def timed_s(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def expected_window_s(n_bytes: int) -> tuple[float, float]:
    ideal_s = n_bytes * 8 / BANDWIDTH_BPS
    return ideal_s * (1 - TRANSFER_TOLERANCE), ideal_s * (1 + TRANSFER_TOLERANCE) + ROUND_TRIP_ALLOWANCE_S


@pytest.mark.docker
def test_shaped_upload_takes_bytes_over_rate(shaped_cluster):
    client = shaped_cluster["slow"]
    payload = np.zeros(TRANSFER_BYTES, dtype=np.uint8)
    client.request({"op": "ping"}, [payload], timeout_s=30.0)  # TCP connection set up

    elapsed_s = timed_s(lambda: client.request({"op": "ping"}, [payload], timeout_s=30.0))

    low_s, high_s = expected_window_s(TRANSFER_BYTES)
    assert low_s <= elapsed_s <= high_s, f"{elapsed_s:.3f} s outside [{low_s:.3f}, {high_s:.3f}]\n{qdisc_report(shaped_cluster.container_for('slow'))}"


@pytest.mark.docker
@pytest.mark.torch
def test_shaped_round_trip_takes_twice(shaped_cluster, identity_segment):
    client = shaped_cluster["slow"]
    client.load("identity", identity_segment, timeout_s=60.0)
    x = np.zeros(SEGMENT_SHAPE, dtype=np.float32)

    elapsed_s = timed_s(lambda: client.run("identity", [x], timeout_s=30.0))

    low_s, high_s = expected_window_s(2 * TRANSFER_BYTES)
    assert low_s <= elapsed_s <= high_s, f"{elapsed_s:.3f} s outside [{low_s:.3f}, {high_s:.3f}]"


@pytest.mark.docker
def test_unshaped_link_much_faster(docker_client, worker_image):
    from amp4ec.real.containers import NodeSpec, WorkerCluster

    payload = np.zeros(TRANSFER_BYTES, dtype=np.uint8)
    with WorkerCluster(docker_client, [NodeSpec("fast", 1.0, 512 * 2**20)], image=worker_image, run_id=new_test_run_id()) as cluster:
        cluster["fast"].request({"op": "ping"}, [payload])
        elapsed_s = timed_s(lambda: cluster["fast"].request({"op": "ping"}, [payload]))

    assert elapsed_s < 0.25 * TRANSFER_BYTES * 8 / BANDWIDTH_BPS


@pytest.mark.docker
def test_recorded_methods_match_kernel(shaped_cluster):
    netem = kernel_netem_config()
    if netem not in ("y", "n"):
        pytest.skip(f"cannot tell from /proc/config.gz whether the kernel has netem (CONFIG_NET_SCH_NETEM={netem})")
    slow = shaped_cluster.shaping["slow"]
    late = shaped_cluster.shaping["late"]

    assert slow.delay_method == METHOD_NONE
    assert late.delay_method == (METHOD_NETEM if netem == "y" else METHOD_SENDER)
    assert slow.bandwidth_method == "tc tbf on eth0 and ifb0 at 8364641 bit/s of frames"
    assert late.bandwidth_method.startswith("tc tbf on eth0 and ifb0 at ")
    report = qdisc_report(shaped_cluster.container_for("slow"))
    assert "tbf" in report
    assert "ifb0" in report


@pytest.mark.docker
@pytest.mark.torch
def test_delay_adds_two_hops(shaped_cluster, identity_segment):
    late = shaped_cluster["late"]
    late.load("identity", identity_segment, timeout_s=60.0)
    x = np.zeros(SEGMENT_SHAPE, dtype=np.float32)
    late.run("identity", [x])
    delay_s = DELAY_MS / 1e3
    plain_s = min(timed_s(lambda: late.run("identity", [x])) for _ in range(3))

    if shaped_cluster.shaping["late"].delay_method == METHOD_NETEM:
        # The kernel delays both hops of the plain client already.
        assert plain_s >= 2 * delay_s
        return
    delayed = DelayedClient(late, delay_s)
    extra_s = timed_s(lambda: delayed.run("identity", [x])) - plain_s

    assert 2 * delay_s * 0.95 <= extra_s <= 2 * delay_s + 0.05


PAPER_2_NODE = Path(__file__).resolve().parents[1] / "scenarios" / "paper" / "2-node.toml"


@pytest.mark.docker
@pytest.mark.torch
@pytest.mark.slow
def test_replay_records_shaping_methods(tmp_path, docker_client, worker_image, run_id):
    import json

    require_torch()
    from amp4ec.real.replay import run_replay

    text = PAPER_2_NODE.read_text().replace("requests = 100", "requests = 3")
    text = text.replace("[monitor]", "[network]\nbandwidth_mbps = 200.0\nshaping = true\n\n[monitor]")
    text = text.replace('name = "medium"\n', 'name = "medium"\nbandwidth_mbps = 50.0\nlatency_ms = 5.0\n')
    scenario = tmp_path / "shaped.toml"
    scenario.write_text(text)

    summary = run_replay(scenario, tmp_path / "real", log=print, run_id=run_id)

    run = json.loads((tmp_path / "real" / "run.json").read_text())
    shaping = run["shaping"]
    assert run["network"] == "docker bridge, shaped"
    assert set(shaping) == {"high", "medium"}
    assert shaping["high"]["bandwidth_bps"] == 200e6
    assert shaping["high"]["delay_method"] == METHOD_NONE
    assert shaping["medium"]["bandwidth_bps"] == 50e6
    assert shaping["medium"]["delay_ms"] == 5.0
    assert shaping["medium"]["delay_method"] in (METHOD_NETEM, METHOD_SENDER)
    assert run["engines"] == {"high": "unix:///var/run/docker.sock", "medium": "unix:///var/run/docker.sock"}
    assert summary["requests"]["completed"] == 3
    assert not any("not applied" in warning for warning in summary["warnings"])


def test_reshape_shapes_only_shaped_nodes_again():
    from types import SimpleNamespace

    from amp4ec.real.coordinator import reshape

    shaped = []
    cluster = SimpleNamespace(shapes={"a": object()}, apply_shaping=shaped.append)
    coordinator = SimpleNamespace(cluster=cluster)
    reshape(coordinator, "a")
    reshape(coordinator, "b")
    assert shaped == ["a"]
    reshape(SimpleNamespace(cluster=SimpleNamespace(shapes={}, apply_shaping=shaped.append)), "a")
    assert shaped == ["a"]
