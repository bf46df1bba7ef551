"""Per-request records kept as columns while a simulation runs.

RequestRecord objects with four lists each take about 1.4 kB per 3-stage request (measured
with tracemalloc) and a Python allocation per field. Here each field is a typed
``array.array`` of 1 to 8 bytes per value, with no Python object per value. Request fields
are preallocated and indexed by request id. Stages are appended to flat columns with their
request id, and grouped per request when the table is built at the end.
"""

from __future__ import annotations

import math
from array import array
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from amp4ec.metrics import RECORD_SCHEMA, RequestRecord

PENDING, COMPLETED, FAILED = 0, 1, 2
OUTCOME_NAMES = ("pending", "completed", "failed")

# Bytes per request and per stage of the columns below, for the memory check before a run:
# 5 request columns of 8 bytes and 1 of 1 byte, and 5 stage columns of 8 or 4 bytes. The
# Parquet table built at the end stores each value once more, and the summary's latency and
# sort arrays a few more per request.
REQUEST_BYTES = 41 + 8 * 6
STAGE_BYTES = 36 + 8 * 4


class RecordColumns(Sequence[RequestRecord]):
    """Records of ``requests`` requests with ids ``0 .. requests - 1``, stored as columns.

    It is a sequence of :class:`RequestRecord` too, built one at a time on access, so code
    that reads a few records need not know the storage.
    """

    def __init__(self, requests: int, node_names: Sequence[str]):
        self.requests = requests
        self.node_names = list(node_names)
        self.arrival_s = array("d", [math.nan]) * requests
        self.start_s = array("d", [math.nan]) * requests
        self.end_s = array("d", [math.nan]) * requests
        self.outcome = array("b", [PENDING]) * requests
        self.bytes_moved = array("q", [0]) * requests
        self.retries = array("q", [0]) * requests
        self.reasons: dict[int, str] = {}
        """request id -> why it failed, for failed requests only"""
        self.stage_request = array("q")
        self.stage_node = array("i")
        self.stage_start_s = array("d")
        self.stage_end_s = array("d")
        self.stage_exec_ms = array("d")
        # The grouping of stages by request, with the stage count it was built for.
        self._grouped: tuple[int, np.ndarray, np.ndarray] | None = None

    def add_stage(self, request_id: int, node_index: int, start_s: float, end_s: float, exec_ms: float) -> None:
        self.stage_request.append(request_id)
        self.stage_node.append(node_index)
        self.stage_start_s.append(start_s)
        self.stage_end_s.append(end_s)
        self.stage_exec_ms.append(exec_ms)

    def fail(self, request_id: int, end_s: float, reason: str) -> None:
        self.end_s[request_id] = end_s
        self.outcome[request_id] = FAILED
        self.reasons[request_id] = reason

    # Reading

    def __len__(self) -> int:
        return self.requests

    def _stage_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the stage rows sorted by request (stable, so in stage order) and each request's offsets."""
        if self._grouped is None or self._grouped[0] != len(self.stage_request):
            request_ids = np.frombuffer(self.stage_request, dtype=np.int64) if len(self.stage_request) else np.empty(0, np.int64)
            order = np.argsort(request_ids, kind="stable")
            counts = np.bincount(request_ids, minlength=self.requests)
            offsets = np.zeros(self.requests + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            self._grouped = (len(self.stage_request), order, offsets)
        return self._grouped[1], self._grouped[2]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.requests))]
        if index < 0:
            index += self.requests
        if not 0 <= index < self.requests:
            raise IndexError(index)
        order, offsets = self._stage_groups()
        rows = order[offsets[index] : offsets[index + 1]].tolist()
        return RequestRecord(
            request_id=index,
            arrival_s=self.arrival_s[index],
            start_s=self.start_s[index],
            end_s=self.end_s[index],
            outcome=OUTCOME_NAMES[self.outcome[index]],
            reason=self.reasons.get(index, ""),
            bytes_moved=self.bytes_moved[index],
            stage_nodes=[self.node_names[self.stage_node[row]] for row in rows],
            stage_start_s=[self.stage_start_s[row] for row in rows],
            stage_end_s=[self.stage_end_s[row] for row in rows],
            stage_exec_ms=[self.stage_exec_ms[row] for row in rows],
            retries=self.retries[index],
        )

    def __iter__(self) -> Iterator[RequestRecord]:
        for index in range(self.requests):
            yield self[index]

    def outcome_array(self) -> np.ndarray:
        return np.frombuffer(self.outcome, dtype=np.int8)

    def float_column(self, name: str) -> np.ndarray:
        return np.frombuffer(getattr(self, name), dtype=np.float64)

    def stage_counts_by_node(self) -> dict[str, int]:
        """Stages run per node name, for nodes that ran at least one."""
        nodes = np.frombuffer(self.stage_node, dtype=np.int32) if len(self.stage_node) else np.empty(0, np.int32)
        counts = np.bincount(nodes, minlength=len(self.node_names))
        return {self.node_names[i]: int(counts[i]) for i in np.flatnonzero(counts)}

    def to_table(self) -> pa.Table:
        """Build the records.parquet table (RECORD_SCHEMA), one row per request in id order."""
        order, offsets = self._stage_groups()
        arrival_s = self.float_column("arrival_s")
        end_s = self.float_column("end_s")
        outcome = self.outcome_array()
        latency_ms = np.where(outcome == COMPLETED, (end_s - arrival_s) * 1e3, math.nan)
        # The schema's list type has 32-bit offsets: up to 2**31 - 1 stages in one run.
        list_offsets = pa.array(offsets.astype(np.int32))

        def stage_list(values: np.ndarray) -> pa.Array:
            return pa.ListArray.from_arrays(list_offsets, pa.array(values[order]))

        names = pa.array(self.node_names, type=pa.string())
        stage_nodes = np.frombuffer(self.stage_node, dtype=np.int32) if len(self.stage_node) else np.empty(0, np.int32)
        node_values = pa.DictionaryArray.from_arrays(pa.array(stage_nodes[order]), names).cast(pa.string())
        columns = {
            "request_id": pa.array(np.arange(self.requests, dtype=np.int64)),
            "arrival_s": pa.array(arrival_s),
            "start_s": pa.array(self.float_column("start_s")),
            "end_s": pa.array(end_s),
            "latency_ms": pa.array(latency_ms),
            "outcome": pa.DictionaryArray.from_arrays(pa.array(outcome), pa.array(OUTCOME_NAMES)).cast(pa.string()),
            "reason": pa.array([self.reasons.get(i, "") for i in range(self.requests)] if self.reasons else [""] * self.requests, type=pa.string()),
            "bytes_moved": pa.array(np.frombuffer(self.bytes_moved, dtype=np.int64)),
            "stage_nodes": pa.ListArray.from_arrays(list_offsets, node_values),
            "stage_start_s": stage_list(self.float_column("stage_start_s")),
            "stage_end_s": stage_list(self.float_column("stage_end_s")),
            "stage_exec_ms": stage_list(self.float_column("stage_exec_ms")),
            "retries": pa.array(np.frombuffer(self.retries, dtype=np.int64)),
        }
        return pa.Table.from_pydict(columns, schema=RECORD_SCHEMA)
