"""The `amp4ec` command as a user runs it: exit statuses, messages and output files."""

import ast
import json
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from amp4ec.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scenarios" / "paper"


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_scenario(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


BASE = """
name = "bad"
[policy]
partitioner = "{partitioner}"
[[nodes]]
name = "a"
cpus = {cpus}
memory_mb = 1024
"""


def test_simulate_paper_scenario_writes_outputs(tmp_path):
    out = tmp_path / "run"
    result = run_cli("simulate", str(PAPER / "3-node.toml"), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    records = pd.read_parquet(out / "records.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == 100
    assert set(records["outcome"]) == {"completed"}
    assert summary["requests"] == {"completed": 100, "failed": 0, "failure_reasons": {}}
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"] <= summary["latency_ms"]["p99"]
    assert set(summary["nodes"]) == {"high", "medium", "low"}
    run = json.loads((out / "run.json").read_text())
    assert run["scenario"]["policy"]["partitioner"] == "ralos"
    assert run["seed"] == 1


@pytest.mark.parametrize(
    ("partitioner", "cpus", "expected"),
    [
        ("nonsense", "1.0", "policy.partitioner: unknown partitioner 'nonsense'"),
        ("ralos", "-1.0", "nodes[0].cpus"),
    ],
)
def test_simulate_rejects_bad_scenario(tmp_path, partitioner, cpus, expected):
    scenario = write_scenario(tmp_path, BASE.format(partitioner=partitioner, cpus=cpus))
    out = tmp_path / "run"
    result = run_cli("simulate", str(scenario), "--out", str(out))
    assert result.exit_code == 2
    assert expected in result.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["scenario.toml"]


def test_simulate_names_missing_field(tmp_path):
    scenario = write_scenario(tmp_path, 'name = "x"\n[[nodes]]\nname = "a"\ncpus = 1.0\n')
    result = run_cli("simulate", str(scenario), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "nodes[0].memory_mb: required field is missing" in result.output


def test_simulate_names_unknown_field(tmp_path):
    scenario = write_scenario(tmp_path, 'name = "x"\nsed = 3\n[[nodes]]\nname = "a"\ncpus = 1.0\nmemory_mb = 512\n')
    result = run_cli("simulate", str(scenario), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "sed: unknown field" in result.output


def test_simulate_rejects_memory_below_runtime(tmp_path):
    scenario = write_scenario(tmp_path, 'name = "x"\n[[nodes]]\nname = "a"\ncpus = 1.0\nmemory_mb = 64\n')
    result = run_cli("simulate", str(scenario), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "nodes.a.memory_mb" in result.output
    assert "raise the node's memory_mb" in result.output


def test_simulate_missing_scenario_file(tmp_path):
    result = run_cli("simulate", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "scenario file not found" in result.output


def test_simulate_refuses_non_empty_out(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    result = run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(out))
    assert result.exit_code == 2
    assert "--force" in result.output
    assert (out / "keep.txt").read_text() == "earlier results"


def test_simulate_rejects_corrupt_calibration(tmp_path):
    calibration = tmp_path / "calibration.json"
    calibration.write_text('{"schema": "amp4ec.calibration/1", "graph": ')
    result = run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(tmp_path / "run"), "--calibration", str(calibration))
    assert result.exit_code == 2
    assert "corrupt or truncated" in result.output
    assert not (tmp_path / "run").exists()


def test_shared_framework_imports_neither_simpy_nor_docker():
    for path in (ROOT / "amp4ec").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in {"simpy", "docker", "zmq"}, f"{path.name} imports {name}"
                # Only the command line and the paper experiment, which drive both stages, may reach them.
                orchestrators = ("cli.py", "paper.py")
                assert not name.startswith(("amp4ec.sim", "amp4ec.real")) or path.name in orchestrators, f"{path.name} imports {name}"


@pytest.mark.slow
def test_core_install_simulates_without_torch(tmp_path):
    """`pip install .` into a fresh venv, then simulate from the shipped calibration."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(ROOT)], capture_output=True, text=True, timeout=900
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the core install pulled in torch"
    out = tmp_path / "run"
    result = subprocess.run(
        [str(env_dir / "bin" / "amp4ec"), "simulate", str(PAPER / "3-node.toml"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "records.parquet").is_file()
    assert (out / "summary.json").is_file()
    assert "latency mean (ms)" in result.stdout


def test_scenario_reference_is_current():
    """docs/scenario-reference.md is regenerated whenever the schema changes."""
    result = run_cli("scenario-reference")
    assert result.exit_code == 0
    committed = (ROOT / "docs" / "scenario-reference.md").read_text()
    assert result.output == committed, "run `amp4ec scenario-reference --out docs/scenario-reference.md`"
    assert "| `cpus` | float | required | > 0 |" in committed


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("cpus = inf", "nodes[0].cpus: Input should be a finite number"),
        ('cpus = "1.0"', "nodes[0].cpus: Input should be a valid number"),
        ("cpus = 1.0\nthreads = true", "nodes[0].threads: Input should be a valid integer"),
    ],
)
def test_simulate_rejects_wrong_types(tmp_path, snippet, expected):
    scenario = write_scenario(tmp_path, f'name = "x"\n[[nodes]]\nname = "a"\nmemory_mb = 1024\n{snippet}\n')
    result = run_cli("simulate", str(scenario), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert expected in result.output


def test_simulate_rejects_contradictory_workload(tmp_path):
    scenario = write_scenario(
        tmp_path, 'name = "x"\n[workload]\nrate_rps = 5.0\n[[nodes]]\nname = "a"\ncpus = 1.0\nmemory_mb = 1024\n'
    )
    result = run_cli("simulate", str(scenario), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "rate_rps applies to open-loop workloads" in result.output


def test_simulate_rejects_bad_scheduler_parameter(tmp_path):
    scenario = write_scenario(
        tmp_path,
        'name = "x"\n[policy]\nscheduler_params = {w_balance = "x"}\n[[nodes]]\nname = "a"\ncpus = 1.0\nmemory_mb = 1024\n',
    )
    result = run_cli("simulate", str(scenario), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "w_balance must be a finite number" in result.output


def test_force_replaces_only_amp4ec_runs(tmp_path, monkeypatch):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(precious), "--force")
    assert result.exit_code == 2
    assert "was not written by amp4ec" in result.output
    assert (precious / "thesis.tex").read_text() == "years of work"

    # A run.json alone does not make a directory amp4ec's.
    (precious / "run.json").write_text("{}")
    result = run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(precious), "--force")
    assert result.exit_code == 2
    assert (precious / "thesis.tex").read_text() == "years of work"

    monkeypatch.chdir(precious)
    result = run_cli("simulate", str(PAPER / "2-node.toml"), "--out", ".", "--force")
    assert result.exit_code == 2
    assert (precious / "thesis.tex").is_file()

    run = tmp_path / "run"
    assert run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(run), "--quiet").exit_code == 0
    assert run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(run), "--quiet", "--force").exit_code == 0
    assert (run / "run.json").is_file()
    assert (run / ".amp4ec-output").is_file()

    # A run written before the marker existed is still recognised by its run.json.
    (run / ".amp4ec-output").unlink()
    assert run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(run), "--quiet", "--force").exit_code == 0


def test_calibration_directory_rejected(tmp_path):
    result = run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(tmp_path / "run"), "--calibration", str(tmp_path))
    assert result.exit_code == 2
    assert "is a directory" in result.output


def test_sigterm_removes_partial_output(tmp_path):
    scenario = write_scenario(
        tmp_path,
        (PAPER / "2-node.toml").read_text().replace("requests = 100", "requests = 3000000"),
    )
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "amp4ec.cli", "simulate", str(scenario), "--out", str(out), "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".run.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(tmp_path.glob(".run.partial-*")), "the run never started"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143
    assert "terminated; no partial output left" in stderr
    assert not out.exists()
    assert list(tmp_path.glob(".run.partial-*")) == []


def test_resolved_scenario_parses_again():
    from amp4ec.scenario import load_scenario, parse_scenario

    for path in sorted(PAPER.glob("*.toml")):
        scenario = load_scenario(path)
        assert parse_scenario(scenario.resolved()) == scenario
    open_loop = parse_scenario({"name": "x", "workload": {"kind": "poisson", "rate_rps": 5.0}, "nodes": [{"name": "a", "cpus": 1.0, "memory_mb": 512}]})
    assert parse_scenario(open_loop.resolved()) == open_loop


def test_calibrate_show_needs_no_torch_or_docker(monkeypatch):
    import amp4ec.cli

    def missing(command):
        raise AssertionError(f"{command} asked for the torch and Docker extras")

    monkeypatch.setattr(amp4ec.cli, "require_extras", missing)
    shipped = ROOT / "amp4ec" / "data" / "calibration-mobilenet_v2.json"
    result = run_cli("calibrate", "show", str(shipped))
    assert result.exit_code == 0, result.output
    assert "features.0" in result.output


def test_killed_run_staging_is_removed(tmp_path):
    """A later run to the same --out removes the staging directory of a killed run, and only that."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    stale = tmp_path / f".out.partial-{finished.pid}-abc"
    stale.mkdir()
    (stale / ".amp4ec-output").write_text("written by amp4ec\n")
    foreign = tmp_path / f".out.partial-{finished.pid}-xyz"
    foreign.mkdir()
    live = tmp_path / ".out.partial-1-abc"
    live.mkdir()
    (live / ".amp4ec-output").write_text("written by amp4ec\n")
    result = run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    # No output marker: not amp4ec's. Process 1 runs: a run in progress.
    assert foreign.exists()
    assert live.exists()


def test_out_inside_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = run_cli("simulate", str(PAPER / "2-node.toml"), "--out", str(tmp_path / "afile" / "sub"), "--quiet")
    assert result.exit_code == 2
    assert "which is a file, not a directory" in result.output


def test_paper_without_containers_writes_page(tmp_path):
    doc = tmp_path / "paper.md"
    result = CliRunner().invoke(
        main, ["paper", "--no-real", "--quiet", "--requests", "5", "--runs", str(tmp_path / "runs"), "--doc", str(doc), "--scenarios", str(PAPER)]
    )
    assert result.exit_code == 0, result.output
    page = doc.read_text()
    assert "| 2-node | simulated |" in page
    assert "real runs were not requested" in page
    # The links' cost in both modes comes from the scenario and the calibration file.
    assert "1,000 Mbit/s, the default, since the scenarios set no `[network]` bandwidth" in page
    assert "the runs here send 5 that way" in page
    assert "Gbit/s host to worker" in page
    assert "input alone is 0.60 MB" in page
