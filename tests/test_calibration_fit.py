"""The fitted cost model, leave-one-profile-out validation and the calibrate subcommands, on synthetic files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from amp4ec.calibrate.fit import FittedCostModel, leave_one_out, summarise
from amp4ec.calibrate.measure import BACK_TO_BACK_PARTS, DEFAULT_MIN_WINDOW_MS, RepeatPolicy, ci95_rel, measure
from amp4ec.cli import main
from amp4ec.costs import CALIBRATION_SCHEMA, Measurement, MemoryProbe, MemorySearch, load_calibration
from amp4ec.sim.cfs import CfsCpu

from synthetic import make_calibration

PROFILES = (("high", 1.0, 1), ("medium", 0.6, 1), ("low", 0.4, 1))
WORK_MS = [1.0, 3.0, 8.0, 15.0, 30.0]


def simulated_measurement(work_ms: float, cpus: float, gap_ms: float, rng, *, runs: int = 40, rate: float = 0.95, cores: int = 1) -> Measurement:
    """Samples as a container with an ideal CFS quota on ``cores`` cores would produce them, with 2 % noise in the work."""
    cpu_ms = work_ms * rng.lognormal(0.0, 0.02, size=runs)
    walls = []
    if gap_ms:
        for cpu in cpu_ms:
            walls.append(CfsCpu(cpus, cores=cores, phase_ms=rng.uniform(0, 100)).run(0.0, cpu, rate))
    else:
        # Back to back, each part starts with a full quota and runs until it spans its share of
        # the window, as measure_back_to_back_interleaved() does.
        cpu_ms = list(cpu_ms)
        turns = []
        for _ in range(BACK_TO_BACK_PARTS):
            quota = CfsCpu(cpus, cores=cores, phase_ms=rng.uniform(0, 100))
            now = 0.0
            for _ in range(3):
                now = quota.run(now, work_ms, rate) + 0.02
            part_ms = 0.0
            part_runs = 0
            while part_ms < DEFAULT_MIN_WINDOW_MS / BACK_TO_BACK_PARTS or part_runs < runs // BACK_TO_BACK_PARTS:
                if len(walls) == len(cpu_ms):
                    cpu_ms.append(work_ms * rng.lognormal(0.0, 0.02))
                end = quota.run(now, cpu_ms[len(walls)], rate)
                walls.append(end - now)
                part_ms += end - now
                part_runs += 1
                now = end + 0.02
            turns.append(part_runs)
        return Measurement(gap_ms=gap_ms, wall_ms=walls, cpu_ms=list(cpu_ms), ci95_rel=0.01, converged=True, turns=turns)
    return Measurement(gap_ms=gap_ms, wall_ms=walls, cpu_ms=list(cpu_ms), ci95_rel=0.01, converged=True)


def synthetic_measured_calibration(seed: int = 0, speed: dict[str, float] | None = None):
    """A schema-2 calibration whose raw samples come from the CFS model with known work per unit.

    ``speed`` slows a profile's machine down by a factor, reference time included, as drift would.
    """
    rng = np.random.default_rng(seed)
    calibration = make_calibration(WORK_MS, profiles=PROFILES)
    for profile in calibration.profiles:
        factor = (speed or {}).get(profile.name, 1.0)
        profile.reference_cpu_ms = [factor * sum(WORK_MS)] * 2
        for timing, work in [*zip(profile.units, WORK_MS), (profile.model, sum(WORK_MS))]:
            timing.spaced = simulated_measurement(factor * work, profile.cpus, 100.0, rng)
            timing.saturated = simulated_measurement(factor * work, profile.cpus, 0.0, rng, runs=60)
    return calibration


def test_ci95_rel_shrinks_with_more_samples():
    rng = np.random.default_rng(1)
    few, many = rng.normal(10, 1, 10), rng.normal(10, 1, 1000)
    assert ci95_rel(many) < ci95_rel(few)
    assert ci95_rel(many) == pytest.approx(1.96 * 1 / np.sqrt(1000) / 10, rel=0.15)
    assert ci95_rel([5.0]) == float("inf")


class FakeWorker:
    """A worker whose profile op returns noisy samples, to test when repetition stops."""

    def __init__(self, noise: float, throttled: bool = True):
        self.rng = np.random.default_rng(0)
        self.noise = noise
        self.throttled = throttled
        self.requests = []

    def profile(self, segment_id, inputs, *, warmup, repeats, gap_ms):
        self.requests.append(repeats)
        # Times are positive however noisy, as a clock delta is.
        values = list(np.maximum(0.1, 10 * (1 + self.noise * self.rng.standard_normal(repeats))))
        throttled = len(self.requests) if self.throttled else 0
        stat = {"nr_periods": 10 * len(self.requests), "nr_throttled": throttled, "throttled_time": 1_000_000 * len(self.requests)}
        before = {
            "nr_periods": stat["nr_periods"] - 10,
            "nr_throttled": stat["nr_throttled"] - (1 if self.throttled else 0),
            "throttled_time": stat["throttled_time"] - 1_000_000,
        }
        return {"wall_ms": values, "cpu_ms": values, "cpu_stat_before": before, "cpu_stat_after": stat, "peak_rss_bytes": 123}


def test_measure_stops_when_precise_and_at_max_count():
    quiet = FakeWorker(noise=0.001)
    result = measure(quiet, "u", [], gap_ms=0.0001, warmup=0, policy=RepeatPolicy(min_repeats=10, max_repeats=60, batch=10))
    assert len(result.wall_ms) == 10
    assert result.converged
    assert result.ci95_rel <= 0.02

    noisy = FakeWorker(noise=0.5)
    result = measure(noisy, "u", [], gap_ms=0.0001, warmup=0, policy=RepeatPolicy(min_repeats=10, max_repeats=35, batch=10))
    assert len(result.wall_ms) == 35
    assert not result.converged
    assert noisy.requests == [10, 10, 10, 5]
    assert result.cpu_stat.nr_throttled == 4
    assert result.cpu_stat.nr_periods == 40
    assert result.cpu_stat.throttled_ms == pytest.approx(4.0)


def test_measure_back_to_back_fills_window():
    # Runs of 10 ms back to back: precise after 10 runs, but the window needs 1 s of runs.
    quiet = FakeWorker(noise=0.001)
    policy = RepeatPolicy(min_repeats=10, max_repeats=60, batch=10, min_window_ms=1000.0)
    result = measure(quiet, "u", [], gap_ms=0.0, warmup=0, policy=policy)
    assert sum(result.wall_ms) >= 1000.0
    assert len(result.wall_ms) <= 101
    assert quiet.requests[0] == 10
    # The probe, then the rest of the window in quarters.
    assert len(quiet.requests) == 5
    assert result.converged

    # Throttled runs take 2.5 times as long after the probe: the window still ends close to 1 s.
    class SlowingDown(FakeWorker):
        def profile(self, *args, **kwargs):
            reply = super().profile(*args, **kwargs)
            if len(self.requests) > 1:
                reply["wall_ms"] = [2.5 * value for value in reply["wall_ms"]]
            return reply

    slowing = SlowingDown(noise=0.001)
    window_only = RepeatPolicy(min_repeats=10, max_repeats=10, batch=10, min_window_ms=1000.0)
    result = measure(slowing, "u", [], gap_ms=0.0, warmup=0, policy=window_only)
    assert 1000.0 <= sum(result.wall_ms) < 1300.0

    # Never throttled: two periods of runs are enough.
    unthrottled = FakeWorker(noise=0.001, throttled=False)
    result = measure(unthrottled, "u", [], gap_ms=0.0, warmup=0, policy=policy)
    assert 200.0 <= sum(result.wall_ms) < 1000.0


def test_measured_precision_resamples_whole_turns():
    from amp4ec.calibrate.fit import measured_ci_rel

    # Six turns of 100 runs each, three at one machine speed and three 40 % slower: the runs
    # of a turn agree closely, so only resampling whole turns shows how uncertain the mean is.
    rng = np.random.default_rng(2)
    levels = [1.0, 1.4, 1.0, 1.4, 1.4, 1.0]
    samples = np.concatenate([level * rng.normal(1.0, 0.01, 100) for level in levels])
    by_run = measured_ci_rel(samples, "mean", seed=0)
    by_turn = measured_ci_rel(samples, "mean", seed=0, turns=[100] * 6)
    assert by_run < 0.02
    assert by_turn > 0.05
    with pytest.raises(ValueError, match="turns add up to 599 runs but wall_ms has 600"):
        Measurement(gap_ms=0.0, wall_ms=list(samples), cpu_ms=list(samples), ci95_rel=0.1, converged=False, turns=[100] * 5 + [99])


def test_predicted_chains_follow_recorded_turns():
    from amp4ec.calibrate.fit import chain_design

    six = Measurement(gap_ms=0.0, wall_ms=[1.0] * 600, cpu_ms=[1.0] * 600, ci95_rel=0.01, converged=True, turns=[100] * 6)
    assert chain_design(six) == {"window_ms": 100.0, "min_runs": 2}
    # A file from before turns were recorded measured three.
    unrecorded = six.model_copy(update={"turns": None})
    assert chain_design(unrecorded) == {"window_ms": 200.0, "min_runs": 4}


def test_fit_recovers_work_and_predicts_throttling():
    calibration = synthetic_measured_calibration()
    model = FittedCostModel.fit(calibration.profiles[:2], threads=1, host_cores=2)
    assert model.cpu_ms("spaced", 1.0)[: len(WORK_MS)] == pytest.approx(WORK_MS, rel=0.03)
    assert model.rate["spaced"] == pytest.approx(0.95, rel=0.02)
    # 30 ms of work at 0.4 CPU back to back: 40 ms of quota per 100 ms period, so the mean
    # wall time is the work over the quota's share.
    walls = model.predict_wall(4, "saturated", cpus=0.4, window_ms=6000.0)
    assert np.mean(walls) == pytest.approx(30.0 / 0.4, rel=0.05)
    # Spaced apart, a 30 ms job fits one period's 40 ms quota and is never throttled.
    assert np.max(model.predict_wall(4, "spaced", cpus=0.4)) < 34


def test_back_to_back_keeps_its_own_rate():
    """2-thread forwards keep one core busy after an idle gap and 1.4 back to back: each regime predicts with its own."""
    rng = np.random.default_rng(4)
    calibration = make_calibration(WORK_MS, profiles=(("double", 2.0, 2), ("pair", 1.0, 2)))
    for profile in calibration.profiles:
        for timing, work in [*zip(profile.units, WORK_MS), (profile.model, sum(WORK_MS))]:
            timing.spaced = simulated_measurement(work, profile.cpus, 100.0, rng, rate=1.0, cores=2)
            timing.saturated = simulated_measurement(work, profile.cpus, 0.0, rng, runs=60, rate=1.4, cores=2)
    model = FittedCostModel.fit([calibration.profile("double")], threads=2, host_cores=2)

    assert model.rate["spaced"] == pytest.approx(1.0, rel=0.02)
    # The whole model (57 ms) is over a fifth of the 200 ms quota, too long to show its rate back to back.
    assert model.rate["saturated"][: len(WORK_MS)] == pytest.approx(1.4, rel=0.02)
    assert model.rate["saturated"][-1] == pytest.approx(1.0, rel=0.02)
    # 3 ms of work back to back on 2 unthrottled CPUs.
    assert np.mean(model.predict_wall(1, "saturated", cpus=2.0)) == pytest.approx(3.0 / 1.4, rel=0.03)
    assert np.mean(model.predict_wall(1, "spaced", cpus=2.0)) == pytest.approx(3.0, rel=0.03)


def quota_exponent_calibration(betas: dict[int, float], profiles, seed: int = 3):
    """Simulated samples whose work doubles with two threads and changes with the quota as ``cpus ** betas[threads]``."""
    rng = np.random.default_rng(seed)
    calibration = make_calibration(WORK_MS, profiles=profiles)
    for profile in calibration.profiles:
        factor = profile.threads * profile.cpus ** betas[profile.threads]
        for timing, work in [*zip(profile.units, WORK_MS), (profile.model, sum(WORK_MS))]:
            timing.spaced = simulated_measurement(factor * work, profile.cpus, 100.0, rng)
            timing.saturated = simulated_measurement(factor * work, profile.cpus, 0.0, rng, runs=60)
    return calibration


def test_shared_beta_predicts_other_quota():
    """A 2-thread profile measured at one quota predicts another through the 1-thread profiles' beta."""
    calibration = quota_exponent_calibration({1: -0.2, 2: -0.2}, (*PROFILES, ("double", 2.0, 2), ("pair", 1.0, 2)))
    training = [p for p in calibration.profiles if p.name != "pair"]
    model = FittedCostModel.fit(training, threads=2, host_cores=2)
    assert model.work.beta("spaced", 2) == pytest.approx(-0.2, abs=0.03)
    predicted = model.cpu_ms("spaced", 1.0)[: len(WORK_MS)]
    assert predicted == pytest.approx([2 * 1.0**-0.2 * w for w in WORK_MS], rel=0.03)


