"""Drift of the classifier's outputs: the predicted classes and the top-1
confidence over a sliding window, compared with a reference (the validation
set's predictions of the serving version, refreshed at each promotion).

Plain Python, no Kafka, no Redis: the classify worker feeds a
:class:`DriftMonitor` between batches and exports what it reads
(``streams/drift_metrics.py``).

Sampling noise alone gives a PSI of about ``(k - 1) / n`` for ``k`` categories
and ``n`` samples (PSI is roughly a chi-square statistic over ``n``): with 77
classes a window of 2,000 reads ~0.04 on an unchanged stream, well under the
usual 0.2 threshold; a window of 200 would read ~0.4 and alarm on noise.
Keep ``window`` at least ``10 * k / psi_threshold`` or so.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

EPS = 1e-4  # the share given to an empty bin: keeps ln(p/q) finite


def _shares(x: Sequence[float] | np.ndarray, eps: float) -> np.ndarray:
    """Counts or proportions -> proportions, every bin at least ``eps`` (then renormalised)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected a non-empty 1-d distribution, got shape {a.shape}")
    if (a < 0).any() or not np.isfinite(a).all():
        raise ValueError("a distribution needs finite, non-negative values")
    total = a.sum()
    a = a / total if total > 0 else np.full_like(a, 1.0 / a.size)
    a = np.maximum(a, eps)
    return a / a.sum()


def psi(p: Sequence[float], q: Sequence[float], eps: float = EPS) -> float:
    """Population stability index of ``p`` (actual) against ``q`` (expected),
    two distributions over the same bins (counts or proportions):
    ``sum((p - q) * ln(p / q))``. Symmetric; 0 for identical distributions;
    > 0.1 is a moderate shift, > 0.2 a large one by the usual rule of thumb.

    >>> psi([0.5, 0.5], [0.5, 0.5])
    0.0
    >>> round(psi([0.9, 0.1], [0.5, 0.5]), 3)
    0.879
    >>> round(psi([10, 0], [5, 5]), 2)   # an empty bin counts as eps, not as -inf
    4.6
    """
    a, b = _shares(p, eps), _shares(q, eps)
    if a.shape != b.shape:
        raise ValueError(f"distributions over different bins: {a.size} vs {b.size}")
    return float(np.sum((a - b) * np.log(a / b)))


def kl(p: Sequence[float], q: Sequence[float], eps: float = EPS) -> float:
    """Kullback-Leibler divergence ``KL(p || q) = sum(p * ln(p / q))`` in nats,
    ``p`` the actual and ``q`` the expected distribution (counts or proportions).

    >>> kl([0.5, 0.5], [0.5, 0.5])
    0.0
    >>> round(kl([0.9, 0.1], [0.5, 0.5]), 3)
    0.368
    """
    a, b = _shares(p, eps), _shares(q, eps)
    if a.shape != b.shape:
        raise ValueError(f"distributions over different bins: {a.size} vs {b.size}")
    return float(np.sum(a * np.log(a / b)))


def confidence_bin(confidence: float, bins: int) -> int:
    """The bin of a probability among ``bins`` equal bins of [0, 1] (1.0 in the last).

    >>> confidence_bin(0.0, 10), confidence_bin(0.55, 10), confidence_bin(1.0, 10)
    (0, 5, 9)
    """
    return min(bins - 1, max(0, int(confidence * bins)))


def confidence_histogram(confidences: Sequence[float], bins: int = 10) -> np.ndarray:
    """Counts of ``confidences`` in ``bins`` equal bins of [0, 1].

    >>> confidence_histogram([0.05, 0.5, 0.55, 1.0], bins=4).tolist()
    [1, 0, 2, 1]
    """
    counts = np.zeros(bins, dtype=np.int64)
    for c in confidences:
        counts[confidence_bin(float(c), bins)] += 1
    return counts


@dataclass(frozen=True)
class Reference:
    """What the stream is compared with: the share of each predicted class and
    the top-1 confidences of the serving version on its validation set."""

    class_probs: dict[str, float]
    confidences: tuple[float, ...]

    def to_dict(self) -> dict:
        """JSON for a model manifest (``drift_reference``)."""
        return {"class_probs": dict(self.class_probs), "confidences": [round(c, 4) for c in self.confidences]}

    @classmethod
    def from_dict(cls, obj: Mapping) -> Reference:
        class_probs = {str(k): float(v) for k, v in obj["class_probs"].items()}
        confidences = tuple(float(c) for c in obj["confidences"])
        if not class_probs or not confidences:
            raise ValueError("a drift reference needs class_probs and confidences")
        return cls(class_probs, confidences)


