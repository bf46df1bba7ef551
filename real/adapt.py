"""Adaptation in replay: the simulator's decision step, carried out on the worker containers.

A thread reads the monitor's published snapshot ten times per ``monitor.period_s`` and hands it to
:meth:`amp4ec.adapt.Adapter.step`, the step the simulator calls on each of its samples. When
the step picks a new plan, this module exports the new segments with torch.export, loads them
on every worker that is up and runs each once, untimed by the requests, then switches the
coordinator to the new plan. Requests that started before the switch finish on the old plan,
whose segments stay loaded, so requests arriving during a redeploy are served by the old plan
until the new one is ready. Each step's real duration goes into the adaptation's record.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from amp4ec.adapt import Adaptation, Adapter
from amp4ec.errors import WorkerError
from amp4ec.partition import Plan, Segment

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VersionedSegment(Segment):
    """A segment of the ``version``-th plan; its id differs from the same index in other plans.

    Workers key segments by id, so a new plan's segments load beside the old plan's instead of
    replacing them while requests still run on the old ones.
    """

    version: int = 0

    @property
    def id(self) -> str:
        return f"v{self.version}s{self.index}"


def versioned_plan(plan: Plan, version: int) -> Plan:
    """Return ``plan`` with every segment id carrying ``version``."""
    segments = tuple(VersionedSegment(s.index, s.start, s.stop, s.nodes, version) for s in plan.segments)
    return Plan(plan.partitioner, segments)


class ReplayAdaptation:
    """The replay's adaptation thread: monitor snapshots in, redeploys on the workers out."""

    def __init__(self, coordinator, adapter: Adapter, traced, deploy_segments):
        self.coordinator = coordinator
        self.adapter = adapter
        self.traced = traced
        self._deploy_segments = deploy_segments
        self.warnings: list[str] = []
        self._version = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="amp4ec-adaptation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; a redeploy under way finishes first, so its record is complete."""
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        # The simulator decides the moment a sample is published. Reading the snapshot ten times
        # per monitor period keeps replay within a tenth of a period of that, and a snapshot
        # read twice triggers once, because the adapter moves its baseline on a trigger.
        poll_s = self.coordinator.scenario.monitor.period_s / 10
        while not self._stop.wait(poll_s):
            snapshot = self.coordinator.monitor.snapshot()
            self.adapter.step(snapshot, self.coordinator.now_s(), self._redeploy, self._warn)

    def _warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)

    def _redeploy(self, decision: Adaptation) -> None:
        """Export the new plan's segments, load them on every worker that is up, then switch to it."""
        coordinator = self.coordinator
        old_plan = coordinator.plan
        started = time.perf_counter()
        self._version += 1
        plan = versioned_plan(self.adapter.plan, self._version)

        log.info("adaptation at %.2f s: redeploying bounds %s as %s", decision.time_s, old_plan.bounds, plan.bounds)
        try:
            blobs = {segment.id: self.traced.export_segment(segment.start, segment.stop) for segment in plan.segments}
        except Exception as error:  # noqa: BLE001 - torch.export raises many types; the run goes on with the old plan
            self.adapter.plan = old_plan
            decision.error = f"exporting the new segments failed: {type(error).__name__}: {error}"
            return
        export_ms = (time.perf_counter() - started) * 1e3

        load_ms: dict[str, float] = {}
        for name in coordinator.table.names():
            if not coordinator.table[name].up:
                # A node that is down gets the plan current when it comes back (bring_up).
                continue
            node_started = time.perf_counter()
            try:
                self._deploy_segments(coordinator.client(name), name, plan, coordinator.graph, blobs)
            except WorkerError as error:
                # The old plan's segments are still loaded everywhere, so it stays in use.
                self.adapter.plan = old_plan
                decision.error = f"loading the new segments on node {name} failed: {error}"
                decision.measured = {"export_ms": export_ms, "load_ms": load_ms}
                return
            load_ms[name] = (time.perf_counter() - node_started) * 1e3

        # NOTE: the old plan's segments stay loaded until the run ends, because the coordinator
        # does not track which requests still use them. Each adaptation adds weights to the workers.
        coordinator.blobs.update(blobs)
        # One assignment: a request reads coordinator.plan once when it starts.
        coordinator.plan = plan
        decision.ready_s = coordinator.now_s()
        decision.measured = {
            "export_ms": export_ms,
            "load_ms": load_ms,
            "total_ms": (time.perf_counter() - started) * 1e3,
            "segment_ids": [segment.id for segment in plan.segments],
        }
