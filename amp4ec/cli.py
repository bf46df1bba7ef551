"""The `amp4ec` command: calibrate, simulate, replay and clean up."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from amp4ec import __version__
from amp4ec.errors import Amp4ecError, OversubscriptionWarning, UsageError

console = Console(stderr=True)
stdout = Console()


@contextlib.contextmanager
def progress_bar(description: str, *, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """Yield a callback ``update(done, total)`` that drives a progress bar with an ETA."""
    if quiet:
        yield lambda done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


# Nodes listed in the summary table; a 10,000-node run lists the rest only in summary.json.
SUMMARY_NODE_ROWS = 20
# The maximum pause calibrate accepts between spaced runs: 50 CFS periods of the default length.
MAX_GAP_MS = 5000.0


def _format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_table(summary: dict[str, Any], title: str) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    latency = summary["latency_ms"]
    for key in ("mean", "p50", "p95", "p99"):
        table.add_row(f"latency {key} (ms)", _format_ms(latency[key]))
    throughput = summary["throughput_rps"]
    table.add_row("throughput (requests/s)", "-" if throughput is None else f"{throughput:.2f}")
    table.add_row("completed / failed", f"{summary['requests']['completed']} / {summary['requests']['failed']}")
    for name, node in list(summary["nodes"].items())[:SUMMARY_NODE_ROWS]:
        utilisation = node["utilisation"]
        table.add_row(
            f"node {name} utilisation ({node['cpus']:g} CPU)",
            "-" if utilisation is None else f"{utilisation:.1%}",
        )
    hidden = len(summary["nodes"]) - SUMMARY_NODE_ROWS
    if hidden > 0:
        table.add_row(f"... {hidden:,} more nodes", "see summary.json")
    table.caption = f"latency: {summary['definitions']['latency']}; throughput: {summary['definitions']['throughput']}"
    return table


def _terminate(signum: int, frame: Any) -> None:
    # Unwinding through SystemExit runs every cleanup (partial output, containers) on SIGTERM too.
    raise SystemExit(128 + signum)


def require_extras(command: str) -> None:
    """Raise a UsageError naming the install command when torch or the Docker extras are missing."""
    missing = [name for name in ("torch", "torchvision", "docker", "zmq") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"{command} needs {', '.join(missing)}, which this installation lacks; "
            "install them with pip install 'amp4ec[torch,docker]'"
        )


class Amp4ecGroup(click.Group):
    """Turns amp4ec errors into one-line messages with the error's exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        try:
            with warnings.catch_warnings():
                # The cluster also logs this warning, and the log line is the one users read.
                warnings.simplefilter("ignore", OversubscriptionWarning)
                return super().invoke(ctx)
        except Amp4ecError as exc:
            console.print(Text("error: ", style="bold red") + Text(str(exc)), highlight=False, soft_wrap=True)
            sys.exit(exc.exit_status)
        except KeyboardInterrupt:
            console.print("interrupted; no partial output left")
            sys.exit(130)
        except SystemExit as exc:
            if exc.code == 128 + signal.SIGTERM:
                console.print("terminated; no partial output left")
            raise


@click.group(cls=Amp4ecGroup)
@click.version_option(__version__, prog_name="amp4ec")
def main() -> None:
    """Calibrate, simulate and replay partitioned DNN inference on CPU- and memory-limited edge containers."""


@main.command()
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="directory for records.parquet, summary.json and run.json")
@click.option("--force", is_flag=True, help="replace --out if it already contains files")
@click.option("--quiet", is_flag=True, help="no progress bar and no summary table")
@click.option("--calibration", type=click.Path(path_type=Path), help="calibration file; overrides the scenario's")
def simulate(scenario: Path, out: Path, force: bool, quiet: bool, calibration: Path | None) -> None:
    """Simulate SCENARIO (a TOML file) and write the run to --out."""
    from amp4ec.sim.run import run_simulation

    summary = run_simulation(scenario, out, force=force, calibration=calibration, progress=progress_bar("simulating", quiet=quiet))
    if not quiet:
        stdout.print(summary_table(summary, f"simulated: {scenario}"))
        for warning in summary.get("warnings", []):
            console.print(Text("warning: ", style="yellow") + Text(warning))