def test_thread_count_keeps_its_own_beta():
    """Two 2-thread quotas fit that thread count's own exponent, which the 1-thread profiles do not share."""
    profiles = (*PROFILES, ("double", 2.0, 2), ("wide", 1.5, 2), ("pair", 1.0, 2))
    calibration = quota_exponent_calibration({1: 0.0, 2: -0.4}, profiles)
    training = [p for p in calibration.profiles if p.name != "pair"]
    model = FittedCostModel.fit(training, threads=2, host_cores=2)
    assert model.work.beta("spaced", 2) == pytest.approx(-0.4, abs=0.05)
    assert model.work.beta("spaced", 1) == pytest.approx(0.0, abs=0.03)
    # The exponent pooled over the training profiles follows the 1-thread majority and would miss pair by over 10 %.
    assert model.work.slopes["spaced"]["beta"] > -0.2
    assert model.cpu_ms("spaced", 1.0)[: len(WORK_MS)] == pytest.approx([2 * w for w in WORK_MS], rel=0.03)
    summary = summarise(leave_one_out(calibration))
    assert summary["per profile"]["pair"]["within_10pct"] >= 0.9


def test_leave_one_out_ideal_cfs_data():
    summary = summarise(leave_one_out(synthetic_measured_calibration()))
    assert summary["all"]["predictions"] == 3 * (len(WORK_MS) + 1) * 2 * 2
    assert summary["mean"]["within_10pct"] >= 0.99
    assert summary["all"]["within_10pct"] >= 0.9


