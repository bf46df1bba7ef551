"""`amp4ec report`: plots and a Markdown summary from one or more run directories.

A run directory is what `amp4ec simulate` or `amp4ec replay` writes: records.parquet,
summary.json and run.json. Runs of the same scenario name from both modes are paired, so
simulated and real results appear side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from amp4ec.errors import UsageError  # noqa: E402
from amp4ec.metrics import LATENCY_DEFINITION, THROUGHPUT_DEFINITION  # noqa: E402

# Width of the time bins of the utilisation-over-time plot, in seconds.
UTILISATION_BIN_S = 0.5


@dataclass
class Run:
    directory: Path
    records: pd.DataFrame
    summary: dict[str, Any]
    info: dict[str, Any]

    @property
    def scenario_name(self) -> str:
        return self.info.get("scenario", {}).get("name", self.directory.name)

    @property
    def mode(self) -> str:
        return self.info.get("mode", "?")

    @property
    def label(self) -> str:
        return f"{self.scenario_name} ({self.mode})"

    @property
    def offered_rate_rps(self) -> float | None:
        workload = self.info.get("scenario", {}).get("workload", {})
        return workload.get("rate_rps") if workload.get("kind") != "closed" else None


def load_run(directory: Path) -> Run:
    """Read a run directory, naming the missing file when it is incomplete."""
    if not directory.is_dir():
        raise UsageError("not a directory; give run directories written by simulate or replay", source=str(directory))
    paths = {name: directory / name for name in ("records.parquet", "summary.json", "run.json")}
    for name, path in paths.items():
        if not path.is_file():
            raise UsageError(f"{name} is missing; is this a run directory of simulate or replay?", source=str(directory))
    try:
        records = pd.read_parquet(paths["records.parquet"])
        summary = json.loads(paths["summary.json"].read_text())
        info = json.loads(paths["run.json"].read_text())
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot read the run: {exc}", source=str(directory)) from exc
    return Run(directory, records, summary, info)


def _completed_latencies(run: Run) -> np.ndarray:
    completed = run.records[run.records["outcome"] == "completed"]
    return np.sort(completed["latency_ms"].to_numpy(dtype=float))


def plot_latency_cdf(runs: list[Run], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        latencies = _completed_latencies(run)
        if len(latencies):
            ax.step(latencies, np.arange(1, len(latencies) + 1) / len(latencies), where="post", label=run.label)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("share of completed requests")
    ax.set_title("Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(runs: list[Run], path: Path) -> None:
    """Plot throughput against offered load for open-loop runs, or one bar per run otherwise."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    open_loop = [r for r in runs if r.offered_rate_rps is not None]
    if open_loop:
        for mode in sorted({r.mode for r in open_loop}):
            points = sorted((r.offered_rate_rps, r.summary["throughput_rps"] or 0.0) for r in open_loop if r.mode == mode)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
        limit = max(r.offered_rate_rps for r in open_loop)
        ax.plot([0, limit], [0, limit], color="grey", linestyle=":", label="throughput = offered load")
        ax.set_xlabel("offered load (requests/s)")
        ax.legend(fontsize="small")
    else:
        labels = [r.label for r in runs]
        ax.bar(range(len(runs)), [r.summary["throughput_rps"] or 0.0 for r in runs])
        ax.set_xticks(range(len(runs)), labels, rotation=30, ha="right", fontsize="small")
        ax.set_xlabel("closed-loop runs (no offered load to vary)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title("Throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def node_busy_share(run: Run, bin_s: float = UTILISATION_BIN_S) -> pd.DataFrame:
    """Return, per time bin and node, the share of the bin the node spent running segments.

    Each stage's execution is taken to end at the stage's end, which places it a transfer
    time late; with bins much longer than a transfer that shift is negligible.
    """
    rows = []
    for _, record in run.records.iterrows():
        for node, end_s, exec_ms in zip(record["stage_nodes"], record["stage_end_s"], record["stage_exec_ms"]):
            rows.append((node, end_s - exec_ms / 1e3, end_s))
    if not rows:
        return pd.DataFrame()
    stages = pd.DataFrame(rows, columns=["node", "start_s", "end_s"])
    horizon_s = stages["end_s"].max()
    edges = np.arange(0.0, horizon_s + bin_s, bin_s)
    shares = {}
    for node, group in stages.groupby("node"):
        busy = np.zeros(len(edges) - 1)
        for start_s, end_s in zip(group["start_s"], group["end_s"]):
            overlap = np.clip(np.minimum(edges[1:], end_s) - np.maximum(edges[:-1], start_s), 0.0, None)
            busy += overlap
        shares[node] = busy / bin_s
    return pd.DataFrame(shares, index=edges[:-1])


def plot_utilisation(runs: list[Run], path: Path) -> None:
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 2.6 * len(runs)), squeeze=False, sharex=True)
    for ax, run in zip(axes[:, 0], runs):
        shares = node_busy_share(run)
        for node in shares.columns:
            ax.plot(shares.index, shares[node], label=node)
        ax.set_title(run.label, fontsize="small")
        ax.set_ylabel("busy share")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=4)
    axes[-1, 0].set_xlabel(f"time since the first request (s), {UTILISATION_BIN_S:g} s bins")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired_runs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Pair a simulated and a real run of the same scenario name."""
    by_name: dict[str, dict[str, Run]] = {}
    for run in runs:
        by_name.setdefault(run.scenario_name, {})[run.mode] = run
    return [(modes["sim"], modes["real"]) for modes in by_name.values() if "sim" in modes and "real" in modes]


def plot_sim_vs_real(pairs: list[tuple[Run, Run]], path: Path) -> None:
    keys = ("mean", "p50", "p95", "p99")
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
    for ax, (sim, real) in zip(axes[0], pairs):
        x = np.arange(len(keys))
        ax.bar(x - 0.2, [sim.summary["latency_ms"][k] or 0 for k in keys], width=0.4, label="simulated")
        ax.bar(x + 0.2, [real.summary["latency_ms"][k] or 0 for k in keys], width=0.4, label="real")
        ax.set_xticks(x, keys)
        ax.set_ylabel("latency (ms)")
        ax.set_title(sim.scenario_name, fontsize="small")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_summary(runs: list[Run], figures: list[str], pairs: list[tuple[Run, Run]]) -> str:
    lines = [
        "# amp4ec report",
        "",
        f"Latency: {LATENCY_DEFINITION}. Throughput: {THROUGHPUT_DEFINITION}.",
        "",
        "| run | directory | completed | failed | mean (ms) | p50 (ms) | p95 (ms) | p99 (ms) | throughput (req/s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        latency = run.summary["latency_ms"]
        requests = run.summary["requests"]
        lines.append(
            f"| {run.label} | `{run.directory}` | {requests['completed']} | {requests['failed']} | "
            f"{_cell(latency['mean'])} | {_cell(latency['p50'])} | {_cell(latency['p95'])} | "
            f"{_cell(latency['p99'])} | {_cell(run.summary['throughput_rps'])} |"
        )
    if pairs:
        lines += ["", "## Simulated against real", "", "| scenario | metric | simulated | real | relative error |", "|---|---|---:|---:|---:|"]
        for sim, real in pairs:
            for key in ("mean", "p50", "p95", "p99"):
                simulated, measured = sim.summary["latency_ms"][key], real.summary["latency_ms"][key]
                error = (simulated - measured) / measured if simulated is not None and measured else None
                lines.append(f"| {sim.scenario_name} | latency {key} (ms) | {_cell(simulated)} | {_cell(measured)} | {_cell(error, 3)} |")
            simulated, measured = sim.summary["throughput_rps"], real.summary["throughput_rps"]
            error = (simulated - measured) / measured if simulated is not None and measured else None
            lines.append(f"| {sim.scenario_name} | throughput (req/s) | {_cell(simulated)} | {_cell(measured)} | {_cell(error, 3)} |")
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[Path], out: Path) -> list[Path]:
    """Write PNG plots and report.md for the given run directories into ``out``; return the files."""
    if not run_dirs:
        raise UsageError("give at least one run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    figures = ["latency-cdf.png", "throughput.png", "utilisation.png"]
    plot_latency_cdf(runs, out / figures[0])
    plot_throughput(runs, out / figures[1])
    plot_utilisation(runs, out / figures[2])
    pairs = paired_runs(runs)
    if pairs:
        figures.append("sim-vs-real.png")
        plot_sim_vs_real(pairs, out / figures[-1])
    (out / "report.md").write_text(markdown_summary(runs, figures, pairs))
    return [out / name for name in [*figures, "report.md"]]
