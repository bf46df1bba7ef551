"""Worker containers of one run: a labelled bridge network and one limited container per node.

Every container and network carries the labels amp4ec.project=amp4ec and amp4ec.run=<run
id> (containers also amp4ec.node=<name>), so `remove_labelled` finds what a crashed run left.
Workers on the default engine publish no ports. The host reaches them at their IP address
on the run's bridge network, which the Docker API reports, so traffic stays on networks the
project created. Workers on another engine (see engines.py) publish their port on that
engine's 127.0.0.1 only.

Workers run as uid 10001 on a read-only root filesystem with every capability dropped,
whether or not the run shapes links: tc runs in a separate shaper container (shaping.py).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from amp4ec.errors import DockerError, OversubscriptionWarning, UsageError, WorkerError
from amp4ec.real.client import WorkerClient

log = logging.getLogger(__name__)

PROJECT_LABEL = "amp4ec.project"
PROJECT_LABEL_VALUE = "amp4ec"
RUN_LABEL = "amp4ec.run"
NODE_LABEL = "amp4ec.node"
# The coordinator that owns a run, as "<boot id>:<pid>", so `amp4ec clean` can tell a
# run whose process died from one that is still going.
OWNER_LABEL = "amp4ec.owner"
ENGINE_FIX = (
    "Start dockerd (for example `dockerd &`, then wait for /var/run/docker.sock) "
    "or set DOCKER_HOST to a running engine."
)

WORKER_PORT = 5555
WORKER_USER = "10001:10001"
# CPU-only torch 2.13 needs about 220 MB resident after import (measured in the worker
# image); a lower memory limit gets the worker OOM-killed at startup.
TORCH_RUNTIME_BYTES = 220 * 2**20
# Docker rejects memory limits below 6 MiB.
DOCKER_MIN_MEMORY_BYTES = 6 * 2**20
# /tmp is the only writable path in the read-only root filesystem. Its pages count against
# the container's memory limit only when something writes there.
TMPFS_OPTIONS = "rw,nosuid,nodev,size=64m"
# glibc's allocator returns large freed buffers to the kernel, so each forward of a unit with
# large activations faults its memory in again. On the shared 2-core VM those faults made the
# back-to-back CPU time of MobileNetV2's features.2 range from 1.2 to 5.2 ms across containers.
# These settings serve buffers up to 32 MiB (the 64-bit maximum in mallopt(3)) from the heap and
# keep the heap mapped, so the same experiment read 1.1 to 2.0 ms, mostly 1.1 to 1.3.
# The cost is memory, since a worker keeps what it freed. features.2's peak rose from 339 to
# 348 MB. A calibration worker loads every unit in turn and peaked up to 39 MiB higher with these
# settings than without (medium's features.2: 363 to 400 MiB).
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
# Summed CPU limits above this share of the engine's cores oversubscribe the machine, and
# measured latencies then include waiting for a core.
OVERSUBSCRIPTION_SHARE = 0.9
# How long a worker that closed its connection may take to show as stopped in the engine.
STOP_REPORT_S = 5.0

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class NodeSpec:
    """One worker container: name, CPU limit (cores), memory limit (bytes), torch threads,
    and the URL of its Docker engine (None: the default engine)."""

    name: str
    cpus: float
    memory_bytes: int
    threads: int = 1
    engine: str | None = None


def docker_client(*, timeout_s: float = 120.0):
    """Return a docker SDK client for the engine in the environment (DOCKER_HOST or the socket).

    Raises DockerError with the fix when the engine is unreachable or the SDK is missing.
    """
    try:
        import docker
    except ImportError as error:
        raise DockerError(
            "the docker SDK is not installed; install amp4ec with the docker extra: "
            "pip install 'amp4ec[docker]'"
        ) from error
    import requests.exceptions

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=int(timeout_s))
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        raise DockerError(f"Docker engine not reachable at {where} ({error}). {ENGINE_FIX}") from error
    return client


def oom_killed(container) -> bool:
    """Return whether the kernel OOM-killed the container's process (from the container state)."""
    import docker.errors

    try:
        container.reload()
    except docker.errors.NotFound:
        return False
    return bool(container.attrs.get("State", {}).get("OOMKilled"))