@main.command()
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="directory for records.parquet, summary.json and run.json")
@click.option("--force", is_flag=True, help="replace --out if it already contains files")
@click.option("--quiet", is_flag=True, help="no progress bar and no summary table")
@click.option("--calibration", type=click.Path(path_type=Path), help="calibration file; overrides the scenario's")
@click.option("--base-image", default=None, help="base image for the worker image, e.g. python:3.11-slim; default: a debootstrap rootfs")
@click.option("--compare", "compare_sim", is_flag=True, help="also simulate the scenario into OUT/fidelity/sim and report the relative errors")
def replay(scenario: Path, out: Path, force: bool, quiet: bool, calibration: Path | None, base_image: str | None, compare_sim: bool) -> None:
    """Replay SCENARIO on real Docker containers and write the run to --out."""
    require_extras("replay")
    from amp4ec.real.replay import run_replay

    summary = run_replay(
        scenario,
        out,
        force=force,
        calibration=calibration,
        base_image=base_image,
        progress=progress_bar("replaying", quiet=quiet),
        log=(lambda message: None) if quiet else (lambda message: console.print(message, highlight=False)),
    )
    if not quiet:
        stdout.print(summary_table(summary, f"replayed on containers: {scenario}"))
        for warning in summary.get("warnings", []):
            console.print(Text("warning: ", style="yellow") + Text(warning))
    if compare_sim:
        from amp4ec.compare import compare_runs, plot_latency_distributions
        from amp4ec.sim.run import run_simulation

        fidelity = out / "fidelity"
        run_simulation(scenario, fidelity / "sim", force=True, calibration=calibration)
        comparison = compare_runs(fidelity / "sim", out)
        plot = plot_latency_distributions(fidelity / "sim", out, fidelity / "latency.png")
        (fidelity / "report.json").write_text(json.dumps(comparison.as_dict(), indent=1) + "\n")
        stdout.print(comparison_table(comparison, f"simulation vs replay: {scenario}"))
        stdout.print(f"latency distributions: {plot}")


@main.group(invoke_without_command=True)
@click.option("--model", default="mobilenet_v2", show_default=True, help="torchvision model name or package.module:factory")
@click.option("--granularity", type=click.Choice(["block", "leaf"]), default="block", show_default=True, help="units: feature blocks and head, or single leaf modules")
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    metavar="NAME:CPUS:MEMORY_MB[:THREADS]",
    help="container profile to measure, repeatable; default high:1.0:1024 medium:0.6:512 low:0.4:512",
)
@click.option("--repeats", default=10, show_default=True, help="minimum timed runs per unit, profile and regime")
@click.option("--max-repeats", default=40, show_default=True, help="maximum timed runs per unit, profile and regime; back to back, runs continue until their time window is full")
@click.option("--target-ci", default=0.02, show_default=True, help="stop repeating once the 95 % confidence half-width of the mean is this share of the mean")
@click.option(
    "--max-turns",
    default=None,
    type=int,
    help="back to back: maximum turns per unit and profile. Every profile takes the first six, and "
    "only those whose mean across turns is less precise than --target-ci take more  [default: 6]",
)
@click.option("--input-shape", default=None, help="input shape for package.module:factory models, e.g. 1,3,64,64")
@click.option("--memory-search", is_flag=True, help="also bisect the smallest memory limit each unit and the whole model run at (slow: one container per probe)")
@click.option("--no-container-link", is_flag=True, help="skip the hop fit between two worker containers")
@click.option("--warmup", default=3, show_default=True, help="untimed runs per unit before timing")
@click.option("--gap-ms", default=100.0, show_default=True, help="pause between runs so the CFS quota refills (ms, at most 5000)")
@click.option("--out", "out", default=None, type=click.Path(path_type=Path), help="calibration file to write (JSON); required unless a subcommand is given")
@click.option("--force", is_flag=True, help="replace --out if the file exists")
@click.option("--base-image", default=None, help="base image for the worker image, e.g. python:3.11-slim; default: a debootstrap rootfs")
@click.option("--quiet", is_flag=True, help="no progress output")
@click.pass_context
def calibrate(
    ctx: click.Context,
    model: str,
    granularity: str,
    profiles: tuple[str, ...],
    repeats: int,
    warmup: int,
    gap_ms: float,
    out: Path,
    force: bool,
    base_image: str | None,
    quiet: bool,
    max_repeats: int,
    target_ci: float,
    max_turns: int | None,
    input_shape: str | None,
    memory_search: bool,
    no_container_link: bool,
) -> None:
    """Measure each unit of a model inside CPU- and memory-limited containers and write a calibration file.

    Subcommands: `validate FILE`, `show FILE`, `plot FILE`, `memory FILE`.
    """
    if ctx.invoked_subcommand is not None:
        # Each subcommand checks its own needs: validate, show and plot read a file without torch or Docker.
        return
    require_extras("calibrate")
    from amp4ec.calibrate.measure import BACK_TO_BACK_PARTS, MAX_TURNS
    from amp4ec.calibrate.run import parse_input_shape, parse_profiles, run_calibration

    if out is None:
        raise UsageError("missing --out FILE: the calibration file to write", field="--out")
    if out.is_file() and not force:
        # A calibration takes many minutes, so a repeated command must not replace one by accident.
        raise UsageError("exists; choose another --out, or pass --force to replace it once the new calibration is complete", source=str(out))
    if max_repeats < repeats:
        raise UsageError(f"--max-repeats ({max_repeats}) must be at least --repeats ({repeats})")
    if not 0 < target_ci < 1:
        raise UsageError(f"--target-ci must be between 0 and 1, got {target_ci}")
    max_turns = BACK_TO_BACK_PARTS if max_turns is None else max_turns
    if max_turns < BACK_TO_BACK_PARTS:
        raise UsageError(f"--max-turns is {max_turns}, but every back-to-back window takes {BACK_TO_BACK_PARTS} turns; give at least {BACK_TO_BACK_PARTS}")
    if max_turns > MAX_TURNS:
        raise UsageError(f"--max-turns is {max_turns}, more than {MAX_TURNS} (hours of back-to-back runs); give at most {MAX_TURNS}")
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise UsageError(f"--warmup must not be negative, got {warmup}")
    if not gap_ms >= 0 or math.isinf(gap_ms):
        raise UsageError(f"--gap-ms must be a finite number of milliseconds, at least 0, got {gap_ms}")
    if gap_ms > MAX_GAP_MS:
        raise UsageError(
            f"--gap-ms is {gap_ms:.12g}, more than {MAX_GAP_MS:g}: every spaced run waits this long, so the calibration "
            f"would take hours, while a CFS quota refills within one period (100 ms by default); give at most {MAX_GAP_MS:g}"
        )
    run_calibration(
        model=model,
        granularity=granularity,
        profiles=parse_profiles(profiles),
        repeats=repeats,
        warmup=warmup,
        gap_ms=gap_ms,
        out=out,
        base_image=base_image,
        log=(lambda message: None) if quiet else (lambda message: console.print(message, highlight=False)),
        max_repeats=max_repeats,
        target_ci_rel=target_ci,
        max_turns=max_turns,
        input_shape=parse_input_shape(input_shape),
        memory_search=memory_search,
        container_link=not no_container_link,
    )


