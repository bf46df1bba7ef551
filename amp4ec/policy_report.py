"""The figures `amp4ec partition` prints for one plan: segments, FLOPs, weights, cuts, predicted times."""

from __future__ import annotations

from dataclasses import dataclass, field

from amp4ec.costs import CostModel
from amp4ec.partition import Plan
from amp4ec.placement import StageModel
from amp4ec.scenario import Scenario

MB = 1e6

@dataclass
class StageRow:
    segment: str
    start: int
    stop: int
    first_unit: str
    last_unit: str
    flops: int
    param_mb: float
    memory_mb: float
    in_cut_bytes: int
    out_cut_bytes: int
    predicted_ms: dict[str, float] = field(default_factory=dict)
    """predicted stage time (execution and both transfers) on each node that may run it"""


def plan_rows(plan: Plan, scenario: Scenario, costs: CostModel) -> list[StageRow]:
    """Describe each segment and predict its time on each node that may run it (see amp4ec.placement)."""
    graph = costs.graph
    model = StageModel(
        graph,
        costs,
        bandwidth_mbps=scenario.network.bandwidth_mbps,
        hop_latency_ms=scenario.network.latency_ms,
        cache=scenario.policy.cache,
    )
    rows = []
    for segment in plan.segments:
        names = segment.nodes or tuple(n.name for n in scenario.nodes)
        rows.append(
            StageRow(
                segment=segment.id,
                start=segment.start,
                stop=segment.stop,
                first_unit=graph.units[segment.start].name,
                last_unit=graph.units[segment.stop - 1].name,
                flops=graph.segment_flops(segment.start, segment.stop),
                param_mb=graph.segment_param_bytes(segment.start, segment.stop) / MB,
                memory_mb=costs.segment_memory_bytes(segment.start, segment.stop) / MB,
                in_cut_bytes=graph.cut_bytes(segment.start),
                out_cut_bytes=graph.cut_bytes(segment.stop),
                predicted_ms={
                    name: model.stage(segment.start, segment.stop, scenario.node(name)).total_ms for name in names
                },
            )
        )
    return rows
