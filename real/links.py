"""The coordinator's DEALER links to the workers: forwarded requests and pushed monitor samples.

One I/O thread owns a DEALER socket per worker, connected to the worker's ROUTER port with
the coordinator's routing id. Through these connections the last worker of a forwarded route
returns its result and every worker pushes its stats, so the coordinator binds no port. Request
threads never touch those sockets: they hand a message to the I/O thread through an inproc
PUSH socket of their own (zmq sockets are not thread-safe) and wait on an event for the
reply. No thread or socket is created per request.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
import zmq

from amp4ec.errors import WorkerError

log = logging.getLogger(__name__)

# How often a waiting request checks its cancellation callback.
CANCEL_POLL_S = 0.05

_CONNECT = b"connect"
_FORWARD = b"forward"
_MONITOR = b"monitor"
_STOP = b"stop"


class Exchange:
    """The replies to one forwarded attempt: parked notices, then the final reply or an error.

    Replies that arrive after close() are dropped by their token.
    """

    def __init__(self, links: WorkerLinks, token: str):
        self.links = links
        self.token = token
        self.replies: queue.SimpleQueue = queue.SimpleQueue()

    def wait(self, *, timeout_s: float, cancelled: Callable[[], bool] | None = None) -> tuple[dict, list]:
        """Return the next reply's header and frames (zmq.Frame objects).

        Raises WorkerError when no reply arrives within timeout_s, when ``cancelled()`` turns
        true (checked every CANCEL_POLL_S), or when a worker of the route returns an error.
        The error's node is then the failing worker's, when the reply names it.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply, frames = self.replies.get(timeout=CANCEL_POLL_S)
                break
            except queue.Empty:
                pass
            if cancelled is not None and cancelled():
                raise WorkerError("cancelled: a node of its route went down while it was in flight", node=None)
            if time.monotonic() > deadline:
                raise WorkerError(f"no reply within {timeout_s:g} s; a worker of the route is busy, stopped or unreachable", node=None)
        if not reply.get("ok"):
            failed_node = reply.get("node")
            raise WorkerError(f"hop {reply.get('hop')} on node {failed_node} failed: {reply.get('error')}", node=failed_node)
        return reply, frames

    def send_next(self, node: str, step: dict) -> None:
        """Tell ``node``, which parked this attempt's outputs, to send them to ``step``'s node."""
        header = {"op": "next", "token": self.token, "step": step}
        self.links._send_command([_FORWARD, node.encode(), json.dumps(header).encode("utf-8")])

    def close(self) -> None:
        with self.links._lock:
            self.links._pending.pop(self.token, None)