def test_leave_one_out_detects_a_wrong_throttling_model():
    """Data whose low profile was not throttled as CFS would: validation must report it."""
    calibration = synthetic_measured_calibration()
    for timing in calibration.profile("low").units + [calibration.profile("low").model]:
        timing.saturated.wall_ms = list(np.asarray(timing.saturated.cpu_ms) / 0.95)
    summary = summarise(leave_one_out(calibration))
    assert summary["per profile"]["low"]["within_10pct"] < 0.8


def test_normalise_removes_machine_drift():
    calibration = synthetic_measured_calibration(speed={"medium": 1.25})
    raw = summarise(leave_one_out(calibration))
    normalised = summarise(leave_one_out(calibration, normalise=True))
    assert raw["per profile"]["medium"]["within_10pct"] < 0.5
    assert normalised["per profile"]["medium"]["within_10pct"] >= 0.9
    assert normalised["all"]["within_10pct"] > raw["all"]["within_10pct"]


def test_memory_search_predicts_oom():
    calibration = synthetic_measured_calibration()
    probes = [MemoryProbe(segment="u4", memory_bytes=300 * 2**20, ran=False, oom_killed=True)]
    calibration.profiles[0].memory_search = [MemorySearch(segment="u4", min_memory_bytes=400 * 2**20, resolution_bytes=2**24, probes=probes)]
    model = FittedCostModel.fit(calibration.profiles, threads=1, host_cores=2)
    assert model.predict_wall(4, "spaced", cpus=1.0, memory_bytes=350 * 2**20) is None
    assert model.predict_wall(4, "spaced", cpus=1.0, memory_bytes=500 * 2**20) is not None


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calibration.json"
    synthetic_measured_calibration().save(path)
    return path


