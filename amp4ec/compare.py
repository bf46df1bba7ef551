"""Fidelity report: how well a simulated run predicted a real run of the same scenario.

Each metric's relative error is ``|sim - real| / |real|``, so the real run is the reference.
A metric that one of the runs could not compute (no completed request, zero duration) has no
error and is reported as missing. A threshold on a missing metric fails the check, because
the prediction could not be confirmed.

This module imports neither docker nor torch, so `amp4ec compare` works with the core install.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amp4ec.errors import FileFormatError, UsageError
from amp4ec.metrics import read_records

LATENCY_KEYS = ("mean", "p50", "p95", "p99")
# Names accepted by `thresholds`: one per latency statistic, throughput and utilisation (the
# utilisation threshold applies to every node).
THRESHOLD_NAMES = (*LATENCY_KEYS, "throughput", "utilisation")


@dataclass
class MetricError:
    """One compared metric: its simulated and real value and the relative error."""

    name: str
    sim: float | None
    real: float | None
    threshold: float | None = None

    @property
    def relative_error(self) -> float | None:
        if self.sim is None or self.real is None:
            return None
        if self.real == 0:
            return 0.0 if self.sim == 0 else math.inf
        return abs(self.sim - self.real) / abs(self.real)

    @property
    def passed(self) -> bool:
        if self.threshold is None:
            return True
        error = self.relative_error
        return error is not None and error <= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sim": self.sim,
            "real": self.real,
            "relative_error": self.relative_error,
            "threshold": self.threshold,
            "passed": self.passed,
        }


@dataclass
class Comparison:
    sim_dir: Path
    real_dir: Path
    metrics: list[MetricError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(metric.passed for metric in self.metrics)

    @property
    def failures(self) -> list[MetricError]:
        return [metric for metric in self.metrics if not metric.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "sim_dir": str(self.sim_dir),
            "real_dir": str(self.real_dir),
            "passed": self.passed,
            "metrics": [metric.as_dict() for metric in self.metrics],
            "warnings": list(self.warnings),
        }


def load_summary(run_dir: Path) -> dict[str, Any]:
    """Read a run directory's summary.json, raising UsageError when the directory is not a run."""
    path = Path(run_dir) / "summary.json"
    if not Path(run_dir).is_dir():
        raise UsageError("run directory not found; give a directory written by simulate or replay --out", source=str(run_dir))
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UsageError("has no summary.json; give a directory written by simulate or replay --out", source=str(run_dir)) from exc
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"summary.json is not valid JSON: {exc}", source=str(path)) from exc
    for key in ("latency_ms", "throughput_rps", "nodes"):
        if key not in summary:
            raise FileFormatError(f"summary.json lacks {key!r}; was it written by this version of amp4ec?", source=str(path))
    return summary


def run_mode(run_dir: Path) -> str | None:
    """Return the mode ("sim" or "real") recorded in the directory's run.json, or None when it has none."""
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    mode = info.get("mode") if isinstance(info, dict) else None
    return mode if isinstance(mode, str) else None


def check_thresholds(thresholds: dict[str, float | None]) -> dict[str, float]:
    checked: dict[str, float] = {}
    for name, value in thresholds.items():
        if name not in THRESHOLD_NAMES:
            raise UsageError(f"unknown threshold {name!r}; expected one of {', '.join(THRESHOLD_NAMES)}")
        if value is None:
            continue
        if not value >= 0:
            raise UsageError(f"threshold for {name} must be a non-negative relative error such as 0.2, got {value}")
        checked[name] = float(value)
    return checked


def compare_runs(sim_dir: Path, real_dir: Path, thresholds: dict[str, float | None] | None = None) -> Comparison:
    """Compare latency statistics, throughput and per-node utilisation of two run directories."""
    limits = check_thresholds(thresholds or {})
    sim = load_summary(sim_dir)
    real = load_summary(real_dir)
    comparison = Comparison(Path(sim_dir), Path(real_dir))

    for key in LATENCY_KEYS:
        comparison.metrics.append(
            MetricError(f"latency {key} (ms)", sim["latency_ms"].get(key), real["latency_ms"].get(key), limits.get(key))
        )
    comparison.metrics.append(
        MetricError("throughput (requests/s)", sim["throughput_rps"], real["throughput_rps"], limits.get("throughput"))
    )

    sim_nodes = sim["nodes"]
    real_nodes = real["nodes"]
    if set(sim_nodes) != set(real_nodes):
        comparison.warnings.append(
            f"the runs have different nodes (sim: {', '.join(sim_nodes)}; real: {', '.join(real_nodes)}); "
            "only the nodes both have are compared"
        )
    for name in (n for n in real_nodes if n in sim_nodes):
        comparison.metrics.append(
            MetricError(
                f"node {name} utilisation",
                sim_nodes[name].get("utilisation"),
                real_nodes[name].get("utilisation"),
                limits.get("utilisation"),
            )
        )

    for label, run_dir in (("sim", sim_dir), ("real", real_dir)):
        mode = run_mode(run_dir)
        if mode is not None and mode != label:
            comparison.warnings.append(
                f"{run_dir} contains a {mode} run but was given as the {label} run; "
                f"the columns headed {label} show that {mode} run"
            )
    for label, summary in (("sim", sim), ("real", real)):
        failed = summary.get("requests", {}).get("failed", 0)
        if failed:
            comparison.warnings.append(f"the {label} run has {failed} failed requests; latency covers completed requests only")
    return comparison


def completed_latencies_ms(run_dir: Path) -> np.ndarray:
    path = Path(run_dir) / "records.parquet"
    if not path.is_file():
        raise UsageError("has no records.parquet; give a directory written by simulate or replay --out", source=str(run_dir))
    try:
        records = read_records(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"cannot read records.parquet: {exc}; rerun the simulation or replay that wrote it", source=str(run_dir)) from exc
    return records.loc[records["outcome"] == "completed", "latency_ms"].to_numpy(dtype=float)


def plot_latency_distributions(sim_dir: Path, real_dir: Path, out: Path) -> Path:
    """Write a PNG with both runs' latency histograms and empirical CDFs side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim_ms = completed_latencies_ms(sim_dir)
    real_ms = completed_latencies_ms(real_dir)
    figure, (histogram, cdf) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    both = np.concatenate([sim_ms, real_ms])
    if len(both):
        bins = np.linspace(both.min(), both.max(), 40) if both.max() > both.min() else 10
        for values, label in ((sim_ms, "simulated"), (real_ms, "real")):
            if len(values):
                histogram.hist(values, bins=bins, alpha=0.5, label=f"{label} (n={len(values)})")
                ordered = np.sort(values)
                cdf.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post", label=label)
    histogram.set_xlabel("latency (ms)")
    histogram.set_ylabel("requests")
    histogram.legend()
    cdf.set_xlabel("latency (ms)")
    cdf.set_ylabel("fraction of completed requests")
    cdf.legend()
    figure.suptitle("latency: simulated vs real")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_error(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1%}"
