"""Replay refuses nodes larger than the Docker host before any container starts."""

from __future__ import annotations

import pytest

from amp4ec.errors import UsageError
from amp4ec.real.replay import check_fits_docker_host
from amp4ec.scenario import parse_scenario

HOST_INFO = {"NCPU": 2, "MemTotal": 4 * 2**30}


def scenario(nodes: list[dict], engines: dict | None = None):
    return parse_scenario({"name": "host", "nodes": nodes, "engines": engines or {}})


def test_node_within_the_host_passes():
    check_fits_docker_host(scenario([{"name": "a", "cpus": 2, "memory_mb": 4096}]), HOST_INFO)


def test_node_with_more_cpus_than_the_host_names_the_field():
    with pytest.raises(UsageError) as raised:
        check_fits_docker_host(scenario([{"name": "a", "cpus": 1, "memory_mb": 512}, {"name": "b", "cpus": 3, "memory_mb": 512}]), HOST_INFO)
    assert raised.value.field == "nodes[1].cpus"
    assert "2 cores" in str(raised.value)


def test_node_with_more_memory_than_the_host_names_the_field():
    with pytest.raises(UsageError) as raised:
        check_fits_docker_host(scenario([{"name": "a", "cpus": 1, "memory_mb": 8192}]), HOST_INFO)
    assert raised.value.field == "nodes[0].memory_mb"


def test_node_on_another_engine_is_not_checked_against_this_host():
    nodes = [{"name": "a", "cpus": 4, "memory_mb": 512, "engine": "big"}]
    check_fits_docker_host(scenario(nodes, {"big": "unix:///var/run/docker-big.sock"}), HOST_INFO)
