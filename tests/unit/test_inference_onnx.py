"""PGKD_INFERENCE_GRAPH=onnxruntime: the exported graph gives the eager results,
int8 quantizes the layers it should, and a graph that cannot be built is refused."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pgkd.errors import ModelError
from pgkd.inference_onnx import (
    BUILD_DIR_PREFIX,
    LAYER_RE,
    OnnxError,
    add_graph,
    build_onnx,
    export_forward,
    export_module,
    halve_embedding_tables,
    load_graph,
    optimize_offline,
    quantize_onnx,
    sweep_stale_builds,
)
from pgkd.student import Student

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


def test_the_onnx_graph_gives_the_eager_results(student):
    expected = {bs: student.predict_proba(TEXTS, bs) for bs in (1, 2, 5)}
    served = student.clone().optimize_for_inference("fp32", "onnxruntime")
    assert served.graph == "onnxruntime" and served.quantize == "fp32"
    for batch_size, probs in expected.items():  # other batch sizes and lengths than the export's example
        np.testing.assert_allclose(served.predict_proba(TEXTS, batch_size), probs, atol=1e-5)
    long = ["word " * 100]  # truncated to max_length
    np.testing.assert_allclose(served.predict_proba(long), student.predict_proba(long), atol=1e-5)
    assert served.optimize_for_inference("fp32", "onnxruntime") is served  # idempotent


def test_the_export_leaves_the_model_in_eval_mode(student):
    # the exporter restores its wrapper's training mode; a wrapper left training would turn
    # dropout on in the eager model (its logits then differ from call to call)
    before = student.predict_proba(TEXTS)
    student.optimize_for_inference("fp32", "onnxruntime")
    assert not student.model.training
    with torch.inference_mode():
        eager = torch.softmax(student.model(**student.encode(TEXTS)).logits, -1).numpy()
    np.testing.assert_allclose(eager, before, atol=1e-6)


def test_a_bert_classifier_is_exported_through_its_own_modules_with_one_mask_a_pass(student, tmp_path):
    # the mask over token pairs is built once; transformers' forward exports torch's fused
    # attention with a NaN guard in every layer (IsNaN), which the BERT module does without
    names = tuple(student.encode(TEXTS).keys())
    module = export_module(student.model, names).eval()
    assert type(module).__name__ == "BertLogits"
    encoding = student.encode(TEXTS)  # padded: the mask matters
    with torch.inference_mode():
        got = module(*(encoding[n] for n in names))
        want = student.model(**encoding).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    target = tmp_path / "model.onnx"
    build_onnx(student.model, student.encode, "fp32", target, threads=1)
    assert "IsNaN" not in {n.op_type for n in onnx.load(str(target)).graph.node}


def test_other_models_and_inputs_are_exported_through_transformers_forward(student):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from pgkd.inference_opt import _Logits

    distil = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=3)).eval()
    assert isinstance(export_module(distil, ("input_ids", "attention_mask")), _Logits)
    # a BERT fed inputs it has no own path for (here: without its attention mask)
    assert isinstance(export_module(student.model, ("input_ids",)), _Logits)


def test_int8_quantizes_the_weight_matmuls_of_every_layer_but_the_last(student, tmp_path):
    source, target = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    example = student.encode(["a short probe", "a longer probe, padded against"])
    names = tuple(example.keys())
    from pgkd.inference_opt import _Logits

    torch.onnx.export(_Logits(student.model, names).eval(), tuple(example[n] for n in names), str(source),
                      input_names=list(names), output_names=["logits"], dynamo=False,
                      dynamic_axes={n: {0: "b", 1: "t"} for n in names})
    chosen = quantize_onnx(source, target, layers=2)
    assert chosen == 6  # layer 0: query, key, value, attention output, intermediate, output
    nodes = onnx.load(str(target)).graph.node
    quantized_layers = {int(LAYER_RE.search(n.name).group(1)) for n in nodes
                        if n.op_type == "MatMulInteger" and LAYER_RE.search(n.name)}
    assert quantized_layers == {0}  # the last layer, the pooler and the head stay fp32
    assert sum(n.op_type == "MatMul" for n in nodes) > 0


@pytest.mark.parametrize("quantize", ["fp32", "int8"])
def test_the_built_graph_is_stored_with_its_fusions_applied(student, tmp_path, quantize):
    # a session of a pre-optimized graph skips the search (half a swap's session time);
    # what is stored is what was checked against the eager model last
    target = tmp_path / "model.onnx"
    names = build_onnx(student.model, student.encode, quantize, target, threads=1)
    fused = {n.op_type for n in onnx.load(str(target)).graph.node if n.domain == "com.microsoft"}
    assert fused, "no ONNX Runtime fusion in the stored graph"
    if quantize == "int8":
        assert fused & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no intermediate left behind
    served = load_graph(tmp_path, {"file": "model.onnx", "inputs": list(names)}, threads=1)
    logits = served(student.encode(TEXTS)).numpy()
    with torch.inference_mode():
        eager = student.model(**student.encode(TEXTS)).logits.numpy()
    assert np.abs(logits - eager).max() < (0.5 if quantize == "int8" else 1e-4)


def test_the_word_embeddings_are_stored_in_fp16_and_give_the_same_logits(student, tmp_path):
    # what the int8 build does to MiniLM's 30522 x 384 table (EMBEDDING_MIN_ELEMENTS), on the tiny
    # model's smaller one; the fp32 graph keeps its fp32 tables (it stays exact)
    target = tmp_path / "model.onnx"
    names = build_onnx(student.model, student.encode, "fp32", target, threads=1)
    words = student.model.config.vocab_size * student.model.config.hidden_size
    size = target.stat().st_size
    assert halve_embedding_tables(target, min_elements=words + 1) == []  # nothing that big: untouched
    assert target.stat().st_size == size

    halved = halve_embedding_tables(target, min_elements=words)
    assert len(halved) == 1 and "word_embeddings" in halved[0]  # not the positions nor the token types
    graph = onnx.load(str(target)).graph
    tables = {i.name: i.data_type for i in graph.initializer if "embeddings" in i.name}
    assert tables[halved[0] + "_fp16"] == onnx.TensorProto.FLOAT16 and halved[0] not in tables
    assert all(t == onnx.TensorProto.FLOAT for name, t in tables.items() if "word_embeddings" not in name)
    assert target.stat().st_size < size - words  # 2 bytes a value saved
    served = load_graph(tmp_path, {"file": "model.onnx", "inputs": list(names)}, threads=1)
    with torch.inference_mode():
        eager = student.model(**student.encode(TEXTS)).logits.numpy()
    np.testing.assert_allclose(served(student.encode(TEXTS)).numpy(), eager, atol=1e-3)


def test_a_table_fp16_cannot_hold_stays_fp32(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    big = np.full((4, 4), 1e5, dtype=np.float32)  # beyond fp16's 65504
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(big, "table")])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert halve_embedding_tables(path, min_elements=1) == []
    big[:] = 1.0  # the same table within fp16's range
    onnx.save(helper.make_model(helper.make_graph(
        graph.node, "g", graph.input, graph.output, [numpy_helper.from_array(big, "table")])), str(path))
    assert halve_embedding_tables(path, min_elements=1) == ["table"]


def test_a_graph_onnx_runtime_cannot_optimize_is_refused_and_removed(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(OnnxError, match="^ONNX Runtime could not optimize the graph: "):
        optimize_offline(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_int8_onnx_student_stays_close_to_fp32(student):
    fp32 = student.predict_proba(TEXTS, 2)
    served = student.clone().optimize_for_inference("int8", "onnxruntime")
    assert served.quantize == "int8" and served.graph == "onnxruntime"
    assert np.abs(served.predict_proba(TEXTS, 2) - fp32).max() < 0.05
    twin = served.clone()  # shares the session: nothing is exported again
    assert twin._forward is served._forward
    np.testing.assert_array_equal(twin.predict_proba(TEXTS, 2), served.predict_proba(TEXTS, 2))


def test_an_onnx_student_only_serves(student, tmp_path):
    student.optimize_for_inference("fp32", "onnxruntime")
    with pytest.raises(ModelError, match="^a onnxruntime student cannot be saved; use the eager model"):
        student.save(tmp_path / "o")
    with pytest.raises(ModelError, match="^a onnxruntime student stays on cpu; load the model again for meta$"):
        student.to("meta")
    with pytest.raises(ModelError, match="^a onnxruntime student cannot go back to eager"):
        student.optimize_for_inference("fp32", "eager")


def test_only_an_eager_fp32_student_is_exported(student):
    student.optimize_for_inference("int8")
    with pytest.raises(ModelError, match="^export to ONNX from the eager fp32 model, not a int8 eager one$"):
        student.optimize_for_inference("int8", "onnxruntime")
    with pytest.raises(ValueError, match="^graph must be one of eager, torchscript, onnxruntime, got 'onnx'$"):
        student.optimize_for_inference("int8", "onnx")


class _BranchesOnShape(torch.nn.Module):
    """A classifier whose forward takes a Python branch on its batch size: the
    export records one branch only, so the check must refuse it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        out = self.model(**inputs)
        if bool(inputs["input_ids"].shape[0] > 2):  # the export sees a batch of 2
            out.logits = out.logits + 1.0
        return out


