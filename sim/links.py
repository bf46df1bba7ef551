"""One direction of a node's link, shared by its concurrent transfers (processor sharing).

Each transfer first pays the link's fixed per-hop cost (``latency_ms``), then its bits join
the link: with ``n`` transfers moving bits, each gets ``bandwidth_bps / n``, and the rates
change whenever a transfer joins or finishes. A transfer alone on the link takes
``latency_ms + bits / bandwidth_bps``.

The link tracks virtual time: the bits served to each active transfer since the link was last
idle. It grows at ``bandwidth_bps / n`` per second, so a transfer that joins at virtual time
``v`` finishes when virtual time reaches ``v + bits``, whatever joins or leaves meanwhile.
Transfers whose per-hop cost has not elapsed wait in ``_pending`` and change the rates only
from their join time. The link steps through them when it predicts its next finish, so it
needs one SimPy event per finished transfer rather than one per join.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable

import simpy

# Bits below which a transfer counts as finished: float error in the virtual time, far below
# one bit of any real transfer.
_FINISHED_BITS = 1e-6


class SharedLink:
    """A link whose concurrent transfers share its bandwidth equally."""

    __slots__ = ("env", "bandwidth_bps", "_active", "_pending", "_virtual_bits", "_updated_s", "_timer", "_timer_s", "_seq")

    def __init__(self, env: simpy.Environment, bandwidth_bps: float):
        self.env = env
        self.bandwidth_bps = bandwidth_bps
        # (finish virtual bits, sequence, callback) of transfers whose bits are moving.
        self._active: list[tuple[float, int, Callable[[], None]]] = []
        # (join time in s, sequence, bits, callback) of transfers still paying the per-hop cost.
        self._pending: list[tuple[float, int, float, Callable[[], None]]] = []
        self._virtual_bits = 0.0
        self._updated_s = 0.0
        self._timer: simpy.Event | None = None
        self._timer_s = math.inf
        self._seq = 0

    @property
    def transfers(self) -> int:
        """Transfers under way: moving bits or paying the per-hop cost."""
        return len(self._active) + len(self._pending)

    def send(self, n_bytes: float, latency_ms: float, done: Callable[[], None], *, start_s: float | None = None) -> None:
        """Start a transfer now, or at ``start_s`` (not before now); ``done`` is called when its last bit arrives."""
        now = self.env.now
        self._seq += 1
        bits = n_bytes * 8.0
        join_s = (now if start_s is None else start_s) + latency_ms / 1e3
        if not self._active and not self._pending:
            # An idle link: the transfer has the whole bandwidth until another one joins.
            self._virtual_bits = 0.0
            self._updated_s = now
            if join_s > now:
                self._pending.append((join_s, self._seq, bits, done))
                finish_s = join_s + bits / self.bandwidth_bps
            else:
                self._active.append((bits, self._seq, done))
                finish_s = now + bits / self.bandwidth_bps
            # An idle link has no timer under way, and finish_s is not before now.
            timer = self.env.timeout(finish_s - now)
            timer.callbacks.append(self._on_timer)
            self._timer = timer
            self._timer_s = finish_s
            return
        self._advance(now)
        if join_s > now:
            heapq.heappush(self._pending, (join_s, self._seq, bits, done))
        else:
            heapq.heappush(self._active, (self._virtual_bits + bits, self._seq, done))
        self._reschedule()

    def set_bandwidth(self, bandwidth_bps: float) -> None:
        """Change the bandwidth from now on, for transfers under way too."""
        self._advance(self.env.now)
        self.bandwidth_bps = bandwidth_bps
        self._reschedule()

    def reset(self) -> None:
        """Drop every transfer, as when the node's container dies; their callbacks are never called."""
        self._active.clear()
        self._pending.clear()
        self._virtual_bits = 0.0
        self._updated_s = self.env.now
        self._timer = None
        self._timer_s = math.inf

    def _progress(self, time_s: float) -> None:
        if self._active:
            self._virtual_bits += (time_s - self._updated_s) * self.bandwidth_bps / len(self._active)
        self._updated_s = time_s

    def _advance(self, time_s: float) -> None:
        """Move the virtual time to ``time_s``, letting in the transfers whose per-hop cost has elapsed."""
        pending = self._pending
        while pending and pending[0][0] <= time_s:
            join_s, seq, bits, done = heapq.heappop(pending)
            self._progress(join_s)
            heapq.heappush(self._active, (self._virtual_bits + bits, seq, done))
        self._progress(time_s)
        if not self._active and not pending:
            # Restarting the virtual time on an idle link keeps its float error small.
            self._virtual_bits = 0.0

    def _next_finish_s(self) -> float:
        """Return when the first transfer finishes, stepping through the pending joins before it."""
        time_s = self._updated_s
        virtual_bits = self._virtual_bits
        n = len(self._active)
        first_finish_bits = self._active[0][0] if self._active else math.inf
        rate_bps = self.bandwidth_bps
        for join_s, _, bits, _ in sorted(self._pending):
            if n:
                finish_s = time_s + (first_finish_bits - virtual_bits) * n / rate_bps
                if finish_s <= join_s:
                    return finish_s
                virtual_bits += (join_s - time_s) * rate_bps / n
            time_s = join_s
            n += 1
            first_finish_bits = min(first_finish_bits, virtual_bits + bits)
        if not n:
            return math.inf
        return time_s + max(0.0, first_finish_bits - virtual_bits) * n / rate_bps

    def _reschedule(self) -> None:
        self._set_timer(self._next_finish_s())

    def _set_timer(self, finish_s: float) -> None:
        finish_s = max(self.env.now, finish_s)
        if finish_s == self._timer_s and self._timer is not None:
            return
        self._timer_s = finish_s
        if finish_s == math.inf:
            self._timer = None
            return
        timer = self.env.timeout(finish_s - self.env.now)
        timer.callbacks.append(self._on_timer)
        # A timer replaced by a newer one still fires, and is ignored.
        self._timer = timer

    def _on_timer(self, timer: simpy.Event) -> None:
        if timer is not self._timer:
            return
        self._timer = None
        self._timer_s = math.inf
        lone = None
        if not self._pending and len(self._active) == 1:
            lone = self._active
        elif not self._active and len(self._pending) == 1 and self._pending[0][0] <= self.env.now:
            lone = self._pending
        if lone is not None:
            # A lone transfer: the timer was set for its finish.
            done = lone.pop()[-1]
            self._virtual_bits = 0.0
            self._updated_s = self.env.now
            done()
            return
        self._advance(self.env.now)
        active = self._active
        finished = []
        while active and active[0][0] - self._virtual_bits <= _FINISHED_BITS:
            finished.append(heapq.heappop(active)[2])
        if not finished and active:
            # The timer was set for the first transfer's finish; float error left it a few bits short.
            finished.append(heapq.heappop(active)[2])
        if not active and not self._pending:
            self._virtual_bits = 0.0
        self._reschedule()
        for done in finished:
            done()