def stopped_state(container, started_at: str | None = None) -> str | None:
    """Return how the container stopped ("exited with status 137", "was removed"), or None while it runs.

    With ``started_at``, the container's start time when its worker was ready, a container running
    again since a restart counts as stopped too ("was restarted"): its worker lost what it had loaded.
    """
    import docker.errors

    try:
        container.reload()
    except docker.errors.NotFound:
        return "was removed"
    state = container.attrs.get("State", {})
    if state.get("Running"):
        if started_at is not None and state.get("StartedAt") != started_at:
            return "was restarted, and its worker lost what it had loaded"
        return None
    return f"exited with status {state.get('ExitCode')}"


def new_run_id(prefix: str = "run") -> str:
    """Return a run id such as run-20250101-120000-3f2a, unique enough for one machine."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def host_cpu_count(client) -> int:
    try:
        return int(client.info()["NCPU"])
    except Exception:  # the engine's count is only a better guess than the local one
        return os.cpu_count() or 1


def check_node_specs(nodes: Sequence) -> None:
    if not nodes:
        raise UsageError("a worker cluster needs at least one node", field="nodes")
    seen = set()
    for node in nodes:
        name = getattr(node, "name", None)
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise UsageError(
                f"node name {name!r} is invalid; use 1 to 63 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit",
                field="nodes.name",
            )
        if name in seen:
            raise UsageError(f"node name {name!r} appears twice; node names must be unique", field="nodes.name")
        seen.add(name)
        cpus = node.cpus
        if not isinstance(cpus, (int, float)) or isinstance(cpus, bool) or not cpus > 0:
            raise UsageError(f"node {name}: cpus={cpus!r} must be a positive number", field="nodes.cpus")
        if isinstance(node.memory_bytes, bool):
            raise UsageError(f"node {name}: memory_bytes={node.memory_bytes!r} must be an integer", field="nodes.memory_bytes")
        if not isinstance(node.memory_bytes, int) or node.memory_bytes < DOCKER_MIN_MEMORY_BYTES:
            raise UsageError(
                f"node {name}: memory_bytes={node.memory_bytes!r} must be an integer of at least "
                f"{DOCKER_MIN_MEMORY_BYTES} (Docker's minimum)",
                field="nodes.memory_bytes",
            )
        engine = getattr(node, "engine", None)
        if engine is not None and (not isinstance(engine, str) or "://" not in engine):
            raise UsageError(
                f"node {name}: engine={engine!r} must be a Docker engine URL such as unix:///var/run/docker-b.sock",
                field="nodes.engine",
            )
        if not isinstance(node.threads, int) or node.threads < 1:
            raise UsageError(f"node {name}: threads={node.threads!r} must be an integer >= 1", field="nodes.threads")


class WorkerCluster:
    """The worker containers of one run, started on `start()` or on entering a `with` block.

    While the cluster is open it installs SIGINT and SIGTERM handlers (when created in the
    main thread) that remove the containers and the network, then raise KeyboardInterrupt or
    SystemExit(143). It also removes them on any exception inside the `with` block and at
    interpreter exit. `close()` is idempotent.
    """

    def __init__(
        self,
        client,
        nodes: Sequence,
        *,
        image: str,
        run_id: str | None = None,
        startup_timeout_s: float = 120.0,
        request_timeout_s: float = 30.0,
        labels: dict[str, str] | None = None,
        handle_signals: bool = True,
        shapes: Mapping[str, object] | None = None,
        check_cores: bool = True,
    ):
        """``shapes`` maps node names to shaping.LinkShape; the nodes named there are shaped
        after they start. ``check_cores`` warns on start when the nodes ask for more CPUs or
        threads than their engine has cores. Calibration turns it off, because its containers
        take turns and its memory probes time nothing."""
        from amp4ec.real.engines import EngineClients

        check_node_specs(nodes)
        self.client = client
        self.engines = EngineClients(client)
        self.shapes = dict(shapes or {})
        unknown = sorted(set(self.shapes) - {node.name for node in nodes})
        if unknown:
            raise UsageError(f"link shapes name unknown nodes: {', '.join(unknown)}", field="shapes")
        self.shaping: dict[str, object] = {}
        self.nodes = list(nodes)
        self.image = image
        self.run_id = run_id or new_run_id()
        if not NAME_PATTERN.fullmatch(self.run_id):
            raise UsageError(
                f"run id {self.run_id!r} is invalid; use letters, digits, '_', '.' or '-'", field="run_id"
            )
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.labels = {**(labels or {}), PROJECT_LABEL: PROJECT_LABEL_VALUE, RUN_LABEL: self.run_id, OWNER_LABEL: owner_id()}
        self.handle_signals = handle_signals
        self.check_cores = check_cores
        self.network_name = f"amp4ec-{self.run_id}"
        self.network = None
        self.other_networks: dict[str, object] = {}
        self.containers: dict[str, object] = {}
        self.addresses: dict[str, str] = {}
        self.clients: dict[str, WorkerClient] = {}
        self.started_at: dict[str, str] = {}
        """per node: the container's start time when its worker replied to the first ping"""
        self.host_warnings: list[str] = []
        """how the containers oversubscribe their engines' cores, for a run's summary"""
        self._previous_handlers: dict[int, object] = {}
        # A signal that arrived while a create call was in flight, acted on when it returns.
        self._creating = False
        self._deferred_signal: int | None = None
        self._closing = False
        # Whether a signal started the close, so that another one during it is ignored, not deferred.
        self._signalled = False
        self._closed = False
        self._started = False
        self._lock = threading.Lock()
        # Called on SIGINT or SIGTERM before the containers are removed, so that users of the
        # workers (a replay's coordinator) stop first and do not report the removal as failures.
        self.on_signal: list[Callable[[], None]] = []

    def __enter__(self) -> WorkerCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getitem__(self, node_name: str) -> WorkerClient:
        return self.client_for(node_name)

    def client_for(self, node_name: str) -> WorkerClient:
        try:
            return self.clients[node_name]
        except KeyError:
            raise UsageError(
                f"no node named {node_name!r} in run {self.run_id}; nodes: {', '.join(self.clients)}"
            ) from None

    # Startup

    def start(self) -> WorkerCluster:
        """Create the network and the containers, and wait until every worker replies to ping.

        On any failure it removes what it created and raises DockerError.
        """
        if self._started:
            raise UsageError(f"worker cluster {self.run_id} was already started; create a new one")
        self._started = True
        if self.check_cores:
            self._warn_oversubscription()
        self._install_signal_handlers()
        atexit.register(self.close)
        try:
            self._create_network()
            self._prepare_other_engines()
            for node in self.nodes:
                self._start_container(node)
            deadline = time.monotonic() + self.startup_timeout_s
            for node in self.nodes:
                self._wait_ready(node, deadline)
            for node in self.nodes:
                problems = isolation_problems(self.containers[node.name], published=not self.on_default_engine(node))
                if problems:
                    raise DockerError(f"the container of node {node.name} is not isolated as set: {'; '.join(problems)}")
                if node.name in self.shapes:
                    self.apply_shaping(node.name)
        except BaseException:
            self.close()
            raise
        log.info("run %s: %d workers ready on network %s", self.run_id, len(self.nodes), self.network_name)
        return self

    def _warn_oversubscription(self) -> None:
        """Warn when the containers of one Docker host ask for more CPUs, or a node for more threads, than it has cores."""
        messages = []
        by_engine: dict[str | None, list] = {}
        for node in self.nodes:
            by_engine.setdefault(node.engine, []).append(node)
        for engine, nodes in by_engine.items():
            cores = host_cpu_count(self.engines.get(engine))
            host = "the Docker host" if engine is None else f"Docker host {engine}"
            total_cpus = sum(node.cpus for node in nodes)
            if total_cpus > OVERSUBSCRIPTION_SHARE * cores:
                messages.append(
                    f"run {self.run_id}: the containers on {host} ask for {total_cpus:g} CPUs in total, more than "
                    f"{OVERSUBSCRIPTION_SHARE:g} x its {cores} cores, so workers will wait for cores and measured "
                    "latencies will include that wait. Use fewer or smaller nodes, or the simulator for larger clusters."
                )
            for node in nodes:
                if node.threads > cores:
                    messages.append(
                        f"run {self.run_id}: node {node.name} runs {node.threads} torch threads on {host} with "
                        f"{cores} cores, so its threads take turns on the cores and its latency includes that "
                        f"wait. Give it at most {cores} threads."
                    )
        for message in messages:
            warnings.warn(message, OversubscriptionWarning, stacklevel=3)
            log.warning(message)
        self.host_warnings.extend(messages)

    def _create_network(self) -> None:
        import docker.errors

        try:
            with self._creating_resource():
                self.network = self.client.networks.create(
                    self.network_name, driver="bridge", labels=dict(self.labels), check_duplicate=True
                )
        except docker.errors.APIError as error:
            raise DockerError(
                f"cannot create network {self.network_name} for run {self.run_id}: {error}. "
                f"A run with this id may still exist; remove it with `amp4ec clean --run {self.run_id}`."
            ) from error

    def _prepare_other_engines(self) -> None:
        """Copy the worker image to every other engine and create the run's network there."""
        import docker.errors

        from amp4ec.real.engines import copy_image, is_default_engine

        for url in sorted({node.engine for node in self.nodes if not is_default_engine(node.engine)}):
            engine = self.engines.get(url)
            copy_image(self.client, engine, self.image, log=log.info)
            try:
                with self._creating_resource():
                    self.other_networks[url] = engine.networks.create(
                        self.network_name, driver="bridge", labels=dict(self.labels), check_duplicate=True
                    )
            except docker.errors.APIError as error:
                raise DockerError(f"cannot create network {self.network_name} on engine {url}: {error}") from error

    def on_default_engine(self, node) -> bool:
        from amp4ec.real.engines import is_default_engine

        return is_default_engine(node.engine)

    def container_name(self, node) -> str:
        return f"amp4ec-{self.run_id}-{node.name}"

    def _start_container(self, node) -> None:
        import docker.errors

        # A container of another engine cannot join this engine's network, so its worker port
        # is published on that engine's loopback interface instead.
        ports = None if self.on_default_engine(node) else {f"{WORKER_PORT}/tcp": ("127.0.0.1", None)}
        try:
            with self._creating_resource():
                container = self.engines.get(node.engine).containers.run(
                    self.image,
                    detach=True,
                    name=self.container_name(node),
                    hostname=node.name,
                    network=self.network_name,
                    # Docker's units: nano_cpus in 1e-9 CPUs (CFS quota = cpus x period), memory in bytes.
                    nano_cpus=int(round(node.cpus * 1e9)),
                    mem_limit=node.memory_bytes,
                    memswap_limit=node.memory_bytes,
                    environment={
                        "AMP4EC_THREADS": str(node.threads),
                        "AMP4EC_PORT": str(WORKER_PORT),
                        "AMP4EC_NODE": node.name,
                        **WORKER_MALLOC_ENV,
                    },
                    labels={**self.labels, NODE_LABEL: node.name},
                    read_only=True,
                    tmpfs={"/tmp": TMPFS_OPTIONS},
                    cap_drop=["ALL"],
                    ports=ports,
                    security_opt=["no-new-privileges"],
                    user=WORKER_USER,
                )
                self.containers[node.name] = container
        except docker.errors.ImageNotFound as error:
            raise DockerError(
                f"worker image {self.image} not found; build it with ensure_worker_image "
                f"(`amp4ec calibrate` builds it too): {error}"
            ) from error
        except docker.errors.APIError as error:
            raise DockerError(f"cannot start the container of node {node.name} (run {self.run_id}): {error}") from error

    def _wait_ready(self, node, deadline: float) -> None:
        import docker.errors

        container = self.containers[node.name]
        address = None
        last_error = None
        while True:
            try:
                container.reload()
            except docker.errors.NotFound as error:
                raise DockerError(f"the container of node {node.name} disappeared during startup") from error
            state = container.attrs.get("State", {})
            if state.get("Status") in ("exited", "dead"):
                raise DockerError(self._startup_failure_message(node, container, state))
            if address is None:
                if self.on_default_engine(node):
                    address = container_address(container, self.network_name)
                    endpoint = f"{address}:{WORKER_PORT}"
                else:
                    address = published_address(container)
                    endpoint = address
                if address is not None:
                    self.addresses[node.name] = f"tcp://{endpoint}"
                    self.clients[node.name] = WorkerClient(
                        self.addresses[node.name], timeout_s=self.request_timeout_s, node=node.name
                    )
            if address is not None:
                try:
                    reply = self.clients[node.name].ping(timeout_s=1.0)
                except WorkerError as error:
                    last_error = error
                else:
                    self.started_at[node.name] = state.get("StartedAt")
                    log.info(
                        "run %s: node %s ready at %s (torch %s, %s threads, runtime rss %s bytes)",
                        self.run_id, node.name, self.addresses[node.name], reply.get("torch"),
                        reply.get("threads"), reply.get("runtime_rss_bytes"),
                    )  # fmt: skip
                    return
            if time.monotonic() > deadline:
                raise DockerError(
                    f"node {node.name} did not reply to ping within {self.startup_timeout_s:g} s "
                    f"(last error: {last_error}). Container log tail:\n{logs_tail(container)}"
                )
            time.sleep(0.2)

    def _startup_failure_message(self, node, container, state: dict) -> str:
        exit_code = state.get("ExitCode")
        limit_mib = node.memory_bytes / 2**20
        message = (
            f"the worker of node {node.name} exited during startup with status {exit_code} "
            f"(memory limit {node.memory_bytes} bytes = {limit_mib:.0f} MiB, cpus {node.cpus:g})."
        )
        runtime_hint = (
            f"the torch runtime needs about {TORCH_RUNTIME_BYTES / 2**20:.0f} MiB for CPU-only torch, plus the "
            "segments; raise the node's memory limit (memory_mb in a scenario, MEMORY_MB in a calibrate --profile)"
        )
        if state.get("OOMKilled"):
            message += f" The kernel OOM-killed it at its limit of {limit_mib:.0f} MiB: {runtime_hint}."
        elif exit_code == 137:
            message += (
                " It was killed (SIGKILL) without an OOM kill in the engine's record: something outside amp4ec "
                "killed it (docker kill), or the kernel's OOM killer did and the engine did not record it. "
                f"In that case {runtime_hint}."
            )
        return message + f"\nContainer log tail:\n{logs_tail(container)}"

    def apply_shaping(self, node_name: str):
        """Shape a started node's link (again after a restart, which resets it); return the result."""
        from amp4ec.real.shaping import apply_shaping

        labels = {**self.labels, NODE_LABEL: node_name}
        with self._creating_resource():
            result = apply_shaping(self.containers[node_name], self.shapes[node_name], labels=labels)
        self.shaping[node_name] = result
        return result

    # Signals

    def _install_signal_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    @contextlib.contextmanager
    def _creating_resource(self):
        """Hold back SIGINT and SIGTERM while a call that creates a labelled resource is in flight.

        Interrupted mid-call, the engine would finish creating the network or container after
        the cleanup had looked for it, and it would stay behind. The signal is acted on as soon
        as the call returns. Signals reach the main thread only, so calls from other threads
        (a recovery's reshaping) run unguarded.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._creating = True
        try:
            yield
        finally:
            self._creating = False
            signum, self._deferred_signal = self._deferred_signal, None
            if signum is not None:
                self._on_signal(signum, None)

    def _on_signal(self, signum, frame) -> None:
        if self._creating:
            log.warning("run %s: %s received while creating a container or network; stopping once that call returns", self.run_id, signal.Signals(signum).name)
            self._deferred_signal = signum
            return
        if self._closing and self._signalled:
            # A second Ctrl-C while the first one's cleanup runs would otherwise interrupt it
            # and leave the network (or a container) behind.
            log.warning("run %s: %s ignored; still removing worker containers", self.run_id, signal.Signals(signum).name)
            return
        if self._closing:
            # A routine close, such as a memory probe's end, is removing the containers: the
            # signal is delivered again once they are gone, so that the command still stops.
            log.warning("run %s: %s received while removing worker containers; stopping once they are removed", self.run_id, signal.Signals(signum).name)
            self._deferred_signal = signum
            return
        self._signalled = True
        log.warning("run %s: received %s, removing worker containers", self.run_id, signal.Signals(signum).name)
        for stop_user in self.on_signal:
            stop_user()
        self.close()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    # Shutdown

    def close(self) -> None:
        """Remove the containers and the network; safe to call more than once."""
        with self._lock:
            if self._closed or self._closing:
                return
            self._closing = True
        try:
            for worker_client in self.clients.values():
                worker_client.close()
            for name, container in list(self.containers.items()):
                remove_container(container, name)
            if self.network is not None:
                remove_network(self.network)
            for network in self.other_networks.values():
                remove_network(network)
            # A signal can arrive while a create call is in flight: the engine then has a
            # container or network this object never recorded, found only by its label.
            remove_labelled(self.client, run_id=self.run_id)
            for engine in self.engines.others().values():
                remove_labelled(engine, run_id=self.run_id)
            self.engines.close()
        finally:
            self._closed = True
            self._restore_signal_handlers()
            atexit.unregister(self.close)
            log.info("run %s: removed %d containers and network %s", self.run_id, len(self.containers), self.network_name)
            signum, self._deferred_signal = self._deferred_signal, None
            if signum is not None:
                # The handler restored above (the command's own, or Python's) now acts on it.
                signal.raise_signal(signum)

    # Inspection

    def container_for(self, node_name: str):
        return self.containers[node_name]

    def oom_killed(self, node_name: str) -> bool:
        return oom_killed(self.containers[node_name])

    def stopped_state(self, node_name: str) -> str | None:
        return stopped_state(self.containers[node_name], self.started_at.get(node_name))

    def wait_for_stop(self, node_names: Sequence[str], error: WorkerError) -> None:
        """After ``error`` from a worker that closed its connection, wait until the engine reports one of ``node_names`` stopped.

        The engine records a container's exit (and whether the kernel OOM-killed it) a moment
        after its process ends, so that a check right after the closed connection could miss it.
        Waits at most STOP_REPORT_S, and not at all for other errors.
        """
        if not error.disconnected:
            return
        deadline = time.monotonic() + STOP_REPORT_S
        while time.monotonic() < deadline:
            if any(self.stopped_state(name) is not None for name in node_names):
                return
            time.sleep(0.1)


def container_address(container, network_name: str) -> str | None:
    networks = container.attrs.get("NetworkSettings", {}).get("Networks", {}) or {}
    address = networks.get(network_name, {}).get("IPAddress")
    return address or None


def isolation_problems(container, *, published: bool = False) -> list[str]:
    """Return how a worker container departs from the hardening the cluster sets (empty: none).

    The checks read the engine's view of the container: a read-only root filesystem, every
    capability dropped and none added, the unprivileged user and no-new-privileges. No port
    may be published unless ``published`` (workers on another engine), and then only on
    127.0.0.1.
    """
    container.reload()
    host_config = container.attrs.get("HostConfig", {})
    problems = []
    if host_config.get("ReadonlyRootfs") is not True:
        problems.append(f"ReadonlyRootfs is {host_config.get('ReadonlyRootfs')!r}, expected True")
    if host_config.get("CapDrop") != ["ALL"]:
        problems.append(f"CapDrop is {host_config.get('CapDrop')!r}, expected ['ALL']")
    if host_config.get("CapAdd"):
        problems.append(f"CapAdd is {host_config.get('CapAdd')!r}, expected none")
    if host_config.get("Privileged"):
        problems.append("Privileged is True")
    if "no-new-privileges" not in (host_config.get("SecurityOpt") or []):
        problems.append(f"SecurityOpt {host_config.get('SecurityOpt')!r} lacks no-new-privileges")
    user = container.attrs.get("Config", {}).get("User")
    if user != WORKER_USER:
        problems.append(f"User is {user!r}, expected {WORKER_USER!r}")
    bindings = host_config.get("PortBindings") or {}
    if bindings and not published:
        problems.append(f"PortBindings is {bindings!r}, expected none")
    for port, port_bindings in bindings.items():
        for binding in port_bindings or []:
            if binding.get("HostIp") != "127.0.0.1":
                problems.append(f"port {port} is published on {binding.get('HostIp') or 'every address'!r}, expected 127.0.0.1")
    return problems


def published_address(container) -> str | None:
    """Return "127.0.0.1:<port>" where the engine publishes the worker port, or None before it does."""
    bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{WORKER_PORT}/tcp") or []
    for binding in bindings:
        if binding.get("HostPort"):
            return f"{binding.get('HostIp') or '127.0.0.1'}:{binding['HostPort']}"
    return None


def logs_tail(container, lines: int = 30) -> str:
    import docker.errors

    try:
        text = container.logs(tail=lines).decode("utf-8", errors="replace").rstrip()
    except docker.errors.DockerException as error:
        return f"(cannot read the container log: {error})"
    return text or "(empty)"


def remove_container(container, name: str = "") -> bool:
    import docker.errors

    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as error:
        # A removal already in progress (from a signal handler, say) is not an error here.
        if "already in progress" in str(error):
            return False
        log.error("cannot remove container %s: %s", name or container.id, error)
        return False
    return True


def remove_network(network) -> bool:
    import docker.errors

    try:
        network.remove()
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as error:
        log.error("cannot remove network %s: %s", network.name, error)
        return False
    return True


def owner_id() -> str:
    """Return "<boot id>:<pid>" of this process, the value of the owner label."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = "unknown"
    return f"{boot_id}:{os.getpid()}"


