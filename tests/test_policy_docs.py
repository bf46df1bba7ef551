"""The plug-in example of docs/policies.md, run as a user would run it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "policies.md"

SCENARIO = """
name = "plugin-example"
[policy]
partitioner = "my_policies:HeaviestAlone"
scheduler = "my_policies:MostIdle"
[workload]
requests = 20
[[nodes]]
name = "high"
cpus = 1.0
memory_mb = 1024
[[nodes]]
name = "low"
cpus = 0.4
memory_mb = 512
"""


def example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    matching = [block for block in blocks if block.startswith("# my_policies.py")]
    assert len(matching) == 1, "docs/policies.md must contain one ```python block starting with '# my_policies.py'"
    return matching[0]


def run_amp4ec(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "amp4ec.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_documented_plugin_runs(tmp_path):
    (tmp_path / "my_policies.py").write_text(example_code())
    scenario = tmp_path / "plugin-example.toml"
    scenario.write_text(SCENARIO)

    shown = run_amp4ec(tmp_path, "partition", str(scenario))
    assert shown.returncode == 0, shown.stderr
    assert "plan of 'heaviest_alone'" in shown.stdout
    assert "nodes chosen by the partitioner" in shown.stdout

    simulated = run_amp4ec(tmp_path, "simulate", str(scenario), "--out", str(tmp_path / "run"), "--quiet")
    assert simulated.returncode == 0, simulated.stderr
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"partitioner": "heaviest_alone"' in summary


def test_documented_plugin_missing_module(tmp_path):
    scenario = tmp_path / "plugin-example.toml"
    scenario.write_text(SCENARIO)
    result = run_amp4ec(tmp_path, "partition", str(scenario))
    assert result.returncode == 2
    assert "partitioner plug-in 'my_policies:HeaviestAlone' cannot be imported" in " ".join(result.stderr.split())
