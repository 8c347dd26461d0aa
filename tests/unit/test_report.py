import json

import pytest

from pgkd.report import classification_report, report_to_text, weakest_classes

LABELS = ["a", "b", "c", "d"]
# a: tp 2, fp 1, fn 1   b: tp 1, fp 1, fn 1   c: tp 0, fp 1, fn 1   d: never present, never predicted
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "a"]


def test_numbers_match_hand_computed_values():
    r = classification_report(Y_TRUE, Y_PRED, LABELS)
    pc = r["per_class"]
    assert pc["a"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3), "support": 3}
    assert pc["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert pc["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert r["n"] == 6
    # macro over a, b, c (d has neither support nor predictions)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert r["weighted_f1"] == pytest.approx((2 / 3 * 3 + 0.5 * 2 + 0.0 * 1) / 6)
    json.dumps(r)  # plain Python types only


def test_predicted_but_absent_class_counts_in_macro():
    r = classification_report(["a", "a"], ["a", "b"], ["a", "b", "c"])
    assert r["per_class"]["b"]["f1"] == 0.0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_empty_and_unknown_inputs():
    r = classification_report([], [], ["a", "b"])
    assert (r["accuracy"], r["macro_f1"], r["weighted_f1"], r["n"]) == (0.0, 0.0, 0.0, 0)
    with pytest.raises(ValueError, match="labels not in the taxonomy: 'z'"):
        classification_report(["a"], ["z"], ["a", "b"])


def test_text_table_has_one_line_per_class_then_the_averages():
    text = report_to_text(classification_report(Y_TRUE, Y_PRED, LABELS))
    lines = text.splitlines()
    assert lines[0].split() == ["label", "precision", "recall", "f1", "support"]
    assert lines[1].split() == ["a", "0.67", "0.67", "0.67", "3"]
    assert lines[4].split() == ["d", "0.00", "0.00", "0.00", "0"]
    assert lines[5].split() == ["accuracy", "0.50", "6"]
    assert lines[6].split() == ["macro_f1", "0.39", "6"]
    assert lines[7].split() == ["weighted_f1", "0.50", "6"]
    assert len(lines) == 8


def test_weakest_classes_order_and_ties():
    r = {
        "per_class": {
            "zeta": {"f1": 0.2, "support": 5},
            "alpha": {"f1": 0.2, "support": 5},
            "beta": {"f1": 0.2, "support": 2},
            "gone": {"f1": 0.0, "support": 0},  # not in the validation set: skipped
            "good": {"f1": 0.9, "support": 1},
            "low": {"f1": 0.1, "support": 9},
        }
    }
    assert weakest_classes(r, 4) == ["low", "beta", "alpha", "zeta"]
    assert weakest_classes(r, 10) == ["low", "beta", "alpha", "zeta", "good"]
    assert weakest_classes(r, 0) == []