@main.command()
@click.option("--run", "run_id", default=None, help="remove the containers and networks of this run id, whatever its state")
@click.option("--all", "remove_all", is_flag=True, help="remove every amp4ec container and network on the engine, live runs included")
def clean(run_id: str | None, remove_all: bool) -> None:
    """Remove containers and networks that amp4ec runs left behind, found by their label.

    Without options, only runs whose coordinator process no longer exists on this machine
    are removed, so runs in progress are left alone.
    """
    try:
        from amp4ec.real.containers import docker_client, remove_labelled
    except ImportError as exc:
        raise UsageError(f"clean needs the Docker SDK and pyzmq ({exc}); install them with pip install 'amp4ec[docker]'") from exc
    if run_id is not None and remove_all:
        raise UsageError("give --run or --all, not both")
    counts = remove_labelled(docker_client(), run_id=run_id, only_orphans=run_id is None and not remove_all)
    stdout.print(f"removed {counts['containers']} containers and {counts['networks']} networks")


@main.group()
def bench() -> None:
    """Benchmarks that print their figures as ratios against a reference measured in the same run."""


@bench.command("sim")
@click.option("--pipeline-requests", default=20_000, show_default=True, help="requests through the 3-stage pipeline")
@click.option("--mm1-jobs", default=100_000, show_default=True, help="jobs through the bare SimPy M/M/1")
@click.option("--scale-requests", default=1_000_000, show_default=True, help="requests in the 10,000-node run")
@click.option("--small-requests", default=20_000, show_default=True, help="requests in the 10-node run")
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
def bench_sim_command(pipeline_requests: int, mm1_jobs: int, scale_requests: int, small_requests: int, as_json: bool) -> None:
    """Engine speed against bare SimPy, and the wall time, memory and cost per request at 10,000 nodes."""
    import json as json_module

    from amp4ec.sim.bench import bench_sim

    for option, value in (("--pipeline-requests", pipeline_requests), ("--mm1-jobs", mm1_jobs), ("--scale-requests", scale_requests), ("--small-requests", small_requests)):
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    figures = bench_sim(
        pipeline_requests=pipeline_requests,
        mm1_jobs=mm1_jobs,
        scale_requests=scale_requests,
        small_requests=small_requests,
        log=lambda line: console.print(line, highlight=False),
    )
    if as_json:
        stdout.print_json(json_module.dumps(figures))
        return
    scale = figures["scale"]
    table = Table(title="amp4ec bench sim", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target")
    table.add_row("3-stage pipeline (simulated requests/s)", f"{figures['pipeline_requests_per_s']:,.0f}", "")
    table.add_row("bare SimPy M/M/1 (jobs/s)", f"{figures['bare_simpy_mm1_jobs_per_s']:,.0f}", "")
    table.add_row("pipeline / M/M/1", f"{figures['ratio']:.2f}", ">= 0.30")
    table.add_row(f"{scale['nodes']:,} nodes, {scale['requests']:,} requests: wall (s)", f"{scale['wall_s']:.1f}", "< 60 at 1,000,000 requests")
    table.add_row("  peak memory (GiB)", f"{scale['peak_rss_bytes'] / 2**30:.2f}", "< 4")
    cost = figures["cost_per_request_us"]
    table.add_row("cost per request at 10 nodes (us)", f"{cost['10_nodes']:,.1f}", "")
    table.add_row("cost per request at 10,000 nodes (us)", f"{cost['10000_nodes']:,.1f}", "")
    table.add_row("10,000-node / 10-node cost", f"{figures['cost_ratio']:.2f}", "<= 2")
    stdout.print(table)


@main.command()
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...", help="scenario key to vary, e.g. workload.rate_rps=10,20 or nodes[0].cpus=0.4,0.6; repeatable")
@click.option("--seeds", default=5, show_default=True, help="seeds per grid point, starting at the scenario's seed")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="directory for runs.parquet (one row per run) and points.parquet (means and 95 % CIs)")
@click.option("--workers", default=None, type=int, help="processes of the local pool; default: one per core")
@click.option("--dask", "dask_address", default=None, help="address of a Dask distributed scheduler to run the sweep on instead")
@click.option("--force", is_flag=True, help="replace --out if it already contains files")
@click.option("--quiet", is_flag=True, help="no progress bar and no table")
def sweep(scenario: Path, grid: tuple[str, ...], seeds: int, out: Path, workers: int | None, dask_address: str | None, force: bool, quiet: bool) -> None:
    """Simulate every combination of --grid values over several seeds and tabulate the results."""
    from amp4ec.rundir import check_output_dir, staged_output
    from amp4ec.sim.sweep import METRICS, run_sweep

    if workers is not None and workers < 1:
        raise UsageError(f"must be at least 1, got {workers}", field="--workers")
    check_output_dir(out, force=force)
    with progress_bar("sweeping", quiet=quiet) as update:
        runs, points = run_sweep(scenario, grid, seeds, workers=workers, dask_address=dask_address, progress=update)
    with staged_output(out, force=force) as staging:
        runs.to_parquet(staging / "runs.parquet", index=False)
        points.to_parquet(staging / "points.parquet", index=False)
    failed = runs["error"].notna().sum()
    if failed:
        console.print(Text("warning: ", style="yellow") + Text(f"{failed} of {len(runs)} runs failed; their errors are in runs.parquet"))
    if not quiet:
        table = Table(title=f"sweep of {scenario} ({seeds} seeds per point, mean ± 95 % CI)")
        # The table shows the headline metrics; points.parquet has all of them.
        shown = ("seeds", "latency_mean_ms", "latency_p95_ms", "throughput_rps", "failed")
        keys = [c for c in points.columns if c not in METRICS and c != "seeds" and not c.endswith("_ci95")]
        columns = keys + list(shown)
        for column in columns:
            # Fold long names such as workload.requests instead of cutting them off.
            table.add_column(column, justify="right", overflow="fold")
        # Records keep each column's type, so integer grid values and seed counts print as integers.
        for row in points.to_dict("records"):
            cells = []
            for column in columns:
                value = row[column]
                half_width = row.get(f"{column}_ci95")
                if column in keys:
                    # A grid value prints as given, so that close values such as 0.011 and 0.014 stay apart.
                    cells.append(repr(value) if isinstance(value, float) else str(value))
                elif isinstance(value, float) and half_width is not None and half_width == half_width:
                    cells.append(f"{value:.2f} ± {half_width:.2f}")
                elif isinstance(value, float):
                    cells.append(f"{value:.2f}")
                else:
                    cells.append(str(value))
            table.add_row(*cells)
        stdout.print(table)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="directory for report.md and the PNG plots")
