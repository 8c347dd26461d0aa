"""The fine-tuning loop: AdamW, linear warmup + linear decay, early stopping on
validation macro-F1 with the best weights restored. Seeded; on CPU the same
seed gives the same weights.

Calling :func:`train` again on a trained student continues from its weights
with a fresh optimizer and schedule (what each PGKD cycle does).

:func:`train_head` is the CPU mode of the same loop: the encoder stays frozen
and only the classification head learns, on the head's inputs computed once,
so an epoch costs almost nothing (the streaming trainer's ``head`` mode).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from pgkd.errors import ConfigError, DataError
from pgkd.features import FeatureCache
from pgkd.report import classification_report

if TYPE_CHECKING:
    from pgkd.data import LabelledTexts
    from pgkd.student import Student


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # upper bound; early stopping usually ends sooner (paper: 30)
    batch_size: int = 64  # paper: 64
    lr: float = 2e-5  # peak learning rate after warmup (paper: 2e-5)
    warmup_ratio: float = 0.1  # share of all steps spent warming up from 0 to lr
    weight_decay: float = 0.01  # AdamW decay, not applied to biases and LayerNorm weights
    patience: int = 5  # epochs without a val macro-F1 gain before stopping (paper: 5)
    class_weighted: bool = False  # weight the loss by inverse class frequency (helps rare classes)
    seed: int = 0
    device: str | None = None  # None = select_device()
    progress: bool = True  # tqdm bar over the steps
    max_grad_norm: float = 1.0  # gradient clipping, the usual BERT fine-tuning guard against spikes

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("patience", self.patience >= 1, "must be >= 1"),
            ("max_grad_norm", self.max_grad_norm > 0, "must be > 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"TrainConfig.{name} {rule}, got {getattr(self, name)!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"TrainConfig.device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}") from None


@dataclass(frozen=True)
class TrainResult:
    best_epoch: int  # 1-based epoch whose weights the student now holds
    best_val_macro_f1: float | None  # None when there was no validation set
    epochs_run: int
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    seconds: float = 0.0
    device: str = "cpu"


def select_device() -> torch.device:
    """CUDA > MPS > CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA; covers dropout and the shuffles below


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, n / (classes present * count): 1.0 for a balanced set.

    >>> class_weights(torch.tensor([0, 0, 1, 1, 1, 1]), 3).tolist()  # class 2 absent
    [1.5, 0.75, 0.0]
    """
    counts = torch.bincount(y, minlength=n_classes).float()
    present = (counts > 0).sum()
    return torch.where(counts > 0, len(y) / (present * counts.clamp(min=1)), torch.zeros_like(counts))


def validate(student: Student, val: LabelledTexts, batch_size: int) -> dict:
    """Validation scores plus the mean cross-entropy of the gold labels."""
    probs = student.predict_proba(val.texts, batch_size=batch_size)  # eval mode + inference_mode inside
    index = {label: i for i, label in enumerate(student.labels)}
    gold = np.array([index[y] for y in val.labels])
    report = classification_report(val.labels, [student.labels[i] for i in probs.argmax(1)], student.labels)
    report["loss"] = float(-np.log(probs[np.arange(len(gold)), gold].clip(min=1e-12)).mean())
    return report


def _check_data(student: Student, train: LabelledTexts, val: LabelledTexts) -> None:
    if len(train) == 0:
        raise DataError("the training set is empty")
    unknown = sorted((set(train.labels) | set(val.labels)) - set(student.labels))
    if unknown:
        raise DataError(f"labels the student has no output for: {', '.join(map(repr, unknown[:5]))}")


def train(student: Student, train: LabelledTexts, val: LabelledTexts, cfg: TrainConfig) -> TrainResult:
    """Fine-tune ``student`` in place on ``train``; early-stop on ``val`` macro-F1.

    With an empty ``val`` it trains for ``cfg.epochs`` and keeps the last weights.
    """
    _check_data(student, train, val)

    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = torch.device(cfg.device) if cfg.device else select_device()
    student.to(device)
    model = student.model
    index = {label: i for i, label in enumerate(student.labels)}
    y = torch.tensor([index[label] for label in train.labels])  # (n,)

    weight = class_weights(y, len(student.labels)).to(device) if cfg.class_weighted else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and LayerNorm weights
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    shuffler = torch.Generator().manual_seed(cfg.seed)

    history: list[dict] = []
    best_f1, best_epoch, best_state, bad_epochs = None, 0, None, 0
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not cfg.progress, leave=False)
    shown: dict[str, object] = {}  # the bar's postfix: epoch, last loss, last val macro-F1
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        epoch_started, losses = time.perf_counter(), []
        for batch in torch.randperm(len(train), generator=shuffler).split(cfg.batch_size):
            enc = student.encode([train.texts[i] for i in batch])
            logits = model(**enc).logits  # (batch, C)
            loss = loss_fn(logits, y[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            shown |= {"epoch": epoch, "loss": f"{losses[-1]:.4f}"}
            bar.set_postfix(shown, refresh=False)
            bar.update(1)

        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0]}
        if len(val):
            scores = validate(student, val, cfg.batch_size)
            row |= {"val_loss": scores["loss"], "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}
        row["seconds"] = time.perf_counter() - epoch_started
        history.append(row)
        if not len(val):
            continue

        shown["val_macro_f1"] = f"{row['val_macro_f1']:.4f}"
        if best_f1 is None or row["val_macro_f1"] > best_f1:
            # A CPU copy: the best weights must survive further steps and not hold GPU memory twice.
            best_f1, best_epoch, bad_epochs = row["val_macro_f1"], epoch, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    bar.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)  # no validation: the last weights are the result
    model.eval()
    return TrainResult(
        best_epoch=best_epoch,
        best_val_macro_f1=best_f1,
        epochs_run=len(history),
        history=history,
        seconds=time.perf_counter() - started,
        device=str(device),
    )


def fit_student(student: Student, train_set: LabelledTexts, val: LabelledTexts, cfg: TrainConfig, *, head_only: bool,
        features: FeatureCache | None = None) -> TrainResult:
    """:func:`train_head` (with ``features``) when ``head_only``, else :func:`train`."""
    if head_only:
        return train_head(student, train_set, val, cfg, features=features)
    return train(student, train_set, val, cfg)


def train_head(student: Student, train: LabelledTexts, val: LabelledTexts, cfg: TrainConfig,
               features: FeatureCache | None = None) -> TrainResult:
    """Like :func:`train`, with the encoder frozen: only ``model.classifier`` learns.

    The head's inputs are computed once for the training and validation texts
    (one forward pass each), then every epoch runs on them: seconds on a CPU
    where a full fine-tune takes minutes. With a ``features`` cache kept between
    calls, only the texts this encoder has not seen are encoded
    (:mod:`pgkd.features`). Same optimizer, schedule, early stopping and
    best-weights restore as :func:`train`.
    """
    _check_data(student, train, val)

    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = torch.device(cfg.device) if cfg.device else select_device()
    student.to(device)
    head = student.model.classifier
    features = features if features is not None else FeatureCache(max_bytes=0)  # none kept: computed here
    x_train = features.head_inputs(student, train.texts, cfg.batch_size)  # (n, hidden)
    x_val = features.head_inputs(student, val.texts, cfg.batch_size) if len(val) else None
    index = {label: i for i, label in enumerate(student.labels)}
    y = torch.tensor([index[label] for label in train.labels], device=device)  # (n,)

    weight = class_weights(y.cpu(), len(student.labels)).to(device) if cfg.class_weighted else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    decay = [p for p in head.parameters() if p.ndim >= 2]
    no_decay = [p for p in head.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    shuffler = torch.Generator().manual_seed(cfg.seed)

    history: list[dict] = []
    best_f1, best_epoch, best_state, bad_epochs = None, 0, None, 0
    for epoch in range(1, cfg.epochs + 1):
        epoch_started, losses = time.perf_counter(), []
        head.train()
        for batch in torch.randperm(len(train), generator=shuffler).split(cfg.batch_size):
            batch = batch.to(device)
            loss = loss_fn(head(x_train[batch]), y[batch])  # (batch, C) logits
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0]}
        if x_val is not None:
            head.eval()
            with torch.inference_mode():
                probs = torch.softmax(head(x_val).float(), dim=-1).cpu().numpy()
            gold = np.array([index[label] for label in val.labels])
            scores = classification_report(val.labels, [student.labels[i] for i in probs.argmax(1)], student.labels)
            row |= {"val_loss": float(-np.log(probs[np.arange(len(gold)), gold].clip(min=1e-12)).mean()),
                    "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}
        row["seconds"] = time.perf_counter() - epoch_started
        history.append(row)
        if x_val is None:
            continue
        if best_f1 is None or row["val_macro_f1"] > best_f1:
            best_f1, best_epoch, bad_epochs = row["val_macro_f1"], epoch, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break

    if best_state is not None:
        head.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    student.model.eval()
    return TrainResult(
        best_epoch=best_epoch,
        best_val_macro_f1=best_f1,
        epochs_run=len(history),
        history=history,
        seconds=time.perf_counter() - started,
        device=str(device),
    )
