"""The worker image, its containers and the client, against a real Docker engine.

The tests at the top need neither Docker nor torch: they check the tensor encoding and the
client's timeout handling against a silent socket on loopback.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import warnings

import numpy as np
import pytest
import zmq

from amp4ec.errors import DockerError, UsageError, WorkerError
from amp4ec.real.client import WorkerClient, decode_arrays, encode_arrays
from amp4ec.real.containers import (
    NODE_LABEL,
    PROJECT_LABEL,
    RUN_LABEL,
    NodeSpec,
    OversubscriptionWarning,
    WorkerCluster,
    host_cpu_count,
    labelled_resources,
    oom_killed,
)
from conftest import new_test_run_id, require_torch

MiB = 2**20
CFS_PERIOD_US = 100_000

# Two nodes with different limits, 1.5 CPUs in total, under the oversubscription warning on a
# 2-core machine.
CLUSTER_NODES = (
    NodeSpec("big", cpus=1.0, memory_bytes=768 * MiB, threads=1),
    NodeSpec("small", cpus=0.5, memory_bytes=400 * MiB, threads=2),
)


# Encoding and client, no Docker


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "int32", "uint8", "bool"])
def test_encode_decode_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)

    specs, frames = encode_arrays([array])
    decoded = decode_arrays(specs, [bytes(frame) for frame in frames])

    assert specs == [{"dtype": dtype, "shape": [2, 3, 4]}]
    assert decoded[0].dtype == array.dtype
    np.testing.assert_array_equal(decoded[0], array)


def test_encode_non_contiguous_array():
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T

    specs, frames = encode_arrays([array])
    decoded = decode_arrays(specs, [bytes(frame) for frame in frames])

    np.testing.assert_array_equal(decoded[0], array)


def test_decode_rejects_short_frame():
    with pytest.raises(WorkerError, match="needs 16"):
        decode_arrays([{"dtype": "float32", "shape": [4]}], [b"\0" * 12])


def test_encode_rejects_unsupported_dtype():
    with pytest.raises(WorkerError, match="complex64"):
        encode_arrays([np.zeros(2, dtype=np.complex64)])


@pytest.fixture
def silent_server():
    """A REP socket on loopback that receives requests and never replies."""
    context = zmq.Context()
    socket = context.socket(zmq.REP)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield f"tcp://127.0.0.1:{port}"
    socket.close(linger=0)
    context.term()


def test_client_timeout_names_node(silent_server):
    client = WorkerClient(silent_server, timeout_s=0.3, node="n7")

    started = time.monotonic()
    with pytest.raises(WorkerError, match="no reply to 'ping' within 0.3 s") as raised:
        client.ping()
    elapsed_s = time.monotonic() - started
    client.close()

    assert raised.value.node == "n7"
    assert silent_server in str(raised.value)
    assert elapsed_s < 2.0


def test_client_usable_after_timeout(silent_server):
    client = WorkerClient(silent_server, timeout_s=0.2, node="n7")

    with pytest.raises(WorkerError):
        client.ping()
    # A REQ socket that sent without receiving would raise "Operation cannot be
    # accomplished in current state"; a recreated socket times out again instead.
    with pytest.raises(WorkerError, match="no reply to 'stats'"):
        client.stats()
    client.close()


class FakeImages:
    def get(self, name):
        import docker.errors

        raise docker.errors.ImageNotFound(f"no such image: {name}")


class FakeClient:
    """A docker client stand-in whose engine has no images, or is unreachable."""

    def __init__(self, reachable=True):
        self.reachable = reachable
        self.images = FakeImages()

    def ping(self):
        if not self.reachable:
            import docker.errors

            raise docker.errors.DockerException("Error while fetching server API version")
        return True


def test_unreachable_engine_names_fix():
    from amp4ec.real.image import ensure_worker_image

    with pytest.raises(DockerError, match="Start dockerd") as raised:
        ensure_worker_image(FakeClient(reachable=False), log=lambda message: None)

    assert "DOCKER_HOST" in str(raised.value)


def test_base_image_needs_debootstrap(monkeypatch):
    from amp4ec.real import image

    monkeypatch.setattr(image.shutil, "which", lambda name: None)

    with pytest.raises(DockerError, match="debootstrap not found") as raised:
        image.ensure_base_image(FakeClient(), log=lambda message: None)

    assert "python:3.11-slim" in str(raised.value)


def test_base_image_needs_root(monkeypatch):
    from amp4ec.real import image

    monkeypatch.setattr(image.shutil, "which", lambda name: "/usr/sbin/debootstrap")
    monkeypatch.setattr(image.os, "geteuid", lambda: 1000)

    with pytest.raises(DockerError, match="needs root, and this process runs as uid 1000"):
        image.ensure_base_image(FakeClient(), log=lambda message: None)


def test_worker_tag_follows_inputs(tmp_path):
    from amp4ec.real.image import render_dockerfile, worker_image_tag

    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    tag = worker_image_tag(render_dockerfile("amp4ec-base:bookworm"), tmp_path)
    same_inputs = worker_image_tag(render_dockerfile("amp4ec-base:bookworm"), tmp_path)
    other_base = worker_image_tag(render_dockerfile("python:3.11-slim"), tmp_path)
    (tmp_path / "numpy-2.4.6-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    more_wheels = worker_image_tag(render_dockerfile("amp4ec-base:bookworm"), tmp_path)

    assert tag.startswith("amp4ec-worker:")
    assert same_inputs == tag
    assert other_base != tag
    assert more_wheels != tag


# Docker


@pytest.fixture(scope="module")
def cluster(docker_client, worker_image):
    with WorkerCluster(docker_client, CLUSTER_NODES, image=worker_image, run_id=new_test_run_id()) as running:
        yield running


@pytest.fixture(scope="module")
def exported_segment():
    """A small torch.export segment, its input and the host's output for that input."""
    torch = require_torch()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, kernel_size=3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, kernel_size=3, stride=2),
        torch.nn.ReLU(),
    ).eval()
    example = torch.randn(1, 3, 32, 32)
    program = torch.export.export(model, (example,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with torch.no_grad():
        expected = model(example).numpy()
    return buffer.getvalue(), example.numpy(), expected


@pytest.mark.docker
def test_worker_image_labelled(docker_client, worker_image):
    from amp4ec.real.image import image_info

    info = image_info(docker_client, worker_image)

    assert info["labels"].get(PROJECT_LABEL) == "amp4ec"
    assert info["torch"] == "2.13.0+cpu"
    assert info["cuda"] is None
    assert info["python"].startswith("3.11.")


@pytest.mark.docker
def test_worker_image_tag_stable(docker_client, worker_image):
    from amp4ec.real.image import ensure_worker_image

    messages = []
    tag = ensure_worker_image(docker_client, log=messages.append)

    assert tag == worker_image
    assert messages == [f"worker image {tag} is up to date"]


@pytest.mark.docker
def test_ping_reports_threads(cluster):
    for node in CLUSTER_NODES:
        reply = cluster[node.name].ping()

        assert reply["torch"] == "2.13.0+cpu"
        assert reply["threads"] == node.threads
        assert reply["node"] == node.name
        assert reply["protocol"] == 2


@pytest.mark.docker
def test_stats_show_container_limits(cluster):
    for node in CLUSTER_NODES:
        stats = cluster[node.name].stats()

        assert stats["cfs_period_us"] == CFS_PERIOD_US
        assert stats["cfs_quota_us"] == int(node.cpus * CFS_PERIOD_US)
        assert stats["memory_limit_bytes"] == node.memory_bytes
        assert 0 < stats["memory_usage_bytes"] <= node.memory_bytes
        assert stats["cpu_usage_ns"] > 0
        assert set(stats["cpu_stat"]) == {"nr_periods", "nr_throttled", "throttled_time"}
        assert stats["net_rx_bytes"] > 0
        assert stats["net_tx_bytes"] > 0


@pytest.mark.docker
def test_containers_hardened_and_labelled(cluster):
    for node in CLUSTER_NODES:
        container = cluster.container_for(node.name)
        container.reload()
        host_config = container.attrs["HostConfig"]

        assert container.labels[RUN_LABEL] == cluster.run_id
        assert container.labels[NODE_LABEL] == node.name
        assert host_config["NanoCpus"] == int(node.cpus * 1e9)
        assert host_config["Memory"] == node.memory_bytes
        assert host_config["MemorySwap"] == node.memory_bytes
        assert host_config["ReadonlyRootfs"] is True
        assert host_config["CapDrop"] == ["ALL"]
        assert not host_config.get("PortBindings")
        assert container.attrs["Config"]["User"] == "10001:10001"


@pytest.mark.docker
def test_bad_requests_get_error_replies(cluster):
    client = cluster["big"]
    bad_requests = [
        ({"op": "fly"}, [], "unknown op 'fly'"),
        ({"op": "run", "segment": "missing", "inputs": []}, [], "segment 'missing' is not loaded"),
        ({"op": "load", "segment": "s"}, [b"not a zip file"], "cannot load segment 's'"),
        ({"op": "load"}, [b""], "'segment' must be a non-empty string"),
    ]
    for header, frames, expected in bad_requests:
        with pytest.raises(WorkerError, match=expected):
            client.request(header, frames)

    # A frame 0 that is not JSON at all.
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(client.address)
    socket.send_multipart([b"\xff not json"])
    assert socket.poll(5000)
    reply = json.loads(socket.recv_multipart()[0])
    socket.close()

    assert reply["ok"] is False
    assert "not a UTF-8 JSON header" in reply["error"]
    assert client.ping()["ok"] is True


@pytest.mark.docker
@pytest.mark.torch
def test_run_matches_host_output(cluster, exported_segment):
    blob, example, expected = exported_segment
    for node in CLUSTER_NODES:
        client = cluster[node.name]
        loaded = client.load("s0", blob)

        outputs, timing = client.run("s0", [example])

        assert loaded["load_ms"] > 0
        assert len(outputs) == 1
        assert outputs[0].shape == expected.shape
        np.testing.assert_allclose(outputs[0], expected, rtol=0, atol=1e-5)
        assert timing["wall_ms"] > 0
        assert timing["cpu_ms"] >= 0


@pytest.mark.docker
@pytest.mark.torch
def test_run_rejects_wrong_input_size(cluster, exported_segment):
    blob, example, _ = exported_segment
    client = cluster["small"]
    client.load("s0", blob)
    header = {"op": "run", "segment": "s0", "inputs": [{"dtype": "float32", "shape": [1, 3, 32, 32]}]}

    with pytest.raises(WorkerError, match="frame has 8 bytes"):
        client.request(header, [b"\0" * 8])
    assert client.ping()["ok"] is True


@pytest.mark.docker
@pytest.mark.torch
def test_profile_returns_repeats(cluster, exported_segment):
    blob, example, _ = exported_segment
    client = cluster["small"]
    client.load("s1", blob)

    profile = client.profile("s1", [example], warmup=2, repeats=7, gap_ms=10)

    assert len(profile["wall_ms"]) == 7
    assert len(profile["cpu_ms"]) == 7
    assert all(value > 0 for value in profile["wall_ms"])
    assert profile["peak_rss_bytes"] > 0
    periods_before = profile["cpu_stat_before"]["nr_periods"]
    periods_after = profile["cpu_stat_after"]["nr_periods"]
    assert periods_after >= periods_before
    assert profile["cpu_usage_ns_after"] > profile["cpu_usage_ns_before"]


@pytest.mark.docker
@pytest.mark.torch
def test_forwards_reuse_their_memory(cluster):
    """After the warm-up, forwards of MobileNetV2's features.2 (4.8 MB activations) map in almost no memory again.

    glibc alone returns some of those buffers to the kernel after a forward, so the next
    forward faults them in again. The containers' allocator settings (WORKER_MALLOC_ENV)
    keep them mapped.
    """
    require_torch()
    from amp4ec.torchgraph import example_inputs, load_model, trace_model

    traced = trace_model(load_model("mobilenet_v2"), "mobilenet_v2", granularity="block")
    unit = [u.name for u in traced.graph.units].index("features.2")
    inputs = [t.numpy() for t in example_inputs(traced.graph, unit, seed=0)]
    client = cluster["big"]
    client.load("wide", traced.export_segment(unit, unit + 1))

    profile = client.profile("wide", inputs, warmup=3, repeats=20, gap_ms=0)

    # Without the settings this run took about 52,000 faults, over 2,000 per forward. With
    # them it took at most one activation's pages, once.
    activation_pages = 96 * 112 * 112 * 4 // 4096
    assert profile["minor_faults"] < 5 * activation_pages


@pytest.mark.docker
@pytest.mark.torch
def test_unload_drops_segment(cluster, exported_segment):
    blob, example, _ = exported_segment
    client = cluster["big"]
    client.load("gone", blob)

    assert client.unload("gone") is True
    assert client.unload("gone") is False
    with pytest.raises(WorkerError, match="segment 'gone' is not loaded"):
        client.run("gone", [example])


@pytest.mark.docker
def test_killed_worker_raises_worker_error(docker_client, worker_image):
    nodes = [NodeSpec("victim", cpus=0.5, memory_bytes=400 * MiB)]
    with WorkerCluster(
        docker_client, nodes, image=worker_image, run_id=new_test_run_id(), request_timeout_s=2.0
    ) as running:
        client = running["victim"]
        assert client.ping()["ok"] is True
        running.container_for("victim").kill()

        started = time.monotonic()
        # Usually the closed connection ends the request at once. When the kill's TCP close does not
        # reach the host before the container's network goes away, the 2 s timeout ends it.
        with pytest.raises(WorkerError, match="closed its connection while 'stats' was in flight|no reply to 'stats' within 2 s") as raised:
            client.stats()
        elapsed_s = time.monotonic() - started

        assert raised.value.node == "victim"
        assert elapsed_s < 5.0
        assert oom_killed(running.container_for("victim")) is False


@pytest.mark.docker
def test_close_removes_everything(docker_client, worker_image):
    run_id = new_test_run_id()
    running = WorkerCluster(docker_client, CLUSTER_NODES[:1], image=worker_image, run_id=run_id)
    running.start()
    before = labelled_resources(docker_client, run_id_prefix=run_id)

    running.close()
    running.close()
    after = labelled_resources(docker_client, run_id_prefix=run_id)

    assert len(before["containers"]) == 1
    assert before["networks"] == [f"amp4ec-{run_id}"]
    assert after == {"containers": [], "networks": []}


@pytest.mark.docker
def test_exception_inside_with_cleans_up(docker_client, worker_image):
    run_id = new_test_run_id()

    with pytest.raises(RuntimeError, match="boom"):
        with WorkerCluster(docker_client, CLUSTER_NODES[:1], image=worker_image, run_id=run_id):
            raise RuntimeError("boom")

    assert labelled_resources(docker_client, run_id_prefix=run_id) == {"containers": [], "networks": []}


@pytest.mark.docker
def test_low_memory_node_fails_clearly(docker_client, worker_image):
    run_id = new_test_run_id()
    nodes = [NodeSpec("tiny", cpus=0.5, memory_bytes=64 * MiB)]

    with pytest.raises(DockerError) as raised:
        with WorkerCluster(docker_client, nodes, image=worker_image, run_id=run_id, startup_timeout_s=60):
            pass

    message = str(raised.value)
    assert "node tiny" in message
    assert "memory limit 67108864 bytes = 64 MiB" in message
    assert "OOM-killed" in message
    assert labelled_resources(docker_client, run_id_prefix=run_id) == {"containers": [], "networks": []}


@pytest.mark.docker
def test_ctrl_c_during_routine_close_stops_after_it(docker_client, worker_image, monkeypatch):
    """A Ctrl-C that lands while a cluster closes as planned (a memory probe's end) must still stop the command."""
    from amp4ec.real import containers as containers_module

    run_id = new_test_run_id()
    cluster = WorkerCluster(docker_client, [NodeSpec("only", cpus=0.5, memory_bytes=400 * MiB)], image=worker_image, run_id=run_id)
    cluster.start()
    remove = containers_module.remove_container

    def remove_after_ctrl_c(container, name):
        os.kill(os.getpid(), signal.SIGINT)
        remove(container, name)

    monkeypatch.setattr(containers_module, "remove_container", remove_after_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        cluster.close()
    assert labelled_resources(docker_client, run_id_prefix=run_id) == {"containers": [], "networks": []}


@pytest.mark.docker
def test_oversubscription_warns(docker_client, worker_image):
    cores = host_cpu_count(docker_client)
    nodes = [NodeSpec("greedy", cpus=float(cores), memory_bytes=400 * MiB)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with WorkerCluster(docker_client, nodes, image=worker_image, run_id=new_test_run_id()) as running:
            assert running["greedy"].ping()["ok"] is True

    assert any(issubclass(warning.category, OversubscriptionWarning) for warning in caught)


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([], "at least one node"),
        ([NodeSpec("bad name", 0.5, 400 * MiB)], "node name 'bad name' is invalid"),
        ([NodeSpec("a", 0.5, 400 * MiB), NodeSpec("a", 0.5, 400 * MiB)], "appears twice"),
        ([NodeSpec("a", 0.0, 400 * MiB)], "cpus=0.0 must be a positive number"),
        ([NodeSpec("a", 0.5, 1000)], "memory_bytes=1000 must be an integer of at least"),
        ([NodeSpec("a", 0.5, 400 * MiB, threads=0)], "threads=0 must be an integer >= 1"),
    ],
)
def test_cluster_rejects_invalid_nodes(nodes, expected):
    with pytest.raises(UsageError, match=expected):
        WorkerCluster(client=None, nodes=nodes, image="unused")


def test_threads_beyond_cores_warn():
    """A node with more torch threads than its engine's cores is warned about before any container starts.

    Each engine's CPU limits are compared with its own cores.
    """

    class TwoCoreEngine:
        def info(self):
            return {"NCPU": 2}

    remote = "unix:///run/other-engine.sock"
    nodes = [
        NodeSpec("fits", cpus=0.5, memory_bytes=400 * MiB, threads=2),
        NodeSpec("crowded", cpus=0.5, memory_bytes=400 * MiB, threads=64),
        NodeSpec("elsewhere", cpus=1.5, memory_bytes=400 * MiB, threads=1, engine=remote),
    ]
    cluster = WorkerCluster(TwoCoreEngine(), nodes, image="unused", run_id=new_test_run_id())
    # Each engine's CPUs are compared with its own cores: 1.0 and 1.5 CPUs on two 2-core hosts do not warn.
    cluster.engines._clients[remote] = TwoCoreEngine()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cluster._warn_oversubscription()
    assert len(cluster.host_warnings) == 1
    assert "node crowded runs 64 torch threads on the Docker host with 2 cores" in cluster.host_warnings[0]
    assert [str(warning.message) for warning in caught] == cluster.host_warnings
