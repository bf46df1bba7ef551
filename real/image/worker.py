"""amp4ec worker: runs exported model segments inside a resource-limited container.

This file is copied into the worker image and runs there on its own. It imports only the
standard library, torch, numpy and pyzmq, never amp4ec, so the image does not depend on the
host's package version.

Protocol (version 2). The worker binds a pyzmq ROUTER socket on tcp://*:AMP4EC_PORT. One
compute thread runs the segment work (load, unload, run, profile, forward, and shutdown after
them) one message at a time in arrival order. The I/O thread replies to ping, stats, monitor
and next at once. A REQ client works as with a REP server. A DEALER client
sends an empty delimiter frame first and gets its replies in the same form. After the
delimiter, every message is multipart: the first frame is a UTF-8 JSON object (the header),
the frames after it are raw payloads. A tensor travels as its raw C-contiguous bytes in native (little-endian) byte order,
described in the header by a spec {"dtype": "float32", "shape": [1, 32, 112, 112]}. Specs
and tensor frames are in the same order. Nothing is pickled.

Supported dtypes: float16, float32, float64, int8, int16, int32, int64, uint8, bool.

Requests (header field "op") and their replies:

- ping -> {"ok": true, "protocol": 1, "torch": "2.13.0+cpu", "threads": 1, "pid": 7,
  "runtime_rss_bytes": N, "node": "n0" or null, "segments": ["s0", ...]}.
  runtime_rss_bytes is the resident set size after importing torch, numpy and pyzmq.
- load {"segment": "s0"} + one frame holding the bytes torch.export.save wrote ->
  {"ok": true, "load_ms": x, "rss_bytes": N}. The segment stays resident until unloaded.
  Loading an id that is already loaded replaces it.
- unload {"segment": "s0"} -> {"ok": true, "unloaded": true}. "unloaded" is false when the
  id was not loaded. Omitting "segment" unloads every segment.
- run {"segment": "s0", "inputs": [spec, ...]} + one frame per input ->
  {"ok": true, "outputs": [spec, ...], "wall_ms": x, "cpu_ms": y} + one frame per output.
  wall_ms is the time.perf_counter delta and cpu_ms the time.process_time delta (CPU time
  of every thread of the worker), both around the forward call only. The wall-clock window
  encloses the CPU-clock reads: reading the process CPU clock makes the kernel account the
  run's CPU time, so a container whose CFS quota ran out is throttled at that read, and with
  the reads outside the window that wait would be missing from every run's wall_ms. A
  segment returning a tuple, list or dict of tensors sends them flattened in order (dict
  values in key order).
- profile {"segment": "s0", "inputs": [spec, ...], "warmup": 3, "repeats": 20,
  "gap_ms": 100} + input frames -> {"ok": true, "wall_ms": [...], "cpu_ms": [...],
  "peak_rss_bytes": N, "cpu_stat_before": {...}, "cpu_stat_after": {...},
  "cpu_usage_ns_before": N, "cpu_usage_ns_after": N, "minor_faults": N}.
  The segment runs warmup + repeats times on the same inputs and the reply contains the timings
  of the repeats only. The worker sleeps gap_ms before every run after the first, so each run
  can start with a refilled CFS quota (gap_ms=0 runs back to back). peak_rss_bytes is the
  worker process's peak resident set size since it started (getrusage ru_maxrss), not
  since the profile began. cpu_stat_* are the container's cgroup cpu.stat counters and
  cpu_usage_ns_* its cpuacct.usage, read just before the first repeat and after the last.
  minor_faults is how many minor page faults the worker process took over the repeats
  (getrusage ru_minflt): memory the kernel had to map in again, for example after the C
  allocator returned a freed buffer to it.
- stats -> {"ok": true, "time_s": time.time(), "cpu_usage_ns", "cpu_stat": {"nr_periods",
  "nr_throttled", "throttled_time"}, "cfs_quota_us", "cfs_period_us",
  "memory_usage_bytes", "memory_limit_bytes", "memory_max_usage_bytes", "net_rx_bytes",
  "net_tx_bytes", "rss_bytes", "peak_rss_bytes", "segments": [...]}.
  Values come from the container's own cgroup v1 files (cpu, cpuacct and memory
  controllers), with cgroup v2 files as fallback. cfs_quota_us is -1 when no CPU limit is
  set. throttled_time is in nanoseconds (v1 unit; v2 throttled_usec is converted). Network
  bytes are the sums over every interface in /proc/net/dev except lo. A value the worker
  cannot read is null.
- forward {"token": "...", "reply_to": "...", "route": [{"segment": "s0", "node": "a",
  "address": "tcp://ip:port"}, ...], "hop": 0, "inputs": [spec, ...], "timings": []} + input
  frames. The worker runs route[hop]'s segment and appends its timing to "timings". Unless
  it is the last hop, it sends the same message with hop + 1, its outputs and the longer
  "timings" to route[hop + 1]'s address, itself a worker, over a DEALER socket it keeps open
  per address. The last hop sends {"ok": true, "op": "forward", "token", "outputs": [spec,
  ...], "timings": [...]} + output frames to the peer whose routing id is reply_to (UTF-8),
  which must be connected to this worker's ROUTER: the coordinator connects to every worker.
  A failing hop sends {"ok": false, "op": "forward", "token", "hop", "node", "error"} there
  instead. A route entry may be null while the coordinator has not chosen that stage's node:
  the worker before it then keeps its outputs ("parks" them, for up to PARKED_TTL_S) and
  sends {"ok": true, "op": "forward", "token", "hop", "parked": true, "timing"} to reply_to.
- next {"token", "step": {"segment", "node", "address"}} names the next stage of parked
  outputs. The worker sends them on as above, with no reply; an error goes to reply_to. A timing is {"node", "segment", "received_s", "start_s", "end_s", "sent_s",
  "wall_ms", "cpu_ms", "in_bytes", "out_bytes"}, the *_s values from time.time() when the
  message was taken from the socket, around the forward call, and before the outputs were
  sent. Nothing is sent back to the previous hop.
- monitor {"period_s": p, "request": id or null} -> the stats reply with "op": "stats",
  "seq": 0 and the request id echoed, and then the
  same stats message, "seq" counting up, every p seconds to the peer that sent monitor,
  without a request. period_s 0 stops the pushes. A later monitor replaces the subscriber,
  and a subscriber that has disconnected is dropped.
- shutdown -> {"ok": true}, then the worker closes its socket and exits with status 0.

Errors: {"ok": false, "error": "message"}. A malformed request, an unknown op or segment,
or an exception in a segment returns an error reply, and the worker keeps serving.

Environment: AMP4EC_THREADS (torch.set_num_threads, default 1), AMP4EC_PORT (default 5555),
AMP4EC_NODE (node name echoed by ping and used in log lines, optional).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import queue
import resource
import signal
import sys
import threading
import time

PROTOCOL_VERSION = 2

log = logging.getLogger("amp4ec.worker")

DTYPE_NAMES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")

# Candidate locations of each cgroup value: v1 files first (the engine on the development
# machines runs cgroup v1), then v2. In a container both are mounted at the container's own
# cgroup, so no path needs the container id.
CGROUP_V1_CPU_DIRS = ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu")
CGROUP_V1_CPUACCT_DIRS = ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuacct")
CGROUP_V1_MEMORY_DIR = "/sys/fs/cgroup/memory"
CGROUP_V2_DIR = "/sys/fs/cgroup"

# Parked outputs whose next stage the coordinator has not named after this long, or beyond
# this many, are dropped (the coordinator has given up on them by then).
PARKED_TTL_S = 300.0
MAX_PARKED = 1000

# cgroup v1 reports "no memory limit" as a huge page-aligned number near 2**63.
UNLIMITED_MEMORY_BYTES = 2**62


class RequestError(Exception):
    """A request the worker rejects; its message goes back in the error reply."""


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as file:
            return file.read().strip()
    except OSError:
        return None


def read_int(path: str) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def read_first_int(paths) -> int | None:
    for path in paths:
        value = read_int(path)
        if value is not None:
            return value
    return None


def read_key_values(path: str) -> dict[str, int] | None:
    text = read_text(path)
    if text is None:
        return None
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def read_cpu_stat() -> dict[str, int | None]:
    """Return nr_periods, nr_throttled and throttled_time (ns) of the container's cgroup."""
    for directory in CGROUP_V1_CPU_DIRS:
        values = read_key_values(f"{directory}/cpu.stat")
        if values is not None:
            return {
                "nr_periods": values.get("nr_periods"),
                "nr_throttled": values.get("nr_throttled"),
                "throttled_time": values.get("throttled_time"),
            }
    values = read_key_values(f"{CGROUP_V2_DIR}/cpu.stat")
    if values is not None:
        throttled_usec = values.get("throttled_usec")
        return {
            "nr_periods": values.get("nr_periods"),
            "nr_throttled": values.get("nr_throttled"),
            "throttled_time": None if throttled_usec is None else throttled_usec * 1000,
        }
    return {"nr_periods": None, "nr_throttled": None, "throttled_time": None}