@click.option("--force", is_flag=True, help="replace --out if it already contains files")
def report(run_dirs: tuple[Path, ...], out: Path, force: bool) -> None:
    """Plot latency CDFs, throughput, per-node utilisation and simulated against real for RUN_DIRS."""
    from amp4ec.report import write_report
    from amp4ec.rundir import staged_output

    with staged_output(out, force=force) as staging:
        written = write_report(list(run_dirs), staging)
    for path in written:
        stdout.print(str(out / path.name))


@main.command()
@click.option("--scenarios", "scenario_dir", default=Path("scenarios/paper"), show_default=True, type=click.Path(path_type=Path), help="folder of the paper's scenario files")
@click.option("--runs", "runs_dir", default=Path("runs/paper"), show_default=True, type=click.Path(path_type=Path), help="folder for the run directories")
@click.option("--doc", default=Path("docs/paper-reproduction.md"), show_default=True, type=click.Path(path_type=Path), help="Markdown page to write")
@click.option("--requests", default=100, show_default=True, help="requests per run (the paper's benchmark sends 100)")
@click.option("--real/--no-real", default=True, show_default=True, help="also replay on containers where this machine allows")
@click.option("--quiet", is_flag=True, help="no progress messages")
def paper(scenario_dir: Path, runs_dir: Path, doc: Path, requests: int, real: bool, quiet: bool) -> None:
    """Reproduce the AMP4EC paper's 2-, 3- and 4-node experiments and write a Markdown page."""
    from amp4ec.paper import CONFIGURATIONS, run_paper

    if requests < 1:
        raise UsageError(f"--requests must be at least 1, got {requests}", field="--requests")
    for name in CONFIGURATIONS:
        for suffix in ("", "-monolithic"):
            if not (scenario_dir / f"{name}{suffix}.toml").is_file():
                raise UsageError(f"{name}{suffix}.toml not found; give the folder of the paper scenarios", source=str(scenario_dir), field="--scenarios")
    run_paper(
        scenario_dir,
        runs_dir,
        doc,
        requests=requests,
        real=real,
        log=(lambda message: None) if quiet else (lambda message: console.print(message, highlight=False)),
    )
    stdout.print(doc.read_text())


