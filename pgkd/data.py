"""Labelled text sets: loading, seeded stratified splits, the paper's protocol.

A :class:`LabelledTexts` is two parallel tuples (texts, labels) that are never
mutated; every split returns new ones. Labels are always strings, so a CSV with
numeric labels (AG News: 1..4) and a JSONL with ints give the same classes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgkd.errors import DataError

TEXT_JOIN = ". "  # several text columns (AG News title + description) become one text



def utf8_encodable(text: str) -> bool:
    r"""False for a string holding a lone surrogate (``json.loads('"\ud800"')``):
    no tokenizer, file or UTF-8 consumer downstream can take it.

    >>> utf8_encodable("café"), utf8_encodable("\ud800")
    (True, False)
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

@dataclass(frozen=True)
class LabelledTexts:
    """Parallel tuples of texts and their labels.

    >>> d = LabelledTexts(["a", "b", "c"], ["x", "y", "x"])
    >>> len(d), d.classes()
    (3, ['x', 'y'])
    >>> d.subset([2, 0]).texts
    ('c', 'a')
    >>> len(d.concat(d))
    6
    """

    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        # Accept any sequence but store tuples, so a caller's list can't change us later.
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", tuple(self.labels))
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels; they must be parallel")

    def __len__(self) -> int:
        return len(self.texts)

    def classes(self) -> list[str]:
        """Sorted unique labels."""
        return sorted(set(self.labels))

    def subset(self, idx: Iterable[int]) -> LabelledTexts:
        idx = [int(i) for i in idx]
        return LabelledTexts(tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx))

    def concat(self, other: LabelledTexts) -> LabelledTexts:
        return LabelledTexts(self.texts + other.texts, self.labels + other.labels)


@dataclass(frozen=True)
class Splits:
    """The paper's protocol: train/val from the seed samples, an unlabelled pool
    (gold labels kept for the teacher simulator; the student never trains on
    them directly) and a held-out test set."""

    train: LabelledTexts
    val: LabelledTexts
    pool: LabelledTexts
    test: LabelledTexts

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "pool": len(self.pool), "test": len(self.test)}


# --- loading ------------------------------------------------------------------


def join_text(parts: Iterable[object]) -> str:
    """Join text columns with ". ", skipping empty or missing parts.

    >>> join_text(["Title", "", None, " body "])
    'Title. body'
    """
    kept = [str(p).strip() for p in parts if p is not None]
    return TEXT_JOIN.join(p for p in kept if p)


def write_labelled(path: str | Path, data: LabelledTexts) -> Path:
    """Write ``data`` as a ``text,label`` CSV that :func:`load_labelled` reads back."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(data.texts, data.labels, strict=True))
    return path


def load_labelled(
    path: str | Path, text_cols: str | Sequence[str], label_col: str, min_classes: int = 2
) -> LabelledTexts:
    """Read a labelled ``.csv`` (with a header) or ``.jsonl`` file.

    Row numbers in error messages count data rows from 1 (a CSV header is not a
    row). Raises :class:`DataError` for a missing file, an unknown extension, a
    missing column, an empty text or label, or fewer than ``min_classes`` classes
    (a training set needs two; an evaluation set may hold one).
    """
    path = Path(path)
    cols = [text_cols] if isinstance(text_cols, str) else list(text_cols)
    if not cols:
        raise DataError("no text column given; pass at least one text column")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")

    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows, header = _read_csv(path)
        _check_columns([*cols, label_col], header, path.name)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path)
    else:
        raise DataError(f"unsupported data file {path.name!r}: expected a .csv or .jsonl file")

    texts, labels = [], []
    for n, row in enumerate(rows, start=1):
        _check_columns([*cols, label_col], list(row), f"row {n} of {path.name}")
        text = join_text(row[c] for c in cols)
        if not text:
            raise DataError(f"empty text in row {n} of {path.name} (columns {', '.join(cols)})")
        label = "" if row[label_col] is None else str(row[label_col]).strip()
        if not label:
            raise DataError(f"empty label in row {n} of {path.name} (column {label_col})")
        texts.append(text)
        labels.append(label)

    if not texts:
        raise DataError(f"{path.name} has no data rows")
    data = LabelledTexts(tuple(texts), tuple(labels))
    if len(data.classes()) < min_classes:
        raise DataError(
            f"{path.name} has {len(data.classes())} class in column {label_col!r}; "
            f"at least {min_classes} classes are needed"
        )
    return data


def _check_columns(wanted: Sequence[str], available: Sequence[str], where: str) -> None:
    for col in wanted:
        if col not in available:
            raise DataError(f"column {col!r} not found in {where}; available columns: {', '.join(available) or 'none'}")


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would
    # otherwise end up in the first column's name.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{path.name} is empty; expected a header row and data rows")
        # Short rows give None values; extra cells land under the None key: drop it.
        rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
        return rows, list(reader.fieldnames)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"line {line_no} of {path.name} is not valid JSON: {err.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"line {line_no} of {path.name} is not a JSON object")
            rows.append(row)
    return rows


def check_labels(train: LabelledTexts, *others: LabelledTexts, names: Sequence[str] = ()) -> None:
    """Raise :class:`DataError` when a set in ``others`` has a label the training
    set lacks: the student has no output for it. ``names`` label the sets in the
    message (default "set #1", "set #2", ...).

    >>> check_labels(LabelledTexts(["a", "b"], ["x", "y"]), LabelledTexts(["c"], ["z"]), names=["val"])
    Traceback (most recent call last):
    ...
    pgkd.errors.DataError: val has 1 label not in the training data: 'z'; every label must appear in train
    """
    known = set(train.labels)
    for i, other in enumerate(others):
        unseen = sorted(set(other.labels) - known)
        if unseen:
            name = names[i] if i < len(names) else f"set #{i + 1}"
            shown = ", ".join(repr(u) for u in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
            plural = "label" if len(unseen) == 1 else "labels"
            raise DataError(
                f"{name} has {len(unseen)} {plural} not in the training data: {shown}; every label must appear in train"
            )


# --- splits -------------------------------------------------------------------


def stratified_split(data: LabelledTexts, test_fraction: float, seed: int) -> tuple[LabelledTexts, LabelledTexts]:
    """Split into (rest, test) with ``round(test_fraction * len(data))`` test
    samples, each class in proportion. A class with at least two samples lands
    on both sides whenever the sizes allow it. The same seed gives the same split.

    >>> d = LabelledTexts([str(i) for i in range(10)], ["a"] * 6 + ["b"] * 4)
    >>> rest, test = stratified_split(d, 0.5, seed=0)
    >>> sorted(test.labels)
    ['a', 'a', 'a', 'b', 'b']
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    taken, rest = _stratified_take(data.labels, round(test_fraction * len(data)), rng)
    return data.subset(rest), data.subset(taken)


