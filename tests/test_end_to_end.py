"""calibrate, simulate and replay on real containers, as the quick start chains them."""

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from amp4ec.costs import load_calibration
from amp4ec.metrics import RECORD_SCHEMA

from conftest import require_torch

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "scenarios" / "paper"

pytestmark = [pytest.mark.docker, pytest.mark.torch]


def run_resources(client, run_id: str) -> list[str]:
    """Return the containers and networks left whose run label starts with ``run_id``."""
    label = {"label": "amp4ec.project=amp4ec"}
    left = [(c.name, c.labels) for c in client.containers.list(all=True, filters=label)]
    left += [(n.name, n.attrs.get("Labels") or {}) for n in client.networks.list(filters=label)]
    return [name for name, labels in left if labels.get("amp4ec.run", "").startswith(run_id)]


def short_scenario(tmp_path: Path, name: str, requests: int) -> Path:
    text = (PAPER / name).read_text().replace("requests = 100", f"requests = {requests}")
    path = tmp_path / name
    path.write_text(text)
    return path


def test_calibrate_writes_measured_file(tmp_path, docker_client, worker_image, run_id):
    require_torch()
    from amp4ec.calibrate.run import parse_profiles, run_calibration

    out = tmp_path / "calibration.json"
    run_calibration(
        model="mobilenet_v2",
        granularity="block",
        profiles=parse_profiles(["low:0.4:512", "high:1.0:1024"]),
        repeats=3,
        warmup=1,
        gap_ms=20.0,
        out=out,
        base_image=None,
        log=print,
        max_repeats=3,
        min_window_ms=300.0,
        run_id=run_id,
    )
    calibration = load_calibration(out)
    assert [p.name for p in calibration.profiles] == ["low", "high"]
    assert calibration.graph.n_units == 20
    assert calibration.provenance.worker_torch.startswith("2.13")
    for profile in calibration.profiles:
        assert all(u.wall.samples == 3 and u.cpu_ms > 0 for u in profile.units)
        assert 150 * 2**20 < profile.runtime_rss_bytes < 600 * 2**20
    # The whole model costs more CPU than its cheapest unit and less than all units run one by one.
    high = calibration.profile("high")
    assert max(u.warm_cpu_ms for u in high.units) < high.model.warm_cpu_ms < sum(u.cpu_ms for u in high.units)
    assert calibration.link is not None
    assert calibration.link.bandwidth_bps > 1e8
    assert run_resources(docker_client, run_id) == []


def test_replay_and_simulate_share_schema(tmp_path, docker_client, worker_image, run_id):
    require_torch()
    from amp4ec.real.replay import run_replay
    from amp4ec.sim.run import run_simulation

    scenario = short_scenario(tmp_path, "3-node.toml", 20)
    sim_summary = run_simulation(scenario, tmp_path / "sim")
    real_summary = run_replay(scenario, tmp_path / "real", log=print, run_id=run_id)

    assert pq.read_schema(tmp_path / "real" / "records.parquet").equals(RECORD_SCHEMA)
    assert pq.read_schema(tmp_path / "sim" / "records.parquet").equals(RECORD_SCHEMA)
    real = pd.read_parquet(tmp_path / "real" / "records.parquet")
    assert list(real["outcome"]) == ["completed"] * 20
    assert all(len(nodes) == len(real_summary["plan"]["bounds"]) - 1 for nodes in real["stage_nodes"])
    assert real_summary["plan"] == sim_summary["plan"]
    assert set(real_summary["nodes"]) == set(sim_summary["nodes"]) == {"high", "medium", "low"}
    # The partitioned pipeline on containers computes what the unsplit model computes on the host.
    assert real_summary["output_check"]["passed"], real_summary["output_check"]
    run = json.loads((tmp_path / "real" / "run.json").read_text())
    assert run["mode"] == "real"
    assert run_resources(docker_client, run_id) == []


def test_replay_bad_scenario_starts_nothing(tmp_path, docker_client, run_id):
    from amp4ec.errors import UsageError
    from amp4ec.real.replay import run_replay

    scenario = tmp_path / "bad.toml"
    scenario.write_text('name = "x"\n[policy]\nscheduler = "fastest"\n[[nodes]]\nname = "a"\ncpus = 1.0\nmemory_mb = 512\n')
    with pytest.raises(UsageError, match="unknown scheduler 'fastest'"):
        run_replay(scenario, tmp_path / "out", log=print, run_id=run_id)
    assert not (tmp_path / "out").exists()
    assert run_resources(docker_client, run_id) == []


PLUGIN_CHOOSING_NO_NODE = """
class Nowhere:
    name = "nowhere"

    def __init__(self, rng):
        pass

    def select(self, task, states):
        return "nope"

    def observe(self, node, exec_ms):
        pass


class Raising(Nowhere):
    def select(self, task, states):
        raise RuntimeError("boom")
"""


@pytest.mark.parametrize(
    ("transport", "plugin", "message"),
    [
        ("forward", "Nowhere", "chose 'nope', which is not a node of the scenario"),
        ("relay", "Nowhere", "chose 'nope', which is not a node of the scenario"),
        ("forward", "Raising", "scheduler 'nowhere_plugin:Raising' failed: RuntimeError: boom"),
    ],
)
def test_replay_plugin_choosing_no_node_is_usage_error(tmp_path, monkeypatch, docker_client, worker_image, run_id, transport, plugin, message):
    require_torch()
    from amp4ec.errors import UsageError
    from amp4ec.real.replay import run_replay

    (tmp_path / "nowhere_plugin.py").write_text(PLUGIN_CHOOSING_NO_NODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = short_scenario(tmp_path, "2-node.toml", 3).read_text().replace('scheduler = "amp4ec"', f'scheduler = "nowhere_plugin:{plugin}"')
    scenario = tmp_path / "plugin.toml"
    scenario.write_text(text + f'\n[replay]\ntransport = "{transport}"\n')
    with pytest.raises(UsageError, match=message):
        run_replay(scenario, tmp_path / "out", log=print, run_id=run_id)
    assert not (tmp_path / "out").exists()
    assert run_resources(docker_client, run_id) == []


STARTUP_SCRIPT = """
import sys
from amp4ec.real.containers import NodeSpec, WorkerCluster, docker_client
nodes = [NodeSpec("a", 0.5, 512 * 2**20, 1), NodeSpec("b", 0.5, 512 * 2**20, 1)]
with WorkerCluster(docker_client(), nodes, image=sys.argv[1], run_id=sys.argv[2]):
    print("ready", flush=True)
"""


@pytest.mark.parametrize("delay_s", [0.2, 0.6, 1.2])
def test_interrupt_during_startup_leaves_nothing(docker_client, worker_image, run_id, delay_s):
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", STARTUP_SCRIPT, worker_image, run_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay_s)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert run_resources(docker_client, run_id) == []
