"""The scenario schema: a TOML file describing nodes, network, workload and policy.

A scenario is validated completely before anything runs, and the resolved form (defaults
included) is written next to every run's results so the run describes itself.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from amp4ec.errors import UsageError

MIB = 1024 * 1024
# Docker grants no quota below 0.01 CPUs. The upper bound is far above any edge node, and keeps
# the fitted work's quota term, extrapolated far outside the calibrated quotas, finite.
MIN_CPUS = 0.01
MAX_CPUS = 1024.0
# 1 kbit/s. MobileNetV2's input (0.6 MB) takes over an hour of simulated time on such a link,
# and the monitor samples every period meanwhile, so a far slower link never finishes.
MIN_BANDWIDTH_MBPS = 0.001


class _Strict(BaseModel):
    # Unknown keys, strings where numbers belong, booleans where integers belong and
    # infinite or NaN numbers are rejected, so a typo in a scenario never passes silently.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class NodeSpec(_Strict):
    """One edge node: a container limited to ``cpus`` CPUs and ``memory_mb`` MiB."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    cpus: float = Field(ge=MIN_CPUS, le=MAX_CPUS, description="CFS quota in CPUs (docker run --cpus)")
    memory_mb: float = Field(gt=0, description="memory limit in MiB (docker run --memory); no swap")
    threads: int | None = Field(default=None, ge=1, description="torch threads; default max(1, floor(cpus))")
    bandwidth_mbps: float | None = Field(default=None, ge=MIN_BANDWIDTH_MBPS, description="this node's link; default network.bandwidth_mbps")
    latency_ms: float | None = Field(default=None, ge=0, description="this node's per-hop cost; default network.latency_ms")
    present: bool = Field(default=True, description="false: the node is absent until a join event")
    engine: str | None = Field(
        default=None,
        description="replay only: Docker engine of this node's container, a name from [engines] or a URL such as "
        "unix:///var/run/docker-b.sock; default: the engine of DOCKER_HOST",
    )

    @property
    def torch_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, math.floor(self.cpus))

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_mb * MIB)


class ModelSpec(_Strict):
    """The model to split; it must match the calibration's model and granularity."""

    name: str = Field(default="mobilenet_v2", description="torchvision model name or package.module:factory")
    granularity: Literal["block", "leaf"] = Field(
        default="block", description="units: feature blocks and head, or single leaf modules"
    )
    service: Literal["calibrated", "exponential"] = Field(
        default="calibrated",
        description="calibrated: each stage costs its calibrated CPU time; exponential: that time is "
        "the mean of an exponential draw per stage (for checks against M/M/k queueing formulas)",
    )


class PolicySpec(_Strict):
    """The partitioner, the scheduler and their parameters."""

    partitioner: str = Field(default="ralos", description="name of a registered partitioner")
    scheduler: str = Field(default="amp4ec", description="name of a registered scheduler")
    partitions: int | None = Field(default=None, ge=1, description="number of segments; default one per node")
    cache: bool = Field(default=True, description="keep deployed segments resident on their nodes")
    scheduler_params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the scheduler")
    partitioner_params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the partitioner")
    on_failure: Literal["fail", "retry"] = Field(
        default="fail",
        description="a stage lost to a node failure, or refused by a node that is down, fails its request, or runs again on another node",
    )
    max_retries: int = Field(
        default=3, ge=0, description="retry: stage attempts after the first, counted per request over all its stages"
    )
    retries: int | None = Field(
        default=None, ge=0, description="deprecated: read as on_failure = \"retry\" and max_retries = retries (0: on_failure = \"fail\")"
    )
    load_time_ms: float = Field(
        default=0.0, ge=0, description="time a worker takes to load its segments once their weights arrive"
    )
    dispatch: Literal["push", "pull"] = Field(
        default="push",
        description="push: the scheduler picks a node per stage; pull: stages wait in one coordinator "
        "queue and the first idle node takes the next (the scheduler is not consulted)",
    )

    @model_validator(mode="after")
    def _translate_retries(self) -> "PolicySpec":
        from amp4ec.timeline import warn_deprecated  # late import: timeline imports this module

        if self.retries is None:
            return self
        if "on_failure" in self.model_fields_set or "max_retries" in self.model_fields_set:
            raise ValueError(
                "retries is the deprecated form of on_failure and max_retries; give either retries or those two, not both"
            )
        self.on_failure = "retry" if self.retries > 0 else "fail"
        self.max_retries = self.retries
        warn_deprecated(f"policy.retries = {self.retries}", f'on_failure = "{self.on_failure}", max_retries = {self.retries}')
        self.retries = None
        return self


