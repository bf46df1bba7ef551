"""The cost of one hop between two worker containers, fitted as fixed cost + bytes / bandwidth.

The sender runs inside one worker container (``docker exec``, so it shares that container's CPU
quota and network namespace) and sends echo requests to the other worker over the same
transport real mode uses: a pyzmq REQ socket to the worker's REP socket, across the run's
Docker bridge network. A round trip carries the payload twice, so one hop is half of the round
trip minus the receiving worker's compute.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np

from amp4ec.costs import LinkCalibration
from amp4ec.errors import DockerError

# Payload sizes for the hop fit, from a small activation to the largest MobileNetV2 cut.
LINK_PAYLOAD_BYTES = (10_000, 100_000, 400_000, 1_600_000)
LINK_REPEATS = 15
CONTAINER_TRANSPORT = "zeromq REQ/REP over TCP, container to container on a Docker bridge network"

# Runs inside the sending container with the worker image's python (numpy and pyzmq only).
SENDER_SCRIPT = """
import json, sys, time
import numpy as np, zmq
address, sizes, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
socket = zmq.Context.instance().socket(zmq.REQ)
socket.setsockopt(zmq.RCVTIMEO, 10000)
socket.setsockopt(zmq.LINGER, 0)
socket.connect(address)
rows = []
for n_bytes in sizes:
    payload = np.zeros(n_bytes // 4, dtype=np.float32)
    header = json.dumps({"op": "run", "segment": "echo", "inputs": [{"dtype": "float32", "shape": [len(payload)]}]}).encode()
    for index in range(repeats + 1):
        started = time.perf_counter()
        socket.send_multipart([header, memoryview(payload).cast("B")])
        reply = socket.recv_multipart()
        round_trip_ms = (time.perf_counter() - started) * 1e3
        answer = json.loads(reply[0])
        if not answer.get("ok"):
            raise SystemExit("echo failed: " + str(answer.get("error")))
        if index:  # the first round trip of each size warms the connection and allocator
            rows.append([payload.nbytes, round_trip_ms, answer["wall_ms"]])
print(json.dumps(rows))
"""


def fit_hops(sizes_bytes: Sequence[int], hops_ms: Sequence[float], *, transport: str) -> LinkCalibration:
    """Fit hop time = fixed_ms + bytes * 8 / bandwidth_bps to the median hop per payload size.

    The median per size resists the odd scheduling hiccup on a shared machine.
    """
    from scipy import stats

    sizes_arr, hops_arr = np.asarray(sizes_bytes, dtype=float), np.asarray(hops_ms, dtype=float)
    unique_sizes = np.unique(sizes_arr)
    medians = np.array([np.median(hops_arr[sizes_arr == s]) for s in unique_sizes])
    fit = stats.linregress(unique_sizes, medians)
    slope_ms_per_byte = max(fit.slope, 1e-12)
    return LinkCalibration(
        fixed_ms=max(0.0, float(fit.intercept)),
        bandwidth_bps=8.0 / (slope_ms_per_byte / 1e3),
        samples=len(sizes_arr),
        transport=transport,
    )


def measure_container_link(cluster, sender: str, receiver: str, echo_blob: bytes, log: Callable[[str], None]) -> LinkCalibration:
    """Fit one hop from worker ``sender``'s container to worker ``receiver`` of ``cluster``."""
    import docker.errors

    worker = cluster[receiver]
    worker.load("echo", echo_blob)
    try:
        container = cluster.container_for(sender)
        address = cluster.addresses[receiver]
        command = ["python", "-c", SENDER_SCRIPT, address, json.dumps(list(LINK_PAYLOAD_BYTES)), str(LINK_REPEATS)]
        try:
            result = container.exec_run(command, demux=True)
        except docker.errors.APIError as error:
            raise DockerError(f"cannot run the link sender in the container of {sender}: {error}") from error
        stdout, stderr = result.output
        if result.exit_code != 0:
            message = (stderr or b"").decode("utf-8", errors="replace").strip()[-500:]
            raise DockerError(f"the link sender in {sender} exited with status {result.exit_code}: {message}")
        rows = json.loads(stdout.decode("utf-8"))
    finally:
        worker.unload("echo")
    sizes = [row[0] for row in rows]
    hops = [max(0.0, round_trip_ms - compute_ms) / 2 for _, round_trip_ms, compute_ms in rows]
    link = fit_hops(sizes, hops, transport=CONTAINER_TRANSPORT)
    log(f"hop {sender} -> {receiver}: {link.fixed_ms:.3f} ms + bytes at {link.bandwidth_bps / 1e9:.2f} Gbit/s")
    return link
