"""The smallest memory limit at which a segment loads and runs, found by bisection.

Each probe starts a fresh worker container with the profile's CPU quota and thread count and
the candidate memory limit (no swap), loads the segment and runs it once. A probe fails when
the kernel OOM-kills the worker (as the container state records) or the worker does not start.
Fresh containers matter: a worker's resident memory only grows, so reusing one would measure
the largest segment seen so far.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from amp4ec.costs import MemoryProbe, MemorySearch
from amp4ec.errors import DockerError, WorkerError

MIB = 2**20
DEFAULT_RESOLUTION_BYTES = 16 * MIB
# A probe that cannot even start its worker waits this long before calling it failed.
PROBE_STARTUP_TIMEOUT_S = 60.0
PROBE_REQUEST_TIMEOUT_S = 20.0


def probe(client, image: str, run_id: str, profile, memory_bytes: int, name: str, blob: bytes, inputs: list[np.ndarray]) -> MemoryProbe:
    """Run segment ``name`` once in a fresh container limited to ``memory_bytes``."""
    from amp4ec.real.containers import NodeSpec as ContainerSpec
    from amp4ec.real.containers import WorkerCluster

    spec = ContainerSpec("probe", profile.cpus, memory_bytes, profile.torch_threads)
    cluster = WorkerCluster(
        client,
        [spec],
        image=image,
        run_id=run_id,
        startup_timeout_s=PROBE_STARTUP_TIMEOUT_S,
        request_timeout_s=PROBE_REQUEST_TIMEOUT_S,
        check_cores=False,
    )
    try:
        try:
            cluster.start()
        except DockerError as error:
            oom = "OOM-killed" in str(error)
            return MemoryProbe(segment=name, memory_bytes=memory_bytes, ran=False, oom_killed=oom, detail="worker did not start")
        worker = cluster["probe"]
        try:
            worker.load(name, blob)
            worker.run(name, inputs)
        except WorkerError as error:
            cluster.wait_for_stop(["probe"], error)
            oom = cluster.oom_killed("probe")
            return MemoryProbe(segment=name, memory_bytes=memory_bytes, ran=False, oom_killed=oom, detail=str(error)[:200])
        return MemoryProbe(segment=name, memory_bytes=memory_bytes, ran=True, oom_killed=False)
    finally:
        cluster.close()


def search_min_memory(
    client,
    image: str,
    run_id_prefix: str,
    profile,
    name: str,
    blob: bytes,
    inputs: list[np.ndarray],
    *,
    low_bytes: int,
    high_bytes: int,
    resolution_bytes: int = DEFAULT_RESOLUTION_BYTES,
    guess_bytes: int | None = None,
    log: Callable[[str], None],
) -> MemorySearch:
    """Bisect between ``low_bytes`` (assumed to fail) and ``high_bytes`` to ``resolution_bytes``.

    Without ``guess_bytes`` the upper bound is probed first: a segment that does not run
    there has no minimum. A guess between the bounds is probed first instead. If the segment
    runs there, the guess becomes the upper bound and the bisection starts from a much
    narrower bracket. If it does not, the guess becomes the lower bound and the upper bound
    is probed next.
    """
    probes: list[MemoryProbe] = []

    def attempt(memory_bytes: int) -> bool:
        result = probe(client, image, f"{run_id_prefix}-{len(probes)}", profile, memory_bytes, name, blob, inputs)
        probes.append(result)
        if result.oom_killed:
            log(f"memory search {profile.name}/{name}: OOM-killed at {memory_bytes / MIB:.0f} MiB")
        return result.ran

    low, high = low_bytes, high_bytes
    guess = None if guess_bytes is None else guess_bytes // MIB * MIB
    if guess is not None and low < guess < high and attempt(guess):
        high = guess
    else:
        if guess is not None and low < guess < high:
            low = guess
        if not attempt(high_bytes):
            return MemorySearch(segment=name, min_memory_bytes=None, resolution_bytes=resolution_bytes, probes=probes)
    while high - low > resolution_bytes:
        middle = (low + high) // 2 // MIB * MIB
        if middle <= low:
            break
        if attempt(middle):
            high = middle
        else:
            low = middle
    log(f"memory search {profile.name}/{name}: runs at {high / MIB:.0f} MiB, not at {low / MIB:.0f} MiB")
    return MemorySearch(segment=name, min_memory_bytes=high, resolution_bytes=resolution_bytes, probes=probes)