class WorkloadSpec(_Strict):
    """Request arrivals: the paper's closed loop (one client, back to back) or open-loop Poisson."""

    kind: Literal["closed", "poisson", "bursty", "diurnal", "trace"] = "closed"
    requests: int = Field(default=100, ge=1)
    batch: int = Field(default=1, ge=1)
    clients: int = Field(default=1, ge=1, description="closed loop: requests in flight")
    think_time_ms: float = Field(default=0.0, ge=0, description="closed loop: pause between a reply and the next request")
    rate_rps: float | None = Field(default=None, gt=0, description="poisson: mean arrival rate in requests per second; bursty: rate while on; diurnal: mean rate")
    # bursty: a two-state Markov-modulated Poisson process (MMPP-2) that alternates between
    # an "on" state at rate_rps and an "off" state at off_rate_rps, with exponential sojourns.
    off_rate_rps: float = Field(default=0.0, ge=0, description="bursty: arrival rate while off")
    on_s: float = Field(default=1.0, gt=0, description="bursty: mean length of an on period in seconds")
    off_s: float = Field(default=1.0, gt=0, description="bursty: mean length of an off period in seconds")
    # diurnal: rate(t) = rate_rps * (1 + amplitude * sin(2 pi (t + phase_s) / period_s)).
    amplitude: float = Field(default=0.5, ge=0, le=1, description="diurnal: relative swing of the rate")
    period_s: float = Field(default=86400.0, gt=0, description="diurnal: length of one cycle in seconds")
    phase_s: float = Field(default=0.0, description="diurnal: shift of the cycle in seconds")
    trace: str | None = Field(
        default=None,
        description="trace: CSV file with an arrival_s column (seconds, non-decreasing); relative to the scenario",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> "WorkloadSpec":
        if self.kind in ("poisson", "bursty", "diurnal") and self.rate_rps is None:
            raise ValueError(f"a {self.kind} workload needs rate_rps (requests per second)")
        if self.kind == "trace" and self.trace is None:
            raise ValueError("a trace workload needs trace, the path of a CSV file with an arrival_s column")
        if self.kind == "closed" and self.rate_rps is not None:
            raise ValueError(
                "rate_rps applies to open-loop workloads; remove it or set kind = \"poisson\" (or \"bursty\", \"diurnal\")"
            )
        # Compared with the defaults, not with the keys given, so a resolved scenario parses again.
        if self.kind != "closed" and (self.clients != 1 or self.think_time_ms != 0):
            raise ValueError("clients and think_time_ms apply to closed loops; remove them or set kind = \"closed\"")
        return self


class NetworkSpec(_Strict):
    """Links between the coordinator and each node; every stage's input and output cross one."""

    bandwidth_mbps: float = Field(default=1000.0, ge=MIN_BANDWIDTH_MBPS, description="link bandwidth in megabits per second")
    latency_ms: float | None = Field(
        default=None, ge=0, description="fixed cost per hop in ms; default: the calibrated value, else 0.2"
    )
    shaping: bool = Field(
        default=False,
        description="replay only: shape each worker's link to its bandwidth_mbps with tc, and add latency_ms as "
        "a delay (netem, or the coordinator waits where the kernel lacks netem)",
    )


# A sample every millisecond is already finer than one unit's run. A shorter period only fills
# the simulator's event queue (and the replay's links) with samples.
MIN_MONITOR_PERIOD_S = 0.001
# The simulator's monitor samples every node once per period for the whole run, and a bursty
# workload draws a block of gaps for each on or off period. On a 2-core machine a sample took
# 3 to 5 us per node and a bursty period 10 us, so either limit means 5 minutes or more.
MAX_NODE_SAMPLES = 10**8
MAX_BURSTY_PERIODS = 10**8
# Simulated time is a float64 number of seconds. Up to 1e9 s (about 32 years) its spacing is at
# most 1.2e-7 s. Far beyond it, short steps round to nothing and a CPU's time slices stop advancing.
MAX_SIMULATED_S = 1e9


class MonitorSpec(_Strict):
    """The sampling of node state that schedulers see: its period and delay."""

    period_s: float = Field(default=1.0, ge=MIN_MONITOR_PERIOD_S, description="how often node state is sampled")
    delay_s: float = Field(default=0.0, ge=0, description="how long a sample takes to reach the scheduler")


ENGINE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ReplaySpec(_Strict):
    """Replay only: how activations travel between the coordinator and the worker containers."""

    transport: Literal["forward", "relay"] = Field(
        default="forward",
        description=(
            "forward: each worker sends its outputs straight to the next stage's worker; "
            "relay: every stage's input and output pass through the coordinator, as the simulator models"
        ),
    )
    route: Literal["per_stage", "at_dispatch"] = Field(
        default="per_stage",
        description=(
            "forward only. per_stage: the scheduler picks each stage's node when the stage before has finished, "
            "as the simulator does; at_dispatch: it picks every stage's node when the request starts"
        ),
    )


DYNAMICS_ACTIONS = ("fail", "recover", "leave", "join", "pause", "resume", "restart", "set_cpus")


class DynamicsEvent(_Strict):
    """Deprecated form of an event: read into [[events]] (at_s is time_s, action is kind, set_cpus is cpu).
    """

    at_s: float = Field(ge=0, description="seconds after the first request")
    node: str
    action: Literal["fail", "recover", "leave", "join", "pause", "resume", "restart", "set_cpus"]
    cpus: float | None = Field(default=None, ge=MIN_CPUS, le=MAX_CPUS, description="set_cpus only: the new CPU limit in CPUs")

    @model_validator(mode="after")
    def _check_cpus(self) -> "DynamicsEvent":
        if self.action == "set_cpus" and self.cpus is None:
            raise ValueError("action set_cpus needs cpus, the new CPU limit")
        if self.action != "set_cpus" and self.cpus is not None:
            raise ValueError(f"cpus applies to set_cpus only, not to action {self.action!r}")
        return self


class NodeProfileMix(_Strict):
    """One kind of node inside a group, drawn with probability proportional to ``weight``."""

    cpus: float = Field(ge=MIN_CPUS, le=MAX_CPUS)
    memory_mb: float = Field(gt=0)
    threads: int | None = Field(default=None, ge=1)
    bandwidth_mbps: float | None = Field(default=None, ge=MIN_BANDWIDTH_MBPS)
    latency_ms: float | None = Field(default=None, ge=0)
    weight: float = Field(default=1.0, gt=0)


class NodeGroupSpec(_Strict):
    """``count`` nodes named ``{prefix}{i}``, each drawn from ``profiles`` with the scenario seed.

    A group expands into plain nodes before anything runs, so a 10,000-node cluster is a few
    lines and the resolved scenario still lists every node.
    """

    prefix: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    count: int = Field(ge=1, le=1_000_000)
    profiles: list[NodeProfileMix] = Field(min_length=1)
    engine: str | None = Field(default=None, description="replay only: Docker engine of the group's nodes (see nodes.engine)")


class EventSpec(_Strict):
    """One change to a node at ``time_s`` seconds after the workload starts, in simulate and replay alike.

    join / leave: the node starts or stops taking new stages (work in flight on a leaving
    node finishes); a node whose first event is join is absent until then. fail: the node
    dies and the stages in flight on it are lost (see policy.on_failure). recover: a failed
    node comes back, its segments deployed again. restart: fail, then recover. pause /
    resume: the node freezes and thaws. A stage still waiting 60 s after it was sent counts
    as lost. cpu: the node's CPU quota becomes ``cpus``. background_load: ``cpus`` of the
    node's quota go to other work from then on (0 ends it). link_bandwidth: the node's link
    changes to ``bandwidth_mbps`` (and ``latency_ms`` if given). CPU changes apply to stages
    that start after the event. In simulation a new bandwidth applies at once, to transfers
    under way too.
    The table "Event kinds by mode" in the scenario reference gives what each mode does for each kind.
    """

    time_s: float = Field(ge=0, description="seconds after the first request")
    kind: Literal["join", "leave", "fail", "recover", "restart", "pause", "resume", "cpu", "background_load", "link_bandwidth"]
    node: str
    cpus: float | None = Field(
        default=None,
        ge=0,
        le=MAX_CPUS,
        description=f"cpu: the new CPU quota (at least {MIN_CPUS}); background_load: CPUs taken by other work",
    )
    bandwidth_mbps: float | None = Field(default=None, ge=MIN_BANDWIDTH_MBPS, description="link_bandwidth: the link's new bandwidth")
    latency_ms: float | None = Field(default=None, ge=0, description="link_bandwidth: the link's new per-hop cost")

    @field_validator("kind", mode="before")
    @classmethod
    def _rename_kind(cls, kind: Any) -> Any:
        from amp4ec.timeline import warn_deprecated  # late import: timeline imports this module

        if kind in ("background", "bandwidth"):
            new = "background_load" if kind == "background" else "link_bandwidth"
            warn_deprecated(f"[[events]] kind = {kind!r}", f"kind = {new!r}")
            return new
        return kind

    @model_validator(mode="after")
    def _check_values(self) -> "EventSpec":
        if self.kind == "background_load" and self.cpus is None:
            raise ValueError("a background_load event needs cpus, the CPUs other work takes")
        if self.kind == "cpu" and (self.cpus is None or self.cpus < MIN_CPUS):
            raise ValueError(f"a cpu event needs cpus >= {MIN_CPUS}, the node's new CPU quota")
        if self.kind not in ("cpu", "background_load") and self.cpus is not None:
            raise ValueError(f"cpus applies to cpu and background_load events only, not to kind {self.kind!r}")
        if self.kind == "link_bandwidth" and self.bandwidth_mbps is None and self.latency_ms is None:
            raise ValueError("a link_bandwidth event needs bandwidth_mbps or latency_ms")
        if self.kind != "link_bandwidth" and (self.bandwidth_mbps is not None or self.latency_ms is not None):
            raise ValueError(f"bandwidth_mbps and latency_ms apply to link_bandwidth events only, not to kind {self.kind!r}")
        return self


class CapacityChange(_Strict):
    """Deprecated: read into [[events]] as a cpu event."""

    time_s: float = Field(ge=0, description="simulated time of the change")
    node: str
    cpus: float = Field(gt=0, description="new CFS quota in CPUs")


class AdaptationSpec(_Strict):
    """Repartitioning and redeploying when the monitor shows a node's CPU quota changing, in simulate and replay."""

    enabled: bool = False
    threshold: float = Field(
        default=0.2, gt=0, description="relative change of a node's CPU quota since the last partitioning that triggers a new one"
    )
    load_ms_per_mb: float = Field(
        default=0.0, ge=0, description="time to load 10^6 bytes of weights into a worker after they arrive, in ms"
    )
    capacity_changes: list[CapacityChange] = Field(default_factory=list, description="deprecated: write cpu events in [[events]]")


class HostSpec(_Strict):
    """The machine every node's container runs on, as in the AMP4EC experiments (one Docker host).

    A node whose ``cpus`` or ``memory_mb`` exceeds the host's is rejected before the run,
    because a container cannot use more CPUs or memory than the machine it runs on. Leave a
    value out when it is not known, and it is not checked.
    """

    cpus: float | None = Field(default=None, gt=0, description="CPUs of the host; no node may ask for more")
    memory_mb: float | None = Field(default=None, gt=0, description="memory of the host in MiB; no node may ask for more")


class Scenario(_Strict):
    """A cluster, a workload and a policy: everything one run needs."""

    name: str = Field(min_length=1, description="label of the run in summaries and reports")
    description: str = Field(default="", description="free text")
    seed: int = Field(default=0, ge=0, description="seed of every random stream (arrivals, scheduler noise, inputs)")
    calibration: str = Field(default="default", description="'default' for the shipped file, or a path")
    model: ModelSpec = Field(default_factory=ModelSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    monitor: MonitorSpec = Field(default_factory=MonitorSpec)
    nodes: list[NodeSpec] = Field(default_factory=list, description="the edge nodes, one container each")
    node_groups: list[NodeGroupSpec] = Field(default_factory=list, description="generated nodes, appended to nodes")
    events: list[EventSpec] = Field(default_factory=list, description="the dynamics timeline, read by simulate and replay")
    dynamics: list[DynamicsEvent] = Field(default_factory=list, description="deprecated: read into events")
    adaptation: AdaptationSpec = Field(default_factory=AdaptationSpec)
    engines: dict[str, str] = Field(
        default_factory=dict,
        description="replay only: Docker engines by name, each a URL such as unix:///var/run/docker-b.sock or "
        "tcp://10.0.0.2:2375; nodes and node groups name them in their engine field",
    )
    replay: ReplaySpec = Field(default_factory=ReplaySpec)
    host: HostSpec | None = Field(
        default=None,
        description="the machine the nodes' containers run on; a node larger than it is rejected. Default: no host "
        "(each simulated node is a machine of its own)",
    )
    # Where each event came from (events[i], dynamics[j], adaptation.capacity_changes[k]), for messages.
    _event_origins: list[str] = PrivateAttr(default_factory=list)

    @field_validator("nodes")
    @classmethod
    def _unique_names(cls, nodes: list[NodeSpec]) -> list[NodeSpec]:
        seen: set[str] = set()
        for node in nodes:
            if node.name in seen:
                raise ValueError(f"node name {node.name!r} appears twice")
            seen.add(node.name)
        return nodes

    @model_validator(mode="after")
    def _expand_and_check(self) -> "Scenario":
        from amp4ec.cluster import check_events, check_host, expand_groups  # late import: cluster imports this module
        from amp4ec.timeline import translate_legacy

        check_host(self)
        if self.node_groups:
            self.nodes = self.nodes + expand_groups(self.node_groups, self.seed, {n.name for n in self.nodes})
            self.node_groups = []
        if not self.nodes:
            raise ValueError("the scenario has no nodes; add [[nodes]] or [[node_groups]]")
        self._event_origins = translate_legacy(self)
        check_events(self)
        self._check_engines()
        check_run_length(self)
        return self

    def event_origins(self) -> list[str]:
        """Return where each event was written, such as ``events[2]`` or ``dynamics[0]``."""
        if len(self._event_origins) == len(self.events):
            return list(self._event_origins)
        return [f"events[{i}]" for i in range(len(self.events))]

    def _check_engines(self) -> None:
        for name, url in self.engines.items():
            if not ENGINE_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"engines: name {name!r} is invalid; use letters, digits, '_', '.' or '-'")
            if "://" not in url:
                raise ValueError(f"engines.{name} = {url!r} is not a URL; write it as unix:///path/docker.sock or tcp://host:port")
        for node in self.nodes:
            if node.engine is not None and node.engine not in self.engines and "://" not in node.engine:
                known = ", ".join(sorted(self.engines)) or "none defined"
                raise ValueError(
                    f"node {node.name}: engine {node.engine!r} is neither a name in [engines] ({known}) nor a URL "
                    "such as unix:///var/run/docker-b.sock"
                )

    def engine_url(self, node_name: str) -> str | None:
        """Return the Docker engine URL of a node's container, or None for the default engine."""
        engine = self.node(node_name).engine
        if engine is None:
            return None
        return self.engines.get(engine, engine)

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def resolved(self) -> dict[str, Any]:
        """Return the scenario with every default filled in, as written to a run's directory."""
        return self.model_dump(mode="json")

    def with_workload(self, **fields: Any) -> Scenario:
        """Return a copy whose workload has ``fields`` replaced, validated as a scenario's would be."""
        workload = WorkloadSpec.model_validate({**self.workload.model_dump(), **fields})
        return self.model_copy(update={"workload": workload})


@dataclass(frozen=True)
class LinkTimes:
    """Lower bounds on the simulated time that requests spend on links, from the model's tensor sizes."""

    request_s: float
    """one request: each of its transfers alone on the fastest link, after the smallest per-hop cost"""
    all_requests_s: float
    """every request's bytes through all nodes' links at once, each link at its highest bandwidth"""
    max_bandwidth_mbps: float
    """the fastest link's highest bandwidth"""
    total_bandwidth_mbps: float
    """the sum over nodes of each link's highest bandwidth"""
    valid_until_s: float = math.inf
    """the first event that may stop a node; until then no request can fail before a transfer"""


def check_run_length(scenario: Scenario, last_arrival_s: float | None = None, links: LinkTimes | None = None) -> None:
    """Raise ValueError for a workload whose simulated run needs more monitor samples or bursty periods than a run can take.

    The length is a lower bound: the requests at the workload's highest rate, or the closed
    loop's think times, each with the smallest hop. An open loop's length is its last arrival,
    ``last_arrival_s``, known once its arrivals are drawn or its trace is read. Without it
    only a closed loop and a bursty workload's periods are checked.
    The simulator passes ``links``, which adds the time each request spends on links and the
    time the links need to carry every request's bytes, up to ``links.valid_until_s``: the run
    is the same as one without node stops until the first of them.
    """
    latencies = [n.latency_ms if n.latency_ms is not None else scenario.network.latency_ms or 0.0 for n in scenario.nodes]
    latencies += [e.latency_ms for e in scenario.events if e.latency_ms is not None]
    hop_s = min(latencies) / 1e3
    bound = _arrival_bound(scenario.workload, last_arrival_s, hop_s)
    if bound is None:
        return
    duration_s, cause = bound
    if hop_s:
        cause += f", with a hop of at least {hop_s * 1e3:g} ms"
    hop_only_s = duration_s
    if links is not None and math.isfinite(duration_s):
        request_s = max(hop_s, links.request_s)
        with_links_s, arrivals = _arrival_bound(scenario.workload, last_arrival_s, request_s)
        per_request = f"{arrivals}, with at least {request_s:.3g} s per request on links of {links.max_bandwidth_mbps:g} Mbps at most"
        if links.all_requests_s > with_links_s:
            with_links_s = links.all_requests_s
            per_request = f"the transfers of every request, through links of {links.total_bandwidth_mbps:.3g} Mbps in total"
        if links.valid_until_s < with_links_s:
            with_links_s = links.valid_until_s
            per_request += f", until the first event that may stop a node at {links.valid_until_s:g} s"
        if with_links_s > duration_s:
            duration_s, cause = with_links_s, per_request
    samples = duration_s / scenario.monitor.period_s
    node_samples = samples * len(scenario.nodes)
    if not math.isfinite(duration_s):
        raise ValueError(f"the run would never end in simulated time ({cause}); give finite rates and times")
    if duration_s > MAX_SIMULATED_S:
        raise ValueError(
            f"the run lasts at least {duration_s:.3g} s of simulated time ({cause}), more than {MAX_SIMULATED_S:.0e} s, "
            "where the simulator's clock (a float64 in seconds) still resolves 0.12 us; shorten the run, or check "
            "that the times are in seconds"
        )
    if node_samples > MAX_NODE_SAMPLES:
        # Faster links help only when the transfers, not the arrivals, make the run too long.
        bandwidth = ""
        if hop_only_s * len(scenario.nodes) / scenario.monitor.period_s <= MAX_NODE_SAMPLES:
            bandwidth = " raise the links' bandwidth_mbps,"
        raise ValueError(
            f"the run lasts at least {duration_s:.3g} s of simulated time ({cause}), so the monitor would sample "
            f"{len(scenario.nodes)} nodes {samples:.3g} times at monitor.period_s = {scenario.monitor.period_s:g}, "
            f"more than {MAX_NODE_SAMPLES:.0e} node samples; raise monitor.period_s to at least "
            f"{_rounded_up(duration_s * len(scenario.nodes) / MAX_NODE_SAMPLES)},{bandwidth} or shorten the run"
        )


def _rounded_up(value: float) -> str:
    """Format a positive ``value`` to three significant digits, rounded up, so that the advised value is enough."""
    text = f"{value:.3g}"
    if float(text) >= value:
        return text
    step = 10.0 ** (math.floor(math.log10(value)) - 2)
    return f"{float(text) + step:.3g}"


def _arrival_bound(workload: WorkloadSpec, last_arrival_s: float | None, request_s: float) -> tuple[float, str] | None:
    """Return a lower bound on the run's length in seconds from its arrivals, and the bound's cause.

    ``request_s`` is the least time one request takes from its arrival to its reply. An open
    loop whose last arrival is not known yet has no bound, and None is returned.
    """
    if workload.kind == "closed":
        # The first round starts at once, and a client thinks only between its rounds.
        rounds = math.ceil(workload.requests / min(workload.clients, workload.requests))
        duration_s = rounds * request_s + (rounds - 1) * workload.think_time_ms / 1e3
        return duration_s, f"{rounds} rounds of workload.think_time_ms = {workload.think_time_ms:g}"
    if workload.kind == "bursty":
        per_cycle = workload.rate_rps * workload.on_s + workload.off_rate_rps * workload.off_s
        periods = 2 * workload.requests / per_cycle if per_cycle > 0 else math.inf
        if not math.isfinite(per_cycle) or not math.isfinite(workload.on_s + workload.off_s) or periods > MAX_BURSTY_PERIODS:
            raise ValueError(
                f"the bursty workload's {workload.requests} requests need about {periods:.3g} on and off periods "
                f"(on_s = {workload.on_s:g}, off_s = {workload.off_s:g}), more than {MAX_BURSTY_PERIODS:.0e}, or "
                "periods too long to add up; make on_s or off_s longer, or the rates higher, and keep both finite"
            )
    if last_arrival_s is None:
        return None
    # Random arrivals can come sooner than requests / rate, so only the drawn last arrival bounds the run.
    source = "the trace's last arrival" if workload.kind == "trace" else "the last drawn arrival"
    return last_arrival_s + request_s, f"{source} at {last_arrival_s:g} s"


def _format_location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def parse_scenario(data: dict[str, Any], *, source: str = "scenario") -> Scenario:
    """Validate raw scenario data, turning pydantic's report into a UsageError naming the field."""
    try:
        scenario = Scenario.model_validate(data)
    except UsageError as exc:
        # Raised by the cross-field checks (events, node groups), which know the field but not the file.
        if exc.source is None:
            located = UsageError(str(exc), source=source)
            located.field = exc.field
            raise located from exc
        raise
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            location = _format_location(error["loc"]) or "(top level)"
            # Errors raised in validators come as "Value error, <message>"; the message is enough.
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field; check its spelling against the scenario reference"
            elif error["type"] == "missing":
                message = "required field is missing"
            value = error.get("input")
            # A whole table as the value would repeat the scenario back; its location names it.
            if error["type"] == "missing" or isinstance(value, (dict, list)):
                lines.append(f"{location}: {message}")
            else:
                lines.append(f"{location}: {message} (got {value!r})")
        # A single error stays on the first line, so that it reads as one line in logs and greps.
        if len(lines) == 1:
            report = f"invalid scenario: {lines[0]}"
        else:
            report = "invalid scenario:\n  " + "\n  ".join(lines)
        raise UsageError(report, source=source) from exc
    from amp4ec import policies  # late import: the registry imports the policy modules

    policies.check_policy_names(scenario, source=source)
    return scenario


def read_scenario_data(path: str | Path) -> dict[str, Any]:
    """Read a scenario TOML file as raw data, with relative calibration and trace paths made absolute."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise UsageError("scenario file not found; give the path of a .toml file", source=str(path)) from exc
    except IsADirectoryError as exc:
        raise UsageError("is a directory; give the path of a .toml file", source=str(path)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"not valid TOML: {exc}", source=str(path)) from exc
    calibration = data.get("calibration", "default")
    if isinstance(calibration, str) and calibration != "default" and not Path(calibration).is_absolute():
        data["calibration"] = str((path.parent / calibration).resolve())
    workload = data.get("workload")
    if isinstance(workload, dict) and isinstance(workload.get("trace"), str) and not Path(workload["trace"]).is_absolute():
        workload["trace"] = str((path.parent / workload["trace"]).resolve())
    return data


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario TOML file; relative calibration and trace paths resolve against it."""
    scenario = parse_scenario(read_scenario_data(path), source=str(path))
    trace = scenario.workload.trace
    if scenario.workload.kind == "trace" and trace is not None and not Path(trace).is_file():
        problem = "is a directory" if Path(trace).is_dir() else "not found"
        raise UsageError(
            f"trace file {trace!r} {problem}; give the path of a CSV file with an arrival_s column",
            field="workload.trace",
            source=str(path),
        )
    return scenario
