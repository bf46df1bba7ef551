"""Docker engines of a run: the default one, and others that node groups name.

A node's container runs on the engine that its scenario entry names in ``engine``, a name
from ``[engines]`` or a URL. Nodes without one run on the default engine of DOCKER_HOST.
How the coordinator reaches a worker depends on its engine:

- default engine: at the container's address on the run's bridge network, as before, with
  no published port;
- any other engine: the worker port is published on that engine's host, bound to
  127.0.0.1, and the coordinator connects to 127.0.0.1:<published port>. A container of
  another engine cannot join the default engine's bridge network, and a loopback binding
  keeps the port closed to other machines.

NOTE: the loopback binding works for engines on the coordinator's own machine (a second
dockerd, say). An engine on another machine needs the coordinator to reach that machine's
127.0.0.1, for example through an SSH tunnel of the published port; the run does not set
that up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from amp4ec.errors import DockerError

log = logging.getLogger(__name__)

DEFAULT_ENGINE_URL = "unix:///var/run/docker.sock"
# Bytes per read while streaming an image from one engine to another.
IMAGE_CHUNK_BYTES = 4 * 2**20


def default_engine_url() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_ENGINE_URL


def is_default_engine(url: str | None) -> bool:
    return url is None or url == default_engine_url()


def engine_client(url: str, *, timeout_s: float = 120.0):
    """Return a docker SDK client of the engine at ``url``; raise DockerError if it does not reply."""
    import docker
    import requests.exceptions

    try:
        client = docker.DockerClient(base_url=url, timeout=int(timeout_s))
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        raise DockerError(
            f"Docker engine not reachable at {url} ({error}). Start that engine, or correct the "
            "node's engine field or the [engines] table of the scenario."
        ) from error
    return client


def copy_image(source, target, tag: str, *, log: Callable[[str], None] = print) -> None:
    """Copy image ``tag`` from engine ``source`` to engine ``target`` unless it is there already.

    The image streams as `docker save | docker load` through the two clients, so no registry
    is needed. Raises DockerError when the source lacks the image or the load fails.
    """
    import docker.errors

    try:
        target.images.get(tag)
        return
    except docker.errors.ImageNotFound:
        pass
    try:
        image = source.images.get(tag)
    except docker.errors.ImageNotFound as error:
        raise DockerError(f"image {tag} is missing on the default engine, so it cannot be copied to another engine") from error
    started = time.monotonic()
    log(f"copying image {tag} to engine {target.api.base_url}")
    try:
        target.images.load(image.save(chunk_size=IMAGE_CHUNK_BYTES, named=True))
        target.images.get(tag)
    except docker.errors.DockerException as error:
        raise DockerError(f"loading image {tag} into engine {target.api.base_url} failed: {error}") from error
    log(f"copied image {tag} in {time.monotonic() - started:.1f} s")


class EngineClients:
    """Docker clients by engine URL, each opened once; None stands for the default engine."""

    def __init__(self, default_client):
        self.default = default_client
        self._clients: dict[str, object] = {}

    def get(self, url: str | None):
        if is_default_engine(url):
            return self.default
        if url not in self._clients:
            self._clients[url] = engine_client(url)
        return self._clients[url]

    def others(self) -> dict[str, object]:
        """Return the clients of the non-default engines opened so far, by URL."""
        return dict(self._clients)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
