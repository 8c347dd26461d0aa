"""The examples the teacher prompt carries: hard negatives (training samples the
student gets wrong with the highest confidence), a sample of other misclassified
ones and a sample of correctly classified ones (16 each in the paper).

The two samples are drawn round-robin over the true classes, so a few large or
easy classes do not fill the prompt on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pgkd.data import LabelledTexts


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # the gold label
    predicted: str  # the student's label
    confidence: float  # the student's probability of ``predicted``


@dataclass(frozen=True)
class Mined:
    correct: list[Example]
    misclassified: list[Example]
    hard_negatives: list[Example]  # highest confidence first


def mine_examples(
    data: LabelledTexts, probs: np.ndarray, labels: Sequence[str], n: int = 16, seed: int = 0
) -> Mined:
    """Pick up to ``n`` examples of each kind from ``data`` given the student's
    ``probs`` (shape ``(len(data), len(labels))``). Seeded.

    >>> d = LabelledTexts(["ok", "meh", "sure wrong", "wrong"], ["pos", "neg", "pos", "neg"])
    >>> probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.95, 0.05], [0.4, 0.6]])  # columns: neg, pos
    >>> m = mine_examples(d, probs, ["neg", "pos"], n=1)
    >>> m.hard_negatives[0].text, m.misclassified[0].text
    ('sure wrong', 'wrong')
    """
    probs = np.asarray(probs)
    if probs.shape != (len(data), len(labels)):
        raise ValueError(f"probs has shape {probs.shape}, expected ({len(data)}, {len(labels)})")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(data.labels) - index.keys())
    if unknown:
        raise ValueError(f"labels not in the taxonomy: {', '.join(map(repr, unknown[:5]))}")

    pred = probs.argmax(axis=1)
    confidence = probs[np.arange(len(pred)), pred]
    gold = np.array([index[y] for y in data.labels], dtype=np.int64)
    wrong = np.flatnonzero(pred != gold)
    right = np.flatnonzero(pred == gold)

    # Stable sort: equal confidences keep data order, so the choice is reproducible.
    by_confidence = wrong[np.argsort(-confidence[wrong], kind="stable")]
    hard, other_wrong = by_confidence[:n], by_confidence[n:]

    rng = np.random.default_rng(seed)

    def example(i: int) -> Example:
        return Example(data.texts[i], data.labels[i], labels[pred[i]], float(confidence[i]))

    return Mined(
        correct=[example(i) for i in _round_robin(right, gold, n, rng)],
        misclassified=[example(i) for i in _round_robin(other_wrong, gold, n, rng)],
        hard_negatives=[example(i) for i in hard],
    )


def _round_robin(candidates: np.ndarray, gold: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """Up to ``n`` of ``candidates``: one per class in a shuffled class order,
    then a second round, and so on; random within each class."""
    groups = [rng.permutation(candidates[gold[candidates] == k]).tolist() for k in np.unique(gold[candidates])]
    groups = [groups[j] for j in rng.permutation(len(groups))]
    picked: list[int] = []
    depth = 0
    while len(picked) < min(n, len(candidates)):
        picked.extend(g[depth] for g in groups if depth < len(g))
        depth += 1
    return picked[:n]
