"""The student served by ONNX Runtime with neither torch nor transformers in the process.

A classify worker that serves a version's stored ONNX graph needs three things:
the graph's session, the tokenizer and the label map. :class:`GraphStudent`
holds them and answers ``predict_proba`` like :class:`pgkd.student.Student`
(same passes, same padding, same logits), with the ``tokenizers`` library,
``onnxruntime`` and numpy alone. Importing torch and transformers costs a worker
~12-15 s of CPU at start-up and ~400k Python objects that every full garbage
collection then walks (~0.4-0.5 s holding the GIL, docs/BENCHMARKS.md).

The tokenizer is read from the version's ``tokenizer.json`` and set up as
transformers sets up its fast tokenizer for ``tokenizer(texts, truncation=True,
max_length=...)``. Whether that gives the very ids transformers gives is checked
where transformers is loaded anyway: by the process that builds the graph
(:func:`tokenizer_matches`, run by ``python -m pgkd.inference_onnx``), which
records the answer with the graph (its manifest entry's ``"tokenizer":
"tokenizers"``). A graph without that record is served by ``Student.served_by``
with transformers' tokenizer, as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pgkd.errors import ModelError, first_line
from pgkd.passes import TOKENIZE_CHUNK, plan_passes, read_labels

if TYPE_CHECKING:
    from pgkd.inference_onnx import OnnxForward

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHECKED = "tokenizers"  # a graph entry's "tokenizer" when the check below passed
# the graph inputs this student can feed, from each encoding's field
FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
# texts the tokenizer check runs beside the trace examples: the cases where a
# tokenizer's set-up differs (case, accents, CJK, emoji, spacing, empty, truncation)
CHECK_TEXTS = (
    "", " ", "Hello WORLD", "Crème brûlée à l'Élysée", "我的卡被吞了", "card 💳 declined!!", "a\tb\nc  d",
    "I can't find the top-up option; why?", "x" * 300, " ".join(["pending transfer"] * 60),
)


class GraphTokenizer:
    """A saved student's tokenizer from the ``tokenizers`` library, truncating to
    ``max_length`` with special tokens, padded per pass by :class:`GraphStudent`.
    Set up once and never changed: versions and threads may share it."""

    def __init__(self, path: Path, max_length: int):
        from tokenizers import Tokenizer

        config = _read_config(path / TOKENIZER_CONFIG)
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        try:
            self.backend = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as err:  # noqa: BLE001 - the library raises plain Exceptions for a bad file
            raise ModelError(f"cannot load {path / TOKENIZER_FILE}: {first_line(err)}") from None
        self.pad_id = self.backend.token_to_id(pad) if isinstance(pad, str) else None
        if self.pad_id is None:
            raise ModelError(f"{path / TOKENIZER_CONFIG} names no pad token the tokenizer knows")
        self.pad_type_id = int(config.get("pad_token_type_id", 0))
        self.left = config.get("padding_side", "right") == "left"
        self.backend.no_padding()
        self.backend.enable_truncation(max_length, direction=config.get("truncation_side", "right"))

    def encode(self, texts: Sequence[str]) -> list:
        """The ``tokenizers`` encodings of ``texts``, truncated, not padded."""
        return self.backend.encode_batch(list(texts), add_special_tokens=True)


class GraphStudent:
    """A serving-only student: ``predict_proba`` by an ONNX Runtime session
    (``forward``, an :class:`pgkd.inference_onnx.OnnxForward`) over the
    :class:`GraphTokenizer` of the :meth:`pgkd.student.Student.save` directory."""

    model = None  # no torch weights: nothing to train, save or quantize
    graph = "onnxruntime"
    device = "cpu"

    def __init__(self, forward: OnnxForward, tokenizer: GraphTokenizer, labels: list[str], max_length: int,
                 quantize: str):
        missing = sorted(set(forward.names) - set(FIELDS))
        if missing:
            raise ModelError(f"the graph takes inputs this student cannot feed: {missing}")
        self.forward, self.tokenizer, self.labels = forward, tokenizer, labels
        self.max_length, self.quantize = max_length, quantize

    @classmethod
    def served_by(cls, path: str | Path, forward: OnnxForward, quantize: str,
                  tokenizer: GraphTokenizer | None = None) -> GraphStudent:
        """The student of the saved directory ``path`` served by ``forward``; its
        tokenizer is loaded from ``path`` unless ``tokenizer`` (one loaded from the
        same files) is given. ModelError when the directory cannot be served so."""
        path = Path(path)
        labels, max_length = read_labels(path)
        return cls(forward, tokenizer or GraphTokenizer(path, max_length), labels, max_length, quantize)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, shape ``(len(texts), len(labels))``, float32, rows
        sum to 1; the passes of :meth:`pgkd.student.Student.batches` (sorted by
        token count, cut by :func:`pgkd.passes.plan_passes`, each padded to its
        longest text), the rows in the input order."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got a single str")
        texts = list(texts)
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        for offset in range(0, len(texts), TOKENIZE_CHUNK):
            encodings = self.tokenizer.encode(texts[offset : offset + TOKENIZE_CHUNK])
            lengths = np.array([len(e.ids) for e in encodings])
            order = np.argsort(lengths, kind="stable")
            for start, end in plan_passes(lengths[order].tolist(), batch_size):
                idx = order[start:end]
                logits = self.forward.session.run(None, self._feeds([encodings[i] for i in idx]))[0]
                out[offset + idx] = softmax(logits)
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[str]:
        probs = self.predict_proba(texts, batch_size=batch_size)
        return [self.labels[i] for i in probs.argmax(axis=1)]

    def _feeds(self, encodings: list) -> dict[str, np.ndarray]:
        """One pass's inputs, padded to its longest text as transformers pads them."""
        width = max(len(e.ids) for e in encodings)
        pads = {"ids": self.tokenizer.pad_id, "attention_mask": 0, "type_ids": self.tokenizer.pad_type_id}
        feeds = {}
        for name in self.forward.names:
            field = FIELDS[name]
            array = np.full((len(encodings), width), pads[field], dtype=np.int64)
            for row, encoding in enumerate(encodings):
                values = getattr(encoding, field)
                if self.tokenizer.left:
                    array[row, width - len(values):] = values
                else:
                    array[row, : len(values)] = values
            feeds[name] = array
        return feeds


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32.

    >>> softmax(np.array([[0.0, 0.0], [1000.0, 0.0]])).round(3).tolist()
    [[0.5, 0.5], [1.0, 0.0]]
    """
    shifted = logits.astype(np.float32) - logits.max(axis=1, keepdims=True).astype(np.float32)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def tokenizer_matches(student, path: Path, texts: Sequence[str]) -> str:
    """'' when the :class:`GraphTokenizer` of the saved directory ``path`` gives
    ``student``'s transformers tokenizer's ids, token types and lengths for every
    text of ``texts`` and :data:`CHECK_TEXTS`; else what differs (or why it cannot
    load). Run where transformers is loaded anyway: by the graph's builder.

    It never raises: whatever goes wrong only withholds the record that lets a
    worker serve the graph without transformers, and says why."""
    try:
        return _tokenizer_difference(student, path, [*texts, *CHECK_TEXTS])
    except ModelError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - a failed check must not fail the graph's build
        return f"the tokenizer check failed: {type(err).__name__}: {first_line(err)}"


def _tokenizer_difference(student, path: Path, texts: list[str]) -> str:
    tokenizer = GraphTokenizer(path, student.max_length)
    expected = student.tokenizer(texts, truncation=True, max_length=student.max_length)
    types = expected.get("token_type_ids")
    for i, (text, encoding) in enumerate(zip(texts, tokenizer.encode(texts), strict=True)):
        if encoding.ids != expected["input_ids"][i] or (types is not None and encoding.type_ids != types[i]):
            return f"the tokenizers library tokenizes {text[:40]!r} otherwise than transformers"
    if tokenizer.pad_id != student.tokenizer.pad_token_id or tokenizer.left != (student.tokenizer.padding_side == "left"):
        return "the tokenizers library pads otherwise than transformers"
    return ""


def default_threads() -> int:
    """Intra-op threads when PGKD_TORCH_THREADS is 0, as torch would pick them
    without importing it: OMP_NUM_THREADS if set, else one per physical core this
    process may run on (hyperthreads of one core count once; every CPU when the
    topology cannot be read)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        pass
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelError(f"{path} is not valid JSON: {first_line(err)}") from None
    return config if isinstance(config, dict) else {}