def owner_alive(labels: dict | None) -> bool:
    """Tell whether the process that owns a labelled run still runs on this machine.

    A run without an owner label, or owned by a process of another boot, counts as dead.

    NOTE: a coordinator on another machine that shares this engine also has another boot id,
    so its live runs count as dead here.
    """
    owner = (labels or {}).get(OWNER_LABEL, "")
    boot_id, _, pid = owner.rpartition(":")
    if not pid.isdigit() or boot_id != owner_id().rpartition(":")[0]:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_labelled(
    client,
    run_id: str | None = None,
    *,
    run_id_prefix: str | None = None,
    only_orphans: bool = False,
) -> dict[str, int]:
    """Remove the containers, then the networks, labelled amp4ec.project=amp4ec.

    run_id limits the removal to one run, run_id_prefix to runs whose id starts with it, and
    only_orphans to runs whose coordinator process no longer exists.
    Returns {"containers": n, "networks": m}, the numbers removed.
    """
    filters = [f"{PROJECT_LABEL}={PROJECT_LABEL_VALUE}"]
    if run_id is not None:
        filters.append(f"{RUN_LABEL}={run_id}")

    def selected(labels: dict) -> bool:
        if only_orphans and owner_alive(labels):
            return False
        if run_id_prefix is None:
            return True
        return (labels or {}).get(RUN_LABEL, "").startswith(run_id_prefix)

    containers = [
        container
        for container in client.containers.list(all=True, filters={"label": filters})
        if selected(container.labels)
    ]
    removed_containers = sum(remove_container(container) for container in containers)
    networks = [network for network in client.networks.list(filters={"label": filters}) if selected(network.attrs.get("Labels"))]
    removed_networks = sum(remove_network(network) for network in networks)
    return {"containers": removed_containers, "networks": removed_networks}


def labelled_resources(client, run_id_prefix: str | None = None) -> dict[str, list[str]]:
    """Return the names of the labelled containers and networks that exist (for checks)."""
    filters = {"label": [f"{PROJECT_LABEL}={PROJECT_LABEL_VALUE}"]}
    containers = [
        c.name
        for c in client.containers.list(all=True, filters=filters)
        if run_id_prefix is None or c.labels.get(RUN_LABEL, "").startswith(run_id_prefix)
    ]
    networks = [
        n.name
        for n in client.networks.list(filters=filters)
        if run_id_prefix is None or (n.attrs.get("Labels") or {}).get(RUN_LABEL, "").startswith(run_id_prefix)
    ]
    return {"containers": containers, "networks": networks}