@main.command("scenario-reference")
@click.option("--out", "out", default=None, type=click.Path(path_type=Path), help="file to write; default: print to standard output")
def scenario_reference_command(out: Path | None) -> None:
    """Print the scenario file reference generated from the schema (docs/scenario-reference.md)."""
    from amp4ec.graph import write_text_atomic
    from amp4ec.reference import scenario_reference

    text = scenario_reference()
    if out is None:
        click.echo(text, nl=False)
    else:
        write_text_atomic(out, text)


def wide_stdout() -> Console:
    """Return a console for wide tables: the terminal's width, or 200 columns when output is piped."""
    return stdout if stdout.is_terminal else Console(width=200)


@main.command()
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), help="calibration file; overrides the scenario's")
def partition(scenario: Path, calibration: Path | None) -> None:
    """Print the plan the scenario's partitioner makes: segments, units, FLOPs, weights, cuts, predicted times."""
    from amp4ec import policies
    from amp4ec.policy_report import plan_rows
    from amp4ec.runs import prepare_run

    prepared = prepare_run(scenario, calibration)
    plan = policies.build_plan(prepared.scenario, prepared.costs.graph, prepared.costs, source=str(scenario))
    network = prepared.scenario.network
    rows = plan_rows(plan, prepared.scenario, prepared.costs)
    table = Table(title=f"plan of {plan.partitioner!r} for {scenario}", show_header=True)
    for column in ("segment", "units", "first unit", "last unit", "MFLOPs", "params (MB)", "memory (MB)", "in cut (bytes)", "out cut (bytes)", "node", "predicted (ms)"):
        table.add_column(column, justify="right" if column in ("units", "MFLOPs", "params (MB)", "memory (MB)", "in cut (bytes)", "out cut (bytes)", "predicted (ms)") else "left")
    for row in rows:
        # One line per node that may run the segment; the segment's figures only on the first.
        for i, (name, ms) in enumerate(row.predicted_ms.items()):
            figures = (
                [row.segment, f"{row.start}-{row.stop - 1}", row.first_unit, row.last_unit, f"{row.flops / 1e6:.1f}",
                 f"{row.param_mb:.2f}", f"{row.memory_mb:.2f}", str(row.in_cut_bytes), str(row.out_cut_bytes)]
                if i == 0
                else [""] * 9
            )
            table.add_row(*figures, name, f"{ms:.2f}")
    if plan.assigned:
        # With one node per segment the stages' predicted times add up to the request's.
        first_choice = [next(iter(row.predicted_ms.values())) for row in rows]
        assigned = f"nodes chosen by the partitioner; predicted latency of one request {sum(first_choice):.2f} ms"
    else:
        assigned = "no node assignment: any node may run a segment"
    searched = any(profile.memory_search for profile in prepared.costs.calibration.profiles)
    memory = "the larger of weights + peak activations and the memory search's need" if searched else "weights + peak activations"
    table.caption = (
        f"{assigned}. Predicted ms = CPU time / min(CPU quota, parallelism) plus input and output transfer "
        f"at {network.bandwidth_mbps:g} Mbit/s and {prepared.costs.hop_latency_ms(network.latency_ms):.3g} ms per hop; "
        f"MB = 10^6 bytes; memory = {memory}, without the runtime"
    )
    wide_stdout().print(table)


