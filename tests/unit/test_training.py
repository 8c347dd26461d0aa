import numpy as np
import pytest
import torch

from pgkd.data import LabelledTexts
from pgkd.errors import ConfigError, DataError
from pgkd.student import Student
from pgkd.training import TrainConfig, select_device, train

WORDS = ["movie", "food", "service", "day", "book", "song", "trip", "game"]


def toy(n_per_class, offset=0):
    """Trivially separable: the first word says the class."""
    texts, labels = [], []
    for i in range(n_per_class):
        noun = WORDS[(i + offset) % len(WORDS)]
        texts += [f"good {noun} today", f"bad {noun} today"]
        labels += ["pos", "neg"]
    return LabelledTexts(texts, labels)


def fast_cfg(**kw):
    base = dict(epochs=8, batch_size=8, lr=5e-3, warmup_ratio=0.1, patience=3, seed=0, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def student(tiny_encoder_dir):
    return Student.from_pretrained(tiny_encoder_dir, ["neg", "pos"], max_length=16, device="cpu")


def test_learns_a_separable_toy_set(student):
    result = train(student, toy(16), toy(4, offset=3), fast_cfg())
    assert result.best_val_macro_f1 == 1.0
    assert result.device == "cpu"
    assert [h["epoch"] for h in result.history] == list(range(1, result.epochs_run + 1))
    assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds"} <= set(result.history[0])
    assert student.predict(["good food today", "bad song today"]) == ["pos", "neg"]


def test_early_stopping_restores_the_best_epoch(student):
    val = toy(4, offset=3)
    result = train(student, toy(16), val, fast_cfg(epochs=30, patience=2))
    assert result.epochs_run == result.best_epoch + 2 < 30  # stopped after `patience` epochs without gain
    best = result.history[result.best_epoch - 1]
    assert best["val_macro_f1"] == max(h["val_macro_f1"] for h in result.history)
    # the student holds the best epoch's weights, not the last epoch's
    probs = student.predict_proba(val.texts)
    gold = [student.labels.index(y) for y in val.labels]
    assert -np.log(probs[np.arange(len(gold)), gold]).mean() == pytest.approx(best["val_loss"], rel=1e-5)


def test_same_seed_same_weights(tiny_encoder_dir):
    def run(seed):
        s = Student.from_pretrained(tiny_encoder_dir, ["neg", "pos"], max_length=16, device="cpu")
        train(s, toy(8), toy(2, offset=1), fast_cfg(epochs=2, seed=seed, class_weighted=True))
        return s.model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_empty_val_trains_fixed_epochs_and_continues(student):
    empty = LabelledTexts((), ())
    first = train(student, toy(8), empty, fast_cfg(epochs=3))
    assert (first.epochs_run, first.best_epoch, first.best_val_macro_f1) == (3, 3, None)
    # continuing from the fine-tuned weights
    again = train(student, toy(8, offset=2), toy(2), fast_cfg(epochs=2, patience=1))
    assert again.epochs_run >= 1 and again.best_val_macro_f1 is not None


def test_bad_inputs(student):
    with pytest.raises(DataError, match="^the training set is empty$"):
        train(student, LabelledTexts((), ()), toy(1), fast_cfg())
    with pytest.raises(DataError, match="^labels the student has no output for: 'meh'$"):
        train(student, LabelledTexts(["so so"], ["meh"]), toy(1), fast_cfg())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", 0.0, "TrainConfig.lr must be > 0, got 0.0"),
        ("epochs", 0, "TrainConfig.epochs must be >= 1, got 0"),
        ("warmup_ratio", 1.0, "TrainConfig.warmup_ratio must be in [0, 1), got 1.0"),
        ("patience", 0, "TrainConfig.patience must be >= 1, got 0"),
        ("device", "gpu9", "TrainConfig.device must be a torch device such as 'cpu' or 'cuda', got 'gpu9'"),
    ],
)
def test_config_names_the_bad_value(field, value, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{field: value})
    assert str(err.value) == message


def test_select_device_on_this_machine():
    assert select_device().type in {"cpu", "cuda", "mps"}
