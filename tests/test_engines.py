"""Several Docker engines: scenario fields, and one cluster across two engines on this machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from amp4ec.errors import UsageError
from amp4ec.scenario import parse_scenario

from conftest import new_test_run_id, skip_or_fail

SECOND_SOCKET_NAME = "docker.sock"
# The second engine's networks come from this pool, which must not overlap the default
# engine's (172.17.0.0/16 and up), or the host would route one subnet to two bridges.
SECOND_ADDRESS_POOL = "base=10.213.0.0/16,size=24"
# The second engine's default bridge, created by the test. `dockerd --bridge=none` would
# delete the host's docker0 at startup (seen with dockerd 20.10.24), breaking the default engine.
SECOND_BRIDGE_ADDRESS = "10.214.0.1/24"
ENGINE_START_TIMEOUT_S = 60.0
ENGINE_STOP_TIMEOUT_S = 30.0

NODES = [{"name": "a", "cpus": 0.5, "memory_mb": 512}]


def test_engine_name_resolves_to_url():
    scenario = parse_scenario(
        {
            "name": "two engines",
            "engines": {"b": "unix:///var/run/docker-b.sock"},
            "nodes": [*NODES, {"name": "c", "cpus": 0.5, "memory_mb": 512, "engine": "b"}],
            "node_groups": [{"prefix": "g", "count": 2, "engine": "b", "profiles": [{"cpus": 0.5, "memory_mb": 512}]}],
        }
    )

    assert scenario.engine_url("a") is None
    assert scenario.engine_url("c") == "unix:///var/run/docker-b.sock"
    assert scenario.engine_url("g0") == "unix:///var/run/docker-b.sock"
    assert scenario.engine_url("g1") == "unix:///var/run/docker-b.sock"


def test_engine_url_accepted_without_table():
    scenario = parse_scenario(
        {"name": "url", "nodes": [{"name": "a", "cpus": 0.5, "memory_mb": 512, "engine": "tcp://127.0.0.1:2375"}]}
    )

    assert scenario.engine_url("a") == "tcp://127.0.0.1:2375"


def test_unknown_engine_name_rejected():
    with pytest.raises(UsageError, match="engine 'b' is neither a name in"):
        parse_scenario({"name": "bad", "nodes": [{"name": "a", "cpus": 0.5, "memory_mb": 512, "engine": "b"}]})


def test_engine_table_needs_urls():
    with pytest.raises(UsageError, match="is not a URL"):
        parse_scenario({"name": "bad", "engines": {"b": "/var/run/docker-b.sock"}, "nodes": NODES})


def test_resolved_scenario_parses_again():
    scenario = parse_scenario(
        {"name": "round trip", "engines": {"b": "unix:///tmp/b.sock"}, "nodes": [{**NODES[0], "engine": "b"}]}
    )

    assert parse_scenario(scenario.resolved()).engine_url("a") == "unix:///tmp/b.sock"


def test_cluster_rejects_engine_without_scheme():
    from amp4ec.real.containers import NodeSpec, check_node_specs

    with pytest.raises(UsageError, match="must be a Docker engine URL"):
        check_node_specs([NodeSpec("a", 0.5, 512 * 2**20, 1, "/var/run/docker-b.sock")])


# Two engines


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]


@pytest.fixture(scope="module")
def second_engine(docker_client):
    """A second dockerd with its own socket, data root, exec root and pidfile; yields its URL.

    It stops by its PID at the end, and its folder is removed unless something is still
    mounted there.
    """
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        skip_or_fail("dockerd not found: install docker.io to run the two-engine test", "AMP4EC_REQUIRE_DOCKER")
    if os.geteuid() != 0:
        skip_or_fail("starting a second dockerd needs root", "AMP4EC_REQUIRE_DOCKER")
    # A short folder name keeps the socket path under the 108-byte limit of unix sockets.
    root = Path(subprocess.check_output(["mktemp", "-d", "/tmp/amp4ec-engine-XXXXXX"], text=True).strip())
    socket_path = root / SECOND_SOCKET_NAME
    url = f"unix://{socket_path}"
    # Interface names have at most 15 characters.
    bridge = f"amp4ecb-{root.name[-6:]}"
    create_bridge(bridge)
    command = [
        dockerd,
        f"--host={url}",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'dockerd.pid'}",
        f"--bridge={bridge}",
        # The default engine owns the host's iptables rules. Published ports of this engine
        # go through its userland proxy instead.
        "--iptables=false",
        f"--default-address-pool={SECOND_ADDRESS_POOL}",
    ]
    log_file = open(root / "dockerd.log", "wb")
    try:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError:
        log_file.close()
        delete_bridge(bridge)
        raise
    try:
        wait_for_engine(url, process, root)
        yield url
    finally:
        stop_engine(process)
        log_file.close()
        delete_bridge(bridge)
        left = mounts_under(root)
        if left:
            print(f"\nsecond engine: {root} kept because these are still mounted: {', '.join(left)}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def create_bridge(name: str) -> None:
    for command in (
        ["ip", "link", "add", "name", name, "type", "bridge"],
        ["ip", "addr", "add", SECOND_BRIDGE_ADDRESS, "dev", name],
        ["ip", "link", "set", name, "up"],
    ):
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            delete_bridge(name)
            pytest.fail(f"`{' '.join(command)}` failed: {completed.stderr.strip()}")


def delete_bridge(name: str) -> None:
    subprocess.run(["ip", "link", "delete", name], capture_output=True)


def wait_for_engine(url: str, process: subprocess.Popen, root: Path) -> None:
    from amp4ec.errors import DockerError
    from amp4ec.real.engines import engine_client

    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"the second dockerd exited with status {process.returncode}:\n{log_tail(root)}")
        try:
            engine_client(url, timeout_s=5.0).close()
            return
        except DockerError:
            if time.monotonic() > deadline:
                pytest.fail(f"the second dockerd did not reply within {ENGINE_START_TIMEOUT_S:g} s:\n{log_tail(root)}")
            time.sleep(0.5)


def stop_engine(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=ENGINE_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=ENGINE_STOP_TIMEOUT_S)


def log_tail(root: Path, lines: int = 30) -> str:
    path = root / "dockerd.log"
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.docker
@pytest.mark.slow
def test_cluster_spans_two_engines(docker_client, worker_image, second_engine):
    from amp4ec.real.containers import NodeSpec, WorkerCluster, isolation_problems, labelled_resources
    from amp4ec.real.engines import engine_client

    run_id = new_test_run_id()
    nodes = [NodeSpec("local", 0.5, 512 * 2**20), NodeSpec("second", 0.5, 512 * 2**20, 1, second_engine)]
    engine_b = engine_client(second_engine)
    try:
        with WorkerCluster(docker_client, nodes, image=worker_image, run_id=run_id) as cluster:
            local = cluster.container_for("local")
            second = cluster.container_for("second")

            assert cluster["local"].ping()["node"] == "local"
            assert cluster["second"].ping()["node"] == "second"
            assert cluster.addresses["second"].startswith("tcp://127.0.0.1:")
            assert not cluster.addresses["local"].startswith("tcp://127.0.0.1:")
            assert [c.id for c in engine_b.containers.list(filters={"label": f"amp4ec.run={run_id}"})] == [second.id]
            assert second.id not in [c.id for c in docker_client.containers.list(all=True)]
            assert isolation_problems(local) == []
            assert isolation_problems(second, published=True) == []
            assert second.attrs["HostConfig"]["PortBindings"]["5555/tcp"][0]["HostIp"] == "127.0.0.1"

        assert labelled_resources(docker_client, run_id) == {"containers": [], "networks": []}
        # The default engine's bridge survives the second engine.
        assert docker_client.containers.run(
            worker_image, ["true"], remove=True, labels={"amp4ec.project": "amp4ec", "amp4ec.run": run_id}
        ) == b""
        assert labelled_resources(engine_b, run_id) == {"containers": [], "networks": []}
    finally:
        engine_b.close()
