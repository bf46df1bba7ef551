"""Partitioners: split a model graph into contiguous segments.

A partitioner maps a graph and the cluster's nodes to a :class:`Plan`; the backends carry the
plan out and check it with :meth:`Plan.validate`. Partitioners import neither SimPy nor Docker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from amp4ec.costs import CostModel
from amp4ec.graph import ModelGraph
from amp4ec.scenario import NodeSpec


@dataclass(frozen=True, slots=True)
class Segment:
    """Units ``start`` to ``stop - 1`` of the graph, run as one stage."""

    index: int
    start: int
    stop: int
    nodes: tuple[str, ...] = ()
    """nodes the partitioner assigned to run this segment (replicas); empty lets the scheduler choose"""

    @property
    def id(self) -> str:
        return f"s{self.index}"


@dataclass(frozen=True, slots=True)
class Plan:
    partitioner: str
    segments: tuple[Segment, ...]

    @property
    def bounds(self) -> list[int]:
        """Cut positions, from 0 to the number of units."""
        return [self.segments[0].start] + [s.stop for s in self.segments]

    @property
    def assigned(self) -> bool:
        """Whether the partitioner chose the nodes of every segment."""
        return all(s.nodes for s in self.segments)

    def segments_on(self, node: str) -> list[Segment]:
        """Return the segments deployed on ``node``: those assigned to it and those assigned to none."""
        return [s for s in self.segments if not s.nodes or node in s.nodes]

    def validate(self, n_units: int) -> None:
        """Check that the segments cover units 0..n_units-1 in order, each at least one unit."""
        if not self.segments:
            raise ValueError(f"partitioner {self.partitioner!r} returned no segments")
        expected_start = 0
        for i, segment in enumerate(self.segments):
            if segment.index != i or segment.start != expected_start or segment.stop <= segment.start:
                raise ValueError(
                    f"partitioner {self.partitioner!r} returned an invalid plan: segment {i} is "
                    f"[{segment.start}, {segment.stop}), expected it to start at unit {expected_start}"
                )
            expected_start = segment.stop
        if expected_start != n_units:
            raise ValueError(
                f"partitioner {self.partitioner!r} returned a plan that ends at unit {expected_start}, "
                f"but the graph has {n_units} units"
            )


def plan_from_bounds(
    partitioner: str, bounds: Sequence[int], nodes: Sequence[Sequence[str]] | None = None
) -> Plan:
    """Build a plan from cut positions and, optionally, the nodes assigned to each segment."""
    pairs = list(zip(bounds[:-1], bounds[1:]))
    assigned = [tuple(n) for n in nodes] if nodes is not None else [()] * len(pairs)
    if len(assigned) != len(pairs):
        raise ValueError(f"{len(pairs)} segments but {len(assigned)} node assignments")
    segments = tuple(Segment(i, start, stop, assigned[i]) for i, (start, stop) in enumerate(pairs))
    return Plan(partitioner, segments)


class Partitioner(Protocol):
    """Maps a graph and nodes to a plan. ``parts`` is the number of segments requested."""

    name: str

    def partition(self, graph: ModelGraph, nodes: Sequence[NodeSpec], costs: CostModel, parts: int) -> Plan: ...


class Monolithic:
    """The whole model as one segment: the paper's baseline."""

    name = "monolithic"

    def partition(self, graph: ModelGraph, nodes: Sequence[NodeSpec], costs: CostModel, parts: int) -> Plan:
        return plan_from_bounds(self.name, [0, graph.n_units])


