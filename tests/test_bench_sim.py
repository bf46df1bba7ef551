"""`amp4ec bench sim` at tiny sizes: every figure is measured and printed, none is made up."""

import json

from click.testing import CliRunner

from amp4ec.cli import main


def test_bench_sim_reports_every_figure():
    result = CliRunner().invoke(
        main,
        ["bench", "sim", "--pipeline-requests", "300", "--mm1-jobs", "2000", "--scale-requests", "300", "--small-requests", "300", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout[result.stdout.index("{") :])
    assert figures["pipeline_requests_per_s"] > 0
    assert figures["bare_simpy_mm1_jobs_per_s"] > 0
    assert figures["ratio"] == figures["pipeline_requests_per_s"] / figures["bare_simpy_mm1_jobs_per_s"]
    assert figures["scale"]["nodes"] == 10_000
    assert figures["scale"]["requests"] == 300
    assert figures["scale"]["peak_rss_bytes"] > 0
    assert figures["scale"]["littles_law_error"] < 1e-9
    assert figures["cost_ratio"] > 0


def test_bench_sim_rejects_zero_requests():
    result = CliRunner().invoke(main, ["bench", "sim", "--scale-requests", "0"])
    assert result.exit_code == 2
    assert "--scale-requests must be at least 1" in result.output