def test_validate_show_plot_commands(calibration_file, tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", "validate", str(calibration_file), "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert "aim: 99 % within 10 %" in result.output
    assert "profile low" in result.output
    summary = json.loads((tmp_path / "v.json").read_text())
    assert summary["all"]["predictions"] == len(summary["comparisons"]) > 0
    assert summary["extrapolated"] == []
    assert summary["pooled_quota_exponent"] == summary["no_quota_exponent"] == []
    assert summary["aim"]["within_5pct"] == 0.90
    assert summary["aim"]["within_10pct"] == 0.99
    meets_aim = summary["all"]["within_5pct"] >= 0.90 and summary["all"]["within_10pct"] >= 0.99
    assert summary["aim"]["met"] == meets_aim

    data = json.loads(calibration_file.read_text())
    data["profiles"][2]["threads"] = 2
    lonely = tmp_path / "lonely.json"
    lonely.write_text(json.dumps(data))
    result = runner.invoke(main, ["calibrate", "validate", str(lonely), "--json", str(tmp_path / "v2.json")])
    assert result.exit_code == 0, result.output
    assert "Profile low (2 threads) is the only one with its thread count" in " ".join(result.output.split())
    assert json.loads((tmp_path / "v2.json").read_text())["extrapolated"] == ["low"]
    # Either remaining 1-thread profile, held out, leaves the other at a single quota. Its
    # training profiles then differ in quota and threads together, so no quota exponent is fitted.
    lonely_summary = json.loads((tmp_path / "v2.json").read_text())
    assert lonely_summary["no_quota_exponent"] == ["high", "medium"]
    assert lonely_summary["pooled_quota_exponent"] == []
    caption = " ".join(result.output.split())
    assert "Held out, each of profiles high and medium leaves its thread count at a single other quota" in caption
    assert "takes CPU work as the same at every quota" in caption

    result = runner.invoke(main, ["calibrate", "show", str(calibration_file)])
    assert result.exit_code == 0, result.output
    assert "u3" in result.output
    assert "medium" in result.output

    # The PNG goes to the current directory, not beside FILE (the shipped file lies in the package).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(main, ["calibrate", "plot", str(calibration_file)])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not calibration_file.with_suffix(".png").exists()
    # An existing PNG is replaced only with --force, and FILE itself never.
    result = runner.invoke(main, ["calibrate", "plot", str(calibration_file)])
    assert result.exit_code == 2
    assert "pass --force to replace it" in result.output
    assert runner.invoke(main, ["calibrate", "plot", str(calibration_file), "--force"]).exit_code == 0
    before = calibration_file.read_bytes()
    result = runner.invoke(main, ["calibrate", "plot", str(calibration_file), "--out", str(calibration_file), "--force"])
    assert result.exit_code == 2
    assert "is FILE itself" in result.output
    assert calibration_file.read_bytes() == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda data: data["profiles"][0]["units"][0]["spaced"]["cpu_ms"].__setitem__(0, float("nan")), "finite"),
        (lambda data: data["profiles"][0]["units"][0]["spaced"]["wall_ms"].__setitem__(0, -1.0), "greater than or equal to 0"),
        (lambda data: data["profiles"][0]["units"][0]["saturated"]["cpu_ms"].pop(), "each run needs both"),
        (lambda data: data["profiles"][1].__setitem__("name", data["profiles"][0]["name"]), "appears more than once"),
        (
            lambda data: data["profiles"][0]["units"][1]["saturated"]["turns"].__setitem__(0, 1),
            "profile 'high' unit 'u1' saturated: turns add up to",
        ),
        (lambda data: data["profiles"][0]["units"][0]["saturated"].__setitem__("turns", ["9"] * 6), "valid integer"),
        (lambda data: data["profiles"][0]["units"][0]["spaced"].__setitem__("turns", [40]), "only back-to-back"),
    ],
)
def test_invalid_samples_rejected(tmp_path, calibration_file, change, message):
    data = json.loads(calibration_file.read_text())
    change(data)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["calibrate", "validate", str(broken)])
    assert result.exit_code == 2
    assert message in result.output
    # The error is one line.
    assert result.output.strip().count("\n") == 0, result.output