@main.command("compare-policies")
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("--requests", type=click.IntRange(min=1), default=None, help="requests per run; default: the scenario's")
@click.option("--calibration", type=click.Path(path_type=Path), help="calibration file; overrides the scenario's")
@click.option("--quiet", is_flag=True, help="no progress bar")
def compare_policies_command(scenario: Path, requests: int | None, calibration: Path | None, quiet: bool) -> None:
    """Simulate every partitioner with every scheduler on SCENARIO and print them, lowest mean latency first."""
    from amp4ec.sim.compare import compare_policies
    from amp4ec.runs import prepare_run

    prepared = prepare_run(scenario, calibration)
    with progress_bar("simulating policy pairs", quiet=quiet) as update:
        results = compare_policies(prepared.scenario, prepared.costs, requests=requests, progress=update)
    table = Table(title=f"policies compared in simulation: {scenario}", show_header=True)
    for column in ("rank", "partitioner", "scheduler", "bounds", "latency mean (ms)", "latency p95 (ms)", "throughput (requests/s)", "failed"):
        table.add_column(column, justify="right" if column not in ("partitioner", "scheduler", "bounds") else "left")
    for rank, pair in enumerate(results, start=1):
        if pair.error is not None:
            table.add_row(str(rank), pair.partitioner, pair.scheduler, "-", "-", "-", "-", f"not run: {pair.error}")
            continue
        table.add_row(
            str(rank),
            pair.partitioner,
            pair.scheduler,
            " ".join(map(str, pair.bounds or [])),
            _format_ms(pair.latency_mean_ms),
            _format_ms(pair.latency_p95_ms),
            "-" if pair.throughput_rps is None else f"{pair.throughput_rps:.2f}",
            str(pair.failed),
        )
    table.caption = (
        "latency: arrival to completion of each completed request; throughput: completed requests over the "
        "time from the first arrival to the last completion; both from the simulator with the scenario's workload"
    )
    wide_stdout().print(table)


def comparison_table(comparison, title: str) -> Table:
    from amp4ec.compare import format_error, format_value

    table = Table(title=title, show_header=True)
    for column in ("metric", "sim", "real", "relative error", "threshold", "check"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric in comparison.metrics:
        if metric.threshold is None:
            status = ""
        elif metric.passed:
            status = "ok"
        else:
            status = "[bold red]FAIL[/]"
        table.add_row(
            metric.name,
            format_value(metric.sim),
            format_value(metric.real),
            format_error(metric.relative_error),
            "-" if metric.threshold is None else f"{metric.threshold:.1%}",
            status,
        )
    table.caption = "relative error = |sim - real| / |real|"
    return table


@main.command()
@click.argument("sim_dir", type=click.Path(path_type=Path))
@click.argument("real_dir", type=click.Path(path_type=Path))
@click.option("--plot", "plot", type=click.Path(path_type=Path), default=None, help="PNG of both latency distributions; default REAL_DIR/fidelity-latency.png")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="also write the report as JSON to this file")
@click.option("--max-error-mean", type=float, default=None, help="fail when mean latency's relative error exceeds this (0.2 = 20%)")
@click.option("--max-error-p50", type=float, default=None, help="fail when p50 latency's relative error exceeds this")
@click.option("--max-error-p95", type=float, default=None, help="fail when p95 latency's relative error exceeds this")
@click.option("--max-error-p99", type=float, default=None, help="fail when p99 latency's relative error exceeds this")
@click.option("--max-error-throughput", type=float, default=None, help="fail when throughput's relative error exceeds this")
@click.option("--max-error-utilisation", type=float, default=None, help="fail when any node's utilisation error exceeds this")
def compare(
    sim_dir: Path,
    real_dir: Path,
    plot: Path | None,
    json_out: Path | None,
    max_error_mean: float | None,
    max_error_p50: float | None,
    max_error_p95: float | None,
    max_error_p99: float | None,
    max_error_throughput: float | None,
    max_error_utilisation: float | None,
) -> None:
    """Report how well the simulated run SIM_DIR predicted the real run REAL_DIR.

    Exits with status 1 when a relative error exceeds its --max-error-* threshold.
    """
    from amp4ec.compare import compare_runs, plot_latency_distributions
    from amp4ec.graph import check_output_file, write_text_atomic

    if json_out is not None:
        check_output_file(json_out, field="--json")
    if plot is not None:
        check_output_file(plot, field="--plot")
    thresholds = {
        "mean": max_error_mean,
        "p50": max_error_p50,
        "p95": max_error_p95,
        "p99": max_error_p99,
        "throughput": max_error_throughput,
        "utilisation": max_error_utilisation,
    }
    comparison = compare_runs(sim_dir, real_dir, thresholds)
    written = plot_latency_distributions(sim_dir, real_dir, plot or Path(real_dir) / "fidelity-latency.png")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(comparison.as_dict(), indent=1) + "\n")
    stdout.print(comparison_table(comparison, f"{sim_dir} (sim) vs {real_dir} (real)"))
    stdout.print(f"latency distributions: {written}")
    for warning in comparison.warnings:
        console.print(Text("warning: ", style="yellow") + Text(warning))
    if not comparison.passed:
        names = ", ".join(metric.name for metric in comparison.failures)
        console.print(Text("fidelity check failed: ", style="bold red") + Text(f"{names} above threshold"), highlight=False)
        sys.exit(1)