def ralos_bounds(unit_costs: Sequence[float], parts: int) -> list[int]:
    """Cut positions by the RALOS rule of AMP4EC (Zhang et al., 2025).

    Walk the units in order, add each cost to the current partition, and close it as soon as
    its running cost reaches total / parts; the leftover units form the last partition. At most
    ``parts - 1`` partitions are closed early, so trailing zero-cost units join the last one
    instead of forming an extra partition.
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    n_units = len(unit_costs)
    target = sum(unit_costs) / parts
    bounds = [0]
    running = 0.0
    for i, cost in enumerate(unit_costs):
        running += cost
        closed = len(bounds) - 1
        if running >= target and closed < parts - 1 and i + 1 < n_units:
            bounds.append(i + 1)
            running = 0.0
    bounds.append(n_units)
    return bounds


RALOS_COSTS = ("published", "macs", "time")
RALOS_WEIGHTINGS = ("equal", "capability")


def unit_costs_for(graph: ModelGraph, costs: CostModel | None, cost: str, threads: int = 1) -> list[float]:
    """Return the per-unit cost RALOS balances.

    ``published`` is the AMP4EC paper's layer cost; ``macs`` is the multiply-accumulates
    torch.utils.flop_counter counts (FLOPs / 2), which charges depthwise convolutions and
    output size correctly; ``time`` is the calibrated CPU time of each unit with ``threads``
    torch threads.
    """
    if cost == "published":
        return [float(u.ralos_cost) for u in graph.units]
    if cost == "macs":
        return [u.flops / 2.0 for u in graph.units]
    if cost == "time":
        if costs is None:
            raise ValueError("cost = 'time' needs a cost model")
        return [costs.unit_cost(i, threads).cpu_ms for i in range(graph.n_units)]
    raise ValueError(f"unknown RALOS cost {cost!r}; choose one of {', '.join(RALOS_COSTS)}")


def node_scores(nodes: Sequence[NodeSpec]) -> list[float]:
    """Node scores S_i = 0.6 c_i/c_max + 0.4 m_i/m_max of the AMP4EC paper (CPU and memory)."""
    c_max = max(n.cpus for n in nodes)
    m_max = max(n.memory_bytes for n in nodes)
    return [0.6 * n.cpus / c_max + 0.4 * n.memory_bytes / m_max for n in nodes]


def weighted_bounds(unit_costs: Sequence[float], shares: Sequence[float]) -> list[int]:
    """Cut positions that close partition i once its running cost reaches ``shares[i] * total``.

    This is the RALOS walk with per-partition targets; with equal shares it equals
    :func:`ralos_bounds`. Every partition gets at least one unit when there are enough units.
    """
    n_units = len(unit_costs)
    parts = min(len(shares), n_units)
    total = sum(unit_costs)
    bounds = [0]
    running = 0.0
    for i, cost in enumerate(unit_costs):
        running += cost
        closed = len(bounds) - 1
        # Leave at least one unit for each partition still to come.
        if closed < parts - 1 and i + 1 < n_units and (
            running >= shares[closed] * total or n_units - (i + 1) <= parts - 1 - closed
        ):
            bounds.append(i + 1)
            running = 0.0
    bounds.append(n_units)
    return bounds


def imbalance(unit_costs: Sequence[float], bounds: Sequence[int], shares: Sequence[float]) -> float:
    """Imbalance L = (1/n) sum |L_i - L_mean| of the AMP4EC paper's capability-weighted RALOS.

    L_i is partition i's cost divided by its node's share P_i, so a partition exactly
    proportional to its node's capability has L_i = total for every i and L = 0. The sources
    do not define L_i; dividing by the share is this project's choice.
    """
    loads = [sum(unit_costs[a:b]) / share for a, b, share in zip(bounds[:-1], bounds[1:], shares)]
    mean = sum(loads) / len(loads)
    return sum(abs(load - mean) for load in loads) / len(loads)


def refine_bounds(unit_costs: Sequence[float], bounds: Sequence[int], shares: Sequence[float]) -> list[int]:
    """Move one boundary by one unit at a time while that lowers :func:`imbalance` (greedy descent)."""
    bounds = list(bounds)
    current = imbalance(unit_costs, bounds, shares)
    # Each accepted move lowers L strictly, so the walk ends; the cap guards float ties.
    for _ in range(len(unit_costs) * len(bounds)):
        best = None
        for b in range(1, len(bounds) - 1):
            for step in (-1, 1):
                moved = bounds[b] + step
                if not bounds[b - 1] < moved < bounds[b + 1]:
                    continue
                candidate = bounds[:b] + [moved] + bounds[b + 1 :]
                value = imbalance(unit_costs, candidate, shares[: len(candidate) - 1])
                if value < current - 1e-12 * max(1.0, current) and (best is None or value < best[0]):
                    best = (value, candidate)
        if best is None:
            break
        current, bounds = best
    return bounds


class Ralos:
    """RALOS of the AMP4EC paper (Zhang et al., 2025), with a choice of unit cost and targets.

    ``cost``: ``"published"`` (Conv2d k_h*k_w*C_in*C_out, Linear in*out, any other leaf its
    parameter count), ``"macs"`` or ``"time"`` (see :func:`unit_costs_for`). ``weighting``:
    ``"equal"`` targets total/parts per partition, the published rule; ``"capability"`` gives
    partition i the target P_i * total from the node score S_i, then moves boundaries one
    unit at a time to lower the imbalance. With capability weighting, partition i is assigned
    to its node unless ``assign`` is false, because the targets assume that node runs it.

    At block granularity the cost of a unit is the sum over its leaf modules, so cuts fall
    only between blocks; at leaf granularity they may fall inside residual blocks.
    """

    name = "ralos"

    def __init__(self, *, cost: str = "published", weighting: str = "equal", assign: bool | None = None):
        if cost not in RALOS_COSTS:
            raise ValueError(f"unknown cost {cost!r}; choose one of {', '.join(RALOS_COSTS)}")
        if weighting not in RALOS_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(RALOS_WEIGHTINGS)}")
        self.cost = cost
        self.weighting = weighting
        self.assign = weighting == "capability" if assign is None else assign

    def partition(self, graph: ModelGraph, nodes: Sequence[NodeSpec], costs: CostModel | None, parts: int) -> Plan:
        threads = nodes[0].torch_threads if nodes else 1
        unit_costs = unit_costs_for(graph, costs, self.cost, threads)
        parts = min(parts, graph.n_units)
        if self.weighting == "equal":
            bounds = ralos_bounds(unit_costs, parts)
            chosen = list(nodes)[: len(bounds) - 1] if len(nodes) >= len(bounds) - 1 else []
        else:
            chosen = _strongest_nodes(nodes, parts)
            scores = node_scores(chosen)
            shares = [score / sum(scores) for score in scores]
            bounds = refine_bounds(unit_costs, weighted_bounds(unit_costs, shares), shares)
        if self.assign and chosen:
            return plan_from_bounds(self.name, bounds, [(n.name,) for n in chosen[: len(bounds) - 1]])
        return plan_from_bounds(self.name, bounds)


def _strongest_nodes(nodes: Sequence[NodeSpec], parts: int) -> list[NodeSpec]:
    """Return the ``parts`` nodes with the highest score, in the scenario's order (one partition each)."""
    scores = node_scores(nodes)
    ranked = sorted(range(len(nodes)), key=lambda i: (-scores[i], i))[: min(parts, len(nodes))]
    return [nodes[i] for i in sorted(ranked)]


class Uniform:
    """Equal unit counts per segment (the first ``n_units % parts`` segments get one more)."""

    name = "uniform"

    def partition(self, graph: ModelGraph, nodes: Sequence[NodeSpec], costs: CostModel | None, parts: int) -> Plan:
        parts = min(parts, graph.n_units)
        size, extra = divmod(graph.n_units, parts)
        bounds = [0]
        for i in range(parts):
            bounds.append(bounds[-1] + size + (1 if i < extra else 0))
        return plan_from_bounds(self.name, bounds)
