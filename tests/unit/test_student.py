import json
import shutil

import numpy as np
import pytest
import torch

from pgkd.errors import ModelError
from pgkd.inference_opt import Int8Linear, TraceError, cpu_has_vnni, quantize_linear_layers, trace_forward
from pgkd.student import Student, default_encoder_path, plan_passes

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


def _cost(lengths, passes, overhead):
    return sum(overhead + (end - start) * max(lengths[start:end]) for start, end in passes)


def _all_plans(n, max_size, start=0):
    if start == n:
        yield []
    for end in range(start + 1, min(n, start + max_size) + 1):
        for rest in _all_plans(n, max_size, end):
            yield [(start, end), *rest]


@pytest.mark.parametrize("seed", range(20))
def test_plan_passes_is_the_cheapest_plan_and_covers_every_text_once(seed):
    rng = np.random.default_rng(seed)
    n, max_size, overhead = int(rng.integers(1, 9)), int(rng.integers(1, 5)), float(rng.choice([0, 8, 24, 100]))
    lengths = sorted(rng.integers(2, 64, size=n).tolist())
    passes = plan_passes(lengths, max_size, overhead)
    assert [i for start, end in passes for i in range(start, end)] == list(range(n))  # in order, each once
    assert all(0 < end - start <= max_size for start, end in passes)
    assert _cost(lengths, passes, overhead) == min(_cost(lengths, p, overhead) for p in _all_plans(n, max_size))


def test_plan_passes_edges():
    assert plan_passes([], 16) == []
    assert plan_passes([7], 16) == [(0, 1)]
    assert plan_passes([5, 5, 5, 5], 16, overhead_tokens=0) == [(0, 4)]  # equal lengths: no reason to cut
    assert plan_passes([5, 6, 7, 8], 16, overhead_tokens=0) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # free passes
    with pytest.raises(ValueError, match="max_size"):
        plan_passes([5], 0)


def test_batches_pad_each_pass_to_its_own_longest_text(student):
    texts = ["a b", "a b c", "a b c d", " ".join(["word"] * 25), "a b c"]
    passes = list(student.batches(texts, batch_size=16))
    assert sorted(i for idx, _ in passes for i in idx) == list(range(len(texts)))
    for idx, enc in passes:
        unpadded = [len(student.tokenizer(texts[i], truncation=True, max_length=32)["input_ids"]) for i in idx]
        assert enc["input_ids"].shape == (len(idx), max(unpadded))  # no column of padding only
        assert enc["attention_mask"].sum(1).tolist() == unpadded
    # the long text is not allowed to pad the four short ones to its length
    assert [3] in [list(idx) for idx, _ in passes]


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


# --- optimize_for_inference (PGKD_INFERENCE_QUANTIZE) ---------------------------------


def test_int8_predictions_stay_close_to_fp32(student):
    fp32 = student.predict_proba(TEXTS)
    int8 = student.clone().optimize_for_inference("int8")
    assert int8.quantize == "int8" and student.quantize == "fp32"  # the clone is quantized, not the original
    probs = int8.predict_proba(TEXTS)
    assert probs.shape == fp32.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, fp32, atol=0.02)
    # every encoder layer but the last is int8; the last layer, the pooler and the head stay fp32
    first, last = int8.model.base_model.encoder.layer
    assert all(type(m) is not torch.nn.Linear for m in first.modules())
    assert any(isinstance(m, Int8Linear) for m in first.modules())
    assert not any(isinstance(m, Int8Linear) for m in last.modules())
    assert type(int8.model.base_model.pooler.dense) is torch.nn.Linear
    assert type(int8.model.classifier) is torch.nn.Linear
    assert int8.optimize_for_inference("int8") is int8  # idempotent: a second call changes nothing


def test_fp32_changes_nothing(student):
    before = student.predict_proba(TEXTS)
    assert student.optimize_for_inference("fp32") is student
    np.testing.assert_array_equal(student.predict_proba(TEXTS), before)


def test_an_int8_student_only_serves(student, tmp_path):
    student.optimize_for_inference("int8")
    with pytest.raises(ModelError, match="^a int8 student cannot be saved; use the fp32 model it was made from$"):
        student.save(tmp_path / "q")
    with pytest.raises(ModelError, match="^a int8 student cannot be trained"):
        student.fit(None, None, None)
    with pytest.raises(ModelError, match="^a int8 student cannot go back to fp32; load the model again$"):
        student.optimize_for_inference("fp32")
    with pytest.raises(ModelError, match="^a int8 student runs on the CPU only, not on meta$"):
        student.to("meta")


def test_quantize_mode_is_validated(student):
    with pytest.raises(ValueError, match="^quantize must be one of fp32, int8, got 'int4'$"):
        student.optimize_for_inference("int4")