def reference_from_predictions(probs: np.ndarray, labels: Sequence[str]) -> Reference:
    """The reference of a version from its predicted probabilities on the
    validation set: ``probs`` is (n, n_labels), ``labels`` the label of each
    column. Every label is listed, with share 0 when never predicted.

    >>> ref = reference_from_predictions(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]), ["a", "b"])
    >>> ref.class_probs
    {'a': 0.75, 'b': 0.25}
    >>> ref.confidences
    (0.9, 0.8, 0.7, 0.6)
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(labels) or probs.shape[0] == 0:
        raise ValueError(f"probs must be (n > 0, {len(labels)}), got {probs.shape}")
    top = probs.argmax(axis=1)
    counts = np.bincount(top, minlength=len(labels))
    class_probs = {label: float(counts[i]) / len(top) for i, label in enumerate(labels)}
    confidences = tuple(float(c) for c in probs.max(axis=1))
    return Reference(class_probs, confidences)


class DriftMonitor:
    """Sliding-window drift of predicted classes and confidences against a reference.

    Feed it each batch's predicted labels and top-1 confidences with
    :meth:`update`. Once the window holds ``min_samples`` predictions it reads
    the PSI and KL divergence of the window's class shares and confidence
    histogram against the reference. ``drifting`` is true while either PSI is
    above ``psi_threshold``; an alarm (``drift_detected`` true after that one
    update) is raised when drifting and no alarm was raised in the last
    ``cooldown_s`` seconds, so one burst gives one alarm, and drift that
    persists gives one alarm per cool-down.

    Args:
        reference_class_probs: label -> share of the reference's predictions (counts work too).
        reference_confidences: the reference's top-1 confidences (binned into ``bins``).
        window: predictions kept (the most recent ones).
        psi_threshold: PSI above which the window counts as drifting.
        cooldown_s: minimum seconds between two alarms.
        bins: equal-width confidence bins over [0, 1].
        min_samples: predictions needed before anything is read (default: a full window).
        clock: seconds, monotonic (tests pass a fake one).

    >>> t = [0.0]
    >>> monitor = DriftMonitor({"a": 0.5, "b": 0.5}, [0.9] * 100, window=100, cooldown_s=60, clock=lambda: t[0])
    >>> monitor.update(["a", "b"] * 50, [0.9] * 100)
    False
    >>> monitor.psi_class, monitor.drifting
    (0.0, False)
    >>> monitor.update(["a"] * 100, [0.35] * 100)     # every text is "a", and unsure
    True
    >>> monitor.drift_detected, monitor.alarms, round(monitor.psi_class, 2)
    (True, 1, 4.6)
    >>> t[0] = 30.0
    >>> monitor.update(["a"] * 10, [0.35] * 10)       # still drifting, inside the cool-down
    False
    >>> monitor.drifting, monitor.alarms
    (True, 1)
    """

    def __init__(
        self,
        reference_class_probs: Mapping[str, float],
        reference_confidences: Sequence[float],
        window: int = 2000,
        psi_threshold: float = 0.2,
        cooldown_s: float = 900.0,
        bins: int = 10,
        min_samples: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        if psi_threshold <= 0:
            raise ValueError(f"psi_threshold must be > 0, got {psi_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        min_samples = window if min_samples is None else min_samples
        if not 1 <= min_samples <= window:
            raise ValueError(f"min_samples must be in [1, window={window}], got {min_samples}")
        self.window = window
        self.psi_threshold = psi_threshold
        self.cooldown_s = cooldown_s
        self.bins = bins
        self.min_samples = min_samples
        self._clock = clock
        self._last_alarm: float | None = None
        self._alarms = 0
        self.set_reference(reference_class_probs, reference_confidences)

    @classmethod
    def from_reference(cls, reference: Reference, **kwargs) -> DriftMonitor:
        return cls(reference.class_probs, reference.confidences, **kwargs)

    def set_reference(self, class_probs: Mapping[str, float], confidences: Sequence[float]) -> None:
        """Compare with a new reference from now on (a promotion). The window is
        emptied: its predictions came from the previous version. The cool-down
        clock is kept."""
        if not class_probs or not len(confidences):
            raise ValueError("a drift reference needs class shares and confidences")
        total = float(sum(class_probs.values()))
        if total <= 0 or min(class_probs.values()) < 0:
            raise ValueError("reference class shares must be non-negative and not all 0")
        self._ref_classes = {str(k): float(v) / total for k, v in class_probs.items()}
        self._ref_confidence = confidence_histogram(confidences, self.bins)
        self._seen: deque[tuple[str, int]] = deque()
        self._class_counts: Counter[str] = Counter()
        self._bin_counts = np.zeros(self.bins, dtype=np.int64)
        self._psi_class = self._psi_confidence = self._kl_class = self._kl_confidence = None
        self._drifting = False
        self._detected = False

    def update(self, labels: Sequence[str], confidences: Sequence[float]) -> bool:
        """Add one batch of predictions; returns ``drift_detected``."""
        if len(labels) != len(confidences):
            raise ValueError(f"{len(labels)} labels but {len(confidences)} confidences")
        for label, confidence in zip(labels, confidences):
            b = confidence_bin(float(confidence), self.bins)
            self._seen.append((label, b))
            self._class_counts[label] += 1
            self._bin_counts[b] += 1
            if len(self._seen) > self.window:
                old_label, old_bin = self._seen.popleft()
                self._class_counts[old_label] -= 1
                if not self._class_counts[old_label]:
                    del self._class_counts[old_label]
                self._bin_counts[old_bin] -= 1
        self._detected = False
        if len(self._seen) < self.min_samples:
            return False
        # labels the reference never predicted get eps there (a new class is drift too)
        names = sorted(set(self._ref_classes) | set(self._class_counts))
        live = [self._class_counts.get(n, 0) for n in names]
        ref = [self._ref_classes.get(n, 0.0) for n in names]
        self._psi_class, self._kl_class = psi(live, ref), kl(live, ref)
        self._psi_confidence = psi(self._bin_counts, self._ref_confidence)
        self._kl_confidence = kl(self._bin_counts, self._ref_confidence)
        self._drifting = max(self._psi_class, self._psi_confidence) > self.psi_threshold
        now = self._clock()
        if self._drifting and (self._last_alarm is None or now - self._last_alarm >= self.cooldown_s):
            self._last_alarm = now
            self._alarms += 1
            self._detected = True
        return self._detected

    # --- read-only state ----------------------------------------------------------
    @property
    def n(self) -> int:
        """Predictions in the window."""
        return len(self._seen)

    @property
    def ready(self) -> bool:
        """The window holds enough predictions for the statistics below."""
        return self._psi_class is not None

    @property
    def psi_class(self) -> float | None:
        """PSI of the window's class shares against the reference (None until ready)."""
        return self._psi_class

    @property
    def psi_confidence(self) -> float | None:
        """PSI of the window's confidence histogram against the reference's."""
        return self._psi_confidence

    @property
    def kl_class(self) -> float | None:
        """KL(window || reference) of the class shares, in nats."""
        return self._kl_class

    @property
    def kl_confidence(self) -> float | None:
        """KL(window || reference) of the confidence histograms, in nats."""
        return self._kl_confidence

    @property
    def drifting(self) -> bool:
        """Either PSI is above the threshold (for the window as it is now)."""
        return self._drifting

    @property
    def drift_detected(self) -> bool:
        """The last :meth:`update` raised an alarm."""
        return self._detected

    @property
    def alarms(self) -> int:
        """Alarms raised so far."""
        return self._alarms

    @property
    def in_cooldown(self) -> bool:
        """An alarm was raised less than ``cooldown_s`` ago."""
        return self._last_alarm is not None and self._clock() - self._last_alarm < self.cooldown_s

    def __repr__(self) -> str:
        def fmt(v: float | None) -> str:
            return "-" if v is None or math.isnan(v) else f"{v:.4f}"

        return (
            f"DriftMonitor(n={self.n}/{self.window}, psi_class={fmt(self._psi_class)}, "
            f"psi_confidence={fmt(self._psi_confidence)}, drifting={self._drifting}, alarms={self._alarms})"
        )
