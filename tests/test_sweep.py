import math
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from amp4ec.cli import main
from amp4ec.errors import UsageError
from amp4ec.sim.sweep import confidence_table, parse_grid, run_sweep, set_path

PAPER = Path(__file__).resolve().parents[1] / "scenarios" / "paper"


def small_scenario(tmp_path: Path) -> Path:
    text = (PAPER / "2-node.toml").read_text().replace("requests = 100", "requests = 30")
    path = tmp_path / "2-node.toml"
    path.write_text(text)
    return path


def test_grid_values_parse_as_toml():
    grid = parse_grid(["workload.rate_rps=10,20.5", "policy.scheduler=amp4ec,round_robin", "policy.cache=true,false"])
    assert grid["workload.rate_rps"] == [10, 20.5]
    assert grid["policy.scheduler"] == ["amp4ec", "round_robin"]
    assert grid["policy.cache"] == [True, False]


@pytest.mark.parametrize("spec", ["novalue", "=1,2", "a.b="])
def test_grid_rejects_malformed_entry(spec):
    with pytest.raises(UsageError, match="KEY=V1,V2"):
        parse_grid([spec])


def test_set_path_indexes_lists():
    data = {"nodes": [{"cpus": 1.0}, {"cpus": 0.5}]}
    set_path(data, "nodes[1].cpus", 0.25)
    assert data["nodes"][1]["cpus"] == 0.25
    with pytest.raises(UsageError, match=r"no nodes\[5\]"):
        set_path(data, "nodes[5].cpus", 1.0)


def test_confidence_interval_uses_student_t():
    runs = pd.DataFrame({"k": [1, 1, 1], "error": [None] * 3, "latency_mean_ms": [10.0, 12.0, 14.0]})
    for metric in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "throughput_rps", "completed", "failed"):
        runs[metric] = 1.0
    row = confidence_table(runs, ["k"]).iloc[0]
    assert row["latency_mean_ms"] == pytest.approx(12.0)
    # t(0.975, 2) = 4.303, sample std 2, n 3.
    assert row["latency_mean_ms_ci95"] == pytest.approx(4.303 * 2 / math.sqrt(3), rel=1e-3)


def test_local_sweep_runs_every_point_and_seed(tmp_path):
    runs, points = run_sweep(small_scenario(tmp_path), ["policy.scheduler=amp4ec,round_robin"], 3, workers=2)
    assert len(runs) == 6
    assert runs["error"].isna().all()
    assert sorted(runs["seed"].unique()) == [1, 2, 3]
    assert list(points["policy.scheduler"]) == ["amp4ec", "round_robin"]
    assert (points["seeds"] == 3).all()
    assert (points["completed"] == 30).all()


def test_sweep_rejects_invalid_point_before_running(tmp_path):
    with pytest.raises(UsageError, match="nodes\\[0\\].cpus"):
        run_sweep(small_scenario(tmp_path), ["nodes[0].cpus=1.0,-2"], 2)


def test_dask_sweep_matches_local(tmp_path):
    distributed = pytest.importorskip("distributed")
    scenario = small_scenario(tmp_path)
    local_runs, _ = run_sweep(scenario, ["workload.requests=10,20"], 2, workers=2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask_runs, dask_points = run_sweep(scenario, ["workload.requests=10,20"], 2, dask_address=cluster.scheduler_address)
    key = ["workload.requests", "seed"]
    local = local_runs.sort_values(key).reset_index(drop=True)
    remote = dask_runs.sort_values(key).reset_index(drop=True)
    pd.testing.assert_series_equal(local["latency_mean_ms"], remote["latency_mean_ms"])
    assert list(dask_points["completed"]) == [10, 20]


def test_sweep_command_writes_tables(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        main,
        ["sweep", str(small_scenario(tmp_path)), "--grid", "nodes[1].cpus=0.333,0.334", "--seeds", "2", "--out", str(out), "--workers", "2"],
    )
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(out / "runs.parquet")) == 4
    assert len(pd.read_parquet(out / "points.parquet")) == 2
    # The seed count is an integer and prints as one.
    assert "│     2 │" in result.output, result.output
    # Grid values print as given, not rounded to two decimals, which would show both as 0.33.
    assert "0.333" in result.output
    assert "0.334" in result.output


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--workers", "100000"], "--workers 100000 is more than 4 processes per core"),
        (["--seeds", "10000000"], "runs, more than 1,000,000"),
        (["--seeds", "0"], "--seeds: must be at least 1, got 0"),
    ],
    ids=["workers", "seeds", "no-seeds"],
)
def test_sweep_rejects_oversized_runs(tmp_path, options, expected):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", str(small_scenario(tmp_path)), "--grid", "nodes[1].cpus=0.3,0.6", "--out", str(out), *options])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert not out.exists()