@pytest.mark.parametrize("full_range", [True, False])
def test_int8_linear_matches_fp32_within_quantization_error(full_range):
    if full_range and not cpu_has_vnni():
        # what 7-bit inputs are for: AVX2 kernels sum pairs of 8-bit products in int16, which
        # saturates (errors of ~30% of the output range here); quantize_linear_layers picks 7 bits
        pytest.skip("8-bit inputs saturate without VNNI; this CPU gets 7-bit inputs (full_range=False)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))
    x = torch.randn(5, 7, 64)  # (batch, tokens, features), as in an encoder
    with torch.inference_mode():
        expected = model(x)
        assert quantize_linear_layers(model, full_range=full_range) == 2
        got = model(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert isinstance(model[0], Int8Linear) and model[0].full_range is full_range
    # 8-bit inputs: ~1% of the output range; 7-bit: about twice that
    tolerance = 0.02 if full_range else 0.04
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


# --- optimize_for_inference(graph="torchscript") (PGKD_INFERENCE_GRAPH) -------------------


@pytest.mark.parametrize("quantize", ["fp32", "int8"])
def test_the_traced_graph_gives_the_eager_results(student, quantize):
    eager = student.clone().optimize_for_inference(quantize)
    traced = student.clone().optimize_for_inference(quantize, "torchscript")
    assert traced.graph == "torchscript" and eager.graph == "eager" and student.graph == "eager"
    for batch_size in (1, 2, 5):  # unpadded single texts, padded pairs, all at once: other shapes than the trace's
        np.testing.assert_allclose(traced.predict_proba(TEXTS, batch_size), eager.predict_proba(TEXTS, batch_size),
                                   atol=1e-6)
    long = ["word " * 100]  # truncated to max_length: the longest shape the graph sees
    np.testing.assert_allclose(traced.predict_proba(long), eager.predict_proba(long), atol=1e-6)
    assert traced.optimize_for_inference(quantize, "torchscript") is traced  # idempotent


def test_a_traced_student_only_serves(student, tmp_path):
    student.optimize_for_inference("fp32", "torchscript")
    with pytest.raises(ModelError, match="^a torchscript student cannot be saved; use the eager model"):
        student.save(tmp_path / "t")
    with pytest.raises(ModelError, match="^a torchscript student cannot be trained"):
        student.fit(None, None, None)
    with pytest.raises(ModelError, match="^a torchscript student stays on cpu; load the model again for meta$"):
        student.to("meta")
    with pytest.raises(ModelError, match="^a torchscript student cannot go back to eager"):
        student.optimize_for_inference("fp32", "eager")
    with pytest.raises(ModelError, match="^quantize before tracing"):
        student.optimize_for_inference("int8", "torchscript")
    with pytest.raises(ValueError, match="^graph must be one of eager, torchscript, onnxruntime, got 'onnx'$"):
        student.optimize_for_inference("fp32", "onnx")


def test_a_traced_clone_runs_its_own_weights(student):
    traced = student.optimize_for_inference("fp32", "torchscript")
    twin = traced.clone()
    assert twin.graph == "torchscript"
    before = traced.predict_proba(TEXTS)
    with torch.no_grad():
        twin.model.classifier.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    twin = twin.clone()  # traced again, from the changed weights
    assert (twin.predict_proba(TEXTS).argmax(1) == 0).all()
    np.testing.assert_array_equal(traced.predict_proba(TEXTS), before)  # the original's graph did not change


class _BranchesOnValues(torch.nn.Module):
    """A classifier whose forward takes a Python branch on its input's values:
    a trace records one branch only, so it must be refused."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        out = self.model(**inputs)
        if bool(inputs["input_ids"].shape[0] > 2):  # the trace sees a batch of 2
            out.logits = out.logits + 1.0
        return out


def test_a_model_that_does_not_trace_faithfully_is_refused(student):
    with pytest.raises(TraceError, match="^the traced graph's logits differ from the model's by 1 on a batch of 3"):
        trace_forward(_BranchesOnValues(student.model).eval(), student.encode)


def test_a_model_that_cannot_be_traced_is_refused(student):
    class Unsupported(torch.nn.Module):
        def forward(self, **inputs):
            raise RuntimeError("an op the tracer does not know\nsecond line")

    with pytest.raises(TraceError, match="^torch.jit.trace failed: RuntimeError: an op the tracer does not know$"):
        trace_forward(Unsupported(), student.encode)


def test_one_tokenizer_serves_several_threads_at_once(tiny_encoder_dir):
    """Clones and inference lanes share a student's tokenizer between threads (and a
    hot swap warms a new version while the old one serves): encoding must stay correct."""
    import threading

    student = Student.from_pretrained(tiny_encoder_dir, ["a", "b"], max_length=16, device="cpu")
    texts = [f"text number {i} " + "word " * (i % 9) for i in range(40)]
    expected = [enc["input_ids"].tolist() for _, enc in student.batches(texts, 4)]
    errors, wrong = [], []

    def work():
        for _ in range(50):
            try:
                if [enc["input_ids"].tolist() for _, enc in student.batches(texts, 4)] != expected:
                    wrong.append(1)
            except Exception as err:  # noqa: BLE001 - e.g. tokenizers' "RuntimeError: Already borrowed"
                errors.append(repr(err))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (errors[:1], len(wrong)) == ([], 0)


def test_the_same_tokenizer_is_saved_as_the_same_files_whatever_it_did_before(tiny_encoder_dir, tmp_path):
    student = Student.from_pretrained(tiny_encoder_dir, ["a", "b"], max_length=16, device="cpu")
    student.save(tmp_path / "fresh")
    student.predict_proba(["a text", "a somewhat longer text"])  # leaves truncation and padding in the backend
    student.tokenizer(["x"], padding="max_length", max_length=24)
    student.save(tmp_path / "used")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "fresh" / name).read_bytes() == (tmp_path / "used" / name).read_bytes(), name
    assert student.encode(["a text", "a somewhat longer text"])["input_ids"].shape == (2, 6)  # calls set their own
