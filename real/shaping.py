"""Link shaping of worker containers, so a replay crosses the links the simulator models.

The simulator gives every node one link to the coordinator with a bandwidth
(``bandwidth_mbps`` of the node, else of ``[network]``) and a fixed cost per hop
(``latency_ms``). With ``network.shaping = true`` a replay shapes each worker the same way:

- bandwidth: a tbf qdisc on the container's eth0 limits what the node sends, and a second
  tbf on an ifb device, fed by an ingress redirect from eth0, limits what it receives. So
  each hop between the coordinator and a node is limited once, as in the simulator.
- delay: a netem qdisc under each tbf when the kernel has netem (CONFIG_NET_SCH_NETEM).
  Otherwise the coordinator emulates it: it sleeps the delay before it sends a stage's
  input and again when the stage's output arrives. The second wait takes the place of the
  node's wait before it sends, because every output passes through the coordinator.

tc runs in the container's network namespace from a short-lived shaper container (uid 0,
NET_ADMIN as its only capability, never privileged), so the worker itself keeps no
capability. The method used for each node is recorded in the run's run.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from amp4ec.errors import DockerError

log = logging.getLogger(__name__)

# The token bucket's size (burst): the larger of 64 KiB, so one full TCP offload segment
# passes without being split, and 1 ms of traffic at the rate.
MIN_BURST_BYTES = 64 * 1024
BURST_S = 0.001
# Packets wait at most this long in the tbf queue before the kernel drops them. A deep
# queue keeps TCP from losing packets, so a transfer of N bytes takes about N / rate.
QUEUE_LATENCY_MS = 500
# tbf counts whole Ethernet frames, and a full TCP segment on a 1500-byte MTU carries 1448
# payload bytes (with TCP timestamps) in a 1514-byte frame. The rate is raised by this
# factor so the payload flows at the scenario's bandwidth, which is what the simulator
# charges (bytes * 8 / bandwidth). Without it, 0.3 to 4 MB transfers took 4.5 % longer than
# N / rate (Docker 20.10, Linux 6.18 VM with 2 cores).
FRAME_BYTES_PER_PAYLOAD_BYTE = 1514 / 1448
INTERFACE = "eth0"
IFB_INTERFACE = "ifb0"

NETEM_PROBE = "netem delay 1ms"
SHAPER_TIMEOUT_S = 60.0
# Label of a shaper container: the name of the worker container it shapes.
SHAPER_LABEL = "amp4ec.shaper_of"
SHAPER_CONFIG_KEYS = ("CapAdd", "CapDrop", "ReadonlyRootfs", "NetworkMode", "Privileged")

METHOD_NETEM = "netem"
METHOD_SENDER = "sender"
METHOD_NONE = "none"


@dataclass(frozen=True)
class LinkShape:
    """The link of one node: its bandwidth in bits per second and its added delay per hop."""

    node: str
    bandwidth_bps: float
    delay_ms: float


@dataclass
class ShapingResult:
    """The shaping of one node's link and the methods used, as recorded in run.json."""

    node: str
    bandwidth_bps: float
    delay_ms: float
    bandwidth_method: str
    delay_method: str
    shaper: dict = field(default_factory=dict)
    """HostConfig fields of the shaper container (SHAPER_CONFIG_KEYS) and its User"""

    def as_dict(self) -> dict:
        return asdict(self)


def link_shapes(scenario) -> dict[str, LinkShape]:
    """Return each node's link from the scenario: the node's own values, else [network]'s.

    The delay is the configured latency_ms only. Without one the simulator charges the
    calibrated per-hop cost, which the real network already has, so nothing is added.
    """
    network = scenario.network
    shapes = {}
    for node in scenario.nodes:
        bandwidth_mbps = node.bandwidth_mbps if node.bandwidth_mbps is not None else network.bandwidth_mbps
        latency_ms = node.latency_ms if node.latency_ms is not None else network.latency_ms
        shapes[node.name] = LinkShape(node.name, bandwidth_mbps * 1e6, latency_ms or 0.0)
    return shapes


