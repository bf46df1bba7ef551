"""Record columns: the same table and summary as RequestRecord objects give."""

import math

import pandas as pd
import pyarrow as pa

from amp4ec.metrics import RECORD_SCHEMA, RequestRecord, records_table, summarise, summarise_arrays
from amp4ec.sim.records import COMPLETED, RecordColumns


def filled_columns() -> RecordColumns:
    columns = RecordColumns(3, ["a", "b"])
    for request_id, arrival_s in enumerate([0.0, 0.5, 1.0]):
        columns.arrival_s[request_id] = arrival_s
        columns.start_s[request_id] = arrival_s
    # Stages arrive interleaved between requests, as they finish in a run.
    columns.add_stage(0, 0, 0.0, 0.2, 150.0)
    columns.add_stage(1, 1, 0.5, 0.6, 90.0)
    columns.add_stage(0, 1, 0.2, 0.4, 120.0)
    columns.end_s[0] = 0.4
    columns.outcome[0] = COMPLETED
    columns.bytes_moved[0] = 800
    columns.fail(1, 0.7, "node b failed during stage s1")
    columns.retries[1] = 2
    columns.end_s[2] = 1.25
    columns.outcome[2] = COMPLETED
    return columns


def expected_records() -> list[RequestRecord]:
    first = RequestRecord(0, 0.0, start_s=0.0, bytes_moved=800)
    first.stage_nodes = ["a", "b"]
    first.stage_start_s = [0.0, 0.2]
    first.stage_end_s = [0.2, 0.4]
    first.stage_exec_ms = [150.0, 120.0]
    first.complete(0.4)
    second = RequestRecord(1, 0.5, start_s=0.5, retries=2)
    second.stage_nodes = ["b"]
    second.stage_start_s = [0.5]
    second.stage_end_s = [0.6]
    second.stage_exec_ms = [90.0]
    second.fail(0.7, "node b failed during stage s1")
    third = RequestRecord(2, 1.0, start_s=1.0)
    third.complete(1.25)
    return [first, second, third]


def test_columns_table_equals_records_table():
    table = filled_columns().to_table()
    assert table.schema == RECORD_SCHEMA
    # Compared as data frames, where NaN latencies of failed requests count as equal.
    pd.testing.assert_frame_equal(table.to_pandas(), records_table(expected_records()).to_pandas())


def test_columns_read_back_as_records():
    records = list(filled_columns())
    assert records == expected_records()
    assert records[1].reason == "node b failed during stage s1"
    assert math.isnan(records[1].latency_ms)


def test_columns_summary_equals_records_summary():
    columns = filled_columns()
    outcome = columns.outcome_array()
    summary = summarise_arrays(
        arrival_s=columns.float_column("arrival_s"),
        end_s=columns.float_column("end_s"),
        completed=outcome == COMPLETED,
        failure_reasons=[columns.reasons[i] for i in sorted(columns.reasons)],
        stages_per_node=columns.stage_counts_by_node(),
        node_busy_cpu_ms={"a": 150.0, "b": 210.0},
        node_cpus={"a": 1.0, "b": 0.5},
    )
    assert summary == summarise(expected_records(), {"a": 150.0, "b": 210.0}, {"a": 1.0, "b": 0.5})


def test_empty_columns_give_empty_table():
    table = RecordColumns(0, ["a"]).to_table()
    assert table.num_rows == 0
    assert table.schema == RECORD_SCHEMA
    assert isinstance(table.column("stage_nodes").type, pa.ListType)
