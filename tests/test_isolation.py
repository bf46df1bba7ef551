"""Worker isolation, read from running containers: no ports, non-root, read-only, no capabilities."""

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
from amp4ec.real.shaping import LinkShape

from conftest import new_test_run_id

pytestmark = pytest.mark.docker

NODE = NodeSpec("iso", 0.5, 512 * 2**20)


def check_host_config(container, *, cap_add: list[str]) -> None:
    container.reload()
    host_config = container.attrs["HostConfig"]

    assert host_config["ReadonlyRootfs"] is True
    assert host_config["CapDrop"] == ["ALL"]
    assert list(host_config.get("CapAdd") or []) == cap_add
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

        check_host_config(container, cap_add=[])
        check_process(container)
        assert isolation_problems(container, net_admin=False) == []


def test_shaped_worker_gets_net_admin_only(docker_client, worker_image):
    shapes = {NODE.name: LinkShape(NODE.name, 100e6, 0.0)}
    with WorkerCluster(docker_client, [NODE], image=worker_image, run_id=new_test_run_id(), shapes=shapes) as cluster:
        container = cluster.container_for(NODE.name)

        check_host_config(container, cap_add=["NET_ADMIN"])
        # The worker process itself keeps no effective capability: it runs as uid 10001.
        check_process(container)
        assert isolation_problems(container, net_admin=True) == []


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
        problems = isolation_problems(container, net_admin=False)
    finally:
        remove_container(container)

    assert any(p.startswith("ReadonlyRootfs") for p in problems)
    assert any(p.startswith("CapDrop") for p in problems)
    assert any(p.startswith("User") for p in problems)
    assert any("no-new-privileges" in p for p in problems)
    assert any(p.startswith("PortBindings") for p in problems)
