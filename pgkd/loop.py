"""The PGKD cycle (arXiv 2411.05045, Algorithm 1), as a plain function.

    baseline = fine-tune the student on the seed training set
    repeat up to max_cycles:
        report   = validation report of the best student          (per-class P/R/F1)
        mined    = correct / misclassified / hard-negative samples of the training set
        targets  = the k weakest classes of the report
        samples  = teacher.generate(report, mined, targets, n)   (the prompt carries the whole report)
        train    = train + samples; retrain from the best student
        keep the candidate if validation macro-F1 improved, else lose one unit of patience

The batch CLI (``pgkd distill``), the benchmark and the streaming curator all
call this module; the two ablations of the benchmark are settings of
:class:`DistillConfig` (``target_strategy="random"``, ``hard_negatives=False``).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from pgkd.data import LabelledTexts
from pgkd.errors import BudgetExhausted, ConfigError
from pgkd.features import FeatureCache, probabilities
from pgkd.mining import mine_examples
from pgkd.report import classification_report, headline, weakest_classes
from pgkd.student import Student
from pgkd.teacher import Teacher
from pgkd.training import TrainConfig, fit_student


@dataclass(frozen=True)
class DistillConfig:
    max_cycles: int = 10  # the paper's budget of teacher rounds
    patience: int = 5  # cycles without a validation gain before stopping
    samples_per_cycle: int = 32  # new samples asked of the teacher each cycle (paper: 32)
    target_classes: int = 8  # k weakest classes the generation is aimed at
    n_examples: int = 16  # correct / misclassified / hard negatives each, in the prompt (paper: 16)
    target_strategy: str = "weakest"  # "weakest" (PGKD) or "random" (ablation)
    hard_negatives: bool = True  # False = ablation without hard negatives in the prompt
    train: TrainConfig = field(default_factory=TrainConfig)  # first fine-tune
    cycle_train: TrainConfig | None = None  # retraining in each cycle (None = same as train)
    head_only: bool = False  # CPU mode: frozen encoder, only the classification head learns
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_cycles", "samples_per_cycle", "target_classes", "n_examples"):
            if getattr(self, name) < (0 if name == "max_cycles" else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        if self.target_strategy not in ("weakest", "random"):
            raise ConfigError(f"target_strategy must be 'weakest' or 'random', got {self.target_strategy!r}")


@dataclass
class DistillResult:
    student: Student  # the best student found
    baseline_val: dict  # validation report of the first fine-tune
    best_val: dict  # validation report of the best student
    train_set: LabelledTexts  # seed training set plus every accepted sample
    cycles: list[dict] = field(default_factory=list)
    stopped_because: str = ""
    baseline_student: Student | None = None  # set by distill(); unchanged by the cycles


def evaluate(student: Student, data: LabelledTexts, batch_size: int = 64, features: FeatureCache | None = None) -> dict:
    """The classification report of ``student`` on ``data`` (through ``features``, when given)."""
    probs = probabilities(student, data.texts, features, batch_size)
    predicted = [student.labels[i] for i in probs.argmax(axis=1)]
    return classification_report(list(data.labels), predicted, student.labels)


def feature_cache(cfg: DistillConfig) -> FeatureCache | None:
    """Head-only runs encode each text once, whatever the cycles ask of it (pgkd.features)."""
    return FeatureCache() if cfg.head_only else None


def pick_targets(report: dict, k: int, strategy: str, rng: random.Random) -> list[str]:
    if strategy == "weakest":
        return weakest_classes(report, k)
    present = sorted(c for c, row in report["per_class"].items() if row["support"] > 0)
    return sorted(rng.sample(present, min(k, len(present))))


def distill(
    student: Student,
    train_set: LabelledTexts,
    val: LabelledTexts,
    teacher: Teacher,
    cfg: DistillConfig,
    known_texts: set[str] | None = None,
    log: Callable[[str], Any] = print,
) -> DistillResult:
    """Fine-tune ``student`` (the baseline), then run the PGKD cycles; return the best student.

    ``known_texts`` are texts the teacher's samples must not repeat (validation and
    test sets, typically); training texts are added to it here.
    """
    features = feature_cache(cfg)
    fit = fit_student(student, train_set, val, cfg.train, head_only=cfg.head_only, features=features)
    baseline_val = evaluate(student, val, features=features)
    log(f"baseline: val {headline(baseline_val)} (best epoch {fit.best_epoch}, {fit.seconds:.0f}s on {fit.device})")
    result = run_cycles(student, baseline_val, train_set, val, teacher, cfg, known_texts, log, features)
    result.baseline_student = student  # run_cycles trains clones only: this is still the baseline
    return result


def run_cycles(
    best: Student,
    best_val: dict,
    train_set: LabelledTexts,
    val: LabelledTexts,
    teacher: Teacher,
    cfg: DistillConfig,
    known_texts: set[str] | None = None,
    log: Callable[[str], Any] = print,
    features: FeatureCache | None = None,
) -> DistillResult:
    """The PGKD cycles from an already fine-tuned student whose validation report is ``best_val``.

    ``best`` itself is never modified: every cycle trains a clone of the best student.
    ``features``: a head-only run's cache of encoder outputs, shared with the
    caller (one of its own otherwise).
    """
    if features is None:
        features = feature_cache(cfg)
    rng = random.Random(cfg.seed)
    cycle_cfg = cfg.cycle_train or cfg.train
    known = set(known_texts or ()) | set(train_set.texts) | set(val.texts)
    result = DistillResult(best, best_val, best_val, train_set)
    patience_left = cfg.patience
    for cycle in range(1, cfg.max_cycles + 1):
        started = time.perf_counter()
        # 1-2. what the student gets right and wrong, on the data it was trained on
        probs = probabilities(best, train_set.texts, features)
        mined = mine_examples(train_set, probs, best.labels, n=cfg.n_examples, seed=cfg.seed + cycle)
        if not cfg.hard_negatives:
            mined = replace(mined, hard_negatives=[])
        # 3-4. the teacher writes samples for the weakest classes, seeing the whole report
        targets = pick_targets(best_val, cfg.target_classes, cfg.target_strategy, rng)
        try:
            gen = teacher.generate(best_val, mined, targets, cfg.samples_per_cycle, known_texts=known)
        except BudgetExhausted as err:
            result.stopped_because = f"teacher budget exhausted: {err}"
            break
        known |= set(gen.samples.texts)
        train_set = train_set.concat(gen.samples)

        # 5. retrain a copy of the best student; keep it only if validation improves
        candidate = best.clone()
        fit = fit_student(candidate, train_set, val, cycle_cfg, head_only=cfg.head_only, features=features)
        cand_val = evaluate(candidate, val, features=features)
        improved = cand_val["macro_f1"] > best_val["macro_f1"]
        result.cycles.append(
            {
                "cycle": cycle,
                "target_classes": targets,
                "samples_requested": gen.requested,
                "samples_accepted": len(gen.samples),
                "samples_rejected": dict(gen.rejected),
                "train_size": len(train_set),
                "val": headline(cand_val),
                "best_val_before": headline(best_val),
                "improved": improved,
                "best_epoch": fit.best_epoch,
                "wall_seconds": round(time.perf_counter() - started, 2),
            }
        )
        log(
            f"cycle {cycle}: +{len(gen.samples)} samples for {len(targets)} classes, "
            f"val macro-F1 {cand_val['macro_f1']:.4f} (best {best_val['macro_f1']:.4f})"
            + (" -> kept" if improved else "")
        )
        if improved:
            best, best_val, patience_left = candidate, cand_val, cfg.patience
        else:
            patience_left -= 1
            if patience_left == 0:
                result.stopped_because = f"no validation gain in {cfg.patience} cycles"
                break
    else:
        result.stopped_because = f"max_cycles={cfg.max_cycles} reached"

    result.student, result.best_val, result.train_set = best, best_val, train_set
    return result


def config_dict(cfg: DistillConfig) -> dict:
    """The config as plain JSON-able data (stored with every run's report)."""
    return asdict(cfg)
