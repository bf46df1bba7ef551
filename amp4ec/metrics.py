"""The per-request record schema shared by sim and real, and the summary computed from it.

Definitions used in every summary:
- latency: from a request's arrival to the end of its last stage, completed requests only;
- throughput: completed requests divided by the time from the first arrival to the last
  completion.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

LATENCY_DEFINITION = "arrival of a request to the end of its last stage, completed requests only"
THROUGHPUT_DEFINITION = "completed requests / (last completion - first arrival)"

RECORD_SCHEMA = pa.schema(
    [
        ("request_id", pa.int64()),
        ("arrival_s", pa.float64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("latency_ms", pa.float64()),
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("bytes_moved", pa.int64()),
        ("stage_nodes", pa.list_(pa.string())),
        ("stage_start_s", pa.list_(pa.float64())),
        ("stage_end_s", pa.list_(pa.float64())),
        ("stage_exec_ms", pa.list_(pa.float64())),
        ("retries", pa.int64()),
    ]
)


@dataclass
class RequestRecord:
    """One request's fate. Times are seconds from the start of the run.

    A stage spans from the coordinator sending its input to receiving its output, transfers
    included; ``stage_exec_ms`` is the part the node spent running the segment, throttling
    included.
    """

    request_id: int
    arrival_s: float
    start_s: float = math.nan
    end_s: float = math.nan
    outcome: str = "pending"
    reason: str = ""
    bytes_moved: int = 0
    stage_nodes: list[str] = field(default_factory=list)
    stage_start_s: list[float] = field(default_factory=list)
    stage_end_s: list[float] = field(default_factory=list)
    stage_exec_ms: list[float] = field(default_factory=list)
    retries: int = 0
    """stage attempts repeated because a node failed or had left"""

    @property
    def latency_ms(self) -> float:
        return (self.end_s - self.arrival_s) * 1e3 if self.outcome == "completed" else math.nan

    def complete(self, end_s: float) -> None:
        self.end_s = end_s
        self.outcome = "completed"

    def fail(self, end_s: float, reason: str) -> None:
        self.end_s = end_s
        self.outcome = "failed"
        self.reason = reason


def records_table(records: list[RequestRecord]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in RECORD_SCHEMA.names}
    for record in records:
        for name in RECORD_SCHEMA.names:
            columns[name].append(record.latency_ms if name == "latency_ms" else getattr(record, name))
    return pa.Table.from_pydict(columns, schema=RECORD_SCHEMA)


def summarise(records: list[RequestRecord], node_busy_cpu_ms: dict[str, float], node_cpus: dict[str, float]) -> dict[str, Any]:
    """Compute latency percentiles, throughput and per-node utilisation from the records.

    A node's utilisation is the CPU time it spent over the CPU time its quota allowed during
    the run: ``busy_cpu_ms / (cpus * duration)``.
    """
    # Stage counts in one pass over the records, not one pass per node.
    stages_per_node: dict[str, int] = {}
    for record in records:
        for name in record.stage_nodes:
            stages_per_node[name] = stages_per_node.get(name, 0) + 1
    return summarise_arrays(
        arrival_s=np.array([r.arrival_s for r in records], dtype=float),
        end_s=np.array([r.end_s for r in records], dtype=float),
        completed=np.array([r.outcome == "completed" for r in records], dtype=bool),
        failure_reasons=[r.reason for r in records if r.outcome == "failed"],
        stages_per_node=stages_per_node,
        node_busy_cpu_ms=node_busy_cpu_ms,
        node_cpus=node_cpus,
    )


def summarise_arrays(
    *,
    arrival_s: np.ndarray,
    end_s: np.ndarray,
    completed: np.ndarray,
    failure_reasons: list[str],
    stages_per_node: dict[str, int],
    node_busy_cpu_ms: dict[str, float],
    node_cpus: dict[str, float],
) -> dict[str, Any]:
    """The summary of :func:`summarise`, from record columns: one entry per request, in record order.

    ``failure_reasons`` contains the reason of each failed request, in record order.
    """
    latencies = (end_s[completed] - arrival_s[completed]) * 1e3
    first_arrival = float(arrival_s.min()) if len(arrival_s) else 0.0
    last_end = float(end_s[completed].max()) if completed.any() else first_arrival
    duration_s = last_end - first_arrival

    def percentile(q: float) -> float | None:
        return float(np.percentile(latencies, q)) if len(latencies) else None

    reasons: dict[str, int] = {}
    for reason in failure_reasons:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "latency_ms": {
            "mean": float(latencies.mean()) if len(latencies) else None,
            "p50": percentile(50),
            "p95": percentile(95),
            "p99": percentile(99),
        },
        "throughput_rps": int(completed.sum()) / duration_s if duration_s > 0 else None,
        "requests": {"completed": int(completed.sum()), "failed": len(failure_reasons), "failure_reasons": reasons},
        "duration_s": duration_s,
        "nodes": {
            name: {
                "cpus": node_cpus[name],
                "busy_cpu_ms": node_busy_cpu_ms.get(name, 0.0),
                "utilisation": (node_busy_cpu_ms.get(name, 0.0) / (node_cpus[name] * duration_s * 1e3))
                if duration_s > 0
                else None,
                "stages": stages_per_node.get(name, 0),
            }
            for name in node_cpus
        },
        "definitions": {"latency": LATENCY_DEFINITION, "throughput": THROUGHPUT_DEFINITION},
    }


def write_run(directory: Path, records: Any, summary: dict[str, Any]) -> None:
    """Write records.parquet and summary.json; ``records`` is a list of RequestRecord or has ``to_table()``."""
    directory.mkdir(parents=True, exist_ok=True)
    table = records.to_table() if hasattr(records, "to_table") else records_table(records)
    pq.write_table(table, directory / "records.parquet")
    (directory / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")


def read_records(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()