def test_unwritable_outputs_rejected_first(tmp_path, calibration_file):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args in (
        ["calibrate", "validate", str(calibration_file), "--json", str(tmp_path / "missing" / "v.json")],
        ["calibrate", "validate", str(calibration_file), "--json", str(tmp_path)],
        ["calibrate", "plot", str(calibration_file), "--out", str(blocker / "x.png")],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        # Rejected before any work: no table printed.
        assert "within 5 %" not in result.output


def test_bad_profile_and_gap_are_one_line(tmp_path):
    from amp4ec.calibrate.run import parse_profiles
    from amp4ec.errors import UsageError

    with pytest.raises(UsageError, match=r"profile 'x:0:512' is invalid: cpus: input should be greater than or equal to 0.01$"):
        parse_profiles(["x:0:512"])
    with pytest.raises(UsageError, match=r"profile 'x:1:abc' is invalid: memory_mb is 'abc', expected a number$"):
        parse_profiles(["x:1:abc"])
    with pytest.raises(UsageError, match=r"profile 'x:1:512:1.5' is invalid: threads is '1.5', expected a whole number$"):
        parse_profiles(["x:1:512:1.5"])
    # Docker refuses a quota above the host's CPU count only once a container is created.
    with pytest.raises(UsageError, match=r"asks for 512 CPUs but this host has \d+; give at most"):
        parse_profiles(["x:512:512"])
    with pytest.raises(UsageError, match=r"asks for 1e\+12 MiB but this host has \d+ MiB; give at most"):
        parse_profiles(["x:1.0:1e12"])
    with pytest.raises(UsageError, match=r"asks for 1000 torch threads but this host has \d+ cores; .* give at most"):
        parse_profiles(["x:1.0:512:1000"])
    # A finished calibration is not replaced by a repeated command.
    earlier = tmp_path / "earlier.json"
    earlier.write_text("earlier")
    result = CliRunner().invoke(main, ["calibrate", "--out", str(earlier)])
    assert result.exit_code == 2
    assert f"{earlier}: exists; choose another --out, or pass --force" in " ".join(result.output.split())
    assert earlier.read_text() == "earlier"
    result = CliRunner().invoke(main, ["calibrate", "--gap-ms", "nan", "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 2
    assert "--gap-ms must be a finite number" in result.output
    result = CliRunner().invoke(main, ["calibrate", "--gap-ms", "40000", "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 2
    assert "--gap-ms is 40000, more than 5000" in result.output
    result = CliRunner().invoke(main, ["calibrate", "--gap-ms", "5000.0001", "--out", str(tmp_path / "c.json")])
    assert "--gap-ms is 5000.0001, more than 5000" in result.output
    result = CliRunner().invoke(main, ["calibrate", "--max-turns", "3", "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 2
    assert "--max-turns is 3, but every back-to-back window takes 6 turns" in result.output
    result = CliRunner().invoke(main, ["calibrate", "--max-turns", "1000000000", "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 2
    assert "--max-turns is 1000000000, more than 300" in result.output
    assert not (tmp_path / "c.json").exists()


def test_schema_versions_load_or_fail(tmp_path, calibration_file):
    data = json.loads(calibration_file.read_text())
    assert data["schema"] == CALIBRATION_SCHEMA
    data["schema"] = "amp4ec.calibration/1"
    for timing in [u for p in data["profiles"] for u in [*p["units"], p["model"]]]:
        del timing["spaced"], timing["saturated"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    assert load_calibration(old).profiles[0].units[0].spaced is None
    result = CliRunner().invoke(main, ["calibrate", "validate", str(old)])
    assert result.exit_code == 0, result.output

    data["schema"] = "amp4ec.calibration/99"
    future = tmp_path / "future.json"
    future.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["calibrate", "show", str(future)])
    assert result.exit_code == 2
    assert "amp4ec.calibration/99" in result.output
    assert "upgrade amp4ec" in result.output

    data["schema"] = "amp4ec.calibration/0"
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["calibrate", "show", str(unknown)])
    assert result.exit_code == 2
    assert "recalibrate" in result.output

    # Turns came with schema 4, so an older file that has them was edited by hand.
    data = json.loads(calibration_file.read_text())
    data["schema"] = "amp4ec.calibration/3"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["calibrate", "show", str(edited)])
    assert result.exit_code == 2
    assert "unit 'u0' has saturated.turns, which amp4ec.calibration/3 files do not have" in result.output

    # Pauses came with schema 5.
    data = json.loads(calibration_file.read_text())
    data["schema"] = "amp4ec.calibration/4"
    data["profiles"][0]["idle_gaps"] = [{"gap_ms": 10.0, "wall_ms": [5.0, 5.0], "cpu_ms": [5.0, 5.0], "ci95_rel": 0.0, "converged": True}]
    edited.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["calibrate", "show", str(edited)])
    assert result.exit_code == 2
    assert "profile 'high' has idle_gaps, which amp4ec.calibration/4 files do not have" in " ".join(result.output.split())

    # A memory search's own provenance came with schema 6; show prints it.
    data = json.loads(calibration_file.read_text())
    data["memory_provenance"] = {"date": "2026-01-02T03:04:05", "amp4ec_version": "0", "host_cpu": "Other CPU", "image": "i", "command": "c"}
    edited.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["calibrate", "show", str(edited)])
    assert result.exit_code == 0, result.output
    assert "memory searched 2026-01-02T03:04:05 on Other CPU" in " ".join(result.output.split())
    data["schema"] = "amp4ec.calibration/5"
    edited.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["calibrate", "show", str(edited)])
    assert result.exit_code == 2
    assert "it has memory_provenance, which amp4ec.calibration/5 files do not have" in " ".join(result.output.split())

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(calibration_file.read_text()[:100])
    result = CliRunner().invoke(main, ["calibrate", "plot", str(corrupt)])
    assert result.exit_code == 2
    assert "corrupt" in result.output


def test_calibrate_without_out_is_a_usage_error():
    result = CliRunner().invoke(main, ["calibrate", "--repeats", "3"])
    assert result.exit_code == 2
    assert "--out" in result.output


def test_validate_needs_two_profiles(tmp_path):
    path = tmp_path / "one.json"
    make_calibration([1.0, 2.0], profiles=(("only", 1.0, 1),)).save(path)
    result = CliRunner().invoke(main, ["calibrate", "validate", str(path)])
    assert result.exit_code == 2
    assert "at least two" in result.output


class ClockedWorker:
    """A worker that records when each single-run request arrives, for the interleaved spaced regime."""

    def __init__(self, name: str, log: list, noise: float = 0.001):
        self.name = name
        self.log = log
        self.rng = np.random.default_rng(len(name))
        self.noise = noise

    def profile(self, segment_id, inputs, *, warmup, repeats, gap_ms):
        import time

        self.log.append((self.name, time.perf_counter(), warmup, repeats, gap_ms))
        values = list(5 * (1 + self.noise * self.rng.standard_normal(repeats)))
        return {"wall_ms": values, "cpu_ms": values, "peak_rss_bytes": 7}


def test_spaced_interleaved_round_robin_keeps_gaps():
    from amp4ec.calibrate.measure import measure_spaced_interleaved

    log: list = []
    workers = {name: ClockedWorker(name, log) for name in ("a", "b", "c")}
    policy = RepeatPolicy(min_repeats=4, max_repeats=8, batch=2)
    results = measure_spaced_interleaved(workers, "u", [], gap_ms=30.0, warmup=2, policy=policy)
    assert [entry[0] for entry in log[:3]] == ["a", "b", "c"]
    assert all(entry[2] == 1 and entry[3] == 1 for entry in log[:3])
    timed = log[3:]
    # Quiet samples are precise after the minimum count, so four rounds, each started by the next worker.
    assert [entry[0] for entry in timed] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(entry[2] == 0 and entry[4] == 0.0 for entry in timed)
    for name in workers:
        times = [entry[1] for entry in log if entry[0] == name]
        assert min(np.diff(times)) >= 0.030
        assert len(results[name].wall_ms) == 4
        assert results[name].converged
    # Three workers share each gap, so four rounds take about four gaps, not twelve.
    assert timed[-1][1] - log[0][1] < 12 * 0.030


def test_back_to_back_interleaved_takes_turns():
    from amp4ec.calibrate.measure import measure_back_to_back_interleaved

    workers = {name: FakeWorker(noise=0.001) for name in ("a", "b", "c")}
    order = []
    for name, worker in workers.items():
        profile = worker.profile

        def logged(*args, _name=name, _profile=profile, **kwargs):
            order.append(_name)
            return _profile(*args, **kwargs)

        worker.profile = logged
    policy = RepeatPolicy(min_repeats=10, max_repeats=60, batch=10, min_window_ms=900.0)
    results = measure_back_to_back_interleaved(workers, "u", [], warmup=2, policy=policy, parts=3, start=1)
    turns = [name for index, name in enumerate(order) if index == 0 or order[index - 1] != name]
    assert turns == ["b", "c", "a", "c", "a", "b", "a", "b", "c"]
    for worker in workers.values():
        # Each part is a window of 300 ms of 10 ms runs, opened by a probe of four runs.
        assert worker.requests.count(4) == 3
        assert sum(worker.requests) >= 90
    for name, result in results.items():
        assert len(result.wall_ms) == sum(workers[name].requests)
        assert len(result.turns) == 3
        assert sum(result.turns) == len(result.wall_ms)
        assert sum(result.wall_ms) >= 900.0
        assert result.cpu_stat.nr_throttled == len(workers[name].requests)
        assert result.converged


def test_later_turns_span_window_after_throttling():
    from amp4ec.calibrate.measure import measure_back_to_back_interleaved

    class ThrottledOnce(FakeWorker):
        """Throttled in the first request only, as a quota can be at one phase of the period and not another."""

        def profile(self, *args, **kwargs):
            reply = super().profile(*args, **kwargs)
            self.throttled = False
            return reply

    worker = ThrottledOnce(noise=0.001)
    policy = RepeatPolicy(min_repeats=10, max_repeats=60, batch=10, min_window_ms=1200.0)
    result = measure_back_to_back_interleaved({"a": worker}, "u", [], warmup=0, policy=policy, parts=3)["a"]
    # Every turn spans its 400 ms share of the window, not just the 200 ms probe.
    spans = [sum(turn) for turn in np.split(np.asarray(result.wall_ms), np.cumsum(result.turns)[:-1])]
    assert min(spans) >= 400.0, spans


def test_spaced_interleaved_stops_at_max_rounds():
    from amp4ec.calibrate.measure import measure_spaced_interleaved

    log: list = []
    workers = {"quiet": ClockedWorker("quiet", log), "noisy": ClockedWorker("noisy", log, noise=0.5)}
    policy = RepeatPolicy(min_repeats=4, max_repeats=9, batch=2)
    results = measure_spaced_interleaved(workers, "u", [], gap_ms=1.0, warmup=0, policy=policy)
    assert len(results["quiet"].wall_ms) == 9
    assert len(results["noisy"].wall_ms) == 9
    assert not results["noisy"].converged
    assert results["quiet"].converged


@pytest.mark.parametrize(
    ("guess_mib", "first_probes"),
    [(None, [1024]), (400, [400]), (250, [250, 1024])],
)
def test_memory_search_starts_from_guess(monkeypatch, guess_mib, first_probes):
    from amp4ec.calibrate import memory
    from amp4ec.scenario import NodeSpec

    mib = memory.MIB
    need_bytes = 300 * mib

    def fake_probe(client, image, run_id, profile, memory_bytes, name, blob, inputs):
        runs = memory_bytes >= need_bytes
        return MemoryProbe(segment=name, memory_bytes=memory_bytes, ran=runs, oom_killed=not runs)

    monkeypatch.setattr(memory, "probe", fake_probe)
    result = memory.search_min_memory(
        None, "image", "run", NodeSpec(name="p", cpus=1.0, memory_mb=1024), "u", b"", [],
        low_bytes=200 * mib, high_bytes=1024 * mib, guess_bytes=None if guess_mib is None else guess_mib * mib, log=lambda _: None,
    )  # fmt: skip
    assert [p.memory_bytes // mib for p in result.probes[: len(first_probes)]] == first_probes
    assert need_bytes <= result.min_memory_bytes < need_bytes + memory.DEFAULT_RESOLUTION_BYTES
    if guess_mib == 400:
        # The narrower bracket needs fewer probes than starting from the profile's limit.
        assert len(result.probes) < 6


def test_turn_precision_counts_turns_not_runs():
    from amp4ec.calibrate.fit import measured_ci_rel
    from amp4ec.calibrate.measure import turn_ci95_rel

    rng = np.random.default_rng(2)
    levels = [1.0, 1.4, 1.0, 1.4, 1.4, 1.0]
    samples = np.concatenate([level * rng.normal(1.0, 0.01, 100) for level in levels])
    by_turn = turn_ci95_rel(samples, [100] * 6)
    assert ci95_rel(samples) < 0.02
    # Student's t over six turns is a little wider than the bootstrap of the same turns.
    assert by_turn == pytest.approx(measured_ci_rel(samples, "mean", seed=0, turns=[100] * 6), rel=0.5)
    assert by_turn > 0.1
    assert turn_ci95_rel(samples, [600]) == float("inf")


class SpellWorker(FakeWorker):
    """A worker whose machine is 40 % slower in every other turn, as on a host with slow spells."""

    def __init__(self, noise: float):
        super().__init__(noise)
        self.turn = -1

    def profile(self, segment_id, inputs, *, warmup, repeats, gap_ms):
        if warmup:
            self.turn += 1
        reply = super().profile(segment_id, inputs, warmup=warmup, repeats=repeats, gap_ms=gap_ms)
        level = 1.4 if self.turn % 2 else 1.0
        reply["wall_ms"] = [level * value for value in reply["wall_ms"]]
        reply["cpu_ms"] = reply["wall_ms"]
        return reply


def test_imprecise_profiles_take_more_turns():
    from amp4ec.calibrate.measure import measure_back_to_back_interleaved

    workers = {"quiet": FakeWorker(noise=0.001), "spells": SpellWorker(noise=0.001)}
    policy = RepeatPolicy(min_repeats=10, max_repeats=60, batch=10, min_window_ms=600.0, max_turns=8)
    results = measure_back_to_back_interleaved(workers, "u", [], warmup=2, policy=policy, parts=3)
    assert len(results["quiet"].turns) == 3
    assert results["quiet"].converged
    # The slow spells keep the mean across turns imprecise, so that profile takes every allowed turn.
    assert len(results["spells"].turns) == 8
    assert workers["spells"].turn == 7
    assert results["spells"].ci95_rel > 0.02
    assert not results["spells"].converged


def test_shipped_calibration_shows_pauses(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", "show", "default"])
    assert result.exit_code == 0, result.output
    # The console's width decides where the title wraps.
    assert "by pause before each run" in " ".join(result.output.split())
    result = runner.invoke(main, ["calibrate", "validate", "default", "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "v.json").read_text())
    pauses = sum(len(p.idle_gaps) for p in load_calibration("default").profiles)
    assert summary["simulator"]["whole model after pauses"]["predictions"] == pauses > 0
    assert summary["simulator"]["whole model back to back"]["predictions"] == len(load_calibration("default").profiles)
    # Two 2-thread profiles at 1 and 2 CPUs: held out, each borrows the exponent of the other thread counts.
    assert summary["pooled_quota_exponent"] == ["double", "pair"]
    assert summary["no_quota_exponent"] == []
    result = runner.invoke(main, ["calibrate", "plot", "default", "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_calibration_reruns_shipped_commands():
    """`make calibration` must rerun the commands the shipped file records, or it regenerates another calibration."""
    import shlex

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text().replace("\\\n", " ")
    recipe = makefile.split("\ncalibration:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    make_commands = [[word for word in shlex.split(line.replace("$(DEV_VENV)/bin/", "")) if word != "--force"] for line in recipe]
    shipped = load_calibration("default")
    recorded = [shipped.provenance.command, shipped.memory_provenance.command]
    assert make_commands == [[word for word in shlex.split(command) if word != "--force"] for command in recorded]


def test_single_quota_profiles_skip_same_quota():
    from amp4ec.calibrate.views import single_quota_profiles

    calibration = synthetic_measured_calibration()
    high, medium, low = calibration.profiles[:3]
    assert high.threads == medium.threads == low.threads
    high.cpus = medium.cpus
    # Held out, high or medium is predicted from a profile at its own quota; low leaves both at one other quota.
    assert single_quota_profiles(calibration) == {"pooled": [], "none": ["low"]}


@pytest.mark.parametrize(
    ("overall", "met", "phrases", "absent"),
    [
        ({"within_5pct": 0.95, "within_10pct": 0.995, "measured_within_5pct": 0.5}, True, ["90 % within 5 %, met"], ["not met", "no cost model"]),
        ({"within_5pct": 0.95, "within_10pct": 0.98, "measured_within_5pct": 0.97}, False, ["not met: 98.0 % within 10 % and 95.0 % within 5 %"], ["no cost model"]),
        ({"within_5pct": 0.80, "within_10pct": 0.95, "measured_within_5pct": 0.874}, False, ["not met", "Only 87.4 % of the measured statistics", "no cost model could show the 5 % aim"], []),
        ({"within_5pct": 0.80, "within_10pct": 0.95}, False, ["not met"], ["no cost model"]),
    ],
    ids=["met", "short at 10 %", "measurements too coarse", "precision unknown"],
)
def test_aim_verdict(overall, met, phrases, absent):
    from amp4ec.calibrate.views import aim_verdict

    verdict, sentence = aim_verdict(overall)
    assert verdict["met"] is met
    for phrase in phrases:
        assert phrase in sentence
    for phrase in absent:
        assert phrase not in sentence
