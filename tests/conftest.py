"""Shared pytest fixtures: Docker and torch availability, the worker image, test run ids.

A test that needs Docker or torch skips when it is missing, unless AMP4EC_REQUIRE_DOCKER=1 or
AMP4EC_REQUIRE_TORCH=1 is set, in which case it fails (CI sets them, so a missing engine
cannot pass silently).
"""

from __future__ import annotations

import importlib
import itertools
import os

import pytest

# Run ids of clusters started by tests begin with this prefix, so the session finalizer can
# remove what a failed test left without touching other runs on the machine.
TEST_RUN_PREFIX = f"pytest{os.getpid()}-"
_run_counter = itertools.count()

DOCKER_SKIP_MESSAGE = "Docker engine not reachable: start dockerd to run this test"


def pytest_configure(config):
    config.addinivalue_line("markers", "docker: needs a running Docker engine and the worker image")
    config.addinivalue_line("markers", "torch: needs torch on the host")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(message: str, require_env: str) -> None:
    if env_flag(require_env):
        pytest.fail(f"{message} ({require_env}=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(message)


def require_torch():
    """Return the torch module, or skip the test (fail when AMP4EC_REQUIRE_TORCH=1)."""
    try:
        return importlib.import_module("torch")
    except ImportError as error:
        skip_or_fail(f"torch not importable ({error}): install amp4ec[torch] to run this test", "AMP4EC_REQUIRE_TORCH")


def new_test_run_id() -> str:
    """Return a run id that the session finalizer recognises as a test run."""
    return f"{TEST_RUN_PREFIX}{next(_run_counter)}"


_docker_state: dict = {}


def connect_docker():
    """Return a docker client, or None with the reason stored, trying only once per session."""
    if "client" not in _docker_state:
        try:
            from amp4ec.errors import DockerError
            from amp4ec.real.containers import docker_client
        except ImportError as error:
            _docker_state.update(client=None, reason=f"docker SDK or pyzmq missing ({error})")
            return None
        try:
            _docker_state.update(client=docker_client(), reason=None)
        except DockerError as error:
            _docker_state.update(client=None, reason=str(error))
    return _docker_state["client"]


@pytest.fixture(scope="session")
def docker_client():
    """A docker SDK client; skips the test (fails when AMP4EC_REQUIRE_DOCKER=1) without an engine."""
    client = connect_docker()
    if client is None:
        skip_or_fail(f"{DOCKER_SKIP_MESSAGE} ({_docker_state['reason']})", "AMP4EC_REQUIRE_DOCKER")
    return client


@pytest.fixture(scope="session")
def worker_image(docker_client):
    """The tag of the worker image, built on first use (several minutes without a cache)."""
    from amp4ec.real.image import ensure_worker_image

    return ensure_worker_image(docker_client, log=lambda message: print(f"[worker image] {message}"))


@pytest.fixture
def run_id():
    return new_test_run_id()


@pytest.fixture(scope="session", autouse=True)
def remove_test_containers():
    """Remove containers and networks of test runs that a failed test left behind."""
    yield
    if _docker_state.get("client") is None:
        return
    from amp4ec.real.containers import remove_labelled

    counts = remove_labelled(_docker_state["client"], run_id_prefix=TEST_RUN_PREFIX)
    if counts["containers"] or counts["networks"]:
        print(
            f"\nremoved leftovers of test runs: {counts['containers']} containers, "
            f"{counts['networks']} networks"
        )
