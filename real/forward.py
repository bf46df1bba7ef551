"""Forwarded requests: activations go worker to worker, never through the coordinator.

The coordinator sends the request's input and its route (each stage's segment, node and
address) to the first stage's worker. Each worker runs its segment and sends its outputs
straight to the next stage's worker. The last one returns the final outputs and the timings
of every stage to the coordinator over the links (links.py).

The scheduler picks the nodes in one of two ways (``[replay] route``). "per_stage", the
default, decides each stage when the one before has finished, as the simulator and relay mode
do: the worker keeps its outputs, notifies the coordinator, and sends them on once the
coordinator names the next node (a small message each way, no tensor). "at_dispatch"
decides every stage from one snapshot before the first runs, so a request costs no
coordinator round trip between stages.

Retries. A request whose route loses a node (the coordinator marks it down, as in relay
mode), whose worker returns an error, or which gets no reply in time is sent again as a whole
from its first stage, on a new route chosen without the nodes that failed, while the
request has retries left (``policy.max_retries`` with ``on_failure = "retry"``). Replies of abandoned attempts are dropped by their token, so each
request ends with exactly one record.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from amp4ec.errors import WorkerError
from amp4ec.metrics import RequestRecord
from amp4ec.schedule import NoNodeAvailable

log = logging.getLogger(__name__)

# Seconds each stage of a route may take before the whole request times out. A paused node
# delays the requests routed through it up to this long.
STAGE_TIMEOUT_S = 60.0


def run_forwarded(coordinator, request_id: int, x: np.ndarray, arrival_s: float) -> tuple[RequestRecord, np.ndarray | None]:
    """Run one request along a forwarded route, retrying per policy; return its record and final output."""
    from amp4ec.real.client import decode_arrays, encode_arrays

    record = RequestRecord(request_id=request_id, arrival_s=arrival_s)
    specs, frames = encode_arrays([x])
    excluded: set[str] = set()
    errors: list[str] = []
    for attempt in range(coordinator.retries + 1):
        if attempt > 0:
            record.retries += 1
        if coordinator.aborted.is_set():
            record.fail(coordinator.now_s(), "replay aborted")
            return record, None
        names: list[str] = []
        generations: dict[str, int] = {}
        try:
            reply, output_frames, dispatch_s, observed = run_attempt(coordinator, record, specs, frames, excluded, names, generations)
        except NoNodeAvailable:
            reason = "no live node" if not errors else f"no live node after {'; '.join(errors)}"
            record.fail(coordinator.now_s(), reason)
            return record, None
        except WorkerError as error:
            errors.append(f"attempt {attempt + 1} on route {' -> '.join(names)}: {error}")
            excluded.update(failed_nodes(error, names, generations, coordinator.table))
            # After a signal the replay cancels its own routes, which are not failures to report.
            if not coordinator.aborted.is_set():
                log.warning("request %d: %s", request_id, errors[-1])
            continue
        received_s = coordinator.now_s()
        # Containers on one engine share the host's wall clock, so the workers' time.time()
        # stamps map onto the run's clock with one offset.
        # NOTE: with engines on several machines the offset includes their clock skew.
        offset_s = time.time() - received_s
        add_stage_records(coordinator, record, names, reply["timings"], dispatch_s, received_s, offset_s, observed)
        outputs = decode_arrays(reply.get("outputs", []), [frame.buffer for frame in output_frames])
        record.complete(received_s)
        return record, outputs[0] if len(outputs) == 1 else None
    record.fail(coordinator.now_s(), "; ".join(errors))
    return record, None


def run_attempt(coordinator, record: RequestRecord, specs: list, frames: list, excluded: set[str], names: list[str], generations: dict[str, int]):
    """Send one attempt of a request and wait for its final reply.

    Fills ``names`` with the route's nodes as they are chosen and ``generations`` with their
    generations at that moment. Returns the final reply, its output frames, the dispatch time
    and how many stages the scheduler has already observed. Raises NoNodeAvailable when a
    stage has no live node, and WorkerError when the attempt fails.
    """
    table = coordinator.table
    # Read once: an adaptation may replace coordinator.plan while the attempt runs.
    segments = coordinator.plan.segments
    if coordinator.route_decision == "per_stage":
        route = [(segments[0], coordinator.choose_stage(record.request_id, segments[0], excluded))]
    else:
        route = coordinator.choose_route(record.request_id, segments, excluded)

    def admit(name: str) -> None:
        node = table[name]
        names.append(name)
        if not node.up:
            # The scheduler chose from a snapshot older than the node's failure.
            raise WorkerError(f"node {name} is down ({node.down_reason})", node=name)
        generations.setdefault(name, node.generation)

    for _, name in route:
        admit(name)

    def cancelled() -> bool:
        if coordinator.aborted.is_set():
            return True
        return any(table[name].generation != generation or not table[name].up for name, generation in generations.items())

    steps = [stage_step(table, segment, name) for segment, name in route]
    header = {"route": steps + [None] * (len(segments) - len(steps)), "hop": 0, "inputs": specs, "timings": []}
    dispatch_s = coordinator.now_s()
    if math.isnan(record.start_s):
        record.start_s = dispatch_s
    timeout_s = STAGE_TIMEOUT_S * len(segments)
    exchange = coordinator.links.start(names[0], header, frames)
    try:
        while True:
            reply, output_frames = exchange.wait(timeout_s=timeout_s, cancelled=cancelled)
            if not reply.get("parked"):
                break
            # Per-stage decision: the stage before has finished, so the scheduler learns its
            # time and picks the next stage's node now, as the simulator and relay mode do.
            hop = int(reply["hop"])
            coordinator.observe(names[hop], reply["timing"]["wall_ms"])
            segment = segments[hop + 1]
            name = coordinator.choose_stage(record.request_id, segment, excluded)
            admit(name)
            exchange.send_next(names[hop], stage_step(table, segment, name))
    finally:
        exchange.close()
    observed = len(names) - 1 if coordinator.route_decision == "per_stage" else 0
    return reply, output_frames, dispatch_s, observed


def stage_step(table, segment, name: str) -> dict:
    return {"segment": segment.id, "node": name, "address": table[name].address}


def failed_nodes(error: WorkerError, names: list[str], generations: dict[str, int], table) -> set[str]:
    """Return the nodes a failed attempt is blamed on, so the retry's route avoids them.

    The worker named by an error reply, else the route's nodes that went down or are paused,
    else (a timeout with no known cause) every node of the route.
    """
    if error.node:
        return {error.node}
    lost = {name for name in names if table[name].generation != generations[name] or not table[name].serving}
    return lost or set(names)


def add_stage_records(
    coordinator, record: RequestRecord, names: list[str], timings: list[dict], dispatch_s: float, received_s: float, offset_s: float, observed: int
) -> None:
    """Fill the record's per-stage lists from the workers' timings, and tell the scheduler the stages after the first ``observed``.

    A stage spans from its input leaving the previous holder (the coordinator for the first
    stage, the previous worker for the others) to its output leaving its worker (the last
    stage: reaching the coordinator), so the stages of a request tile its time from dispatch
    to reply as in relay mode.
    """
    if len(timings) != len(names):
        raise WorkerError(f"the reply carries {len(timings)} stage timings for a route of {len(names)} stages")
    for index, (name, timing) in enumerate(zip(names, timings)):
        if index == 0:
            start_s = dispatch_s
        else:
            start_s = timings[index - 1]["sent_s"] - offset_s
        end_s = received_s if index == len(names) - 1 else timing["sent_s"] - offset_s
        # Keep the stages inside the attempt's span despite sub-millisecond clock differences.
        start_s = min(max(start_s, dispatch_s), received_s)
        end_s = min(max(end_s, start_s), received_s)
        if index >= observed:
            coordinator.observe(name, timing["wall_ms"])
        record.stage_nodes.append(name)
        record.stage_start_s.append(start_s)
        record.stage_end_s.append(end_s)
        record.stage_exec_ms.append(timing["wall_ms"])
        record.bytes_moved += int(timing["in_bytes"]) + int(timing["out_bytes"])
