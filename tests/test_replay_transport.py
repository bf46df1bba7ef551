"""Replay with each transport and route decision: every stage recorded, output unchanged."""

import json

import pandas as pd
import pytest

from conftest import require_torch

SCENARIO = """
name = "transport"
seed = 2
[policy]
scheduler = "round_robin"
[workload]
kind = "closed"
clients = 2
requests = 6
[monitor]
period_s = 0.5
[[nodes]]
name = "a"
cpus = 0.5
memory_mb = 512
[[nodes]]
name = "b"
cpus = 0.5
memory_mb = 512
"""


@pytest.mark.docker
@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize(("transport", "route"), [("forward", "per_stage"), ("forward", "at_dispatch"), ("relay", "per_stage")])
def test_transport_records_every_stage(tmp_path, docker_client, worker_image, transport, route):
    require_torch()
    from amp4ec.real.replay import run_replay

    scenario_path = tmp_path / "transport.toml"
    scenario_path.write_text(SCENARIO + f'[replay]\ntransport = "{transport}"\nroute = "{route}"\n')
    out = tmp_path / "real"
    summary = run_replay(scenario_path, out, log=print)

    assert summary["output_check"]["passed"], summary["output_check"]
    records = pd.read_parquet(out / "records.parquet")
    assert list(records["outcome"]) == ["completed"] * 6
    for _, record in records.iterrows():
        starts, ends = list(record["stage_start_s"]), list(record["stage_end_s"])
        assert len(record["stage_nodes"]) == 2
        assert all(exec_ms > 0 for exec_ms in record["stage_exec_ms"])
        assert record["start_s"] == pytest.approx(starts[0])
        # Relay mode completes the record just after its last stage ends.
        assert 0 <= record["end_s"] - ends[-1] < 0.01
        assert all(start <= end for start, end in zip(starts, ends))
        assert ends[0] <= starts[1] + 1e-6
        # Input 1x3x224x224 and output 1x1000 float32, plus the cut activation both ways.
        assert record["bytes_moved"] > (3 * 224 * 224 + 1000) * 4
    run = json.loads((out / "run.json").read_text())
    assert run["transport"]["activations"] == transport
    assert run["monitor"]["method"] == "push"
    assert run["monitor"]["pushes"] > 0
    assert run["scenario"]["replay"] == {"transport": transport, "route": route}