def tbf_rate_bps(bandwidth_bps: float) -> int:
    """Return the tbf rate in bits per second (frames) that carries ``bandwidth_bps`` of payload."""
    return int(round(bandwidth_bps * FRAME_BYTES_PER_PAYLOAD_BYTE))


def tbf_arguments(bandwidth_bps: float) -> str:
    """Return the tbf parameters (rate, burst, latency) for a payload bandwidth in bits per second."""
    rate_bps = tbf_rate_bps(bandwidth_bps)
    burst_bytes = max(MIN_BURST_BYTES, int(rate_bps / 8 * BURST_S))
    return f"rate {rate_bps}bit burst {burst_bytes} latency {QUEUE_LATENCY_MS}ms"


def exec_in(container, command: str) -> tuple[int, str]:
    """Run a shell command in the container as its own user; return (exit code, output)."""
    import docker.errors

    try:
        result = container.exec_run(["/bin/sh", "-c", command])
    except docker.errors.APIError as error:
        raise DockerError(f"docker exec in container {container.name} failed: {error}") from error
    return result.exit_code, result.output.decode("utf-8", errors="replace").strip()


def shaping_commands(shape: LinkShape, *, netem: bool) -> list[str]:
    """Return the ip and tc commands that shape eth0 both ways, in the order they must run."""
    tbf = tbf_arguments(shape.bandwidth_bps)
    delay = f"netem delay {shape.delay_ms:g}ms" if netem and shape.delay_ms > 0 else None
    commands = [
        f"ip link add {IFB_INTERFACE} type ifb",
        f"ip link set {IFB_INTERFACE} up",
        f"tc qdisc add dev {INTERFACE} handle ffff: ingress",
        # u32 "match u32 0 0" matches every packet; matchall is missing from some kernels.
        f"tc filter add dev {INTERFACE} parent ffff: protocol all u32 match u32 0 0 "
        f"action mirred egress redirect dev {IFB_INTERFACE}",
    ]
    for device in (INTERFACE, IFB_INTERFACE):
        commands.append(f"tc qdisc add dev {device} root handle 1: tbf {tbf}")
        if delay is not None:
            commands.append(f"tc qdisc add dev {device} parent 1:1 handle 10: {delay}")
    return commands


def shaper_script(shape: LinkShape) -> str:
    """Return the shell script the shaper container runs: a netem probe, then the tc commands.

    It prints "netem=yes" or "netem=no" first. Each command is echoed before it runs, and
    the script stops at the first failure.
    """
    lines = ["set -e", "netem=no"]
    if shape.delay_ms > 0:
        # The probe uses the loopback device, which the shaping leaves alone.
        lines.append(f"if tc qdisc add dev lo root {NETEM_PROBE} 2>/dev/null; then tc qdisc del dev lo root; netem=yes; fi")
    lines.append('echo "netem=$netem"')
    without_netem = set(shaping_commands(shape, netem=False))
    for command in shaping_commands(shape, netem=True):
        lines.append(f"echo '+ {command}'")
        lines.append(command if command in without_netem else f'[ "$netem" = no ] || {command}')
    return "\n".join(lines) + "\n"


