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


def plan_from_bounds(partitioner: str, bounds: Sequence[int]) -> Plan:
    segments = tuple(Segment(i, start, stop) for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])))
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


class Ralos:
    """RALOS with the published per-layer cost (Conv2d k_h*k_w*C_in*C_out, Linear in*out, else params).

    At block granularity the cost of a unit is the sum over its leaf modules, so cuts fall
    only between blocks; at leaf granularity they may fall inside residual blocks.
    """

    name = "ralos"

    def partition(self, graph: ModelGraph, nodes: Sequence[NodeSpec], costs: CostModel, parts: int) -> Plan:
        unit_costs = [float(u.ralos_cost) for u in graph.units]
        return plan_from_bounds(self.name, ralos_bounds(unit_costs, min(parts, graph.n_units)))
