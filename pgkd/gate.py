"""The validation gate: does a retrained candidate replace the current version?

Both versions are scored on the same gold validation set
(:func:`pgkd.report.classification_report`); the candidate passes only if

1. its macro-F1 >= the current macro-F1 + ``min_macro_f1_gain``,
2. its accuracy is at most ``max_accuracy_drop`` below the current accuracy, and
3. no class with support >= ``min_support`` loses more than ``max_class_f1_drop`` F1.

Boundaries pass (a tolerance of 1e-9 absorbs float rounding). Pure functions:
the trainer records the decision, this module decides it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from pgkd.errors import ConfigError

if TYPE_CHECKING:
    from pgkd.settings import Settings

_EPS = 1e-9  # 0.81 + 0.01 must count as >= 0.82
_MAX_CLASSES_NAMED = 5  # classes named in one reason line


@dataclass(frozen=True)
class GateConfig:
    min_macro_f1_gain: float = 0.0  # may be negative: tolerate a small macro-F1 loss
    max_accuracy_drop: float = 0.01
    min_support: int = 5  # classes with fewer validation examples are too noisy to veto
    max_class_f1_drop: float = 0.10

    def __post_init__(self):
        for name in ("max_accuracy_drop", "max_class_f1_drop", "min_support"):
            if getattr(self, name) < 0:
                raise ConfigError(f"GateConfig.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> GateConfig:
        return cls(
            min_macro_f1_gain=settings.gate_min_macro_f1_gain,
            max_accuracy_drop=settings.gate_max_accuracy_drop,
            min_support=settings.gate_min_support,
            max_class_f1_drop=settings.gate_max_class_f1_drop,
        )


@dataclass(frozen=True)
class GateDecision:
    """``reasons``: one line per failed rule (empty when passed). ``margins``:
    candidate minus current for ``macro_f1`` and ``accuracy``, the largest F1 loss
    of a class with enough support (``worst_class_f1_drop``, negative when every
    such class improved) and that class (``worst_class``, None when there is none)."""

    passed: bool
    reasons: list[str]
    margins: dict[str, float | str | None]

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and the CLI.

        >>> GateDecision(True, [], {"macro_f1": 0.012, "accuracy": -0.004}).summary()
        'passed (macro-F1 +0.0120, accuracy -0.0040)'
        >>> GateDecision(False, ["accuracy 0.7000 dropped 0.1000 from current 0.8000 (max 0.0100)"], {}).summary()
        'rejected: accuracy 0.7000 dropped 0.1000 from current 0.8000 (max 0.0100)'
        """
        if self.passed:
            return f"passed (macro-F1 {self.margins['macro_f1']:+.4f}, accuracy {self.margins['accuracy']:+.4f})"
        return "rejected: " + "; ".join(self.reasons)


def evaluate_gate(candidate: dict, current: dict, cfg: GateConfig) -> GateDecision:
    """Apply the three rules to two classification reports of the same validation set.

    >>> cur = {"macro_f1": 0.80, "accuracy": 0.85, "per_class": {"a": {"f1": 0.9, "support": 10}}}
    >>> cand = {"macro_f1": 0.79, "accuracy": 0.86, "per_class": {"a": {"f1": 0.9, "support": 10}}}
    >>> evaluate_gate(cand, cur, GateConfig()).reasons
    ['macro-F1 0.7900 < current 0.8000 + margin 0.0000']
    """
    reasons: list[str] = []

    macro_cand, macro_cur = float(candidate["macro_f1"]), float(current["macro_f1"])
    if macro_cand < macro_cur + cfg.min_macro_f1_gain - _EPS:
        reasons.append(f"macro-F1 {macro_cand:.4f} < current {macro_cur:.4f} + margin {cfg.min_macro_f1_gain:.4f}")

    acc_cand, acc_cur = float(candidate["accuracy"]), float(current["accuracy"])
    if acc_cur - acc_cand > cfg.max_accuracy_drop + _EPS:
        reasons.append(
            f"accuracy {acc_cand:.4f} dropped {acc_cur - acc_cand:.4f} from current {acc_cur:.4f} "
            f"(max {cfg.max_accuracy_drop:.4f})"
        )

    drops = class_f1_drops(candidate, current, cfg.min_support)  # worst first
    too_big = [(label, cur, cand) for label, cur, cand in drops if cur - cand > cfg.max_class_f1_drop + _EPS]
    if too_big:
        named = ", ".join(f"{label} {cur:.4f} -> {cand:.4f}" for label, cur, cand in too_big[:_MAX_CLASSES_NAMED])
        more = f" (+{len(too_big) - _MAX_CLASSES_NAMED} more)" if len(too_big) > _MAX_CLASSES_NAMED else ""
        reasons.append(
            f"{len(too_big)} class(es) with support >= {cfg.min_support} lost more than "
            f"{cfg.max_class_f1_drop:.4f} F1: {named}{more}"
        )

    worst = drops[0] if drops else None
    margins: dict[str, float | str | None] = {
        "macro_f1": macro_cand - macro_cur,
        "accuracy": acc_cand - acc_cur,
        "worst_class_f1_drop": (worst[1] - worst[2]) if worst else 0.0,
        "worst_class": worst[0] if worst else None,
    }
    return GateDecision(passed=not reasons, reasons=reasons, margins=margins)


def class_f1_drops(candidate: dict, current: dict, min_support: int) -> list[tuple[str, float, float]]:
    """``(label, current F1, candidate F1)`` of every class with support >=
    ``min_support`` in the current report, largest F1 loss first (then by name).
    A class the candidate's report lacks counts as F1 0."""
    rows = []
    for label, row in current["per_class"].items():
        if row["support"] < min_support:
            continue
        cand = candidate["per_class"].get(label, {}).get("f1", 0.0)
        rows.append((label, float(row["f1"]), float(cand)))
    return sorted(rows, key=lambda r: (-(r[1] - r[2]), r[0]))
