"""Partitioners that also place segments on nodes: optimal, replicate and hybrid.

All of them predict a stage's time with :class:`StageModel`, the same model `amp4ec partition`
prints. The model follows the simulator's request path: the coordinator sends a stage's input
over the node's link, the node runs the segment, and the output comes back over the same link.

- Execution: a segment with ``cpu_ms`` of CPU work and ``parallelism`` (CPU time over
  unthrottled wall time) runs on a node with CFS quota ``c`` CPUs in ``cpu_ms / min(c,
  parallelism)``. This is the back-to-back rate: a request that starts with a full quota can
  finish sooner (the CFS simulator shows it), so the prediction is an upper estimate for an
  idle node and the long-run rate for a busy one.
- Transfer: ``hop_latency_ms + bytes * 8 / bandwidth_bps`` for the input cut and again for the
  output cut; with the cache off the segment's weights travel with its input.
- Memory: a node needs the torch runtime plus, for each segment deployed on it, the weights and
  the peak activations (:meth:`CostModel.segment_memory_bytes`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from amp4ec.costs import CostModel
from amp4ec.errors import UsageError
from amp4ec.graph import ModelGraph
from amp4ec.partition import Plan, plan_from_bounds, refine_bounds, unit_costs_for, weighted_bounds
from amp4ec.scenario import NodeSpec

OBJECTIVES = ("latency", "bottleneck")
# The dynamic programme visits every subset of nodes, so its time doubles with each node.
# NOTE: 12 nodes is an estimate of where a block-granularity model still takes seconds; not benchmarked.
MAX_OPTIMAL_NODES = 12
DEFAULT_BANDWIDTH_MBPS = 1000.0


@dataclass(frozen=True, slots=True)
class StageTime:
    exec_ms: float
    transfer_ms: float

    @property
    def total_ms(self) -> float:
        return self.exec_ms + self.transfer_ms

    @property
    def bottleneck_ms(self) -> float:
        # The worker and the link are separate resources, so a pipeline is limited by the busier one.
        return max(self.exec_ms, self.transfer_ms)


class StageModel:
    """Predicted time and memory of segment ``[start, stop)`` on one node (see the module docstring)."""

    def __init__(
        self,
        graph: ModelGraph,
        costs: CostModel,
        *,
        bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS,
        hop_latency_ms: float | None = None,
        cache: bool = True,
    ):
        self.graph = graph
        self.costs = costs
        self.bandwidth_bps = bandwidth_mbps * 1e6
        self.hop_latency_ms = costs.hop_latency_ms(hop_latency_ms)
        self.cache = cache
        self._prefix: dict[tuple[int, float], tuple[float, float, list[float], list[float]]] = {}
        self._memory: dict[tuple[int, int], int] = {}

    def prefix_sums(self, threads: int, cpus: float) -> tuple[list[float], list[float], list[float], list[float]]:
        """Return the per-call CPU and wall ms by first unit (with that unit's own work) and the prefix sums of the units' scaled CPU and wall ms.

        The costs are the calibration's fit at the node's thread count and CPU quota.
        """
        # Prefix sums of CPU and wall time make every segment's cost O(1). They add up the same
        # terms as CostModel.segment_cost: one call overhead, the first unit's cold start and warm
        # work, the other units' warm work times the chain scale.
        cached = self._prefix.get((threads, cpus))
        if cached is None:
            overhead = self.costs.call_overhead(threads, cpus)
            scale = self.costs.chain_scale(threads, cpus)
            units = [self.costs.unit_cost(i, threads, cpus) for i in range(self.graph.n_units)]
            base_cpu, base_wall = [], []
            for first in range(self.graph.n_units):
                base = [overhead, self.costs.cold_start(threads, cpus, first=first), units[first]]
                base_cpu.append(sum(c.cpu_ms for c in base))
                base_wall.append(sum(c.cpu_ms / c.parallelism for c in base))
            cpu, wall = [0.0], [0.0]
            for unit in units:
                cpu.append(cpu[-1] + scale * unit.cpu_ms)
                wall.append(wall[-1] + scale * unit.cpu_ms / unit.parallelism)
            cached = (base_cpu, base_wall, cpu, wall)
            self._prefix[(threads, cpus)] = cached
        return cached

    def exec_ms(self, start: int, stop: int, node: NodeSpec) -> float:
        base_cpu, base_wall, cpu, wall = self.prefix_sums(node.torch_threads, node.cpus)
        cpu_ms = base_cpu[start] + cpu[stop] - cpu[start + 1]
        wall_ms = base_wall[start] + wall[stop] - wall[start + 1]
        parallelism = cpu_ms / wall_ms if wall_ms > 0 else 1.0
        return cpu_ms / min(node.cpus, parallelism)

    def transfer_ms(self, start: int, stop: int) -> float:
        in_bytes = self.graph.cut_bytes(start)
        if not self.cache:
            in_bytes += self.graph.segment_param_bytes(start, stop)
        out_bytes = self.graph.cut_bytes(stop)
        return CostModel.transfer_ms(in_bytes, self.bandwidth_bps, self.hop_latency_ms) + CostModel.transfer_ms(
            out_bytes, self.bandwidth_bps, self.hop_latency_ms
        )

    def stage(self, start: int, stop: int, node: NodeSpec) -> StageTime:
        return StageTime(self.exec_ms(start, stop, node), self.transfer_ms(start, stop))

    def segment_memory_bytes(self, start: int, stop: int) -> int:
        key = (start, stop)
        if key not in self._memory:
            self._memory[key] = self.costs.segment_memory_bytes(start, stop)
        return self._memory[key]

    def fits(self, start: int, stop: int, node: NodeSpec) -> bool:
        return self.costs.runtime_bytes + self.segment_memory_bytes(start, stop) <= node.memory_bytes


def plan_objective(stages: Sequence[StageTime], objective: str) -> float:
    """End-to-end latency (sum of stage times) or pipeline bottleneck (slowest stage resource)."""
    if objective == "latency":
        return sum(s.total_ms for s in stages)
    if objective == "bottleneck":
        return max(s.bottleneck_ms for s in stages)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


class _NetworkAware:
    """Partitioners that predict transfer time take the scenario's network unless given one."""

    uses_network = True

    def _model(self, graph: ModelGraph, costs: CostModel) -> StageModel:
        return StageModel(
            graph, costs, bandwidth_mbps=self.bandwidth_mbps, hop_latency_ms=self.hop_latency_ms, cache=self.cache
        )


class Optimal(_NetworkAware):
    """Cut points and one node per segment that minimise the predicted latency or bottleneck.

    A dynamic programme in the style of PipeEdge over (units covered, set of nodes used). Each
    node runs at most one segment, at most ``parts`` segments are used, and a segment goes only
    to a node whose memory limit covers the runtime, its weights and its activations. A stage's predicted time does not depend on the previous stage's node because
    every stage is relayed through the coordinator, so the set of used nodes is enough state.
    For ``objective = "bottleneck"`` a second pass minimises latency among the plans with the
    optimal bottleneck, so ties are broken towards the faster plan.
    """

    name = "optimal"

    def __init__(
        self,
        *,
        objective: str = "latency",
        bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS,
        hop_latency_ms: float | None = None,
        cache: bool = True,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.objective = objective
        self.bandwidth_mbps = bandwidth_mbps
        self.hop_latency_ms = hop_latency_ms
        self.cache = cache

    def partition(self, graph: ModelGraph, nodes: Sequence[NodeSpec], costs: CostModel, parts: int) -> Plan:
        if len(nodes) > MAX_OPTIMAL_NODES:
            raise ValueError(
                f"optimal visits every subset of nodes and supports at most {MAX_OPTIMAL_NODES} nodes, "
                f"got {len(nodes)}; use ralos or hybrid for larger clusters"
            )
        model = self._model(graph, costs)
        if self.objective == "latency":
            best = optimal_placement(graph.n_units, nodes, parts, model, "total", sum_costs=True)
        else:
            first = optimal_placement(graph.n_units, nodes, parts, model, "bottleneck", sum_costs=False)
            limit = first[0] * (1 + 1e-9) if first else math.inf
            best = optimal_placement(graph.n_units, nodes, parts, model, "total", sum_costs=True, max_stage_ms=limit)
        if best is None:
            raise ValueError(_no_fit_message(graph, nodes, costs))
        _, bounds, assigned = best
        return plan_from_bounds(self.name, bounds, [(nodes[k].name,) for k in assigned])


def stage_terms(
    n_units: int, nodes: Sequence[NodeSpec], model: StageModel, stage_cost: str, max_stage_ms: float = math.inf
) -> np.ndarray:
    """Return term[k, i, j]: the objective term of segment [i, j) on node k, inf where not allowed.

    ``stage_cost`` is ``"total"`` (execution plus transfers) or ``"bottleneck"`` (the busier of
    worker and link). A segment is not allowed on a node whose memory limit it exceeds, nor
    when its bottleneck exceeds ``max_stage_ms``.
    """
    # The same formulas as StageModel.stage, over every (i, j) at once; the brute-force tests
    # compare the result with the scalar path.
    graph = model.graph
    cut_bytes = np.array([graph.cut_bytes(i) for i in range(n_units + 1)], dtype=float)
    param_prefix = np.concatenate([[0.0], np.cumsum([u.param_bytes for u in graph.units[:n_units]], dtype=float)])
    in_bytes = cut_bytes[:, None] + (0.0 if model.cache else param_prefix[None, :] - param_prefix[:, None])
    transfer = (
        2 * model.hop_latency_ms + (in_bytes + cut_bytes[None, :]) * 8.0 / model.bandwidth_bps * 1e3
    )
    memory = np.full((n_units + 1, n_units + 1), math.inf)
    for i in range(n_units):
        for j in range(i + 1, n_units + 1):
            memory[i, j] = model.segment_memory_bytes(i, j)
    memory += model.costs.runtime_bytes
    valid = np.triu(np.ones((n_units + 1, n_units + 1), dtype=bool), k=1)
    terms = np.full((len(nodes), n_units + 1, n_units + 1), math.inf)
    for k, node in enumerate(nodes):
        base_cpu, base_wall, cpu, wall = model.prefix_sums(node.torch_threads, node.cpus)
        cpu = np.asarray(cpu[: n_units + 1])
        wall = np.asarray(wall[: n_units + 1])
        # Row i is a segment starting at unit i, whose own work is in base_cpu[i], so the prefix
        # sums count from unit i + 1. Row n_units starts no segment and only pads.
        first_cpu = np.append(base_cpu[:n_units], 0.0)[:, None]
        first_wall = np.append(base_wall[:n_units], 0.0)[:, None]
        cpu_ms = first_cpu + cpu[None, :] - np.append(cpu[1:], 0.0)[:, None]
        wall_ms = first_wall + wall[None, :] - np.append(wall[1:], 0.0)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            parallelism = np.where(wall_ms > 0, cpu_ms / wall_ms, 1.0)
        exec_ms = cpu_ms / np.minimum(node.cpus, parallelism)
        bottleneck = np.maximum(exec_ms, transfer)
        term = exec_ms + transfer if stage_cost == "total" else bottleneck
        allowed = valid & (memory <= node.memory_bytes) & (bottleneck <= max_stage_ms)
        terms[k] = np.where(allowed, term, math.inf)
    return terms


def optimal_placement(
    n_units: int,
    nodes: Sequence[NodeSpec],
    parts: int,
    model: StageModel,
    stage_cost: str,
    *,
    sum_costs: bool,
    max_stage_ms: float = math.inf,
) -> tuple[float, list[int], list[int]] | None:
    """Return (objective, bounds, node index per segment) of the best plan, or None if none fits.

    The objective is the sum of the stages' terms (``sum_costs``) or their maximum; see
    :func:`stage_terms` for ``stage_cost`` and ``max_stage_ms``.
    """
    n_nodes = len(nodes)
    n_masks = 1 << n_nodes
    terms = stage_terms(n_units, nodes, model, stage_cost, max_stage_ms)
    # best[i, mask]: lowest objective covering units [0, i) with the nodes in mask.
    best = np.full((n_units + 1, n_masks), math.inf)
    best[0, 0] = 0.0
    parent_start = np.full((n_units + 1, n_masks), -1, dtype=np.int64)
    parent_mask = np.full((n_units + 1, n_masks), -1, dtype=np.int64)
    parent_node = np.full((n_units + 1, n_masks), -1, dtype=np.int64)
    used = [bin(mask).count("1") for mask in range(n_masks)]
    for i in range(n_units):
        for mask in range(n_masks):
            value = best[i, mask]
            if math.isinf(value) or used[mask] >= parts:
                continue
            for k in range(n_nodes):
                if mask & (1 << k):
                    continue
                # All segment ends j > i at once.
                row = terms[k, i, i + 1 :]
                candidates = value + row if sum_costs else np.maximum(value, row)
                new_mask = mask | (1 << k)
                better = candidates < best[i + 1 :, new_mask]
                if not better.any():
                    continue
                ends = np.nonzero(better)[0] + i + 1
                best[ends, new_mask] = candidates[better]
                parent_start[ends, new_mask] = i
                parent_mask[ends, new_mask] = mask
                parent_node[ends, new_mask] = k
    final = best[n_units]
    if math.isinf(final.min()):
        return None
    mask = int(np.argmin(final))
    value = float(final[mask])
    bounds, assigned = [n_units], []
    position = n_units
    while position > 0:
        start, previous_mask, k = (
            int(parent_start[position, mask]),
            int(parent_mask[position, mask]),
            int(parent_node[position, mask]),
        )
        bounds.append(start)
        assigned.append(k)
        position, mask = start, previous_mask
    return value, bounds[::-1], assigned[::-1]


def brute_force_placement(
    n_units: int, nodes: Sequence[NodeSpec], parts: int, model: StageModel, objective: str
) -> float | None:
    """Return the best objective over every plan, by enumeration (for tests on small instances)."""
    best = None
    for n_segments in range(1, min(parts, len(nodes), n_units) + 1):
        for inner in itertools.combinations(range(1, n_units), n_segments - 1):
            bounds = [0, *inner, n_units]
            for order in itertools.permutations(range(len(nodes)), n_segments):
                pairs = list(zip(bounds[:-1], bounds[1:]))
                if not all(model.fits(a, b, nodes[k]) for (a, b), k in zip(pairs, order)):
                    continue
                value = plan_objective([model.stage(a, b, nodes[k]) for (a, b), k in zip(pairs, order)], objective)
                best = value if best is None else min(best, value)
    return best


def _no_fit_message(graph: ModelGraph, nodes: Sequence[NodeSpec], costs: CostModel) -> str:
    largest = max(nodes, key=lambda n: n.memory_bytes)
    smallest_unit = min(costs.segment_memory_bytes(i, i + 1) for i in range(graph.n_units))
    return (
        f"no plan fits the nodes' memory: the runtime needs {costs.runtime_bytes / 2**20:.0f} MiB and the "
        f"{graph.n_units} units need {costs.segment_memory_bytes(0, graph.n_units) / 2**20:.0f} MiB in total "
        f"(the smallest unit {smallest_unit / 2**20:.1f} MiB), but the largest node {largest.name!r} has "
        f"{largest.memory_mb:g} MiB; add memory or nodes"
    )


class Replicate(_NetworkAware):
    """The whole model on every node whose memory limit fits it; the scheduler routes each request.

    The plan has one segment with every fitting node as a replica. Schedulers keep to those
    nodes; ``shortest_expected_completion`` routes by capacity (queued work over CPU quota).
    """

    name = "replicate"

    def __init__(self, *, bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS, hop_latency_ms: float | None = None, cache: bool = True):
        self.bandwidth_mbps = bandwidth_mbps
        self.hop_latency_ms = hop_latency_ms
        self.cache = cache

    def partition(self, graph: ModelGraph, nodes: Sequence[NodeSpec], costs: CostModel, parts: int) -> Plan:
        model = self._model(graph, costs)
        replicas = [n.name for n in nodes if model.fits(0, graph.n_units, n)]
        if not replicas:
            raise ValueError(_no_fit_message(graph, nodes, costs))
        return plan_from_bounds(self.name, [0, graph.n_units], [replicas])


class Hybrid(_NetworkAware):
    """Pipeline stages, each served by a group of replica nodes.

    Nodes are split into ``stages`` groups of about equal total CPU quota (largest node to the
    group with the least quota so far). The model is cut with capability-weighted RALOS targets
    on calibrated time, each stage's target proportional to its group's quota. Every node of a
    group whose memory limit fits the stage's segment serves it.
    """

    name = "hybrid"

    def __init__(
        self,
        *,
        stages: int = 2,
        bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS,
        hop_latency_ms: float | None = None,
        cache: bool = True,
    ):
        if stages < 1:
            raise ValueError(f"stages must be at least 1, got {stages}")
        self.stages = stages
        self.bandwidth_mbps = bandwidth_mbps
        self.hop_latency_ms = hop_latency_ms
        self.cache = cache

    def partition(self, graph: ModelGraph, nodes: Sequence[NodeSpec], costs: CostModel, parts: int) -> Plan:
        n_stages = min(self.stages, len(nodes), graph.n_units)
        groups: list[list[NodeSpec]] = [[] for _ in range(n_stages)]
        for node in sorted(nodes, key=lambda n: -n.cpus):
            min(groups, key=lambda g: sum(n.cpus for n in g)).append(node)
        quotas = [sum(n.cpus for n in g) for g in groups]
        shares = [q / sum(quotas) for q in quotas]
        unit_costs = unit_costs_for(graph, costs, "time", nodes[0].torch_threads)
        bounds = refine_bounds(unit_costs, weighted_bounds(unit_costs, shares), shares)
        model = self._model(graph, costs)
        assigned = []
        for (start, stop), group in zip(zip(bounds[:-1], bounds[1:]), groups):
            replicas = [n.name for n in group if model.fits(start, stop, n)]
            if not replicas:
                raise ValueError(
                    f"no node of stage group {[n.name for n in group]} has memory for units [{start}, {stop}) "
                    f"({model.segment_memory_bytes(start, stop) / 2**20:.0f} MiB plus the runtime); "
                    "use fewer stages or add memory"
                )
            assigned.append(replicas)
        return plan_from_bounds(self.name, bounds, assigned)


def check_plan_fits(plan: Plan, nodes: Sequence[NodeSpec], costs: CostModel, *, source: str = "scenario") -> None:
    """Raise UsageError when the plan cannot be deployed within the nodes' memory limits.

    A segment assigned to nodes must fit on each of them together with every other segment
    deployed there. Unassigned segments are deployed on every node. A node they do not fit is
    OOM-killed at deployment and the simulator reports it, so the plan is rejected only when
    no node at all can fit them.
    """
    runtime = costs.runtime_bytes
    by_name = {n.name: n for n in nodes}
    for segment in plan.segments:
        for name in segment.nodes:
            if name not in by_name:
                raise UsageError(
                    f"partitioner {plan.partitioner!r} assigned segment {segment.id} to unknown node {name!r}",
                    field="policy.partitioner",
                    source=source,
                )
    fitting = []
    for node in nodes:
        deployed = plan.segments_on(node.name)
        need = runtime + sum(costs.segment_memory_bytes(s.start, s.stop) for s in deployed)
        assigned_here = any(s.nodes for s in deployed)
        if need > node.memory_bytes and assigned_here:
            raise UsageError(
                f"the plan of partitioner {plan.partitioner!r} does not fit node {node.name!r}: its segments "
                f"{', '.join(s.id for s in deployed)} and the runtime need {need / 2**20:.0f} MiB but the limit "
                f"is {node.memory_mb:g} MiB; choose a partitioner that respects memory (optimal) or raise memory_mb",
                field="policy.partitioner",
                source=source,
            )
        if need <= node.memory_bytes:
            fitting.append(node.name)
    if not fitting:
        batch = getattr(costs, "batch", 1)
        if batch > 1:
            # Activations grow with the batch, so a large batch alone can exceed every node's memory.
            advice = f"the activations of a batch of {batch} count; lower workload.batch, "
        else:
            advice = ""
        raise UsageError(
            f"the plan of partitioner {plan.partitioner!r} fits no node: every node would be OOM-killed at "
            f"deployment; {advice}use more partitions, a partitioner that respects memory (optimal) or raise memory_mb",
            field="policy.partitioner",
            source=source,
        )

