"""What the classification head receives for each text, computed once per encoder.

A head-only round (the trainer's CPU mode, ``pgkd distill --head-only``) trains
``model.classifier`` on the frozen encoder's outputs. The encoder is the same in
every such round, so the seed and validation texts, most of a round's texts,
would be encoded again and again for the same result. :class:`FeatureCache`
keeps those outputs per text, under the **fingerprint of the encoder** that
made them (every weight outside the head, the tokenizer, the max length): a
student whose encoder differs in one weight gets its own entries, never
another encoder's. It is bounded in bytes; the least recently used texts go
first.

Cached rows agree with a fresh computation to float rounding (a text's pass
companions differ; padding is masked), not bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import sys
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pgkd.errors import ModelError

if TYPE_CHECKING:
    from pgkd.student import Student


def head_features(student: Student, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """What the classification head (``model.classifier``) receives for each text,
    in eval mode (no dropout): ``(len(texts), hidden)``, on the student's device.
    ModelError when the head does not take one vector per text."""
    captured: list[torch.Tensor] = []
    hook = student.model.classifier.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    where: list[np.ndarray] = []  # the passes of Student.batches (texts of similar length); rows go back below
    student.model.eval()
    try:
        with torch.inference_mode():
            for idx, encoding in student.batches(texts, batch_size):
                student.model(**encoding)
                where.append(idx)
    finally:
        hook.remove()
    if not captured or any(c.ndim != 2 for c in captured):
        raise ModelError(f"{type(student.model).__name__}.classifier does not take one vector per text; "
                         "train the whole model instead")
    features = torch.empty_like(torch.cat(captured))  # a normal tensor: inference-mode ones cannot be saved for backward
    features[torch.as_tensor(np.concatenate(where), device=features.device)] = torch.cat(captured)
    return features


_ENTRY_OVERHEAD = 700  # bytes of Python objects per cached text besides its encoding and its string
_TOKENIZER_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> sha256 of its definition


def tokenizer_digest(tokenizer) -> bytes:
    """sha256 of a tokenizer's definition (a fast tokenizer's JSON less the
    padding and truncation it was last called with; else its vocabulary), once
    per tokenizer object: the project never changes a loaded tokenizer
    (Student.clone shares it), and the JSON costs ~0.1 s to normalise."""
    known = _TOKENIZER_DIGESTS.get(tokenizer)
    if known is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        else:
            definition = tokenizer.get_vocab()
        known = hashlib.sha256(json.dumps([type(tokenizer).__name__, tokenizer.padding_side,
                                           tokenizer.truncation_side, definition], sort_keys=True).encode()).digest()
        _TOKENIZER_DIGESTS[tokenizer] = known
    return known


def encoder_fingerprint(student: Student) -> str:
    """sha256 of what decides a text's head input: every tensor of the model
    outside ``model.classifier`` (name, dtype, shape, bytes), the tokenizer and
    the max length. ~0.1 s for MiniLM-L6 on one CPU core."""
    model = student.model
    head = next((name for name, module in model.named_modules() if module is model.classifier), None)
    if head is None:
        raise ModelError(f"{type(model).__name__} has no classifier module")
    digest = hashlib.sha256(tokenizer_digest(student.tokenizer))
    digest.update(f"max_length={student.max_length};".encode())
    for name, tensor in model.state_dict().items():
        if name == head or name.startswith(head + "."):
            continue
        flat = tensor.detach().to("cpu").contiguous().view(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


class FeatureCache:
    """The head inputs of texts per encoder fingerprint, at most ``max_bytes`` of
    memory for them (:meth:`entry_bytes`: the encodings, the texts, the objects).

    >>> FeatureCache(max_bytes=0).rows
    0
    """

    def __init__(self, max_bytes: int = 512 << 20):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._rows: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # (fingerprint, text) -> row, on CPU
        self._bytes = 0
        self.hits = 0  # texts served from the cache
        self.misses = 0  # texts encoded

    @property
    def rows(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def head_inputs(self, student: Student, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """:func:`head_features` of ``texts`` (same shape, on the student's device),
        encoding only the texts this encoder has not encoded before."""
        texts = list(texts)
        key = sys.intern(encoder_fingerprint(student)) if self.max_bytes else ""  # one string for all its entries
        missing = [t for t in dict.fromkeys(texts) if (key, t) not in self._rows]
        fresh = {}
        if missing:
            computed = head_features(student, missing, batch_size).to("cpu")
            fresh = dict(zip(missing, computed, strict=True))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        rows = []
        for text in texts:
            row = fresh.get(text)
            if row is None:
                row = self._rows[(key, text)]
                self._rows.move_to_end((key, text))
            rows.append(row)
        for text, row in fresh.items():
            self._keep((key, text), row)
        if not rows:
            return torch.empty((0, 0), device=student.device)
        return torch.stack(rows).to(student.device)

    def predict_proba(self, student: Student, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``student.predict_proba(texts)`` through the cache: the head on the cached
        inputs (an eager fp32 student, as trained; the same probabilities to
        float rounding)."""
        if student.graph != "eager" or student.quantize != "fp32" or student.model is None:
            return student.predict_proba(list(texts), batch_size)  # a serving student: its own path
        inputs = self.head_inputs(student, texts, batch_size)
        out = np.empty((len(inputs), len(student.labels)), dtype=np.float32)
        if not len(inputs):
            return out
        head = student.model.classifier
        was_training = head.training
        head.eval()
        try:
            with torch.inference_mode():
                out[:] = torch.softmax(head(inputs).float(), dim=-1).cpu().numpy()
        finally:
            head.train(was_training)
        return out

    @staticmethod
    def entry_bytes(text: str, row: torch.Tensor) -> int:
        """What one entry holds in memory: the encoding, the text, and the
        objects around them (a tensor, the key, the dict's node: ~700 bytes,
        measured with CPython 3.11 and torch 2.15). A MiniLM entry: ~2.3 KiB."""
        return row.element_size() * row.nelement() + sys.getsizeof(text) + _ENTRY_OVERHEAD

    def _keep(self, key: tuple[str, str], row: torch.Tensor) -> None:
        size = self.entry_bytes(key[1], row)
        if size > self.max_bytes:
            return
        row = row.clone()  # not a view of the whole computed matrix, which would stay alive through it
        self._rows[key] = row
        self._bytes += size
        while self._bytes > self.max_bytes:
            (_, text), dropped = self._rows.popitem(last=False)
            self._bytes -= self.entry_bytes(text, dropped)


def probabilities(student: Student, texts: Sequence[str], cache: FeatureCache | None = None,
                  batch_size: int = 64) -> np.ndarray:
    """``student.predict_proba(texts)``, through ``cache`` when there is one."""
    if cache is None:
        return student.predict_proba(list(texts), batch_size)
    return cache.predict_proba(student, texts, batch_size)
