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
from simpy.events import NORMAL

# Bits below which a transfer counts as finished: float error in the virtual time, far below
# one bit of any real transfer.
_FINISHED_BITS = 1e-6


def schedule_at(env: simpy.Environment, time_s: float, value: object = None) -> simpy.Event:
    """Return a triggered event with ``value`` that SimPy processes at exactly ``time_s`` (not before now).

    ``env.timeout(time_s - env.now)`` would land at ``env.now + (time_s - env.now)``, which
    can differ from ``time_s`` in the last bit. This pushes the event as
    ``Environment.schedule`` does, with the time itself (SimPy 4 keeps its queue in
    ``_queue`` and its event counter in ``_eid``).
    """
    event = simpy.Event(env)
    event._ok = True
    event._value = value
    heapq.heappush(env._queue, (time_s, NORMAL, next(env._eid), event))
    return event


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
        if not self._active and not self._pending:
            finish_s = self._start_alone(n_bytes, latency_ms, done, now, start_s)
            # An idle link has no timer under way, and finish_s is not before now.
            timer = self.env.timeout(finish_s - now)
            timer.callbacks.append(self._on_timer)
            self._timer = timer
            return
        self._seq += 1
        bits = n_bytes * 8.0
        join_s = (now if start_s is None else start_s) + latency_ms / 1e3
        self._advance(now)
        if join_s > now:
            heapq.heappush(self._pending, (join_s, self._seq, bits, done))
        else:
            heapq.heappush(self._active, (self._virtual_bits + bits, self._seq, done))
        self._reschedule()

    @property
    def idle(self) -> bool:
        """True when no transfer is under way."""
        return not self._active and not self._pending

    def alone_arrival_s(self, n_bytes: float, latency_ms: float, sent_s: float, start_s: float | None = None) -> float:
        """Return when a transfer sent at ``sent_s`` arrives if it stays alone on the link.

        It is the time at which the timer that :meth:`send` would schedule fires, to the bit.
        """
        join_s = (sent_s if start_s is None else start_s) + latency_ms / 1e3
        finish_s = (join_s if join_s > sent_s else sent_s) + n_bytes * 8.0 / self.bandwidth_bps
        # SimPy schedules a timeout at now + delay, which can differ from finish_s in the last bit.
        return sent_s + (finish_s - sent_s)

    def adopt(
        self,
        n_bytes: float,
        latency_ms: float,
        done: Callable[[], None],
        sent_s: float,
        *,
        start_s: float | None = None,
        timer: simpy.Event | None = None,
    ) -> None:
        """Take over a transfer that was sent alone at ``sent_s`` without :meth:`send`.

        The link must have been idle since ``sent_s``. Its state becomes what :meth:`send` at
        ``sent_s`` would have left, so transfers that join from now on share the bandwidth as
        if the transfer had been sent then. ``timer`` is an event already scheduled for the
        transfer's arrival, to be used as the link's timer; without it a new one is scheduled.
        """
        self._start_alone(n_bytes, latency_ms, done, sent_s, start_s)
        if timer is None:
            timer = schedule_at(self.env, self.alone_arrival_s(n_bytes, latency_ms, sent_s, start_s))
        timer.callbacks.append(self._on_timer)
        self._timer = timer

    def _start_alone(
        self, n_bytes: float, latency_ms: float, done: Callable[[], None], sent_s: float, start_s: float | None
    ) -> float:
        """Start a transfer at ``sent_s`` on the idle link and return its finish. The caller sets the timer."""
        self._seq += 1
        bits = n_bytes * 8.0
        join_s = (sent_s if start_s is None else start_s) + latency_ms / 1e3
        # The transfer has the whole bandwidth until another one joins.
        self._virtual_bits = 0.0
        self._updated_s = sent_s
        if join_s > sent_s:
            self._pending.append((join_s, self._seq, bits, done))
            finish_s = join_s + bits / self.bandwidth_bps
        else:
            self._active.append((bits, self._seq, done))
            finish_s = sent_s + bits / self.bandwidth_bps
        self._timer_s = finish_s
        return finish_s

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
