import numpy as np
import pytest

from pgkd.data import LabelledTexts
from pgkd.mining import Example, mine_examples

LABELS = ["a", "b", "c"]


def one_hot_probs(pred, conf):
    """Rows with probability ``conf`` on the predicted class, the rest spread evenly."""
    probs = np.full((len(pred), len(LABELS)), 0.0)
    for i, (p, c) in enumerate(zip(pred, conf)):
        probs[i] = (1 - c) / (len(LABELS) - 1)
        probs[i, LABELS.index(p)] = c
    return probs


def test_hard_negatives_are_the_most_confident_errors():
    gold = ["a", "a", "b", "b", "c", "c", "a", "b"]
    pred = ["b", "a", "a", "b", "a", "c", "c", "c"]
    conf = [0.60, 0.9, 0.95, 0.8, 0.70, 0.9, 0.40, 0.99]
    data = LabelledTexts([f"t{i}" for i in range(8)], gold)
    m = mine_examples(data, one_hot_probs(pred, conf), LABELS, n=2)

    assert [e.text for e in m.hard_negatives] == ["t7", "t2"]
    assert m.hard_negatives[0] == Example("t7", "b", "c", pytest.approx(0.99))
    # two of the other errors t0 (gold a), t4 (gold c), t6 (gold a): one per gold class
    assert len(m.misclassified) == 2
    assert {e.text for e in m.misclassified} <= {"t0", "t4", "t6"}
    assert sorted(e.label for e in m.misclassified) == ["a", "c"]
    assert all(e.label != e.predicted for e in m.misclassified)
    assert all(e.label == e.predicted for e in m.correct)
    assert len(m.correct) == 2


def test_samples_are_seeded_and_spread_over_classes():
    gold = ["a"] * 20 + ["b"] * 3 + ["c"] * 3
    data = LabelledTexts([f"t{i}" for i in range(len(gold))], gold)
    probs = one_hot_probs(gold, [0.9] * len(gold))  # all correct
    m = mine_examples(data, probs, LABELS, n=3, seed=5)
    assert sorted(e.label for e in m.correct) == ["a", "b", "c"]  # one per class first
    assert m == mine_examples(data, probs, LABELS, n=3, seed=5)
    assert m.hard_negatives == [] and m.misclassified == []
    assert len(mine_examples(data, probs, LABELS, n=100).correct) == len(data)


def test_shape_mismatch_is_rejected():
    data = LabelledTexts(["x"], ["a"])
    with pytest.raises(ValueError, match=r"probs has shape \(1, 2\), expected \(1, 3\)"):
        mine_examples(data, np.ones((1, 2)) / 2, LABELS)
