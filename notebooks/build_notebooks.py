"""Write the example notebooks from the cells below, so they stay reviewable as plain Python.

Run `python notebooks/build_notebooks.py` after editing; tests/test_notebooks.py executes the
written notebooks with the small settings their first cell defines.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

CALIBRATION = [
    new_markdown_cell(
        "# 01 Calibration\n\nWhat each MobileNetV2 unit costs in each container profile of the shipped "
        "calibration, and how much splitting the model costs on top of its units."
    ),
    new_code_cell(
        "import os\n"
        "import pandas as pd\n"
        "import matplotlib.pyplot as plt\n"
        "from amp4ec.costs import CostModel, load_calibration\n\n"
        "# 'default' is the calibration shipped with the package; give a path to read your own.\n"
        "CALIBRATION = os.environ.get('AMP4EC_CALIBRATION', 'default')\n"
        "calibration = load_calibration(CALIBRATION)\n"
        "calibration.provenance"
    ),
    new_code_cell(
        "rows = []\n"
        "for profile in calibration.profiles:\n"
        "    for unit in profile.units:\n"
        "        rows.append({'profile': profile.name, 'unit': unit.name, 'spaced_cpu_ms': unit.cpu_ms,\n"
        "                     'back_to_back_cpu_ms': unit.warm_cpu_ms, 'p95_wall_ms': unit.wall.p95_ms})\n"
        "units = pd.DataFrame(rows)\n"
        "units.pivot(index='unit', columns='profile', values='back_to_back_cpu_ms').round(2)"
    ),
    new_code_cell(
        "ax = units.pivot(index='unit', columns='profile', values='back_to_back_cpu_ms').plot.bar(figsize=(10, 4))\n"
        "ax.set_ylabel('CPU time per forward, back to back (ms)')\n"
        "plt.tight_layout()"
    ),
    new_code_cell(
        "costs = CostModel(calibration)\n"
        "n = calibration.graph.n_units\n"
        "whole = costs.segment_cost(0, n, threads=1).cpu_ms\n"
        "split = sum(costs.segment_cost(a, b, threads=1).cpu_ms for a, b in [(0, 7), (7, 14), (14, n)])\n"
        "print(f'whole model {whole:.1f} ms CPU; in three segments {split:.1f} ms CPU')"
    ),
]

SCALING = [
    new_markdown_cell(
        "# 02 Scaling\n\nSimulated latency and throughput as the low node's CPU quota and the scheduler change, "
        "over several seeds with confidence intervals (`amp4ec sweep`)."
    ),
    new_code_cell(
        "import os\n"
        "from pathlib import Path\n"
        "import matplotlib.pyplot as plt\n"
        "from amp4ec.sim.sweep import run_sweep\n\n"
        "ROOT = Path.cwd().parent if Path.cwd().name == 'notebooks' else Path.cwd()\n"
        "# Small settings run in a minute; raise SEEDS and the grid for a study.\n"
        "SEEDS = int(os.environ.get('AMP4EC_NOTEBOOK_SEEDS', 3))\n"
        "QUOTAS = [0.1, 0.2, 0.4, 0.8]\n"
        "runs, points = run_sweep(\n"
        "    ROOT / 'scenarios/paper/3-node.toml',\n"
        "    [f\"nodes[2].cpus={','.join(map(str, QUOTAS))}\", 'policy.scheduler=amp4ec,round_robin', 'workload.requests=50'],\n"
        "    SEEDS,\n"
        "    workers=2,\n"
        ")\n"
        "points"
    ),
    new_code_cell(
        "fig, ax = plt.subplots(figsize=(6, 4))\n"
        "for scheduler, group in points.groupby('policy.scheduler'):\n"
        "    ax.errorbar(group['nodes[2].cpus'], group['latency_mean_ms'], yerr=group['latency_mean_ms_ci95'], marker='o', label=scheduler)\n"
        "ax.set_xlabel('CPU quota of the low node (CPUs)')\n"
        "ax.set_ylabel('mean latency (ms), 95 % CI')\n"
        "ax.legend()"
    ),
]

SIM_VS_REAL = [
    new_markdown_cell(
        "# 03 Simulated against real\n\nSimulate a paper scenario, replay it on containers, and compare the "
        "latency distributions. Replay needs torch on the host and a running Docker engine."
    ),
    new_code_cell(
        "import os, tempfile\n"
        "from pathlib import Path\n"
        "import pandas as pd\n"
        "import matplotlib.pyplot as plt\n"
        "from amp4ec.sim.run import run_simulation\n"
        "from amp4ec.real.replay import run_replay\n\n"
        "ROOT = Path.cwd().parent if Path.cwd().name == 'notebooks' else Path.cwd()\n"
        "REQUESTS = int(os.environ.get('AMP4EC_NOTEBOOK_REQUESTS', 20))\n"
        "work = Path(tempfile.mkdtemp(prefix='amp4ec-notebook-'))\n"
        "scenario = work / '2-node.toml'\n"
        "scenario.write_text((ROOT / 'scenarios/paper/2-node.toml').read_text().replace('requests = 100', f'requests = {REQUESTS}'))\n"
        "sim = run_simulation(scenario, work / 'sim')\n"
        "real = run_replay(scenario, work / 'real', log=lambda message: None)\n"
        "pd.DataFrame({'simulated': sim['latency_ms'], 'real': real['latency_ms']})"
    ),
    new_code_cell(
        "fig, ax = plt.subplots(figsize=(6, 4))\n"
        "for label in ('sim', 'real'):\n"
        "    latencies = pd.read_parquet(work / label / 'records.parquet')['latency_ms'].sort_values()\n"
        "    ax.step(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], where='post', label=label)\n"
        "ax.set_xlabel('latency (ms)')\n"
        "ax.set_ylabel('share of requests')\n"
        "ax.legend()"
    ),
]


def main() -> None:
    for name, cells in (("01-calibration", CALIBRATION), ("02-scaling", SCALING), ("03-sim-vs-real", SIM_VS_REAL)):
        notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(notebook, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
