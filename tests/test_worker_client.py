"""WorkerClient against stand-in workers: plain ZMQ reply sockets in their own processes, no torch or Docker."""

import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("zmq")

# Replies {"ok": true} to the first N requests, then reads one more and exits without a reply.
STAND_IN_WORKER = """
import json, os, sys, zmq
reply_socket = zmq.Context().socket(zmq.REP)
reply_socket.bind(f"tcp://127.0.0.1:{sys.argv[1]}")
for _ in range(int(sys.argv[2])):
    reply_socket.recv_multipart()
    reply_socket.send_multipart([json.dumps({"ok": True}).encode()])
reply_socket.recv_multipart()
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_worker(port: int, replies: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STAND_IN_WORKER, str(port), str(replies)])


@pytest.fixture
def port():
    return free_port()


def test_worker_exit_fails_request_at_once(port):
    from amp4ec.errors import WorkerError
    from amp4ec.real.client import WorkerClient

    worker = start_worker(port, replies=1)
    try:
        with WorkerClient(f"tcp://127.0.0.1:{port}", timeout_s=30, node="n0") as client:
            assert client.request({"op": "ping"}, timeout_s=30)[0] == {"ok": True}
            started = time.monotonic()
            with pytest.raises(WorkerError, match="closed its connection while 'run' was in flight") as caught:
                client.request({"op": "run"})
            assert time.monotonic() - started < 10
            assert caught.value.disconnected
            assert caught.value.node == "n0"
    finally:
        worker.kill()
        worker.wait()


def test_worker_gone_before_request_fails_soon(port):
    from amp4ec.errors import WorkerError
    from amp4ec.real.client import RECONNECT_GRACE_S, WorkerClient

    worker = start_worker(port, replies=1)
    with WorkerClient(f"tcp://127.0.0.1:{port}", timeout_s=30) as client:
        client.request({"op": "ping"})
        worker.kill()
        worker.wait()
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(WorkerError, match="did not reconnect within") as caught:
            client.request({"op": "run"})
        assert time.monotonic() - started < RECONNECT_GRACE_S + 5
        assert caught.value.disconnected


def test_restarted_worker_serves_next_request(port):
    from amp4ec.real.client import WorkerClient

    first = start_worker(port, replies=1)
    second = None
    try:
        with WorkerClient(f"tcp://127.0.0.1:{port}", timeout_s=30) as client:
            assert client.request({"op": "ping"})[0] == {"ok": True}
            # The worker goes away between requests and another takes its port.
            first.kill()
            first.wait()
            time.sleep(1.0)
            second = start_worker(port, replies=1)
            assert client.request({"op": "ping"})[0] == {"ok": True}
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.kill()
                worker.wait()


def test_silent_worker_times_out(port):
    from amp4ec.errors import WorkerError
    from amp4ec.real.client import WorkerClient

    worker = start_worker(port, replies=1)
    try:
        with WorkerClient(f"tcp://127.0.0.1:{port}", timeout_s=30) as client:
            client.request({"op": "ping"})
            # A stopped (not ended) worker keeps its connection open, so only the timeout ends the request.
            worker.send_signal(19)  # SIGSTOP
            with pytest.raises(WorkerError, match="no reply to 'run' within 0.5 s") as caught:
                client.request({"op": "run"}, timeout_s=0.5)
            assert not caught.value.disconnected
    finally:
        worker.kill()
        worker.wait()
