import json
import shutil

import numpy as np
import pytest
import torch

from pgkd.errors import ModelError
from pgkd.student import Student, default_encoder_path

LABELS = ["neg", "neu", "pos"]
TEXTS = [
    "short",
    "a considerably longer text that needs many more tokens than the others do",
    "mid length text here",
    "x",
    "another fairly long sentence, with punctuation; and more words",
]


@pytest.fixture
def student(tiny_encoder_dir):
    return Student.from_pretrained(tiny_encoder_dir, LABELS, max_length=32, device="cpu")


def test_default_encoder_is_the_packaged_minilm():
    path = default_encoder_path()
    assert (path / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384


def test_predict_proba_shape_and_rows(student):
    probs = student.predict_proba(TEXTS, batch_size=2)
    assert probs.shape == (5, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert student.predict_proba([]).shape == (0, 3)
    assert student.predict(TEXTS) == [LABELS[i] for i in probs.argmax(1)]
    with pytest.raises(TypeError, match="single str"):
        student.predict_proba("one text")


def test_length_bucketing_restores_the_input_order(student):
    # Batched by length (padding differs per batch) vs one text at a time: same rows, same order.
    batched = student.predict_proba(TEXTS, batch_size=2)
    single = np.stack([student.predict_proba([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert not student.model.training  # eval mode is restored, not forced to train


def test_predict_restores_training_mode(student):
    student.model.train()
    student.predict_proba(TEXTS[:2])
    assert student.model.training


def test_head_init_is_seeded(tiny_encoder_dir):
    a = Student.from_pretrained(tiny_encoder_dir, LABELS, device="cpu", seed=1)
    b = Student.from_pretrained(tiny_encoder_dir, LABELS, device="cpu", seed=1)
    c = Student.from_pretrained(tiny_encoder_dir, LABELS, device="cpu", seed=2)
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    assert a.model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}


def test_save_load_round_trip(student, tmp_path):
    student.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not (tmp_path / "m" / "pytorch_model.bin").exists()
    loaded = Student.load(tmp_path / "m", device="cpu")
    assert loaded.labels == LABELS and loaded.max_length == 32
    np.testing.assert_array_equal(loaded.predict_proba(TEXTS), student.predict_proba(TEXTS))


def test_load_refuses_a_pickle_only_checkpoint(student, tmp_path):
    student.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(student.model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelError) as err:
        Student.load(tmp_path / "m")
    assert str(err.value) == (
        f"{tmp_path / 'm'} has no model.safetensors; only safetensors checkpoints are loaded "
        "(pickle files such as pytorch_model.bin are refused)"
    )


def test_load_errors(student, tmp_path):
    with pytest.raises(ModelError, match="^model directory not found: "):
        Student.load(tmp_path / "missing")
    student.save(tmp_path / "m")
    (tmp_path / "m" / "labels.json").unlink()
    with pytest.raises(ModelError, match=r"has no labels.json; expected a directory written by Student.save\(\)$"):
        Student.load(tmp_path / "m")


def test_from_pretrained_errors(tiny_encoder_dir, tmp_path):
    with pytest.raises(ModelError, match="^cannot load encoder "):
        Student.from_pretrained(tmp_path, LABELS)  # an empty directory
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_encoder_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="^cannot load encoder .*no file named model.safetensors"):
        Student.from_pretrained(pickled, LABELS)  # never falls back to the pickle
    with pytest.raises(ModelError, match="^max_length must be between 2 and 128 for "):
        Student.from_pretrained(tiny_encoder_dir, LABELS, max_length=512)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        Student.from_pretrained(tiny_encoder_dir, ["a", "a"])


def test_clone_is_independent(student):
    twin = student.clone()
    with torch.no_grad():
        twin.model.classifier.bias.add_(1.0)
    assert not torch.equal(twin.model.classifier.bias, student.model.classifier.bias)
    assert twin.labels == student.labels and twin.device == student.device


def test_the_real_default_encoder_predicts():
    student = Student.from_pretrained(None, ["a", "b"], device="cpu")
    probs = student.predict_proba(["I am still waiting on my card?", "What is the exchange rate?"])
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