def apply_shaping(container, shape: LinkShape, *, labels: dict[str, str] | None = None) -> ShapingResult:
    """Shape the container's link with tc and return the methods used.

    tc runs in a short-lived shaper container on the same engine, from the worker's image,
    that joins the worker's network namespace as uid 0 with NET_ADMIN as its only
    capability. The qdiscs stay after it exits, and the worker never has a capability.
    Raises DockerError with the script's output when a command fails.
    """
    import docker.errors

    engine = container.client
    image = container.attrs.get("Config", {}).get("Image") or container.image.id
    try:
        shaper = engine.containers.run(
            image,
            ["/bin/sh", "-c", shaper_script(shape)],
            detach=True,
            name=f"{container.name}-shaper",
            network_mode=f"container:{container.id}",
            user="0",
            cap_drop=["ALL"],
            cap_add=["NET_ADMIN"],
            read_only=True,
            security_opt=["no-new-privileges"],
            labels={**(labels or {}), SHAPER_LABEL: container.name},
        )
    except docker.errors.APIError as error:
        raise DockerError(f"cannot start the shaper container of node {shape.node}: {error}") from error
    try:
        status = shaper.wait(timeout=SHAPER_TIMEOUT_S)
        output = shaper.logs().decode("utf-8", errors="replace").strip()
        shaper.reload()
        shaper_config = {key: shaper.attrs["HostConfig"].get(key) for key in SHAPER_CONFIG_KEYS}
        shaper_config["User"] = shaper.attrs["Config"].get("User")
    except (docker.errors.DockerException, OSError) as error:
        raise DockerError(f"the shaper container of node {shape.node} did not finish: {error}") from error
    finally:
        try:
            shaper.remove(force=True)
        except docker.errors.DockerException as error:
            log.error("cannot remove shaper container %s: %s", shaper.name, error)
    if status.get("StatusCode") != 0:
        raise DockerError(
            f"shaping node {shape.node} failed with exit status {status.get('StatusCode')}; the shaper's "
            f"output:\n{output}\nThe kernel needs tbf, ifb and the u32 classifier; turn network.shaping "
            "off to run unshaped."
        )
    netem = output.splitlines()[:1] == ["netem=yes"]
    if shape.delay_ms <= 0:
        delay_method = METHOD_NONE
    else:
        delay_method = METHOD_NETEM if netem else METHOD_SENDER
    result = ShapingResult(
        shape.node,
        shape.bandwidth_bps,
        shape.delay_ms,
        f"tc tbf on {INTERFACE} and {IFB_INTERFACE} at {tbf_rate_bps(shape.bandwidth_bps)} bit/s of frames",
        delay_method,
        shaper_config,
    )
    log.info("container %s: shaped to %s bit/s, delay %s ms by %s", container.name, int(shape.bandwidth_bps), shape.delay_ms, delay_method)
    return result


def qdisc_report(container) -> str:
    """Return `tc -s qdisc show` of the container, for logs and checks."""
    code, output = exec_in(container, "tc -s qdisc show")
    return output if code == 0 else f"(tc failed with exit status {code}: {output})"


def sender_delay(delay_s: float) -> None:
    """Wait one hop's delay before a send, where the kernel cannot delay packets (no netem)."""
    if delay_s > 0:
        time.sleep(delay_s)


class DelayedClient:
    """A worker client whose stage runs pay the node's hop delay on the way in and out.

    Only `run` is delayed: it carries the stage's input and output, the two hops the
    simulator charges. Every other attribute is the wrapped client's.
    """

    def __init__(self, client, delay_s: float):
        self._client = client
        self.delay_s = delay_s

    def __getattr__(self, name):
        return getattr(self._client, name)

    def run(self, *args, **kwargs):
        sender_delay(self.delay_s)
        result = self._client.run(*args, **kwargs)
        sender_delay(self.delay_s)
        return result


def sender_delays_s(results) -> dict[str, float]:
    """Return {node: delay in s} for the shaped nodes whose delay the sender must emulate."""
    return {r.node: r.delay_ms / 1e3 for r in results if r.delay_method == METHOD_SENDER}


def delay_sender_clients(coordinator, sender_delays_s: dict[str, float]) -> None:
    """Make the coordinator's stage clients pay each node's hop delay (sender emulation).

    The coordinator looks its clients up through ``coordinator.client(name)``; this wraps
    that lookup for the nodes in ``sender_delays_s`` and leaves the others unchanged.
    """
    delays = {name: delay_s for name, delay_s in sender_delays_s.items() if delay_s > 0}
    if not delays:
        return
    lookup = coordinator.client

    def delayed_lookup(name: str):
        client = lookup(name)
        return DelayedClient(client, delays[name]) if name in delays else client

    coordinator.client = delayed_lookup
