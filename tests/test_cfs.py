import math
import statistics

import pytest

from amp4ec.sim.cfs import CfsCpu


def back_to_back(cpu: CfsCpu, work_ms: float, jobs: int, parallelism: float = 1.0) -> list[float]:
    latencies, time_ms = [], 0.0
    for _ in range(jobs):
        end_ms = cpu.run(time_ms, work_ms, parallelism)
        latencies.append(end_ms - time_ms)
        time_ms = end_ms
    return latencies


def test_idle_job_runs_at_full_speed():
    cpu = CfsCpu(0.4)
    assert cpu.run(0.0, 20.0) == pytest.approx(20.0)


def test_job_waits_for_next_period_when_quota_spent():
    cpu = CfsCpu(0.4)
    assert cpu.run(0.0, 40.0) == pytest.approx(40.0)
    # The 40 ms quota of period [0, 100) is spent, so the next job starts at 100.
    assert cpu.run(40.0, 10.0) == pytest.approx(110.0)


def test_wait_adds_cold_work():
    # 40 ms run in the first period's quota; the other 20 ms, plus 5 ms for cold caches, after the wait.
    assert CfsCpu(0.4).run(0.0, 60.0, cold_ms=5.0) == pytest.approx(125.0)
    assert CfsCpu(0.4).run(0.0, 30.0, cold_ms=5.0) == pytest.approx(30.0)
    # A job that waits before it starts pays nothing extra.
    cpu = CfsCpu(0.4)
    cpu.run(0.0, 40.0)
    assert cpu.run(40.0, 10.0, cold_ms=5.0) == pytest.approx(110.0)


def test_back_to_back_is_bimodal_with_quota_mean():
    latencies = back_to_back(CfsCpu(0.4), 20.0, 200)
    # Two 20 ms jobs fit in each 40 ms quota; every other job waits out the period: 20 and 80 ms.
    assert sorted({round(x) for x in latencies}) == [20, 80]
    assert statistics.mean(latencies) == pytest.approx(50.0, rel=0.02)


def test_long_run_throughput_equals_quota():
    cpu = CfsCpu(0.6)
    latencies = back_to_back(cpu, 7.0, 1000)
    assert sum(latencies) == pytest.approx(1000 * 7.0 / 0.6, rel=0.01)


def test_two_threads_drain_quota_twice_as_fast():
    latencies = back_to_back(CfsCpu(1.0, cores=2), 20.0, 100, parallelism=2.0)
    assert statistics.median(latencies) == pytest.approx(10.0)
    # 100 ms of quota lasts 50 ms of wall time on two threads, so some jobs wait 50 ms.
    assert max(latencies) == pytest.approx(60.0)


def test_parallelism_capped_by_cores():
    assert CfsCpu(4.0, cores=1).run(0.0, 20.0, parallelism=4.0) == pytest.approx(20.0)


def test_phase_shifts_period_boundaries():
    cpu = CfsCpu(0.4, phase_ms=30.0)
    cpu.run(30.0, 40.0)
    assert cpu.run(70.0, 10.0) == pytest.approx(140.0)


def test_invalid_cpus_rejected():
    with pytest.raises(ValueError, match="cpus must be positive"):
        CfsCpu(0.0)


def test_extreme_quotas_finish():
    # Cold work larger than the whole quota of a period, and a core count too large to measure.
    tiny = CfsCpu(0.004)
    end_ms = tiny.run(0.0, 16.0, 1.0, cold_ms=0.6)
    assert math.isfinite(end_ms)
    assert end_ms > 16.0 / 0.004
    huge = CfsCpu(1e300, cores=10**300)
    assert huge.run(5.0, 16.0, 1e300) == pytest.approx(5.0)