@bench.command("real")
@click.option("--scenario", "scenario", default=Path("scenarios/bench/pipeline-2-node.toml"), show_default=True, type=click.Path(path_type=Path), help="scenario whose pipelined throughput is measured")
@click.option("--requests", default=60, show_default=True, help="requests of the pipelined replay")
@click.option("--clients", default=None, type=int, help="closed-loop clients; default two per node")
@click.option("--repeats", default=30, show_default=True, help="echo round trips per payload size")
@click.option("--base-image", default=None, help="base image for the worker image; default: a debootstrap rootfs")
def bench_real(scenario: Path, requests: int, clients: int | None, repeats: int, base_image: str | None) -> None:
    """Per-hop overhead for 10 KB to 1.5 MB activations, and pipelined throughput over the capacity bound."""
    from amp4ec.real.bench import bench_hops, bench_pipeline

    if requests < 1 or repeats < 1:
        raise UsageError(f"--requests and --repeats must be at least 1, got {requests} and {repeats}")
    if clients is not None and clients < 1:
        raise UsageError(f"--clients must be at least 1, got {clients}")
    log = lambda message: console.print(message, highlight=False)  # noqa: E731
    hops = bench_hops(repeats=repeats, base_image=base_image, log=log)
    table = Table(title="per-hop time, host to worker container (median)")
    for column in ("payload", "hop (ms)", "overhead beyond bytes/bandwidth (ms)", "loopback pyzmq hop (ms)", "hop / loopback"):
        table.add_column(column, justify="right")
    for row in hops["rows"]:
        ratio = row["hop_over_loopback"]
        table.add_row(f"{row['bytes'] / 1e3:g} KB", f"{row['hop_ms']:.3f}", f"{row['overhead_ms']:.3f}", f"{row['loopback_hop_ms']:.3f}", "-" if ratio is None else f"{ratio:.2f}")
    table.caption = f"bandwidth fitted over the sizes: {hops['fitted_bandwidth_bps'] / 1e9:.2f} Gbit/s"
    stdout.print(table)
    verdict = "ok" if hops["passed"] else "ABOVE TARGET"
    stdout.print(f"overhead at 100 KB: {hops['overhead_ms_at_100kb']:.3f} ms (target < {hops['target_ms']} ms): {verdict}")
    forward_table = Table(title="per-hop time, forwarded route coordinator -> worker -> worker -> coordinator (median)")
    for column in ("payload", "hop (ms)", "overhead beyond bytes/bandwidth (ms)"):
        forward_table.add_column(column, justify="right")
    for row in hops["forward_rows"]:
        forward_table.add_row(f"{row['bytes'] / 1e3:g} KB", f"{row['hop_ms']:.3f}", f"{row['overhead_ms']:.3f}")
    forward_table.caption = f"bandwidth fitted over the sizes: {hops['forward_fitted_bandwidth_bps'] / 1e9:.2f} Gbit/s"
    stdout.print(forward_table)
    verdict = "ok" if hops["forward_passed"] else "ABOVE TARGET"
    stdout.print(f"forwarded overhead at 100 KB: {hops['forward_overhead_ms_at_100kb']:.3f} ms (target < {hops['target_ms']} ms): {verdict}")
    pipeline = bench_pipeline(scenario, requests=requests, clients=clients, base_image=base_image, log=log)
    if pipeline["ratio"] is None:
        stdout.print(f"pipelined replay completed {pipeline['completed']} requests; no capacity ratio")
    else:
        stdout.print(
            f"pipelined throughput {pipeline['throughput_rps']:.2f} requests/s; capacity bound "
            f"{pipeline['total_cpus']:g} CPUs / {pipeline['cpu_ms_per_request']:.1f} CPU ms per request = "
            f"{pipeline['capacity_bound_rps']:.2f} requests/s; ratio {pipeline['ratio']:.3f} "
            f"(target >= {pipeline['target']}): {'ok' if pipeline['passed'] else 'BELOW TARGET'}"
        )
        if pipeline["simulated_ratio"] is not None:
            stdout.print(
                f"the simulator's ratio for the same plan, scheduler and workload is {pipeline['simulated_ratio']:.3f}, "
                f"the most this schedule allows; the replay reached {pipeline['ratio_over_simulated']:.3f} of it"
            )


