import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from amp4ec.cli import main
from amp4ec.report import load_run, node_busy_share

PAPER = Path(__file__).resolve().parents[1] / "scenarios" / "paper"


@pytest.fixture
def runs(tmp_path):
    """A simulated 2-node run, and a copy relabelled as real so the pairing logic has a pair."""
    sim = tmp_path / "sim"
    result = CliRunner().invoke(main, ["simulate", str(PAPER / "2-node.toml"), "--out", str(sim), "--quiet"])
    assert result.exit_code == 0, result.output
    real = tmp_path / "real"
    shutil.copytree(sim, real)
    info = json.loads((real / "run.json").read_text())
    info["mode"] = "real"
    (real / "run.json").write_text(json.dumps(info))
    return sim, real


def test_report_writes_plots_and_markdown(tmp_path, runs):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [".amp4ec-output", "latency-cdf.png", "report.md", "sim-vs-real.png", "throughput.png", "utilisation.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| paper-2-node (sim) |" in markdown
    assert "## Simulated against real" in markdown
    assert "| paper-2-node | latency mean (ms) |" in markdown
    assert "completed requests / (last completion - first arrival)" in markdown


def test_busy_share_matches_summary(runs):
    run = load_run(runs[0])
    shares = node_busy_share(run, bin_s=0.5)
    # Time-integrated busy share equals the total execution time each node recorded.
    for node in shares.columns:
        recorded_s = sum(
            exec_ms / 1e3
            for nodes, execs in zip(run.records["stage_nodes"], run.records["stage_exec_ms"])
            for name, exec_ms in zip(nodes, execs)
            if name == node
        )
        assert shares[node].sum() * 0.5 == pytest.approx(recorded_s, rel=1e-6)


def test_report_rejects_non_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "records.parquet is missing" in result.output
    assert not (tmp_path / "out").exists()
