"""The validation gate: each rule, its boundary, and the reason lines it writes."""

import pytest

from pgkd.errors import ConfigError
from pgkd.gate import GateConfig, GateDecision, evaluate_gate
from pgkd.report import classification_report
from pgkd.settings import load_settings


def report(macro_f1=0.80, accuracy=0.85, **f1_support):
    """A minimal report; per-class rows as name=(f1, support)."""
    rows = f1_support or {"a": (0.8, 10)}
    return {"macro_f1": macro_f1, "accuracy": accuracy,
            "per_class": {label: {"f1": f1, "support": support} for label, (f1, support) in rows.items()}}


def test_equal_reports_pass_with_default_margins():
    decision = evaluate_gate(report(), report(), GateConfig())
    assert decision == GateDecision(True, [], {"macro_f1": 0.0, "accuracy": 0.0, "worst_class_f1_drop": 0.0,
                                               "worst_class": "a"})
    assert decision.summary() == "passed (macro-F1 +0.0000, accuracy +0.0000)"


def test_macro_f1_below_current_plus_margin_is_rejected():
    cfg = GateConfig(min_macro_f1_gain=0.01)
    assert evaluate_gate(report(macro_f1=0.81), report(macro_f1=0.80), cfg).passed  # boundary: 0.80 + 0.01
    decision = evaluate_gate(report(macro_f1=0.8099), report(macro_f1=0.80), cfg)
    assert not decision.passed
    assert decision.reasons == ["macro-F1 0.8099 < current 0.8000 + margin 0.0100"]
    assert decision.margins["macro_f1"] == pytest.approx(0.0099)


def test_a_negative_gain_tolerates_a_small_macro_f1_loss():
    cfg = GateConfig(min_macro_f1_gain=-0.02)
    assert evaluate_gate(report(macro_f1=0.78), report(macro_f1=0.80), cfg).passed
    assert evaluate_gate(report(macro_f1=0.779), report(macro_f1=0.80), cfg).reasons == [
        "macro-F1 0.7790 < current 0.8000 + margin -0.0200"
    ]


def test_accuracy_drop_beyond_tolerance_is_rejected():
    cfg = GateConfig(max_accuracy_drop=0.01)
    assert evaluate_gate(report(accuracy=0.84), report(accuracy=0.85), cfg).passed  # boundary: exactly 0.01
    decision = evaluate_gate(report(accuracy=0.8389), report(accuracy=0.85), cfg)
    assert decision.reasons == ["accuracy 0.8389 dropped 0.0111 from current 0.8500 (max 0.0100)"]
    assert decision.margins["accuracy"] == pytest.approx(-0.0111)


def test_a_class_losing_too_much_f1_is_rejected_worst_first():
    cfg = GateConfig(max_class_f1_drop=0.10, min_support=5)
    current = report(a=(0.90, 10), b=(0.80, 10), c=(0.70, 10))
    assert evaluate_gate(report(a=(0.80, 10), b=(0.80, 10), c=(0.70, 10)), current, cfg).passed  # boundary
    candidate = report(a=(0.70, 10), b=(0.50, 10), c=(0.75, 10))
    decision = evaluate_gate(candidate, current, cfg)
    assert decision.reasons == [
        "2 class(es) with support >= 5 lost more than 0.1000 F1: b 0.8000 -> 0.5000, a 0.9000 -> 0.7000"
    ]
    assert decision.margins["worst_class"] == "b"
    assert decision.margins["worst_class_f1_drop"] == pytest.approx(0.30)


def test_classes_below_min_support_cannot_veto():
    cfg = GateConfig(min_support=5)
    current = report(big=(0.8, 5), small=(1.0, 4))
    candidate = report(big=(0.8, 5), small=(0.0, 4))
    decision = evaluate_gate(candidate, current, cfg)
    assert decision.passed and decision.margins["worst_class"] == "big"
    # support 5 is enough: the boundary is inclusive
    assert not evaluate_gate(report(big=(0.5, 5)), report(big=(0.8, 5)), cfg).passed


def test_a_class_missing_from_the_candidate_counts_as_f1_zero():
    decision = evaluate_gate(report(a=(0.8, 10)), report(a=(0.8, 10), gone=(0.6, 10)), GateConfig())
    assert decision.reasons == ["1 class(es) with support >= 5 lost more than 0.1000 F1: gone 0.6000 -> 0.0000"]


def test_many_failing_classes_are_named_up_to_five():
    current = report(**{f"c{i}": (0.9, 10) for i in range(7)})
    candidate = report(**{f"c{i}": (0.5, 10) for i in range(7)})
    (reason,) = evaluate_gate(candidate, current, GateConfig()).reasons
    assert reason.startswith("7 class(es) with support >= 5 lost more than 0.1000 F1: c0 0.9000 -> 0.5000, ")
    assert reason.endswith("c4 0.9000 -> 0.5000 (+2 more)")


def test_every_failed_rule_gives_one_line_and_the_summary_joins_them():
    decision = evaluate_gate(report(macro_f1=0.5, accuracy=0.5, a=(0.1, 10)),
                             report(macro_f1=0.8, accuracy=0.9, a=(0.9, 10)), GateConfig())
    assert len(decision.reasons) == 3 and all("\n" not in r for r in decision.reasons)
    assert decision.summary() == "rejected: " + "; ".join(decision.reasons)
    assert decision.as_dict()["passed"] is False


def test_on_real_reports():
    labels = ["a", "b"]
    current = classification_report(["a"] * 6 + ["b"] * 6, ["a"] * 6 + ["b"] * 6, labels)
    candidate = classification_report(["a"] * 6 + ["b"] * 6, ["a"] * 6 + ["a"] * 3 + ["b"] * 3, labels)
    decision = evaluate_gate(candidate, current, GateConfig())
    assert not decision.passed and decision.margins["worst_class"] == "b"
    assert decision.reasons[0] == "macro-F1 0.7333 < current 1.0000 + margin 0.0000"


def test_config_from_settings_and_validation(monkeypatch):
    monkeypatch.setenv("PGKD_GATE_MIN_MACRO_F1_GAIN", "0.005")
    monkeypatch.setenv("PGKD_GATE_MIN_SUPPORT", "3")
    cfg = GateConfig.from_settings(load_settings())
    assert cfg == GateConfig(min_macro_f1_gain=0.005, max_accuracy_drop=0.01, min_support=3, max_class_f1_drop=0.10)
    with pytest.raises(ConfigError, match=r"^GateConfig.max_accuracy_drop must be >= 0, got -0.1$"):
        GateConfig(max_accuracy_drop=-0.1)
