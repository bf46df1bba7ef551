"""Forwarded routes, parked outputs and pushed stats between worker processes on loopback.

The workers here are real/image/worker.py run as host processes, which is the same server the
containers run, without Docker.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import require_torch

pytest.importorskip("zmq")

WORKER_SCRIPT = Path(__file__).resolve().parents[1] / "real" / "image" / "worker.py"
SLOW_SIDE = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def export_slow_segment() -> bytes:
    """Export a program that multiplies a 600 x 600 input by itself 200 times (about 0.5 s on a 2-core Xeon, more on slower hosts)."""
    import io

    import torch

    class Slow(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x
            for _ in range(200):
                y = torch.tanh(y @ y)
            return y

    program = torch.export.export(Slow(), (torch.zeros(SLOW_SIDE, SLOW_SIDE),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def workers():
    """Two worker processes on loopback, n0 and n1, with "echo" and "slow" loaded."""
    require_torch()
    from amp4ec.calibrate.run import export_echo
    from amp4ec.real.client import WorkerClient

    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT)],
            env={**os.environ, "AMP4EC_PORT": str(port), "AMP4EC_NODE": f"n{index}"},
            stderr=subprocess.DEVNULL,
        )
        for index, port in enumerate(ports)
    ]
    addresses = [f"tcp://127.0.0.1:{port}" for port in ports]
    clients = [WorkerClient(address, timeout_s=60) for address in addresses]
    try:
        echo_blob = export_echo()
        slow_blob = export_slow_segment()
        for client in clients:
            client.load("echo", echo_blob)
            client.load("slow", slow_blob)
        yield addresses
    finally:
        for client, process in zip(clients, processes):
            try:
                client.shutdown(timeout_s=10)
            finally:
                client.close()
                process.wait(timeout=20)


@pytest.fixture
def links(workers):
    from amp4ec.real.links import WorkerLinks

    received = []
    links = WorkerLinks(lambda node, stats: received.append((time.monotonic(), node, stats)), monitor_period_s=0.1)
    links.received = received
    for index, address in enumerate(workers):
        links.connect(f"n{index}", address)
    yield links
    links.close()


def step(workers, index: int, segment: str = "echo") -> dict:
    return {"segment": segment, "node": f"n{index}", "address": workers[index]}


def forward_header(route, x):
    from amp4ec.real.client import encode_arrays

    specs, frames = encode_arrays([x])
    return {"route": route, "hop": 0, "inputs": specs, "timings": []}, frames


def test_forward_route_returns_output(workers, links):
    from amp4ec.real.client import decode_arrays

    x = np.arange(25_000, dtype=np.float32)
    header, frames = forward_header([step(workers, 0), step(workers, 1)], x)
    reply, output_frames = links.forward("n0", header, frames, timeout_s=30)

    output = decode_arrays(reply["outputs"], [frame.buffer for frame in output_frames])[0]
    assert np.array_equal(output, x)
    assert [timing["node"] for timing in reply["timings"]] == ["n0", "n1"]
    assert [timing["in_bytes"] for timing in reply["timings"]] == [100_000, 100_000]
    first, second = reply["timings"]
    assert first["received_s"] <= first["start_s"] <= first["end_s"] <= first["sent_s"]
    assert first["sent_s"] <= second["received_s"] <= second["sent_s"]


def test_forward_error_names_node(workers, links):
    from amp4ec.errors import WorkerError

    header, frames = forward_header([step(workers, 0), step(workers, 1, "missing")], np.zeros(4, np.float32))
    with pytest.raises(WorkerError, match="segment 'missing' is not loaded") as raised:
        links.forward("n0", header, frames, timeout_s=30)
    assert raised.value.node == "n1"


def test_parked_outputs_go_where_named(workers, links):
    from amp4ec.real.client import decode_arrays

    x = np.linspace(0, 1, 1000, dtype=np.float32)
    header, frames = forward_header([step(workers, 0), None], x)
    exchange = links.start("n0", header, frames)
    try:
        notice, _ = exchange.wait(timeout_s=30)
        assert notice["parked"] is True
        assert notice["hop"] == 0
        exchange.send_next("n0", step(workers, 1))
        reply, output_frames = exchange.wait(timeout_s=30)
    finally:
        exchange.close()
    assert "parked" not in reply
    assert [timing["node"] for timing in reply["timings"]] == ["n0", "n1"]
    assert np.array_equal(decode_arrays(reply["outputs"], [frame.buffer for frame in output_frames])[0], x)


def test_stats_pushed_during_compute(workers, links):
    """Pushes keep their period while the worker runs a long segment, since the I/O thread sends them."""
    links.request_stats(["n0"], period_s=0.1, timeout_s=10)
    header, frames = forward_header([step(workers, 0, "slow")], np.full((SLOW_SIDE, SLOW_SIDE), 0.01, np.float32))
    started = time.monotonic()
    reply, _ = links.forward("n0", header, frames, timeout_s=60)
    finished = time.monotonic()
    run_ms = reply["timings"][0]["wall_ms"]
    during = [t for t, node, _ in links.received if node == "n0" and started < t < finished]
    assert run_ms > 250, f"the slow segment ran only {run_ms:.0f} ms; the test needs a longer one"
    # One push per 100 ms period, less one for the phase at either end.
    expected_pushes = int(run_ms / 100) - 1
    assert len(during) >= expected_pushes, f"{len(during)} pushes during a {run_ms:.0f} ms segment"
    stats = links.received[-1][2]
    assert stats["op"] == "stats"
    assert "cpu_usage_ns" in stats


def test_final_stats_stops_pushes(workers, links):
    arrived = links.request_stats(["n0", "n1"], period_s=0, timeout_s=10)
    assert sorted(arrived) == ["n0", "n1"]
    count = len(links.received)
    time.sleep(0.4)
    assert len(links.received) == count


def test_late_reply_is_dropped(workers, links):
    from amp4ec.errors import WorkerError

    header, frames = forward_header([step(workers, 1, "slow")], np.full((SLOW_SIDE, SLOW_SIDE), 0.01, np.float32))
    with pytest.raises(WorkerError, match="no reply within"):
        links.forward("n1", header, frames, timeout_s=0.1)
    deadline = time.monotonic() + 30
    while links.dropped_replies == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert links.dropped_replies == 1