class WorkerLinks:
    """DEALER sockets to every worker, driven by one I/O thread.

    ``on_stats(node, stats)`` runs in the I/O thread for every stats message a worker pushes;
    it must be quick and must not raise.
    """

    def __init__(self, on_stats: Callable[[str, dict], None], *, monitor_period_s: float, context: zmq.Context | None = None):
        self.routing_id = f"amp4ec-coordinator-{uuid.uuid4().hex[:12]}"
        self.monitor_period_s = monitor_period_s
        self._on_stats = on_stats
        self._context = context or zmq.Context.instance()
        self._command_address = f"inproc://amp4ec-links-{uuid.uuid4().hex}"
        self._commands = self._context.socket(zmq.PULL)
        self._commands.bind(self._command_address)
        self._local = threading.local()
        self._pushes: list[zmq.Socket] = []
        self._pending: dict[str, Exchange] = {}
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        # Per node, the id of the last request_stats call whose reply arrived.
        self._stats_replies: dict[str, int] = {}
        self._stats_changed = threading.Condition(self._lock)
        # Replies whose request had already timed out or been cancelled.
        self.dropped_replies = 0
        self.stats_received = 0
        self._thread = threading.Thread(target=self._loop, name="amp4ec-links", daemon=True)
        self._thread.start()

    # Called from any thread

    def connect(self, node: str, address: str) -> None:
        """(Re)connect the link to ``node`` at ``address`` and subscribe to its stats pushes."""
        self._send_command([_CONNECT, node.encode(), address.encode()])

    def start(self, node: str, header: dict, frames: Sequence[bytes | memoryview]) -> Exchange:
        """Send a forward message to ``node``, the route's first worker; return the exchange to wait on."""
        token = f"{next(self._tokens)}"
        header = {**header, "op": "forward", "token": token, "reply_to": self.routing_id}
        exchange = Exchange(self, token)
        with self._lock:
            self._pending[token] = exchange
        self._send_command([_FORWARD, node.encode(), json.dumps(header).encode("utf-8"), *frames])
        return exchange

    def forward(
        self,
        node: str,
        header: dict,
        frames: Sequence[bytes | memoryview],
        *,
        timeout_s: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[dict, list]:
        """Send a forward message whose route is complete and return the final reply (see Exchange.wait)."""
        exchange = self.start(node, header, frames)
        try:
            return exchange.wait(timeout_s=timeout_s, cancelled=cancelled)
        finally:
            exchange.close()

    def request_stats(self, nodes: Sequence[str], *, period_s: float, timeout_s: float) -> list[str]:
        """Send monitor(period_s) to ``nodes`` and wait for the stats sample each replies with.

        Returns the nodes whose sample arrived within timeout_s. period_s 0 stops their pushes,
        which is how the run takes its final sample.
        """
        request = next(self._tokens)
        for node in nodes:
            self._send_command([_MONITOR, node.encode(), f"{period_s!r}".encode(), str(request).encode()])
        deadline = time.monotonic() + timeout_s
        with self._stats_changed:
            while True:
                arrived = [node for node in nodes if self._stats_replies.get(node) == request]
                remaining_s = deadline - time.monotonic()
                if len(arrived) == len(nodes) or remaining_s <= 0:
                    return arrived
                self._stats_changed.wait(remaining_s)

    def close(self) -> None:
        """Stop the I/O thread and close every socket; requests still waiting time out."""
        if self._thread.is_alive():
            self._send_command([_STOP])
            self._thread.join(timeout=5)
        with self._lock:
            for push in self._pushes:
                push.close(linger=0)
            self._pushes.clear()

    def _send_command(self, frames: list) -> None:
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._command_address)
            self._local.push = push
            with self._lock:
                self._pushes.append(push)
        push.send_multipart(frames, copy=False)

    # The I/O thread

    def _loop(self) -> None:
        sockets: dict[str, zmq.Socket] = {}
        names: dict[zmq.Socket, str] = {}
        poller = zmq.Poller()
        poller.register(self._commands, zmq.POLLIN)
        try:
            while True:
                for socket, _ in poller.poll():
                    if socket is self._commands:
                        if not self._command(self._commands.recv_multipart(copy=False), sockets, names, poller):
                            return
                        continue
                    # Drain the socket: under load several replies wait at once.
                    while True:
                        try:
                            message = socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._receive(names[socket], message)
        finally:
            for socket in sockets.values():
                socket.close(linger=0)
            self._commands.close(linger=0)

    def _command(self, message: list, sockets: dict, names: dict, poller: zmq.Poller) -> bool:
        kind = message[0].bytes
        if kind == _STOP:
            return False
        node = message[1].bytes.decode()
        if kind == _CONNECT:
            old = sockets.pop(node, None)
            if old is not None:
                poller.unregister(old)
                names.pop(old, None)
                old.close(linger=0)
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTING_ID, self.routing_id.encode())
            socket.connect(message[2].bytes.decode())
            sockets[node] = socket
            names[socket] = node
            poller.register(socket, zmq.POLLIN)
            self._send(socket, node, [b"", json.dumps({"op": "monitor", "period_s": self.monitor_period_s}).encode()])
            return True
        socket = sockets.get(node)
        if socket is None:
            log.error("links: no link to node %s; connect it first", node)
            return True
        if kind == _FORWARD:
            self._send(socket, node, [b"", *message[2:]])
        elif kind == _MONITOR:
            period_s = float(message[2].bytes.decode())
            request = int(message[3].bytes.decode())
            self._send(socket, node, [b"", json.dumps({"op": "monitor", "period_s": period_s, "request": request}).encode()])
        return True

    def _send(self, socket: zmq.Socket, node: str, frames: list) -> None:
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # The request times out or is cancelled in its own thread.
            log.warning("links: send queue to node %s is full; message dropped", node)

    def _receive(self, node: str, message: list) -> None:
        if len(message) < 2 or len(message[0]) != 0:
            log.warning("links: malformed message from node %s (%d frames)", node, len(message))
            return
        try:
            header = json.loads(message[1].bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            log.warning("links: message from node %s has no JSON header: %s", node, error)
            return
        op = header.get("op")
        if op == "stats":
            try:
                self._on_stats(node, header)
            except Exception:  # a monitor bug must not stop the links
                log.exception("links: stats from node %s could not be used", node)
            with self._stats_changed:
                self.stats_received += 1
                if header.get("request") is not None:
                    self._stats_replies[node] = header["request"]
                self._stats_changed.notify_all()
        elif op == "forward":
            with self._lock:
                exchange = self._pending.get(str(header.get("token")))
                if exchange is None:
                    self.dropped_replies += 1
                    return
            exchange.replies.put((header, message[2:]))
        else:
            log.warning("links: unexpected message from node %s: %r", node, header)
