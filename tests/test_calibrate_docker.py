"""`amp4ec calibrate` against real containers with tiny settings, and its faults."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from amp4ec.calibrate.measure import BACK_TO_BACK_PARTS, IDLE_GAP_RUNS, IDLE_GAP_TURNS, IDLE_GAPS_MS, PROBE_WINDOW_MS, RepeatPolicy
from amp4ec.costs import CALIBRATION_SCHEMA, load_calibration

from conftest import require_torch

TESTS = Path(__file__).resolve().parent
TINY = "tiny_models:make"
TINY_SHAPE = "1,3,16,16"


def labelled_containers(client, run_id_part: str) -> set[str]:
    """Names of labelled containers whose run id contains ``run_id_part`` (other runs may share the engine)."""
    containers = client.containers.list(all=True, filters={"label": "amp4ec.project=amp4ec"})
    return {c.name for c in containers if run_id_part in c.labels.get("amp4ec.run", "")}


def logged_run_id(log_text: str) -> str:
    match = re.search(r"run id (calibrate-[0-9a-f]+)", log_text)
    assert match, log_text[-2000:]
    return match.group(1)


def amp4ec_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "amp4ec.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    # The tiny model's module lives in tests/, which the worker never needs: it gets exported programs.
    return {**os.environ, "PYTHONPATH": str(TESTS), **extra}


@pytest.mark.docker
@pytest.mark.torch
@pytest.mark.slow
def test_calibrate_factory_model_measures_both_regimes(tmp_path, docker_client, worker_image):
    require_torch()
    out = tmp_path / "tiny.json"
    result = subprocess.run(
        amp4ec_command(
            "calibrate", "--model", TINY, "--input-shape", TINY_SHAPE, "--granularity", "leaf",
            "--profile", "a:1.0:512", "--profile", "b:0.3:512",
            "--repeats", "3", "--max-repeats", "6", "--warmup", "1", "--gap-ms", "20", "--out", str(out),
        ),  # fmt: skip
        env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    calibration = load_calibration(out)
    assert calibration.schema_ == CALIBRATION_SCHEMA
    assert calibration.graph.model == TINY
    assert calibration.graph.input_shape == [1, 3, 16, 16]
    assert [p.name for p in calibration.profiles] == ["a", "b"]
    for profile in calibration.profiles:
        assert len(profile.reference_cpu_ms) == 2
        for timing in [*profile.units, profile.model]:
            assert 3 <= len(timing.spaced.wall_ms) <= 6
            assert timing.spaced.converged == (timing.spaced.ci95_rel <= 0.02)
            # Back to back, each turn's runs continue past --max-repeats until they span at least
            # two CFS periods, or until the turn's share of the run cap.
            turn_cap = math.ceil(RepeatPolicy().max_window_repeats / BACK_TO_BACK_PARTS)
            turns = np.split(np.asarray(timing.saturated.wall_ms), np.cumsum(timing.saturated.turns)[:-1])
            assert len(turns) == BACK_TO_BACK_PARTS
            for turn in turns:
                assert turn.sum() >= PROBE_WINDOW_MS or len(turn) == turn_cap
            for measurement in (timing.spaced, timing.saturated):
                assert measurement.ci95_rel <= 0.02 or not measurement.converged
                assert measurement.cpu_stat is not None
                assert measurement.cpu_stat.nr_periods is not None
                assert measurement.peak_rss_bytes > 100 * 2**20
        # The whole model after each pause shorter than --gap-ms, in turns.
        assert [m.gap_ms for m in profile.idle_gaps] == [pause for pause in IDLE_GAPS_MS if pause < 20]
        for measurement in profile.idle_gaps:
            assert len(measurement.turns) == IDLE_GAP_TURNS
            assert len(measurement.cpu_ms) >= IDLE_GAP_RUNS
    # Both profiles are measured unit by unit in turn, with a drift sample before the first unit and after each one.
    assert calibration.drift_profile == "a"
    assert [sample.after for sample in calibration.drift] == ["start", *(u.name for u in calibration.profiles[0].units), "model"]
    assert all(sample.cpu_ms > 0 for sample in calibration.drift)
    times = [sample.time_s for sample in calibration.drift]
    assert times == sorted(times)
    link = calibration.container_link
    assert link is not None
    assert link.transport.startswith("zeromq")
    assert "container to container" in link.transport
    assert link.bandwidth_bps > 1e7
    validated = subprocess.run(amp4ec_command("calibrate", "validate", str(out)), env=cli_env(), capture_output=True, text=True, timeout=120)
    assert validated.returncode == 0, validated.stderr
    assert "within 10 %" in validated.stdout
    assert "simulator:" in validated.stdout
    assert labelled_containers(docker_client, logged_run_id(result.stderr)) == set()


@pytest.mark.docker
@pytest.mark.torch
def test_memory_search_finds_a_limit_and_reports_oom(docker_client, worker_image, run_id):
    torch = require_torch()
    import io

    import numpy as np

    from amp4ec.calibrate.memory import MIB, search_min_memory
    from amp4ec.errors import OversubscriptionWarning
    from amp4ec.real.containers import host_cpu_count
    from amp4ec.scenario import NodeSpec

    # 24 M float32 parameters (96 MiB) cannot fit next to the runtime in 200 MiB, and fit in 640 MiB.
    big = torch.nn.Linear(4096, 6144)
    program = torch.export.export(big.eval(), (torch.zeros(1, 4096),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    messages = []
    # A probe asking for every core would be oversubscribed in a replay. A probe times nothing,
    # so it must not warn.
    profile = NodeSpec(name="p", cpus=float(host_cpu_count(docker_client)), memory_mb=640)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = search_min_memory(
            docker_client, worker_image, run_id, profile, "big", buffer.getvalue(),
            [np.zeros((1, 4096), dtype=np.float32)], low_bytes=200 * MIB, high_bytes=640 * MIB, resolution_bytes=128 * MIB,
            log=messages.append,
        )  # fmt: skip
    assert not [w for w in caught if issubclass(w.category, OversubscriptionWarning)]
    assert result.min_memory_bytes is not None
    assert 200 * MIB < result.min_memory_bytes <= 640 * MIB
    assert result.probes[0].ran
    assert result.probes[0].memory_bytes == 640 * MIB
    failed = [p for p in result.probes if not p.ran]
    assert failed
    assert all(p.memory_bytes < result.min_memory_bytes for p in failed)
    assert any(p.oom_killed for p in failed), [p.detail for p in failed]
    assert labelled_containers(docker_client, run_id) == set()


def write_tiny_calibration(path: Path) -> None:
    """Write a calibration of the tiny model with made-up timings and no memory search."""
    from synthetic import make_calibration
    from tiny_models import make

    from amp4ec.torchgraph import trace_model

    graph = trace_model(make(), TINY, input_shape=[1, 3, 16, 16], granularity="block").graph
    calibration = make_calibration(
        [0.1] * graph.n_units, graph=graph, profiles=(("a", 1.0, 1), ("b", 0.5, 1)), memory_bytes=512 * 2**20
    )
    calibration.save(path)


@pytest.mark.docker
@pytest.mark.torch
def test_memory_added_to_earlier_calibration(tmp_path, docker_client, worker_image):
    require_torch()
    earlier = tmp_path / "earlier.json"
    write_tiny_calibration(earlier)
    earlier_text = earlier.read_text()
    out = tmp_path / "with-memory.json"
    result = subprocess.run(
        amp4ec_command("calibrate", "memory", str(earlier), "--out", str(out)), env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert earlier.read_text() == earlier_text
    before = load_calibration(earlier)
    after = load_calibration(out)
    assert after.schema_ == CALIBRATION_SCHEMA
    assert after.memory_provenance is not None
    assert "calibrate memory" in after.memory_provenance.command
    # One search per thread count, shared by both profiles: every unit and the whole model.
    for profile, earlier_profile in zip(after.profiles, before.profiles):
        assert [search.segment for search in profile.memory_search] == [u.name for u in after.graph.units] + ["model"]
        for search in profile.memory_search:
            assert search.min_memory_bytes is not None
            assert search.min_memory_bytes <= 512 * 2**20
        assert profile.units == earlier_profile.units
    assert after.profiles[0].memory_search == after.profiles[1].memory_search
    assert labelled_containers(docker_client, logged_run_id(result.stderr + result.stdout)) == set()


def test_memory_search_keeps_existing_out(tmp_path):
    require_torch()
    earlier = tmp_path / "earlier.json"
    write_tiny_calibration(earlier)
    out = tmp_path / "out.json"
    out.write_text("earlier")
    result = subprocess.run(amp4ec_command("calibrate", "memory", str(earlier), "--out", str(out)), env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pass --force" in result.stderr
    assert out.read_text() == "earlier"


def shrink_second_profile(data: dict) -> None:
    data["profiles"][1]["memory_bytes"] = 10 * 2**20


def rename_first_unit(data: dict) -> None:
    # The graph and each profile's timings must agree, so both are renamed.
    data["graph"]["units"][0]["name"] = "renamed"
    for profile in data["profiles"]:
        profile["units"][0]["name"] = "renamed"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [(shrink_second_profile, "profile b has a memory limit of 10 MiB, below the"), (rename_first_unit, "the model code has changed")],
    ids=["limit below runtime", "changed model"],
)
def test_memory_search_rejects_unusable_file(tmp_path, edit, expected):
    require_torch()
    earlier = tmp_path / "earlier.json"
    write_tiny_calibration(earlier)
    data = json.loads(earlier.read_text())
    edit(data)
    earlier.write_text(json.dumps(data))
    out = tmp_path / "out.json"
    # No Docker engine is needed to find either problem: this one does not exist.
    env = cli_env(DOCKER_HOST="unix:///nonexistent/docker.sock")
    result = subprocess.run(amp4ec_command("calibrate", "memory", str(earlier), "--out", str(out)), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in " ".join(result.stderr.split())
    assert not out.exists()


def test_unknown_model_is_a_usage_error(tmp_path):
    require_torch()
    out = tmp_path / "c.json"
    out.write_text("earlier")
    result = subprocess.run(amp4ec_command("calibrate", "--model", "no_such_net", "--force", "--out", str(out)), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "unknown model 'no_such_net'" in result.stderr
    assert out.read_text() == "earlier"


def test_memory_below_runtime_is_a_usage_error(tmp_path):
    out = tmp_path / "c.json"
    result = subprocess.run(amp4ec_command("calibrate", "--profile", "tiny:1.0:64", "--out", str(out)), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "64 MiB" in result.stderr
    assert "raise it" in result.stderr
    assert not out.exists()


def test_docker_not_running_leaves_earlier_file(tmp_path):
    require_torch()
    pytest.importorskip("docker")
    out = tmp_path / "c.json"
    out.write_text("earlier")
    result = subprocess.run(
        amp4ec_command("calibrate", "--model", TINY, "--input-shape", TINY_SHAPE, "--force", "--out", str(out)),
        env=cli_env(DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "docker" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert out.read_text() == "earlier"


def interrupt_calibration(tmp_path: Path, docker_client, interrupt) -> tuple[int, str, Path, str, float]:
    """Start a calibration over an earlier output file and call ``interrupt(process, run_id)`` 3 s after its worker starts.

    Returns the exit status, the log, the output path, the run id and the seconds from the interruption to the exit.
    """
    out = tmp_path / "c.json"
    out.write_text("earlier")
    log_path = tmp_path / "calibrate.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            amp4ec_command(
                "calibrate", "--model", TINY, "--input-shape", TINY_SHAPE, "--profile", "a:1.0:512",
                "--repeats", "50", "--max-repeats", "50", "--gap-ms", "100", "--force", "--out", str(out),
            ),  # fmt: skip
            env=cli_env(COLUMNS="200"), stdout=subprocess.DEVNULL, stderr=log_file, text=True,
        )
        try:
            # Wait until the calibration's worker container runs.
            deadline = time.monotonic() + 240
            run_id = None
            while time.monotonic() < deadline and run_id is None:
                assert process.poll() is None, log_path.read_text()[-2000:]
                match = re.search(r"run id (calibrate-[0-9a-f]+)", log_path.read_text())
                if match and labelled_containers(docker_client, match.group(1)):
                    run_id = match.group(1)
                else:
                    time.sleep(0.5)
            assert run_id, "no calibration container started"
            time.sleep(3)
            interrupted = time.monotonic()
            interrupt(process, run_id)
            process.wait(timeout=120)
            exit_s = time.monotonic() - interrupted
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, log_path.read_text(), out, run_id, exit_s


@pytest.mark.docker
@pytest.mark.torch
@pytest.mark.parametrize(("action", "stopped"), [("kill", "exited with status 137"), ("restart", "was restarted")])
def test_stopped_worker_is_named(tmp_path, docker_client, worker_image, action, stopped):
    require_torch()

    def stop_worker(process, run_id):
        # Kill or restart the worker from outside, as `docker kill` or `docker restart` would.
        for name in labelled_containers(docker_client, run_id):
            container = docker_client.containers.get(name)
            if action == "kill":
                container.kill()
            else:
                container.restart(timeout=1)

    status, log_text, out, run_id, exit_s = interrupt_calibration(tmp_path, docker_client, stop_worker)

    stderr = " ".join(log_text.split())
    assert status == 1, stderr[-2000:]
    assert f"profile a: the worker container {stopped}" in stderr
    if action == "kill":
        assert "closed its connection" in stderr
    # The closed connection ends the calibration, not the request timeout of 30 s.
    assert exit_s < 20
    assert out.read_text() == "earlier"
    assert labelled_containers(docker_client, run_id) == set()


@pytest.mark.docker
@pytest.mark.torch
def test_ctrl_c_midway_cleans_up(tmp_path, docker_client, worker_image):
    require_torch()

    status, stderr, out, run_id, _ = interrupt_calibration(tmp_path, docker_client, lambda process, run_id: process.send_signal(signal.SIGINT))

    assert status == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert out.read_text() == "earlier"
    assert labelled_containers(docker_client, run_id) == set()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.json")]


@pytest.mark.docker
@pytest.mark.torch
@pytest.mark.parametrize("delay_s", [0.5, 1.5])
def test_ctrl_c_during_export_exits_cleanly(tmp_path, docker_client, worker_image, delay_s):
    require_torch()
    out = tmp_path / "c.json"
    out.write_text("earlier")
    log_path = tmp_path / "calibrate.log"
    with open(log_path, "w") as log_file:
        # MobileNetV2 takes seconds to export, long enough to interrupt while torch is busy with it.
        process = subprocess.Popen(
            amp4ec_command("calibrate", "--model", "mobilenet_v2", "--profile", "a:1.0:512", "--force", "--out", str(out)),
            env=cli_env(COLUMNS="200"), stdout=subprocess.DEVNULL, stderr=log_file, text=True,
        )  # fmt: skip

        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "tracing" not in log_path.read_text():
                assert process.poll() is None, log_path.read_text()[-2000:]
                time.sleep(0.1)
            run_id = logged_run_id(log_path.read_text())
            time.sleep(delay_s)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    stderr = log_path.read_text()
    assert "exported" not in stderr, "the export ended before the interrupt; the test did not interrupt it"
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert "terminate called" not in stderr
    assert out.read_text() == "earlier"
    assert labelled_containers(docker_client, run_id) == set()