def read_cpu_usage_ns() -> int | None:
    value = read_first_int(f"{d}/cpuacct.usage" for d in CGROUP_V1_CPUACCT_DIRS)
    if value is not None:
        return value
    values = read_key_values(f"{CGROUP_V2_DIR}/cpu.stat")
    if values is not None and "usage_usec" in values:
        return values["usage_usec"] * 1000
    return None


def read_cfs_quota() -> tuple[int | None, int | None]:
    """Return (cfs_quota_us, cfs_period_us); the quota is -1 when the CPU is unlimited."""
    quota = read_first_int(f"{d}/cpu.cfs_quota_us" for d in CGROUP_V1_CPU_DIRS)
    period = read_first_int(f"{d}/cpu.cfs_period_us" for d in CGROUP_V1_CPU_DIRS)
    if quota is not None or period is not None:
        return quota, period
    text = read_text(f"{CGROUP_V2_DIR}/cpu.max")
    if text is None:
        return None, None
    parts = text.split()
    if len(parts) != 2:
        return None, None
    try:
        period = int(parts[1])
    except ValueError:
        return None, None
    quota = -1 if parts[0] == "max" else int(parts[0])
    return quota, period


def read_memory() -> dict[str, int | None]:
    usage = read_int(f"{CGROUP_V1_MEMORY_DIR}/memory.usage_in_bytes")
    limit = read_int(f"{CGROUP_V1_MEMORY_DIR}/memory.limit_in_bytes")
    max_usage = read_int(f"{CGROUP_V1_MEMORY_DIR}/memory.max_usage_in_bytes")
    if usage is None and limit is None:
        usage = read_int(f"{CGROUP_V2_DIR}/memory.current")
        limit_text = read_text(f"{CGROUP_V2_DIR}/memory.max")
        if limit_text is not None and limit_text != "max":
            try:
                limit = int(limit_text)
            except ValueError:
                limit = None
        max_usage = read_int(f"{CGROUP_V2_DIR}/memory.peak")
    if limit is not None and limit >= UNLIMITED_MEMORY_BYTES:
        limit = None
    return {
        "memory_usage_bytes": usage,
        "memory_limit_bytes": limit,
        "memory_max_usage_bytes": max_usage,
    }