def test_a_model_that_does_not_export_faithfully_is_refused(student):
    with pytest.raises(OnnxError, match="^the fp32 ONNX graph's logits differ from the model's by 1 on a batch of 3"):
        export_forward(_BranchesOnShape(student.model).eval(), student.encode)


def test_without_onnxruntime_the_export_is_refused(student, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(OnnxError, match=r"^onnxruntime is not installed \(pip install onnxruntime onnx\)$"):
        student.optimize_for_inference("int8", "onnxruntime")
    assert student.graph == "eager" and student.quantize == "fp32"  # unchanged: another graph can serve it


def test_a_stored_graph_loads_as_it_was_built_and_refuses_what_it_cannot_serve(student, tmp_path):
    student.model.eval()
    (tmp_path / "onnx").mkdir()
    names = build_onnx(student.model, student.encode, "int8", tmp_path / "onnx" / "model.int8.onnx", threads=1)
    entry = {"file": "onnx/model.int8.onnx", "inputs": list(names)}
    forward = load_graph(tmp_path, entry, threads=1)
    encoding = student.encode(TEXTS)
    with torch.no_grad():
        eager = student.model(**encoding).logits
    assert forward.names == tuple(names) and (forward(encoding) - eager).abs().max() < 0.5  # int8: INT8_TOLERANCE

    with pytest.raises(OnnxError, match=r"^the stored ONNX graph takes \['input_ids', 'token_type_ids', "
                                        r"'attention_mask'\], its manifest says \['input_ids'\]$"):
        load_graph(tmp_path, {**entry, "inputs": ["input_ids"]}, threads=1)
    (tmp_path / "onnx" / "model.int8.onnx").write_bytes(b"not a graph")
    with pytest.raises(OnnxError, match=r"^the stored ONNX graph does not load: \w+: "):
        load_graph(tmp_path, entry, threads=1)


def test_a_publisher_without_onnxruntime_is_refused_a_graph_and_nothing_is_written(tmp_path, monkeypatch):
    import pgkd.inference_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    monkeypatch.setattr(pgkd.inference_onnx, "build_graph_in_child", lambda *a, **kw: pytest.fail("built"))
    with pytest.raises(OnnxError, match=r"^onnxruntime is not installed \(pip install onnxruntime onnx\)$"):
        add_graph(tmp_path, "int8")
    assert list(tmp_path.iterdir()) == []


# --- the child build: it dies with its worker, and what a killed worker left is swept ----------


def test_stale_build_directories_are_swept_and_live_ones_kept(tmp_path):
    stale, live = tmp_path / (BUILD_DIR_PREFIX + "old"), tmp_path / (BUILD_DIR_PREFIX + "new")
    other = tmp_path / "someone-elses-old-dir"
    for path in (stale, live, other):
        path.mkdir()
        (path / "model.onnx").write_bytes(b"x" * 10)
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    assert sweep_stale_builds(tmp_path, older_than_s=660) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_graph_builder_dies_with_the_worker_that_waits_for_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    # the "worker": starts a child that calls die_with_parent, then is SIGKILLed
    worker = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import os, sys, time\\n"
        "from pgkd.inference_onnx import die_with_parent\\n"
        "die_with_parent(int(sys.argv[1]))\\n"
        "open(sys.argv[2], \"w\").write(str(os.getpid()))\\n"
        "time.sleep(60)', str(os.getpid()), sys.argv[1]])\n"
        "time.sleep(60)\n"), str(pid_file)])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the builder outlived its worker"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, waiting for init to reap it
