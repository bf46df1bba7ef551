"""The `amp4ec` command: calibrate, simulate, replay and clean up."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from amp4ec import __version__
from amp4ec.errors import Amp4ecError, UsageError

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
    for name, node in summary["nodes"].items():
        utilisation = node["utilisation"]
        table.add_row(
            f"node {name} utilisation ({node['cpus']:g} CPU)",
            "-" if utilisation is None else f"{utilisation:.1%}",
        )
    table.caption = f"latency: {summary['definitions']['latency']}; throughput: {summary['definitions']['throughput']}"
    return table


class Amp4ecGroup(click.Group):
    """Turns amp4ec errors into one-line messages with the error's exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Amp4ecError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            sys.exit(exc.exit_status)
        except KeyboardInterrupt:
            console.print("interrupted; partial output removed")
            sys.exit(130)


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
            console.print(f"[yellow]warning:[/] {warning}")


@main.command()
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="directory for records.parquet, summary.json and run.json")
@click.option("--force", is_flag=True, help="replace --out if it already contains files")
@click.option("--quiet", is_flag=True, help="no progress bar and no summary table")
@click.option("--calibration", type=click.Path(path_type=Path), help="calibration file; overrides the scenario's")
@click.option("--base-image", default=None, help="base image for the worker image, e.g. python:3.11-slim; default: a debootstrap rootfs")
def replay(scenario: Path, out: Path, force: bool, quiet: bool, calibration: Path | None, base_image: str | None) -> None:
    """Replay SCENARIO on real Docker containers and write the run to --out."""
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
            console.print(f"[yellow]warning:[/] {warning}")


@main.group(invoke_without_command=True)
@click.option("--model", default="mobilenet_v2", show_default=True, help="torchvision model name or package.module:factory")
@click.option("--granularity", type=click.Choice(["block", "leaf"]), default="block", show_default=True)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    metavar="NAME:CPUS:MEMORY_MB",
    help="container profile to measure, repeatable; default high:1.0:1024 medium:0.6:512 low:0.4:512",
)
@click.option("--repeats", default=10, show_default=True, help="least timed runs per unit, profile and regime")
@click.option("--max-repeats", default=60, show_default=True, help="most timed runs per unit, profile and regime")
@click.option("--target-ci", default=0.02, show_default=True, help="stop repeating once the 95 % confidence half-width of the mean is this share of the mean")
@click.option("--input-shape", default=None, help="input shape for package.module:factory models, e.g. 1,3,64,64")
@click.option("--memory-search", is_flag=True, help="also bisect the smallest memory limit each unit and the whole model run at (slow: one container per probe)")
@click.option("--no-container-link", is_flag=True, help="skip the hop fit between two worker containers")
@click.option("--warmup", default=3, show_default=True, help="untimed runs per unit before timing")
@click.option("--gap-ms", default=100.0, show_default=True, help="pause between runs so the CFS quota refills (ms)")
@click.option("--out", "out", default=None, type=click.Path(path_type=Path), help="calibration file to write (JSON); required unless a subcommand is given")
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
    base_image: str | None,
    quiet: bool,
    max_repeats: int,
    target_ci: float,
    input_shape: str | None,
    memory_search: bool,
    no_container_link: bool,
) -> None:
    """Measure each unit of a model inside CPU- and memory-limited containers and write a calibration file.

    Subcommands: `validate FILE`, `show FILE`, `plot FILE`.
    """
    from amp4ec.calibrate.run import parse_input_shape, parse_profiles, run_calibration

    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise UsageError("missing --out FILE: the calibration file to write", field="--out")
    if max_repeats < repeats:
        raise UsageError(f"--max-repeats ({max_repeats}) must be at least --repeats ({repeats})")
    if not 0 < target_ci < 1:
        raise UsageError(f"--target-ci must be between 0 and 1, got {target_ci}")
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise UsageError(f"--warmup must not be negative, got {warmup}")
    if gap_ms < 0:
        raise UsageError(f"--gap-ms must not be negative, got {gap_ms}")
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
        input_shape=parse_input_shape(input_shape),
        memory_search=memory_search,
        container_link=not no_container_link,
    )


@main.command()
@click.option("--run", "run_id", default=None, help="remove only the containers and networks of this run id")
def clean(run_id: str | None) -> None:
    """Remove containers and networks that amp4ec left behind, found by their label."""
    from amp4ec.real.containers import docker_client, remove_labelled

    counts = remove_labelled(docker_client(), run_id=run_id)
    stdout.print(f"removed {counts}")


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
    from amp4ec.calibrate.views import validate_table
    from amp4ec.costs import load_calibration

    table, summary = validate_table(load_calibration(file), normalise=normalise)
    stdout.print(table)
    if json_out is not None:
        from amp4ec.graph import write_text_atomic
        import json

        write_text_atomic(json_out, json.dumps(summary, indent=1))


@calibrate.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def calibrate_show(file: Path) -> None:
    """Print the per-unit times of FILE as a table, one column pair per profile."""
    from amp4ec.calibrate.views import show_tables
    from amp4ec.costs import load_calibration

    for table in show_tables(load_calibration(file)):
        stdout.print(table)


@calibrate.command("plot")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", "out", default=None, type=click.Path(path_type=Path), help="PNG file to write; default: FILE with the suffix .png")
def calibrate_plot(file: Path, out: Path | None) -> None:
    """Write a PNG of FILE: per-unit time by profile, and predicted against measured (leave one profile out)."""
    from amp4ec.calibrate.views import plot_calibration
    from amp4ec.costs import load_calibration

    out = out or file.with_suffix(".png")
    plot_calibration(load_calibration(file), out)
    stdout.print(f"wrote {out}")


@main.group()
def bench() -> None:
    """Benchmarks that print their figures as ratios against a reference measured in the same run."""


@bench.command("calibrate")
@click.option("--model", default="mobilenet_v2", show_default=True, help="torchvision model name or package.module:factory")
@click.option("--repeats", default=10, show_default=True, help="least timed runs per unit, profile and regime")
@click.option("--max-repeats", default=60, show_default=True, help="most timed runs per unit, profile and regime")
@click.option("--out", "out", default=None, type=click.Path(path_type=Path), help="keep the calibration file here; default: a temporary file")
def bench_calibrate(model: str, repeats: int, max_repeats: int, out: Path | None) -> None:
    """Time `amp4ec calibrate` of a model on the three default profiles."""
    from amp4ec.calibrate.bench import bench_calibrate as run_bench

    stdout.print(run_bench(model=model, repeats=repeats, max_repeats=max_repeats, out=out, log=lambda message: console.print(message, highlight=False)))


if __name__ == "__main__":
    main()