def read_net_bytes() -> tuple[int | None, int | None]:
    """Return (received, transmitted) bytes summed over every interface except lo."""
    text = read_text("/proc/net/dev")
    if text is None:
        return None, None
    rx_bytes = 0
    tx_bytes = 0
    # Two header lines, then "iface: rx_bytes packets ... (8 rx fields) tx_bytes ...".
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            continue
        values = fields.split()
        if len(values) < 9:
            continue
        rx_bytes += int(values[0])
        tx_bytes += int(values[8])
    return rx_bytes, tx_bytes


def read_rss_bytes() -> int | None:
    text = read_text("/proc/self/statm")
    if text is None:
        return None
    return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_peak_rss_bytes() -> int:
    # On Linux ru_maxrss is in kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Worker:
    """The state of one worker process: the loaded segments and the torch runtime."""

    def __init__(self, torch_module, numpy_module, threads: int, node: str | None):
        self.torch = torch_module
        self.np = numpy_module
        self.threads = threads
        self.node = node
        self.segments: dict[str, object] = {}
        self.runtime_rss_bytes = read_rss_bytes()

    # Tensor encoding

    def decode_inputs(self, header: dict, frames: list[bytes]) -> list:
        specs = header.get("inputs")
        if not isinstance(specs, list):
            raise RequestError("field 'inputs' must be a list of {dtype, shape} specs")
        if len(specs) != len(frames):
            raise RequestError(
                f"'inputs' lists {len(specs)} tensors but the message carries {len(frames)} frames"
            )
        tensors = []
        for index, (spec, frame) in enumerate(zip(specs, frames)):
            if not isinstance(spec, dict):
                raise RequestError(f"inputs[{index}] must be an object with dtype and shape")
            dtype = spec.get("dtype")
            shape = spec.get("shape")
            if dtype not in DTYPE_NAMES:
                raise RequestError(
                    f"inputs[{index}]: unsupported dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}"
                )
            if not isinstance(shape, list) or not all(
                isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
            ):
                raise RequestError(f"inputs[{index}]: shape {shape!r} must be a list of non-negative integers")
            np_dtype = self.np.dtype(dtype)
            expected_bytes = int(self.np.prod(shape, dtype=self.np.int64)) * np_dtype.itemsize
            if len(frame) != expected_bytes:
                raise RequestError(
                    f"inputs[{index}]: frame has {len(frame)} bytes but dtype {dtype} "
                    f"and shape {shape} need {expected_bytes}"
                )
            # No copy: received zmq frames are writable, and the array keeps its frame alive.
            # A read-only buffer is copied, since torch warns on one and a segment may write
            # into its input.
            array = self.np.frombuffer(frame, dtype=np_dtype).reshape(shape)
            if not array.flags.writeable:
                array = array.copy()
            tensors.append(self.torch.from_numpy(array))
        return tensors

    def encode_outputs(self, result) -> tuple[list[dict], list]:
        tensors = flatten_outputs(result, self.torch)
        specs = []
        frames = []
        for index, tensor in enumerate(tensors):
            array = tensor.detach().cpu().contiguous().numpy()
            dtype = str(array.dtype)
            if dtype not in DTYPE_NAMES:
                raise RequestError(f"output {index} has dtype {dtype}, which the protocol cannot carry")
            specs.append({"dtype": dtype, "shape": list(array.shape)})
            frames.append(memoryview(array).cast("B"))
        return specs, frames

    # Requests

    def segment(self, header: dict):
        segment_id = header.get("segment")
        if not isinstance(segment_id, str) or not segment_id:
            raise RequestError("field 'segment' must be a non-empty string")
        module = self.segments.get(segment_id)
        if module is None:
            loaded = ", ".join(sorted(self.segments)) or "none"
            raise RequestError(f"segment {segment_id!r} is not loaded (loaded: {loaded}); send load first")
        return module

    def forward(self, module, inputs):
        with self.torch.inference_mode():
            return module(*inputs)

    def handle_ping(self, header, frames):
        return {
            "ok": True,
            "protocol": PROTOCOL_VERSION,
            "torch": self.torch.__version__,
            "threads": self.torch.get_num_threads(),
            "pid": os.getpid(),
            "runtime_rss_bytes": self.runtime_rss_bytes,
            "node": self.node,
            "segments": sorted(self.segments),
        }, []

    def handle_load(self, header, frames):
        segment_id = header.get("segment")
        if not isinstance(segment_id, str) or not segment_id:
            raise RequestError("field 'segment' must be a non-empty string")
        if len(frames) != 1:
            raise RequestError(f"load needs exactly one frame with the exported program, got {len(frames)}")
        started = time.perf_counter()
        try:
            program = self.torch.export.load(io.BytesIO(frames[0]))
            module = program.module()
        except Exception as error:
            raise RequestError(
                f"cannot load segment {segment_id!r} with torch.export.load: {type(error).__name__}: {error}"
            ) from error
        # Drop a previous version first, so its memory is released before it counts twice.
        self.segments.pop(segment_id, None)
        self.segments[segment_id] = module
        load_ms = (time.perf_counter() - started) * 1e3
        rss_bytes = read_rss_bytes()
        log.info("loaded segment %s in %.1f ms (rss %s bytes)", segment_id, load_ms, rss_bytes)
        return {"ok": True, "load_ms": load_ms, "rss_bytes": rss_bytes}, []

    def handle_unload(self, header, frames):
        segment_id = header.get("segment")
        if segment_id is None:
            unloaded = bool(self.segments)
            self.segments.clear()
        elif isinstance(segment_id, str):
            unloaded = self.segments.pop(segment_id, None) is not None
        else:
            raise RequestError("field 'segment' must be a string or absent")
        return {"ok": True, "unloaded": unloaded}, []

    def handle_run(self, header, frames):
        module = self.segment(header)
        inputs = self.decode_inputs(header, frames)
        wall_start = time.perf_counter()
        cpu_start = time.process_time()
        result = self.forward(module, inputs)
        cpu_ms = (time.process_time() - cpu_start) * 1e3
        wall_ms = (time.perf_counter() - wall_start) * 1e3
        specs, output_frames = self.encode_outputs(result)
        return {"ok": True, "outputs": specs, "wall_ms": wall_ms, "cpu_ms": cpu_ms}, output_frames

    def handle_profile(self, header, frames):
        module = self.segment(header)
        inputs = self.decode_inputs(header, frames)
        warmup = header.get("warmup", 3)
        repeats = header.get("repeats", 20)
        gap_ms = header.get("gap_ms", 100)
        for name, value in (("warmup", warmup), ("repeats", repeats)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RequestError(f"field '{name}' must be a non-negative integer, got {value!r}")
        if repeats < 1:
            raise RequestError("field 'repeats' must be at least 1")
        if not isinstance(gap_ms, (int, float)) or isinstance(gap_ms, bool) or gap_ms < 0:
            raise RequestError(f"field 'gap_ms' must be a non-negative number, got {gap_ms!r}")

        gap_s = gap_ms / 1e3
        for run_index in range(warmup):
            if run_index > 0 and gap_s:
                time.sleep(gap_s)
            self.forward(module, inputs)

        wall_ms = []
        cpu_ms = []
        cpu_stat_before = None
        cpu_usage_ns_before = None
        for run_index in range(repeats):
            if (warmup > 0 or run_index > 0) and gap_s:
                time.sleep(gap_s)
            if run_index == 0:
                cpu_stat_before = read_cpu_stat()
                cpu_usage_ns_before = read_cpu_usage_ns()
                faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall_start = time.perf_counter()
            cpu_start = time.process_time()
            self.forward(module, inputs)
            cpu_ms.append((time.process_time() - cpu_start) * 1e3)
            wall_ms.append((time.perf_counter() - wall_start) * 1e3)
        return {
            "ok": True,
            "wall_ms": wall_ms,
            "cpu_ms": cpu_ms,
            "peak_rss_bytes": read_peak_rss_bytes(),
            "cpu_stat_before": cpu_stat_before,
            "cpu_stat_after": read_cpu_stat(),
            "cpu_usage_ns_before": cpu_usage_ns_before,
            "cpu_usage_ns_after": read_cpu_usage_ns(),
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before,
        }, []

    def handle_stats(self, header, frames):
        quota_us, period_us = read_cfs_quota()
        rx_bytes, tx_bytes = read_net_bytes()
        reply = {
            "ok": True,
            "time_s": time.time(),
            "cpu_usage_ns": read_cpu_usage_ns(),
            "cpu_stat": read_cpu_stat(),
            "cfs_quota_us": quota_us,
            "cfs_period_us": period_us,
            "net_rx_bytes": rx_bytes,
            "net_tx_bytes": tx_bytes,
            "rss_bytes": read_rss_bytes(),
            "peak_rss_bytes": read_peak_rss_bytes(),
            "segments": sorted(self.segments),
        }
        reply.update(read_memory())
        return reply, []


def flatten_outputs(result, torch_module) -> list:
    if isinstance(result, torch_module.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        tensors = []
        for item in result:
            tensors.extend(flatten_outputs(item, torch_module))
        return tensors
    if isinstance(result, dict):
        tensors = []
        for key in sorted(result):
            tensors.extend(flatten_outputs(result[key], torch_module))
        return tensors
    raise RequestError(f"segment returned {type(result).__name__}, expected tensors")


def parse_header(frame: bytes) -> dict:
    try:
        header = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"frame 0 is not a UTF-8 JSON header: {error}") from error
    if not isinstance(header, dict):
        raise RequestError(f"header must be a JSON object, got {type(header).__name__}")
    return header


def read_env_int(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise SystemExit(f"amp4ec worker: {name}={text!r} is not an integer") from None
    if value < minimum:
        raise SystemExit(f"amp4ec worker: {name}={value} must be at least {minimum}")
    return value


# Returned by the step that replies to a shutdown request, to end the I/O loop.
STOP_SERVING = object()


class Server:
    """The ROUTER socket loop: requests, forwarded activations and monitor pushes."""

    def __init__(self, worker: Worker, zmq_module, port: int):
        self.worker = worker
        self.zmq = zmq_module
        self.handlers = {
            "ping": worker.handle_ping,
            "load": worker.handle_load,
            "unload": worker.handle_unload,
            "run": worker.handle_run,
            "profile": worker.handle_profile,
            "stats": worker.handle_stats,
        }
        self.context = zmq_module.Context()
        self.socket = self.context.socket(zmq_module.ROUTER)
        self.socket.setsockopt(zmq_module.LINGER, 1000)
        # Sending to a routing id that is not connected raises EHOSTUNREACH instead of
        # dropping the message silently, so the worker can log it.
        self.socket.setsockopt(zmq_module.ROUTER_MANDATORY, 1)
        # A peer that connects under a routing id already in use takes it over. By default a
        # ROUTER accepts such a second connection but drops its messages. That happened when the
        # coordinator reconnected to a restarted worker while its old link's automatic
        # reconnection already had the id, so the worker never heard from the coordinator again.
        self.socket.setsockopt(zmq_module.ROUTER_HANDOVER, 1)
        self.socket.bind(f"tcp://*:{port}")
        self.port = port

        # One DEALER per next-hop address, kept open across requests.
        self.next_hops: dict[str, object] = {}
        # Outputs waiting for op next: token -> (time parked, forward header, output frames).
        self.parked: dict[str, tuple] = {}
        self.subscriber: bytes | None = None
        self.monitor_period_s = 0.0
        self.next_push_s = math.inf
        self.push_seq = 0
        self.error_count = 0

        # Work for the compute thread: callables that return the callable the I/O thread runs
        # when they are done (None stops the thread). The compute thread signals each result
        # over an inproc socket, so the I/O thread's poll wakes up for it.
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        signal_address = f"inproc://amp4ec-worker-results-{os.getpid()}"
        self.result_signals = self.context.socket(zmq_module.PULL)
        self.result_signals.bind(signal_address)
        self.signal_sender = self.context.socket(zmq_module.PUSH)
        self.signal_sender.connect(signal_address)
        self.compute_thread = threading.Thread(target=self.compute_loop, name="amp4ec-compute", daemon=True)

    def close(self) -> None:
        self.jobs.put(None)
        self.compute_thread.join(timeout=10)
        for next_hop in self.next_hops.values():
            next_hop.close(linger=0)
        self.signal_sender.close(linger=0)
        self.result_signals.close(linger=0)
        self.socket.close()
        self.context.term()

    def run(self) -> None:
        """Serve until a shutdown request: control messages here, segment work on the compute thread.

        Only the compute thread runs segments, one at a time in arrival order. The I/O thread
        (this one) owns every socket, so stats, pings, monitor pushes and the "next" messages
        of parked outputs do not queue behind a forward call.
        """
        self.compute_thread.start()
        log.info("listening on tcp://*:%d", self.port)
        poller = self.zmq.Poller()
        poller.register(self.socket, self.zmq.POLLIN)
        poller.register(self.result_signals, self.zmq.POLLIN)
        while True:
            timeout_ms = None
            if self.subscriber is not None:
                timeout_ms = max(0, int((self.next_push_s - time.monotonic()) * 1e3))
            events = dict(poller.poll(timeout_ms))
            if self.result_signals in events:
                while True:
                    try:
                        self.result_signals.recv(flags=self.zmq.NOBLOCK)
                    except self.zmq.Again:
                        break
                    if self.results.get()() is STOP_SERVING:
                        return
            if self.socket in events:
                while True:
                    try:
                        message = self.socket.recv_multipart(flags=self.zmq.NOBLOCK, copy=False)
                    except self.zmq.Again:
                        break
                    self.handle(message, time.time())
            if self.subscriber is not None and time.monotonic() >= self.next_push_s:
                self.push_stats()

    def compute_loop(self) -> None:
        while True:
            work = self.jobs.get()
            if work is None:
                return
            self.results.put(work())
            self.signal_sender.send(b"")

    def handle(self, message: list, received_s: float) -> None:
        """Serve one control message now, or queue its segment work for the compute thread."""
        envelope, body = split_envelope(message)
        if not body:
            self.count_error(None, "message without a header frame after the routing envelope")
            return
        payloads = [frame.buffer for frame in body[1:]]
        op = None
        try:
            header = parse_header(body[0].bytes)
            op = header.get("op")
            if op == "forward":
                self.jobs.put(lambda: self.compute_forward(header, payloads, received_s))
                return
            if op == "next":
                self.handle_next(header)
                return
            if op == "shutdown":
                # Queued behind the segment work that arrived before it.
                self.jobs.put(lambda: lambda: self.finish_shutdown(envelope))
                return
            if op == "monitor":
                reply, frames = self.subscribe(envelope[0], header)
            elif op in ("ping", "stats"):
                reply, frames = self.handlers[op](header, payloads)
            else:
                handler = self.handlers.get(op)
                if handler is None:
                    raise RequestError(
                        f"unknown op {op!r}; expected one of {', '.join(sorted(self.handlers))}, forward, next, monitor, shutdown"
                    )
                self.jobs.put(lambda: self.compute_request(envelope, op, handler, header, payloads))
                return
        except Exception as error:  # a malformed request must not stop the worker
            reply, frames = self.error_reply(op, error), []
        self.send(envelope, reply, frames)

    def error_reply(self, op, error: Exception) -> dict:
        message = str(error) if isinstance(error, RequestError) else f"{type(error).__name__}: {error}"
        self.count_error(op, message)
        return {"ok": False, "error": message}

    def compute_request(self, envelope: list, op, handler, header: dict, payloads: list):
        """Run a request's handler on the compute thread; return the I/O thread's reply step."""
        try:
            reply, frames = handler(header, payloads)
        except Exception as error:  # a failing segment must not stop the worker
            reply, frames = self.error_reply(op, error), []
        return lambda: self.send(envelope, reply, frames)

    def finish_shutdown(self, envelope: list) -> object:
        self.send(envelope, {"ok": True}, [])
        log.info("shutdown requested")
        return STOP_SERVING

    def count_error(self, op, message: str) -> None:
        self.error_count += 1
        # Log the first errors in full, then one line in every 100, so a client that keeps
        # sending bad requests cannot flood the container log.
        if self.error_count <= 20 or self.error_count % 100 == 0:
            log.warning("request op=%r failed (error %d): %s", op, self.error_count, message)

    def send(self, envelope: list, reply: dict, frames: list) -> bool:
        """Send a reply through the ROUTER socket; return False when the peer has gone."""
        try:
            self.socket.send_multipart([*envelope, json.dumps(reply).encode("utf-8"), *frames], copy=False)
        except self.zmq.ZMQError as error:
            # EHOSTUNREACH: the peer disconnected (a timed-out REQ client, a stopped coordinator).
            log.warning("cannot send %s reply: %s", reply.get("op", "a"), error)
            return False
        return True

    def compute_forward(self, header: dict, frames: list, received_s: float):
        """Run a forward hop's segment on the compute thread; return the I/O thread's sending step."""
        token = header.get("token")
        reply_to = header.get("reply_to")
        hop = header.get("hop")
        try:
            if not isinstance(reply_to, str) or not reply_to:
                raise RequestError("field 'reply_to' must be the coordinator's routing id")
            route = header.get("route")
            if not isinstance(route, list) or not route:
                raise RequestError("field 'route' must be a non-empty list of {segment, node, address}")
            if not isinstance(hop, int) or isinstance(hop, bool) or not 0 <= hop < len(route):
                raise RequestError(f"field 'hop' must index the route (0 to {len(route) - 1}), got {hop!r}")
            step = route[hop]
            if not isinstance(step, dict):
                raise RequestError(f"route[{hop}] must be an object with segment, node and address")
            module = self.worker.segment(step)
            inputs = self.worker.decode_inputs(header, frames)
            start_s = time.time()
            wall_start = time.perf_counter()
            cpu_start = time.process_time()
            result = self.worker.forward(module, inputs)
            cpu_ms = (time.process_time() - cpu_start) * 1e3
            wall_ms = (time.perf_counter() - wall_start) * 1e3
            end_s = time.time()
            specs, output_frames = self.worker.encode_outputs(result)
            timings = header.get("timings")
            if not isinstance(timings, list):
                raise RequestError("field 'timings' must be a list")
            timing = {
                "node": self.worker.node,
                "segment": step["segment"],
                "received_s": received_s,
                "start_s": start_s,
                "end_s": end_s,
                "sent_s": None,
                "wall_ms": wall_ms,
                "cpu_ms": cpu_ms,
                "in_bytes": sum(len(frame) for frame in frames),
                "out_bytes": sum(len(frame) for frame in output_frames),
            }
            timings.append(timing)
            header["inputs"] = specs
        except Exception as error:  # any failure goes back to the coordinator, which retries
            return lambda failure=error: self.fail_forward(header, failure)
        return lambda: self.route_forward(header, output_frames)

    def route_forward(self, header: dict, output_frames: list) -> None:
        """Send a finished hop's outputs on: to the next stage, parked, or back to reply_to."""
        try:
            route = header["route"]
            hop = header["hop"]
            reply_to = header["reply_to"]
            if hop + 1 < len(route):
                if route[hop + 1] is None:
                    self.park(header, output_frames, reply_to)
                else:
                    self.send_next_stage(header, output_frames)
                return
            header["timings"][-1]["sent_s"] = time.time()
            reply = {"ok": True, "op": "forward", "token": header.get("token"), "outputs": header["inputs"], "timings": header["timings"]}
            self.send([reply_to.encode("utf-8"), b""], reply, output_frames)
        except Exception as error:  # any failure goes back to the coordinator, which retries
            self.fail_forward(header, error)

    def fail_forward(self, header: dict, error: Exception) -> None:
        message = str(error) if isinstance(error, RequestError) else f"{type(error).__name__}: {error}"
        self.count_error("forward", message)
        reply_to = header.get("reply_to")
        if isinstance(reply_to, str) and reply_to:
            reply = {"ok": False, "op": "forward", "token": header.get("token"), "hop": header.get("hop"), "node": self.worker.node, "error": message}
            self.send([reply_to.encode("utf-8"), b""], reply, [])

    def send_next_stage(self, header: dict, output_frames: list) -> None:
        """Send a forward message whose "hop" is still the stage just run on to the next stage."""
        route = header["route"]
        hop = header["hop"] + 1
        step = route[hop]
        address = step.get("address") if isinstance(step, dict) else None
        if not isinstance(address, str) or not address.startswith("tcp://"):
            raise RequestError(f"route[{hop}].address must be a tcp:// address, got {address!r}")
        header["hop"] = hop
        header["timings"][-1]["sent_s"] = time.time()
        self.send_next_hop(address, [b"", json.dumps(header).encode("utf-8"), *output_frames])

    def park(self, header: dict, output_frames: list, reply_to: str) -> None:
        """Keep the outputs until the coordinator names the next stage's node (op next)."""
        now_s = time.monotonic()
        for token in [t for t, parked in self.parked.items() if now_s - parked[0] > PARKED_TTL_S]:
            del self.parked[token]
        while len(self.parked) >= MAX_PARKED:
            del self.parked[next(iter(self.parked))]
        self.parked[str(header.get("token"))] = (now_s, header, output_frames)
        timing = header["timings"][-1]
        notice = {"ok": True, "op": "forward", "token": header.get("token"), "hop": header["hop"], "parked": True, "timing": timing}
        self.send([reply_to.encode("utf-8"), b""], notice, [])

    def handle_next(self, header: dict) -> None:
        """Send parked outputs to the stage the coordinator chose; errors go to reply_to."""
        token = str(header.get("token"))
        parked = self.parked.pop(token, None)
        if parked is None:
            self.count_error("next", f"no parked outputs for token {token}; they expired or were sent")
            return
        _, forward_header, output_frames = parked
        reply_to = forward_header["reply_to"]
        hop = forward_header["hop"] + 1
        try:
            step = header.get("step")
            if not isinstance(step, dict):
                raise RequestError("field 'step' must be an object with segment, node and address")
            forward_header["route"][hop] = step
            self.send_next_stage(forward_header, output_frames)
        except Exception as error:  # reported like a failing forward hop
            message = str(error) if isinstance(error, RequestError) else f"{type(error).__name__}: {error}"
            self.count_error("next", message)
            reply = {"ok": False, "op": "forward", "token": token, "hop": hop, "node": self.worker.node, "error": message}
            self.send([reply_to.encode("utf-8"), b""], reply, [])

    def send_next_hop(self, address: str, message: list) -> None:
        next_hop = self.next_hops.get(address)
        if next_hop is None:
            next_hop = self.context.socket(self.zmq.DEALER)
            next_hop.setsockopt(self.zmq.LINGER, 0)
            next_hop.connect(address)
            self.next_hops[address] = next_hop
            log.info("connected to next hop %s", address)
        try:
            next_hop.send_multipart(message, flags=self.zmq.NOBLOCK, copy=False)
        except self.zmq.Again:
            raise RequestError(f"next hop {address} is not accepting messages (send queue full)") from None

    def subscribe(self, subscriber: bytes, header: dict) -> tuple[dict, list]:
        period_s = header.get("period_s")
        if not isinstance(period_s, (int, float)) or isinstance(period_s, bool) or period_s < 0:
            raise RequestError(f"field 'period_s' must be a non-negative number of seconds, got {period_s!r}")
        if period_s == 0:
            self.subscriber = None
            self.next_push_s = math.inf
            log.info("monitor pushes stopped")
        else:
            self.subscriber = subscriber
            self.monitor_period_s = float(period_s)
            self.next_push_s = time.monotonic() + self.monitor_period_s
            log.info("pushing stats every %.3f s", self.monitor_period_s)
        self.push_seq = 0
        reply, _ = self.worker.handle_stats(header, [])
        reply.update(op="stats", seq=0, request=header.get("request"))
        return reply, []

    def push_stats(self) -> None:
        self.push_seq += 1
        reply, _ = self.worker.handle_stats({}, [])
        reply.update(op="stats", seq=self.push_seq)
        if not self.send([self.subscriber, b""], reply, []):
            log.warning("monitor subscriber disconnected; pushes stopped")
            self.subscriber = None
            self.next_push_s = math.inf
            return
        # Keep the period's phase, but skip the pushes missed while a long request ran.
        self.next_push_s += self.monitor_period_s
        now_s = time.monotonic()
        if self.next_push_s <= now_s:
            self.next_push_s = now_s + self.monitor_period_s


def split_envelope(message: list) -> tuple[list, list]:
    """Split a ROUTER message into its routing envelope (ids and the empty delimiter) and body."""
    for index, frame in enumerate(message):
        if len(frame) == 0:
            return message[: index + 1], message[index + 1 :]
    # No delimiter: a raw DEALER without one. Reply with the routing id alone.
    return message[:1], message[1:]


def serve(worker: Worker, zmq_module, port: int) -> None:
    server = Server(worker, zmq_module, port)
    try:
        server.run()
    finally:
        server.close()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s amp4ec-worker[%(process)d]: %(message)s",
    )
    threads = read_env_int("AMP4EC_THREADS", 1, 1)
    port = read_env_int("AMP4EC_PORT", 5555, 1)
    node = os.environ.get("AMP4EC_NODE") or None

    # As PID 1 in a container, Python ignores SIGTERM unless a handler is installed; `docker
    # stop` then waits for its timeout and kills.
    def stop(signum, frame):
        log.info("received signal %d, exiting", signum)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)

    started = time.perf_counter()
    log.info("starting (node %s, threads %d, port %d)", node, threads, port)
    import numpy
    import torch
    import zmq

    torch.set_num_threads(threads)
    # Interop threads run independent ops in parallel. A single one keeps the number of busy
    # threads at AMP4EC_THREADS.
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError as error:
        log.warning("cannot set interop threads: %s", error)
    worker = Worker(torch, numpy, threads, node)
    log.info(
        "torch %s imported in %.0f ms, rss %s bytes",
        torch.__version__,
        (time.perf_counter() - started) * 1e3,
        worker.runtime_rss_bytes,
    )
    serve(worker, zmq, port)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
