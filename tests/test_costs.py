import json

import pytest

from amp4ec.costs import CostModel, load_calibration
from amp4ec.errors import FileFormatError

from synthetic import make_calibration


def test_segment_cost_sums_units():
    costs = CostModel(make_calibration([1.0, 2.0, 3.0]))
    cost = costs.segment_cost(0, 2, threads=1)
    assert cost.cpu_ms == pytest.approx(3.0)
    assert cost.parallelism == pytest.approx(1.0)


def test_segment_cost_rejects_empty_segment():
    costs = CostModel(make_calibration([1.0, 2.0]))
    with pytest.raises(ValueError, match="outside"):
        costs.segment_cost(1, 1, threads=1)


def test_transfer_time():
    assert CostModel.transfer_ms(1_000_000, 1e9, 0.5) == pytest.approx(8.5)


def test_calibration_round_trip(tmp_path):
    path = tmp_path / "c.json"
    make_calibration([1.0, 2.0]).save(path)
    assert load_calibration(path).graph.n_units == 2


def test_corrupt_calibration_rejected(tmp_path):
    path = tmp_path / "c.json"
    make_calibration([1.0, 2.0]).save(path)
    path.write_text(path.read_text()[:100])
    with pytest.raises(FileFormatError, match="corrupt or truncated"):
        load_calibration(path)


def test_other_schema_version_rejected(tmp_path):
    path = tmp_path / "c.json"
    make_calibration([1.0]).save(path)
    data = json.loads(path.read_text())
    data["schema"] = "amp4ec.calibration/99"
    path.write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match="recalibrate"):
        load_calibration(path)


def test_default_calibration_is_measured():
    calibration = load_calibration("default")
    assert calibration.graph.model == "mobilenet_v2"
    assert {p.name for p in calibration.profiles} >= {"high", "medium", "low"}
    assert calibration.provenance.worker_torch.startswith("2.13")
    for profile in calibration.profiles:
        assert all(u.wall.samples >= 5 for u in profile.units)