def paper_splits(
    data: LabelledTexts,
    n_seed: int = 1000,
    val_fraction: float = 0.2,
    n_test: int | None = None,
    seed: int = 0,
    test: LabelledTexts | None = None,
) -> Splits:
    """The paper's protocol: ``n_seed`` stratified labelled samples split
    80/20 into train/val; everything else in ``data`` is the unlabelled pool.

    The test set is the given ``test`` (e.g. the dataset's own test file), cut
    to a stratified ``n_test`` samples when ``n_test`` is smaller; without
    ``test``, ``n_test`` stratified samples are carved from ``data`` first.
    """
    if test is None and n_test is None:
        raise DataError("paper_splits needs a test set (test=...) or a test size to carve from data (n_test=...)")
    rng = np.random.default_rng(seed)
    remaining = data
    if test is not None:
        if n_test is not None and n_test < len(test):
            test = test.subset(_stratified_take(test.labels, n_test, rng)[0])
    else:
        if not 0 < n_test < len(data):
            raise DataError(f"n_test={n_test} must be between 1 and {len(data) - 1} (the data has {len(data)} samples)")
        test_idx, rest_idx = _stratified_take(data.labels, n_test, rng)
        test, remaining = data.subset(test_idx), data.subset(rest_idx)
    if not 2 <= n_seed <= len(remaining):
        raise DataError(f"n_seed={n_seed} must be between 2 and {len(remaining)} (the samples left for train/val/pool)")

    seed_idx, pool_idx = _stratified_take(remaining.labels, n_seed, rng)
    labelled = remaining.subset(seed_idx)
    val_idx, train_idx = _stratified_take(labelled.labels, round(val_fraction * n_seed), rng)
    return Splits(
        train=labelled.subset(train_idx),
        val=labelled.subset(val_idx),
        pool=remaining.subset(pool_idx),
        test=test,
    )


def _stratified_take(labels: Sequence[str], n_take: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (taken, rest), both sorted, with exactly ``n_take`` taken and each
    class's share proportional to its size."""
    classes, y = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
    counts = np.bincount(y, minlength=len(classes))
    alloc = _allocate(counts, n_take, rng)
    taken, rest = [], []
    for k in range(len(classes)):
        members = rng.permutation(np.flatnonzero(y == k))
        taken.append(members[: alloc[k]])
        rest.append(members[alloc[k] :])
    empty = np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(taken or [empty])), np.sort(np.concatenate(rest or [empty]))


def _allocate(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """How many of each class to take so the sum is ``total``: proportional
    shares, rounded by largest remainder (random tie-break), while every class
    with >= 2 samples keeps at least one on each side when the sizes allow it.

    >>> _allocate(np.array([10, 2]), 2, np.random.default_rng(0)).tolist()  # not [2, 0]
    [1, 1]
    >>> _allocate(np.array([6, 4]), 5, np.random.default_rng(0)).tolist()
    [3, 2]
    """
    n = int(counts.sum())
    if not 0 <= total <= n:
        raise ValueError(f"cannot take {total} of {n} samples")
    lo = np.where(counts >= 2, 1, 0)
    hi = np.where(counts >= 2, counts - 1, counts)
    if not lo.sum() <= total <= hi.sum():
        lo, hi = np.zeros_like(counts), counts.copy()  # too few to give every class both sides
    quota = total * counts / max(n, 1)
    alloc = np.clip(np.floor(quota).astype(np.int64), lo, hi)
    tie_break = rng.random(len(counts))
    # Greedy fix-up one sample at a time: give to the class furthest below its
    # quota, take from the class furthest above it. At most len(counts) steps
    # after flooring, a few more after clipping.
    while alloc.sum() < total:
        gap = np.where(alloc < hi, quota - alloc, -np.inf)
        alloc[np.lexsort((tie_break, gap))[-1]] += 1
    while alloc.sum() > total:
        gap = np.where(alloc > lo, alloc - quota, -np.inf)
        alloc[np.lexsort((tie_break, gap))[-1]] -= 1
    return alloc
