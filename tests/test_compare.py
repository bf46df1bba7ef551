"""Fidelity report: relative errors, thresholds, the plot and the CLI's exit status."""

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from amp4ec.cli import main
from amp4ec.compare import MetricError, compare_runs
from amp4ec.errors import UsageError
from amp4ec.metrics import RequestRecord, summarise, write_run


def write_fake_run(directory: Path, latencies_ms: list[float], busy_cpu_ms: dict[str, float]) -> None:
    records = []
    for i, latency_ms in enumerate(latencies_ms):
        record = RequestRecord(request_id=i, arrival_s=float(i))
        record.start_s = float(i)
        record.complete(i + latency_ms / 1e3)
        records.append(record)
    summary = summarise(records, busy_cpu_ms, {name: 1.0 for name in busy_cpu_ms})
    write_run(directory, records, summary)


@pytest.fixture
def runs(tmp_path):
    sim = tmp_path / "sim"
    real = tmp_path / "real"
    write_fake_run(sim, [100.0] * 10, {"a": 900.0, "b": 450.0})
    write_fake_run(real, [110.0] * 9 + [200.0], {"a": 1000.0, "b": 450.0})
    return sim, real


def test_relative_error_uses_real_as_reference():
    assert MetricError("x", sim=90.0, real=100.0).relative_error == pytest.approx(0.1)
    assert MetricError("x", sim=0.0, real=0.0).relative_error == 0.0
    assert math.isinf(MetricError("x", sim=1.0, real=0.0).relative_error)
    assert MetricError("x", sim=None, real=1.0).relative_error is None


def test_missing_metric_fails_threshold():
    assert not MetricError("x", sim=None, real=1.0, threshold=0.5).passed
    assert MetricError("x", sim=None, real=1.0).passed


def test_compare_runs_values(runs):
    sim, real = runs
    comparison = compare_runs(sim, real, {"mean": 0.2, "p99": 0.2})
    by_name = {m.name: m for m in comparison.metrics}
    real_mean = (9 * 110.0 + 200.0) / 10
    assert by_name["latency mean (ms)"].relative_error == pytest.approx(abs(100.0 - real_mean) / real_mean)
    assert by_name["latency p50 (ms)"].relative_error == pytest.approx(10 / 110)
    assert by_name["latency mean (ms)"].passed
    assert not by_name["latency p99 (ms)"].passed
    assert "node a utilisation" in by_name and "node b utilisation" in by_name
    assert not comparison.passed


def test_compare_rejects_bad_threshold(runs):
    with pytest.raises(UsageError, match="non-negative"):
        compare_runs(*runs, {"mean": -1.0})
    with pytest.raises(UsageError, match="unknown threshold"):
        compare_runs(*runs, {"p90": 0.1})


def test_cli_compare_exit_status_and_plot(runs, tmp_path):
    sim, real = runs
    plot = tmp_path / "latency.png"
    report = tmp_path / "report.json"
    runner = CliRunner()
    passing = runner.invoke(main, ["compare", str(sim), str(real), "--plot", str(plot), "--json", str(report), "--max-error-mean", "0.2"])
    assert passing.exit_code == 0, passing.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(report.read_text())["passed"] is True
    failing = runner.invoke(main, ["compare", str(sim), str(real), "--plot", str(plot), "--max-error-p99", "0.1"])
    assert failing.exit_code == 1, failing.output
    missing = runner.invoke(main, ["compare", str(tmp_path / "nope"), str(real)])
    assert missing.exit_code == 2
    # A plot path under a file is rejected before the comparison runs.
    under_file = runner.invoke(main, ["compare", str(sim), str(real), "--plot", str(report / "x.png")])
    assert under_file.exit_code == 2
    assert "--plot" in under_file.output


def test_compare_simulated_runs_from_cli(tmp_path):
    root = Path(__file__).resolve().parents[1]
    runner = CliRunner()
    scenario = root / "scenarios" / "paper" / "2-node.toml"
    for name in ("a", "b"):
        result = runner.invoke(main, ["simulate", str(scenario), "--out", str(tmp_path / name), "--quiet"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--max-error-mean", "0", "--max-error-utilisation", "0"])
    # The simulator is deterministic for a seed, so two runs of one scenario agree exactly.
    assert result.exit_code == 0, result.output
    # The second directory is given as the real run; the report says it is not one.
    output = " ".join(result.output.split())
    assert f"{tmp_path / 'b'} contains a sim run but was given as the real run" in output
    assert output.count("contains a") == 1, output


def test_cli_compare_reports_a_corrupt_records_file(runs, tmp_path):
    sim, real = runs
    (real / "records.parquet").write_bytes(b"not parquet")
    result = CliRunner().invoke(main, ["compare", str(sim), str(real), "--plot", str(tmp_path / "latency.png")])
    assert result.exit_code == 2, result.output
    assert "cannot read records.parquet" in result.output
    assert not (tmp_path / "latency.png").exists()
