"""The validation report: per-class precision/recall/F1/support plus accuracy and
macro/weighted F1, as a JSON-ready dict and as the compact text table that the
teacher prompt carries (numpy only).

Macro-F1 averages over the classes that occur in ``y_true`` or in ``y_pred``
(sklearn's ``f1_score(average="macro")`` without ``labels=``). A class of the
taxonomy that is neither present nor predicted has no evidence either way and
would only pull the mean towards 0, so it is left out of the mean; it still has
a row (all zeros, support 0) in ``per_class``. A class that is predicted but
absent counts with F1 = 0: those are real false positives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Per-class and averaged scores; a ratio with a zero denominator is 0.0.

    >>> r = classification_report(["a", "a", "b", "c"], ["a", "b", "b", "b"], ["a", "b", "c"])
    >>> r["accuracy"], r["per_class"]["b"]
    (0.5, {'precision': 0.3333333333333333, 'recall': 1.0, 'f1': 0.5, 'support': 1})
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted((set(y_true) | set(y_pred)) - index.keys())
    if unknown:
        raise ValueError(f"labels not in the taxonomy: {', '.join(map(repr, unknown[:5]))}")

    k = len(labels)
    t = np.array([index[y] for y in y_true], dtype=np.int64)
    p = np.array([index[y] for y in y_pred], dtype=np.int64)
    tp = np.bincount(t[t == p], minlength=k).astype(float)
    support = np.bincount(t, minlength=k)
    predicted = np.bincount(p, minlength=k)

    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    seen = (support > 0) | (predicted > 0)
    n = len(t)
    return {
        "accuracy": float((t == p).mean()) if n else 0.0,
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / n) if n else 0.0,
        "n": n,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    den = np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(den), where=den > 0)


def report_to_text(report: dict) -> str:
    """The compact table of the prompt: one line per class, then the averages.

    >>> r = classification_report(["a", "a", "b"], ["a", "b", "b"], ["a", "b"])
    >>> print(report_to_text(r))
    label        precision  recall  f1    support
    a            1.00       0.50    0.67  2
    b            0.50       1.00    0.67  1
    accuracy                        0.67  3
    macro_f1                        0.67  3
    weighted_f1                     0.67  3
    """
    width = max([len("weighted_f1"), *(len(label) for label in report["per_class"])])
    lines = [f"{'label':<{width}}  precision  recall  f1    support"]
    for label, s in report["per_class"].items():
        lines.append(
            f"{label:<{width}}  {s['precision']:<9.2f}  {s['recall']:<6.2f}  {s['f1']:<4.2f}  {s['support']}"
        )
    blank = " " * (9 + 2 + 6 + 2)  # the precision and recall columns
    for name in ("accuracy", "macro_f1", "weighted_f1"):
        lines.append(f"{name:<{width}}  {blank}{report[name]:<4.2f}  {report['n']}")
    return "\n".join(lines)


def weakest_classes(report: dict, k: int) -> list[str]:
    """The ``k`` classes with the lowest F1 among those with support > 0; ties go
    to the lower support (fewer examples to learn from), then to the name.

    >>> r = classification_report(["a", "b", "b", "c", "d"], ["a", "a", "b", "a", "d"], ["a", "b", "c", "d", "e"])
    >>> weakest_classes(r, 3)
    ['c', 'a', 'b']
    """
    scored = [(s["f1"], s["support"], label) for label, s in report["per_class"].items() if s["support"] > 0]
    return [label for _, _, label in sorted(scored)[: max(k, 0)]]


def headline(report: dict) -> dict:
    """The three numbers a run is judged on.

    >>> headline({"accuracy": 0.912345, "macro_f1": 0.9, "weighted_f1": 0.91, "per_class": {}})
    {'accuracy': 0.9123, 'macro_f1': 0.9, 'weighted_f1': 0.91}
    """
    return {k: round(float(report[k]), 4) for k in ("accuracy", "macro_f1", "weighted_f1")}
