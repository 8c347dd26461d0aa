"""pgkd.drift: PSI/KL with known values, the monitor's window, threshold and cool-down."""

import doctest
import math

import numpy as np
import pytest

import pgkd.drift
from pgkd.drift import DriftMonitor, Reference, kl, psi, reference_from_predictions

UNIFORM4 = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_docstring_examples():
    result = doctest.testmod(pgkd.drift)
    assert result.attempted > 0 and result.failed == 0


def test_identical_distributions_give_zero():
    p = [0.1, 0.2, 0.3, 0.4]
    assert psi(p, p) == pytest.approx(0.0, abs=1e-12)
    assert kl(p, p) == pytest.approx(0.0, abs=1e-12)
    assert psi([1, 2, 3, 4], p) == pytest.approx(0.0, abs=1e-12)  # counts or shares


def test_known_values():
    # sum((p - q) ln(p / q)) by hand: 0.4 ln 1.8 - 0.4 ln 0.2
    expected = 0.4 * math.log(1.8) - 0.4 * math.log(0.2)
    assert psi([0.9, 0.1], [0.5, 0.5]) == pytest.approx(expected, rel=1e-3)
    assert kl([0.9, 0.1], [0.5, 0.5]) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-3)
    assert psi([0.9, 0.1], [0.5, 0.5]) == pytest.approx(psi([0.5, 0.5], [0.9, 0.1]))  # symmetric


def test_a_shifted_distribution_is_above_the_usual_threshold():
    reference = [0.25, 0.25, 0.25, 0.25]
    assert psi([0.26, 0.24, 0.25, 0.25], reference) < 0.01
    assert psi([0.55, 0.15, 0.15, 0.15], reference) > 0.2


def test_empty_bins_are_smoothed_not_infinite():
    assert math.isfinite(psi([1, 0], [0, 1])) and math.isfinite(kl([1, 0], [0, 1]))


