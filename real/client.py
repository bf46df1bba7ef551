"""Host-side client of one worker container, and the tensor encoding both sides use.

The protocol is described in the docstring of image/worker.py. The host side uses numpy
only, so a coordinator can run without torch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from amp4ec.errors import UsageError, WorkerError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
# How often a waiting request checks its cancellation callback.
CANCEL_POLL_S = 0.05
# How long a request sent while the worker's connection is down waits for it to come back
# (ZMQ reconnects every 0.1 s by default) before failing instead of waiting for its timeout.
RECONNECT_GRACE_S = 2.0

# The dtypes the worker accepts. Tensors travel little-endian: encode_arrays converts
# big-endian arrays, and the worker image is built for x86_64.
DTYPE_NAMES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


def encode_arrays(arrays: Sequence[np.ndarray]) -> tuple[list[dict], list[memoryview]]:
    """Return the header specs and the frames (raw C-contiguous bytes) of a list of arrays."""
    specs = []
    frames = []
    for index, array in enumerate(arrays):
        array = np.asarray(array)
        dtype = array.dtype.name
        if dtype not in DTYPE_NAMES:
            raise WorkerError(f"array {index} has dtype {dtype}; the protocol carries {', '.join(DTYPE_NAMES)}")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        array = np.ascontiguousarray(array)
        specs.append({"dtype": dtype, "shape": list(array.shape)})
        frames.append(memoryview(array).cast("B") if array.size else memoryview(b""))
    return specs, frames


def decode_arrays(specs: Sequence[dict], frames: Sequence[bytes]) -> list[np.ndarray]:
    """Return the arrays that specs and frames describe.

    The arrays are views of the received frames, not copies.
    Raises WorkerError when the specs and frames disagree.
    """
    if len(specs) != len(frames):
        raise WorkerError(f"message lists {len(specs)} tensors but carries {len(frames)} frames")
    arrays = []
    for index, (spec, frame) in enumerate(zip(specs, frames)):
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if dtype not in DTYPE_NAMES or not isinstance(shape, list):
            raise WorkerError(f"tensor {index} has an invalid spec {spec!r}")
        np_dtype = np.dtype(dtype)
        expected_bytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if len(frame) != expected_bytes:
            raise WorkerError(
                f"tensor {index}: frame has {len(frame)} bytes but {dtype} {shape} needs {expected_bytes}"
            )
        arrays.append(np.frombuffer(frame, dtype=np_dtype).reshape(shape))
    return arrays


class WorkerClient:
    """A REQ socket to one worker, with a timeout on every request.

    A timed-out request leaves a REQ socket unable to send, so the client closes it and
    connects a new one before raising WorkerError. The reply of the timed-out request, if it
    arrives later, is dropped with the old socket. A request also fails as soon as the worker
    closes its connection (its process ended or its container stopped), since no reply can come
    after that. Not thread-safe: use one client per thread.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        node: str | None = None,
        context: zmq.Context | None = None,
    ):
        if timeout_s <= 0:
            raise UsageError(f"timeout_s must be positive, got {timeout_s}", field="timeout_s")
        self.address = address if "://" in address else f"tcp://{address}"
        self.timeout_s = timeout_s
        self.node = node
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._events: zmq.Socket | None = None
        self._down_since: float | None = None
        """when the connection to the worker closed, while it stays closed"""
        self._connect()

    def __repr__(self) -> str:
        return f"WorkerClient({self.address!r}, node={self.node!r})"

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _connect(self) -> None:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        self._events = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        socket.connect(self.address)
        self._socket = socket
        self._down_since = None
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        self._poller.register(self._events, zmq.POLLIN)

    def close(self) -> None:
        """Close the socket; the client cannot send afterwards."""
        if self._socket is not None:
            self._socket.disable_monitor()
            self._events.close(linger=0)
            self._socket.close(linger=0)
            self._socket = None
            self._events = None

    def _error(self, message: str, *, disconnected: bool = False) -> WorkerError:
        return WorkerError(f"{message} (address {self.address})", node=self.node, disconnected=disconnected)

    def request(
        self,
        header: dict,
        frames: Sequence[bytes | memoryview] = (),
        *,
        timeout_s: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[dict, list[memoryview]]:
        """Send one request and return the reply header and frames (writable views, not copies).

        Raises WorkerError when no reply arrives within timeout_s (default: the client's), when
        ``cancelled()`` turns true while waiting (checked every CANCEL_POLL_S), or when the
        worker replies with an error.
        """
        if self._socket is None:
            raise self._error("client is closed")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        op = header.get("op")
        started = time.monotonic()
        try:
            self._read_events()
            self._socket.send_multipart([json.dumps(header).encode("utf-8"), *frames], copy=False)
            outcome = self._wait_reply(started + timeout_s, cancelled)
            if outcome != "reply":
                self._reset()
                if outcome == "disconnected":
                    raise self._error(
                        f"the worker closed its connection while {op!r} was in flight, or before it and did not "
                        f"reconnect within {RECONNECT_GRACE_S:g} s: its process ended or its container stopped",
                        disconnected=True,
                    )
                if outcome == "cancelled":
                    raise self._error(f"request {op!r} cancelled: the node went down while it was in flight")
                raise self._error(
                    f"no reply to {op!r} within {timeout_s:g} s; the worker is busy, stopped or unreachable"
                )
            # No copy: the payload frames are returned as views of the received messages.
            message = self._socket.recv_multipart(copy=False)
        except zmq.ZMQError as error:
            self._reset()
            raise self._error(f"request {op!r} failed: {error}") from error
        try:
            reply = json.loads(message[0].bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._error(f"reply to {op!r} is not a JSON header: {error}") from error
        if not isinstance(reply, dict) or not reply.get("ok"):
            error_text = reply.get("error") if isinstance(reply, dict) else reply
            raise self._error(f"{op!r} failed: {error_text}")
        log.debug("%s %s took %.2f ms", self.node or self.address, op, (time.monotonic() - started) * 1e3)
        return reply, [frame.buffer for frame in message[1:]]

    def _read_events(self) -> bool:
        """Track the connection's state from the monitor's pending events; return whether it closed."""
        closed = False
        while self._events.poll(0):
            event = recv_monitor_message(self._events)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._down_since = time.monotonic()
                closed = True
            elif event == zmq.EVENT_CONNECTED:
                self._down_since = None
        return closed

    def _wait_reply(self, deadline: float, cancelled: Callable[[], bool] | None) -> str:
        """Wait for the reply and return "reply", or "timeout", "cancelled" or "disconnected" when none can come.

        A request sent over an open connection is lost when that connection closes. One sent while
        the connection was down goes out once ZMQ reconnects, so it waits RECONNECT_GRACE_S for that.
        """
        while True:
            now = time.monotonic()
            if self._down_since is not None and now - self._down_since > RECONNECT_GRACE_S:
                return "disconnected"
            remaining_s = deadline - now
            if remaining_s <= 0:
                return "timeout"
            slice_s = remaining_s if cancelled is None else min(remaining_s, CANCEL_POLL_S)
            if self._down_since is not None:
                slice_s = min(slice_s, CANCEL_POLL_S)
            ready = dict(self._poller.poll(timeout=max(1, int(slice_s * 1e3))))
            if self._socket in ready:
                return "reply"
            if self._events in ready:
                was_up = self._down_since is None
                if self._read_events() and was_up:
                    return "disconnected"
            if cancelled is not None and cancelled():
                return "cancelled"

    def _reset(self) -> None:
        self.close()
        self._connect()

    # Operations

    def ping(self, *, timeout_s: float | None = None) -> dict:
        """Return the worker's torch version, thread count, pid and runtime memory."""
        reply, _ = self.request({"op": "ping"}, timeout_s=timeout_s)
        return reply

    def load(self, segment_id: str, blob: bytes, *, timeout_s: float | None = None) -> dict:
        """Send a segment (bytes written by torch.export.save); return load_ms and rss_bytes."""
        reply, _ = self.request({"op": "load", "segment": segment_id}, [blob], timeout_s=timeout_s)
        return reply

    def unload(self, segment_id: str | None = None, *, timeout_s: float | None = None) -> bool:
        """Drop one segment, or every segment when segment_id is None; return whether any was loaded."""
        header = {"op": "unload"}
        if segment_id is not None:
            header["segment"] = segment_id
        reply, _ = self.request(header, timeout_s=timeout_s)
        return bool(reply.get("unloaded"))

    def run(
        self,
        segment_id: str,
        arrays: Sequence[np.ndarray],
        *,
        timeout_s: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[list[np.ndarray], dict]:
        """Run a loaded segment; return its outputs and {"wall_ms", "cpu_ms"} of the forward call."""
        specs, frames = encode_arrays(arrays)
        reply, output_frames = self.request(
            {"op": "run", "segment": segment_id, "inputs": specs}, frames, timeout_s=timeout_s, cancelled=cancelled
        )
        outputs = decode_arrays(reply.get("outputs", []), output_frames)
        return outputs, {"wall_ms": reply["wall_ms"], "cpu_ms": reply["cpu_ms"]}

    def profile(
        self,
        segment_id: str,
        arrays: Sequence[np.ndarray],
        warmup: int = 3,
        repeats: int = 20,
        gap_ms: float = 100.0,
        *,
        timeout_s: float | None = None,
    ) -> dict:
        """Run a segment warmup + repeats times and return the per-repeat timings.

        The default timeout is the client's timeout plus the total gap time. Pass a longer
        one when warmup + repeats forward calls may take longer than the client's timeout.
        """
        if timeout_s is None:
            timeout_s = self.timeout_s + (warmup + repeats) * gap_ms / 1e3
        specs, frames = encode_arrays(arrays)
        header = {
            "op": "profile",
            "segment": segment_id,
            "inputs": specs,
            "warmup": warmup,
            "repeats": repeats,
            "gap_ms": gap_ms,
        }
        reply, _ = self.request(header, frames, timeout_s=timeout_s)
        return reply

    def stats(self, *, timeout_s: float | None = None) -> dict:
        """Return the container's cgroup CPU, memory and network counters."""
        reply, _ = self.request({"op": "stats"}, timeout_s=timeout_s)
        return reply

    def shutdown(self, *, timeout_s: float | None = None) -> None:
        """Ask the worker to exit with status 0."""
        self.request({"op": "shutdown"}, timeout_s=timeout_s)
