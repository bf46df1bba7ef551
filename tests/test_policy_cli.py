"""`amp4ec partition` and `amp4ec compare-policies` on the shipped calibration."""

from pathlib import Path

from click.testing import CliRunner

from amp4ec.cli import main

SCENARIO = """
name = "policies"
[policy]
partitioner = "{partitioner}"
partitioner_params = {params}
[workload]
requests = {requests}
[[nodes]]
name = "high"
cpus = 1.0
memory_mb = 1024
[[nodes]]
name = "low"
cpus = 0.4
memory_mb = {low_memory_mb}
"""


def write(tmp_path: Path, partitioner="ralos", params="{}", requests=10, low_memory_mb=512) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(SCENARIO.format(partitioner=partitioner, params=params, requests=requests, low_memory_mb=low_memory_mb))
    return path


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_partition_prints_plan(tmp_path):
    result = run_cli("partition", str(write(tmp_path, "optimal", '{ objective = "bottleneck" }')))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("plan of 'optimal'" in line for line in lines)
    for column in ("MFLOPs", "params (MB)", "in cut (bytes)", "out cut (bytes)", "predicted (ms)"):
        assert column in result.output
    # The input cut of the first segment is the 1x3x224x224 float32 image.
    assert "602112" in result.output
    assert "predicted latency of one request" in " ".join(result.output.split())
    # The shipped calibration has a memory search, which raises the estimate where a worker needed more.
    assert "memory = the larger of weights + peak activations and the memory search's need" in " ".join(result.output.split())


def test_partition_unknown_partitioner(tmp_path):
    result = run_cli("partition", str(write(tmp_path, "fastest")))
    assert result.exit_code == 2
    assert "unknown partitioner 'fastest'" in result.output


def test_partition_plan_over_memory(tmp_path):
    # Pinned to the 0.4-CPU node, the last segment meets a limit below the runtime plus its weights.
    scenario = write(tmp_path, "ralos", '{ weighting = "capability" }', low_memory_mb=222)
    result = run_cli("partition", str(scenario))
    assert result.exit_code == 2
    assert "plan of partitioner 'ralos' does not fit node 'low'" in " ".join(result.output.split())


def test_compare_policies_ranks_pairs(tmp_path):
    result = run_cli("compare-policies", str(write(tmp_path)), "--requests", "5", "--quiet")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    # Ten partitioner configurations, each with the seven registered schedulers.
    assert len(rows) == 10 * 7
    latencies = [float(row.split("│")[5]) for row in rows]
    assert latencies == sorted(latencies)
    for name in ("optimal objective=bottleneck", "replicate", "hybrid", "ralos cost=time", "shortest_expected_completion", "cache_aware", "pinned"):
        assert name in result.output


def test_compare_requests_checked_for_run_length(tmp_path):
    """--requests copies the scenario without validating it again, so the run length is checked up front."""
    path = tmp_path / "long.toml"
    path.write_text('name = "x"\n[monitor]\nperiod_s = 0.001\n[workload]\nrequests = 1\nthink_time_ms = 1e8\n[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n')
    result = run_cli("compare-policies", str(path), "--requests", "10", "--quiet")
    assert result.exit_code == 2
    assert "--requests: the run lasts at least 9e+05 s" in " ".join(result.output.split())


def test_compare_without_runnable_pair_is_usage_error(tmp_path):
    # A 1 kbit/s link makes every pair's transfers too long for a 1 ms monitor period.
    path = tmp_path / "slow.toml"
    path.write_text(
        'name = "x"\n[monitor]\nperiod_s = 0.001\n[network]\nbandwidth_mbps = 0.001\n[workload]\nrequests = 100\n'
        '[[nodes]]\nname = "n"\ncpus = 1.0\nmemory_mb = 1024\n'
    )
    result = run_cli("compare-policies", str(path), "--quiet")
    output = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "no partitioner and scheduler pair could run" in output
    assert "raise the links' bandwidth_mbps" in output
