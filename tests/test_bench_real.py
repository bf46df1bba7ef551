"""The pieces of `amp4ec bench real` that need no container."""

import numpy as np
import pytest

pytest.importorskip("zmq")

from amp4ec.real.bench import loopback_hops_ms, overhead_beyond_bandwidth


def test_overhead_removes_bandwidth_term():
    sizes = (10_000, 100_000, 400_000, 1_500_000)
    bandwidth_bps = 2e9
    hops_ms = np.array([0.3 + n * 8 / bandwidth_bps * 1e3 for n in sizes])
    overhead_ms, fitted_bps = overhead_beyond_bandwidth(sizes, hops_ms)
    assert fitted_bps == pytest.approx(bandwidth_bps, rel=1e-6)
    assert overhead_ms == pytest.approx([0.3] * 4, abs=1e-9)


def test_loopback_reference_grows_with_size():
    hops_ms = loopback_hops_ms((1_000, 4_000_000), repeats=5)
    assert hops_ms[0] > 0
    assert hops_ms[1] > hops_ms[0]
