"""Small hand-made graphs and calibrations for tests that must not depend on torch or Docker.

These are test inputs only; the calibration shipped with the package is measured.
"""

from __future__ import annotations

from amp4ec.costs import CALIBRATION_SCHEMA, Calibration, ProfileCalibration, Provenance, TimingStats, UnitTiming
from amp4ec.graph import Cut, Leaf, ModelGraph, TensorSpec, Unit


def make_graph(unit_costs: list[int], *, cut_bytes: int = 4000, model: str = "synthetic") -> ModelGraph:
    units = [
        Unit(
            name=f"u{i}",
            flops=2 * cost,
            param_bytes=4 * cost,
            activation_bytes=cut_bytes,
            leaves=[Leaf(name=f"u{i}.conv", type="Conv2d", params=cost, ralos_cost=cost, macs=cost)],
        )
        for i, cost in enumerate(unit_costs)
    ]
    cuts = [
        Cut(index=i, tensors=[TensorSpec(name=f"t{i}", shape=[1, cut_bytes // 4], bytes=cut_bytes)])
        for i in range(len(units) + 1)
    ]
    return ModelGraph(model=model, granularity="block", input_shape=[1, cut_bytes // 4], units=units, cuts=cuts)


def make_calibration(
    cpu_ms: list[float],
    *,
    profiles: tuple[tuple[str, float, int], ...] = (("high", 1.0, 1), ("low", 0.4, 1)),
    runtime_rss_bytes: int = 200 * 2**20,
    model: str = "synthetic",
    graph: ModelGraph | None = None,
    memory_bytes: int = 2**30,
) -> Calibration:
    """Return a calibration whose units take ``cpu_ms`` in every profile, on ``graph`` or a synthetic one."""
    graph = graph or make_graph([max(1, int(ms * 1000)) for ms in cpu_ms], model=model)

    def timing(name: str, ms: float) -> UnitTiming:
        stats = TimingStats(mean_ms=ms, p50_ms=ms, p95_ms=ms, samples=10)
        return UnitTiming(name=name, cpu_ms=ms, wall=stats, warm_cpu_ms=ms, warm_wall=stats)

    return Calibration(
        schema=CALIBRATION_SCHEMA,
        graph=graph,
        profiles=[
            ProfileCalibration(
                name=name,
                cpus=cpus,
                memory_bytes=memory_bytes,
                threads=threads,
                gap_ms=100.0,
                runtime_rss_bytes=runtime_rss_bytes,
                units=[timing(u.name, ms) for u, ms in zip(graph.units, cpu_ms)],
                model=timing("model", sum(cpu_ms)),
            )
            for name, cpus, threads in profiles
        ],
        provenance=Provenance(
            date="test",
            amp4ec_version="test",
            host_cpu="test",
            host_cores=2,
            host_torch="none",
            worker_torch="none",
            image="none",
            command="tests/synthetic.py",
            warmup=0,
            repeats=10,
        ),
    )
