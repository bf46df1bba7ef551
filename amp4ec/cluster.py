"""Cluster generators and checks of the dynamics timeline, run while a scenario is validated.

Node groups expand into plain nodes with a random stream derived from the scenario seed, so
the same scenario always yields the same cluster, and a changed seed a different mix.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from pydantic import TypeAdapter

from amp4ec.errors import UsageError

if TYPE_CHECKING:
    from amp4ec.scenario import HostSpec, NodeGroupSpec, NodeSpec, Scenario


# Generated nodes are validated in blocks of this many. One pydantic-core call per block keeps
# the time per node low, and the block's raw dicts stay a small share of the nodes' memory.
EXPAND_BLOCK_NODES = 65536


@functools.cache
def _node_list_adapter() -> "TypeAdapter[list[NodeSpec]]":
    from amp4ec.scenario import NodeSpec

    return TypeAdapter(list[NodeSpec])


def expand_groups(groups: list["NodeGroupSpec"], seed: int, taken: set[str]) -> list["NodeSpec"]:
    """Return the nodes of every group, profiles drawn by weight; names must not clash."""
    from amp4ec.workload import rng_for

    nodes: list[NodeSpec] = []
    names = set(taken)
    for g, group in enumerate(groups):
        weights = np.array([p.weight for p in group.profiles], dtype=float)
        rng = rng_for(seed, f"node-group:{group.prefix}")
        choices = rng.choice(len(group.profiles), size=group.count, p=weights / weights.sum())
        generated = [f"{group.prefix}{i}" for i in range(group.count)]
        clashes = names.intersection(generated)
        if clashes:
            first = next(name for name in generated if name in clashes)
            raise UsageError(
                f"generated node name {first!r} is already taken; choose another prefix",
                field=f"node_groups[{g}].prefix",
            )
        names.update(generated)
        # Each profile's fields as a node of [[nodes]] has them: the ones given, and the group's engine.
        profile_fields = []
        for profile in group.profiles:
            node_fields = profile.model_dump(exclude={"weight"}, exclude_none=True)
            if group.engine is not None:
                node_fields["engine"] = group.engine
            profile_fields.append(node_fields)
        picked = choices.tolist()
        # A million nodes took 3.3 s (734 MiB peak) validated in blocks, and 5.9 s (1,221 MiB) with
        # a model_construct per node, whose fields_set holds every field (2-core VM, pydantic 2.14).
        adapter = _node_list_adapter()
        for first_index in range(0, group.count, EXPAND_BLOCK_NODES):
            block = range(first_index, min(first_index + EXPAND_BLOCK_NODES, group.count))
            nodes += adapter.validate_python([{"name": generated[i], **profile_fields[picked[i]]} for i in block])
    return nodes


def check_host(scenario: "Scenario", host: "HostSpec | None" = None) -> None:
    """Reject nodes and node-group profiles that ask for more CPUs or memory than the host has.

    ``host`` defaults to the scenario's own. Real mode can pass the Docker host's figures
    (``docker info``: NCPU, and MemTotal in MiB) to check the same before starting containers.
    """
    host = host if host is not None else scenario.host
    if host is None:
        return
    sized = [(f"nodes[{i}]", node.name, node.cpus, node.memory_mb) for i, node in enumerate(scenario.nodes)]
    for g, group in enumerate(scenario.node_groups):
        for p, profile in enumerate(group.profiles):
            sized.append((f"node_groups[{g}].profiles[{p}]", f"profile {p} of group {group.prefix}", profile.cpus, profile.memory_mb))
    for where, label, cpus, memory_mb in sized:
        if host.cpus is not None and cpus > host.cpus:
            raise UsageError(
                f"node {label} asks for cpus = {cpus:g} but its host has {host.cpus:g} CPUs; "
                "lower the node's cpus or raise host.cpus",
                field=f"{where}.cpus",
            )
        if host.memory_mb is not None and memory_mb > host.memory_mb:
            raise UsageError(
                f"node {label} asks for memory_mb = {memory_mb:g} but its host has {host.memory_mb:g} MiB; "
                "lower the node's memory_mb or raise host.memory_mb",
                field=f"{where}.memory_mb",
            )


def check_events(scenario: "Scenario") -> None:
    """Reject events that name unknown nodes or ask for impossible changes, before the run.

    Messages name each event where it was written (``events[i]``, or ``dynamics[j]`` and
    ``adaptation.capacity_changes[k]`` for the deprecated forms).
    """
    by_name = {node.name: node for node in scenario.nodes}
    origins = scenario.event_origins()
    for i, event in enumerate(scenario.events):
        node = by_name.get(event.node)
        if node is None:
            raise UsageError(
                f"unknown node {event.node!r}; events must name a node of [[nodes]] or a generated "
                "one such as the first of a group ({prefix}0)",
                field=f"{origins[i]}.node",
            )
    # Background work takes CPUs out of the node's quota, and cpu events change that quota.
    # Both modes apply events by time, then in list order; every state along that order must
    # leave the worker some quota.
    timelines: dict[str, list[tuple[float, int]]] = {}
    for i, event in enumerate(scenario.events):
        if event.kind in ("cpu", "background_load"):
            timelines.setdefault(event.node, []).append((event.time_s, i))
    for name, timeline in timelines.items():
        quota_cpus = by_name[name].cpus
        background_cpus = 0.0
        for _, index in sorted(timeline):
            event = scenario.events[index]
            if event.kind == "background_load":
                background_cpus = event.cpus
            else:
                quota_cpus = event.cpus
            if background_cpus >= quota_cpus:
                raise UsageError(
                    f"background cpus = {background_cpus:g} would take all of node {name}'s {quota_cpus:g} CPUs "
                    "at that time; give less than the node's quota (use a fail event to stop a node)",
                    field=f"{origins[index]}.cpus",
                )