def test_bad_distributions_are_named():
    with pytest.raises(ValueError, match="different bins: 2 vs 3"):
        psi([1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        kl([1, -1], [1, 1])


def test_reference_from_predictions_and_back():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    ref = reference_from_predictions(probs, ["x", "y", "z"])
    assert ref.class_probs == pytest.approx({"x": 2 / 3, "y": 1 / 3, "z": 0.0})
    assert ref.confidences == pytest.approx((0.7, 0.8, 0.6))
    assert Reference.from_dict(ref.to_dict()) == ref
    with pytest.raises(ValueError, match=r"probs must be \(n > 0, 2\), got \(3, 3\)"):
        reference_from_predictions(probs, ["x", "y"])


def _monitor(clock, **kw) -> DriftMonitor:
    kw = {"window": 400, "psi_threshold": 0.2, "cooldown_s": 60.0, "bins": 10, "clock": clock} | kw
    return DriftMonitor(UNIFORM4, [0.85] * 100, **kw)


def _steady(n: int) -> tuple[list[str], list[float]]:
    return [("a", "b", "c", "d")[i % 4] for i in range(n)], [0.85] * n


def _shifted(n: int) -> tuple[list[str], list[float]]:
    return ["a"] * n, [0.35] * n


def test_nothing_is_read_until_the_window_has_min_samples():
    monitor = _monitor(FakeClock(), min_samples=200)
    assert monitor.update(*_shifted(199)) is False
    assert not monitor.ready and monitor.psi_class is None and not monitor.drifting
    assert monitor.update(*_shifted(1)) is True
    assert monitor.ready and monitor.psi_class > 0.2 and monitor.psi_confidence > 0.2


def test_steady_stream_reads_near_zero_and_never_alarms():
    monitor = _monitor(FakeClock())
    for _ in range(5):
        assert monitor.update(*_steady(100)) is False
    assert monitor.psi_class == pytest.approx(0.0, abs=1e-6)
    assert monitor.psi_confidence == pytest.approx(0.0, abs=1e-6)
    assert monitor.kl_class == pytest.approx(0.0, abs=1e-6) and monitor.alarms == 0


def test_cooldown_gives_one_alarm_per_burst_and_one_per_cooldown_while_drift_persists():
    clock = FakeClock()
    monitor = _monitor(clock, min_samples=100)
    assert monitor.update(*_shifted(100)) is True and monitor.alarms == 1
    for _ in range(10):  # the burst goes on within the cool-down: no new alarm
        clock.t += 5
        assert monitor.update(*_shifted(50)) is False
        assert monitor.drifting and not monitor.drift_detected and monitor.in_cooldown
    assert monitor.alarms == 1
    clock.t += 10.0  # 60 s after the first alarm
    assert monitor.update(*_shifted(10)) is True and monitor.alarms == 2


def test_window_slides_back_to_normal():
    clock = FakeClock()
    monitor = _monitor(clock, min_samples=100)
    monitor.update(*_shifted(400))
    assert monitor.drifting
    monitor.update(*_steady(300))  # 100 shifted predictions left of 400
    assert monitor.n == 400 and monitor.drifting
    monitor.update(*_steady(100))  # the window holds only steady ones now
    assert monitor.psi_class == pytest.approx(0.0, abs=1e-6) and not monitor.drifting
    clock.t += 3600
    assert monitor.update(*_steady(50)) is False


def test_a_class_the_reference_never_predicted_is_drift():
    monitor = _monitor(FakeClock(), window=100)
    assert monitor.update(["new_label"] * 100, [0.85] * 100) is True
    assert monitor.psi_confidence == pytest.approx(0.0, abs=1e-6)


def test_set_reference_empties_the_window_and_keeps_the_cooldown():
    clock = FakeClock()
    monitor = _monitor(clock, min_samples=100)
    assert monitor.update(*_shifted(100)) is True
    # promotion: the new version predicts mostly "a", unsure
    monitor.set_reference({"a": 1.0, "b": 0.0}, [0.35] * 50)
    assert monitor.n == 0 and not monitor.ready and not monitor.drifting
    monitor.update(*_shifted(100))
    assert monitor.psi_class == pytest.approx(0.0, abs=1e-6) and not monitor.drifting
    monitor.update(*_steady(100))
    assert monitor.drifting and not monitor.drift_detected  # still in the first alarm's cool-down


def test_constructor_names_bad_values():
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        DriftMonitor(UNIFORM4, [0.5], window=0)
    with pytest.raises(ValueError, match=r"min_samples must be in \[1, window=10\], got 11"):
        DriftMonitor(UNIFORM4, [0.5], window=10, min_samples=11)
    with pytest.raises(ValueError, match="3 labels but 2 confidences"):
        DriftMonitor(UNIFORM4, [0.5]).update(["a", "b", "c"], [0.5, 0.5])


# --- the worker side: streams/drift_metrics.py (no Redis here; tests/integration/test_drift_alarm.py has it) ---


def _sample(name: str, **labels: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


def test_observe_exports_the_monitor():
    from streams import drift_metrics

    drift_metrics.clear()
    before = _sample("pgkd_drift_alarms_total") or 0.0
    monitor = _monitor(FakeClock(), min_samples=100)
    monitor.update(*_shifted(50))
    drift_metrics.observe(monitor)  # not ready: no PSI series yet
    assert _sample("pgkd_drift_psi", kind="class") is None and _sample("pgkd_drift_alarm") == 0
    monitor.update(*_shifted(50))
    drift_metrics.observe(monitor)
    assert _sample("pgkd_drift_psi", kind="class") == pytest.approx(monitor.psi_class)
    assert _sample("pgkd_drift_psi", kind="confidence") == pytest.approx(monitor.psi_confidence)
    assert _sample("pgkd_drift_kl", kind="class") == pytest.approx(monitor.kl_class)
    assert _sample("pgkd_drift_alarm") == 1 and _sample("pgkd_drift_alarms_total") == before + 1
    record = drift_metrics.alarm_record(monitor, "v0003", "host:1", now=5.0)
    assert record["ts"] == 5.0 and record["psi"] == pytest.approx(max(monitor.psi_class, monitor.psi_confidence), abs=1e-6)
    assert record["model_version"] == "v0003" and record["threshold"] == 0.2 and record["window"] == 100
    drift_metrics.clear()
    assert _sample("pgkd_drift_psi", kind="class") is None and _sample("pgkd_drift_alarm") == 0


def test_watch_uses_the_manifest_reference_else_the_first_window(tmp_path):
    import asyncio
    import json
    from types import SimpleNamespace

    from pgkd.settings import Settings
    from streams.drift_metrics import DriftWatch

    settings = Settings(drift_window=100, drift_cooldown_s=60)
    with_ref, without = tmp_path / "v1", tmp_path / "v2"
    with_ref.mkdir(), without.mkdir()
    reference = Reference(UNIFORM4, (0.85,) * 100)
    (with_ref / "manifest.json").write_text(json.dumps({"version": "v1", "drift_reference": reference.to_dict()}))
    watch = DriftWatch(settings, client=None, worker="test")

    watch.reset(SimpleNamespace(version="v1", path=with_ref))
    asyncio.run(watch.after_batch(*_shifted(100)))
    assert watch.monitor.drifting and watch.monitor.alarms == 1

    # a version without a reference: its first full window becomes the reference
    watch.reset(SimpleNamespace(version="v2", path=without))
    asyncio.run(watch.after_batch(*_shifted(60)))
    asyncio.run(watch.after_batch(*_shifted(40)))
    assert watch.monitor.n == 0 and not watch.monitor.drifting
    asyncio.run(watch.after_batch(*_shifted(100)))
    assert watch.monitor.psi_class == pytest.approx(0.0, abs=1e-6) and watch.monitor.alarms == 1
    asyncio.run(watch.after_batch(*_steady(100), version="v1"))  # a batch the old version answered
    assert watch.monitor.n == 100 and not watch.monitor.drifting