@calibrate.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="also write every comparison to this JSON file")
@click.option(
    "--normalise",
    is_flag=True,
    help="scale CPU work by each profile's whole-model reference time, measured in the held-out container too, to remove machine drift",
)
def calibrate_validate(file: Path, json_out: Path | None, normalise: bool) -> None:
    """Leave each profile of FILE out, predict it from the others, and report how close the predictions are."""
    import json

    from amp4ec.calibrate.views import validate_table
    from amp4ec.costs import load_calibration
    from amp4ec.graph import check_output_file, write_text_atomic

    if json_out is not None:
        check_output_file(json_out, field="--json")
    table, summary = validate_table(load_calibration(file), normalise=normalise)
    wide_stdout().print(table)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(summary, indent=1))


@calibrate.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def calibrate_show(file: Path) -> None:
    """Print the per-unit times of FILE as a table, one column pair per profile."""
    from amp4ec.calibrate.views import show_tables
    from amp4ec.costs import load_calibration

    out = wide_stdout()
    for table in show_tables(load_calibration(file)):
        out.print(table)


@calibrate.command("plot")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", "out", default=None, type=click.Path(path_type=Path), help="PNG file to write; default: FILE's name with the suffix .png, in the current directory")
@click.option("--force", is_flag=True, help="replace --out if the file exists")
def calibrate_plot(file: Path, out: Path | None, force: bool) -> None:
    """Write a PNG of FILE: per-unit time by profile, predicted against measured (leave one profile out), and the whole model after each pause."""
    from amp4ec.calibrate.views import plot_calibration
    from amp4ec.costs import load_calibration
    from amp4ec.graph import check_output_file

    # Not beside FILE: the shipped calibration lies inside the installed package.
    out = out or Path(file.with_suffix(".png").name)
    check_output_file(out, field="--out")
    if out.exists() and file.exists() and out.samefile(file):
        raise UsageError("is FILE itself; give another --out for the PNG", source=str(out), field="--out")
    if out.exists() and not force:
        raise UsageError("exists; choose another --out, or pass --force to replace it", source=str(out), field="--out")
    plot_calibration(load_calibration(file), out)
    stdout.print(f"wrote {out}")


@calibrate.command("memory")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="calibration file to write; FILE itself needs --force")
@click.option("--force", is_flag=True, help="replace --out if the file exists")
@click.option("--base-image", default=None, help="base image for the worker image, e.g. python:3.11-slim; default: a debootstrap rootfs")
@click.option("--quiet", is_flag=True, help="no progress output")
def calibrate_memory(file: Path, out: Path, force: bool, base_image: str | None, quiet: bool) -> None:
    """Add a memory search to calibration FILE: the smallest memory limit each unit and the whole model run at, per thread count.

    The timings in FILE are kept. This runs one container per probe (several minutes for MobileNetV2).
    """
    require_extras("calibrate")
    from amp4ec.calibrate.run import add_memory_search

    if out.is_file() and not force:
        raise UsageError("exists; choose another --out, or pass --force to replace it once the search is complete", source=str(out), field="--out")
    add_memory_search(
        file=file, out=out, base_image=base_image,
        log=(lambda message: None) if quiet else (lambda message: console.print(message, highlight=False)),
    )  # fmt: skip


@bench.command("calibrate")
@click.option("--model", default="mobilenet_v2", show_default=True, help="torchvision model name or package.module:factory")
@click.option("--repeats", default=10, show_default=True, help="minimum timed runs per unit, profile and regime")
@click.option("--max-repeats", default=40, show_default=True, help="maximum timed runs per unit, profile and regime; back to back, runs continue until their time window is full")
@click.option("--out", "out", default=None, type=click.Path(path_type=Path), help="keep the calibration file here; default: a temporary file")
def bench_calibrate(model: str, repeats: int, max_repeats: int, out: Path | None) -> None:
    """Time `amp4ec calibrate` of a model on the three default profiles."""
    from amp4ec.calibrate.bench import bench_calibrate as run_bench

    stdout.print(run_bench(model=model, repeats=repeats, max_repeats=max_repeats, out=out, log=lambda message: console.print(message, highlight=False)))


def run() -> None:
    """Run the command line: the console script's entry point.

    A command that fails or is interrupted soon after exporting a model (calibrate exports in a
    thread while its containers start) leaves torch's native threads running. Finalising the
    interpreter then aborts with "terminate called without an active exception" and exit
    status 134, although every cleanup has already run, so a failed command that imported
    torch exits without finalising, with its own status.
    """
    try:
        main()
    except SystemExit as exc:
        # sys.exit(None) means success and sys.exit("message") failure, as the interpreter reads them.
        status = exc.code if isinstance(exc.code, int) else 1
        if exc.code is None:
            status = 0
        if status != 0 and "torch" in sys.modules:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        raise


if __name__ == "__main__":
    run()
