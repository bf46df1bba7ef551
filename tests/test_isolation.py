"""Worker isolation, read from running containers: no ports, non-root, read-only, no capabilities.

With shaping on, only the short-lived shaper container gets NET_ADMIN; the worker gets none.
"""

from __future__ import annotations

import pytest

from amp4ec.real.containers import (
    PROJECT_LABEL,
    RUN_LABEL,
    WORKER_USER,
    NodeSpec,
    WorkerCluster,
    isolation_problems,
    remove_container,
)
from amp4ec.real.shaping import SHAPER_LABEL, LinkShape

from conftest import new_test_run_id

pytestmark = pytest.mark.docker

NODE = NodeSpec("iso", 0.5, 512 * 2**20)


def check_host_config(container) -> None:
    container.reload()
    host_config = container.attrs["HostConfig"]

    assert host_config["ReadonlyRootfs"] is True
    assert host_config["CapDrop"] == ["ALL"]
    assert not host_config.get("CapAdd")
    assert host_config["Privileged"] is False
    assert "no-new-privileges" in host_config["SecurityOpt"]
    assert not host_config.get("PortBindings")
    assert not (container.attrs["NetworkSettings"].get("Ports") or {}).get("5555/tcp")
    assert container.attrs["Config"]["User"] == WORKER_USER


def check_process(container) -> None:
    uid = WORKER_USER.split(":")[0]
    status = container.exec_run(["cat", "/proc/1/status"]).output.decode()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    cap_line = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    write = container.exec_run(["/bin/sh", "-c", "echo x > /opt/amp4ec/probe"])

    assert uid_line.split()[1:] == [uid] * 4
    assert int(cap_line.split()[1], 16) == 0
    assert write.exit_code != 0
    assert b"Read-only file system" in write.output


def test_unshaped_worker_isolated(docker_client, worker_image):
    with WorkerCluster(docker_client, [NODE], image=worker_image, run_id=new_test_run_id()) as cluster:
        container = cluster.container_for(NODE.name)

        check_host_config(container)
        check_process(container)
        assert isolation_problems(container) == []


def test_shaped_worker_stays_isolated(docker_client, worker_image):
    shapes = {NODE.name: LinkShape(NODE.name, 100e6, 0.0)}
    with WorkerCluster(docker_client, [NODE], image=worker_image, run_id=new_test_run_id(), shapes=shapes) as cluster:
        container = cluster.container_for(NODE.name)
        shaper = cluster.shaping[NODE.name].shaper
        qdiscs = container.exec_run(["tc", "qdisc", "show", "dev", "eth0"]).output.decode()

        check_host_config(container)
        check_process(container)
        assert isolation_problems(container) == []
        assert "tbf" in qdiscs
        # Only the shaper, which exits once the qdiscs are set, had NET_ADMIN.
        assert shaper["CapAdd"] == ["NET_ADMIN"]
        assert shaper["CapDrop"] == ["ALL"]
        assert shaper["Privileged"] is False
        assert shaper["ReadonlyRootfs"] is True
        assert shaper["NetworkMode"] == f"container:{container.id}"
        assert shaper["User"] == "0"
        assert not docker_client.containers.list(all=True, filters={"label": f"{SHAPER_LABEL}={container.name}"})


def test_problems_listed_for_plain_container(docker_client, worker_image):
    run_id = new_test_run_id()
    container = docker_client.containers.run(
        worker_image,
        ["sleep", "60"],
        detach=True,
        user="0",
        ports={"5555/tcp": ("127.0.0.1", None)},
        labels={PROJECT_LABEL: "amp4ec", RUN_LABEL: run_id},
    )
    try:
        problems = isolation_problems(container)
    finally:
        remove_container(container)

    assert any(p.startswith("ReadonlyRootfs") for p in problems)
    assert any(p.startswith("CapDrop") for p in problems)
    assert any(p.startswith("User") for p in problems)
    assert any("no-new-privileges" in p for p in problems)
    assert any(p.startswith("PortBindings") for p in problems)
