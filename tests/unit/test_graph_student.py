"""GraphStudent: the ONNX Runtime student without torch gives the torch student's
answers over the same graph, and its tokenizer is checked against transformers'."""

import json

import numpy as np
import pytest

from pgkd.errors import ModelError
from pgkd.graph_student import CHECK_TEXTS, GraphStudent, GraphTokenizer, softmax, tokenizer_matches
from pgkd.inference_onnx import build_onnx, load_graph
from pgkd.inference_opt import TRACE_EXAMPLE
from pgkd.student import Student

LABELS = ["neg", "neu", "pos"]
TEXTS = [
    "short",
    "a considerably longer text that needs many more tokens than the others do",
    "mid length text here",
    "x",
    "",
    "Crème brûlée, 我的卡 💳",
    "word " * 100,  # truncated to max_length
    "another fairly long sentence, with punctuation; and more words",
]


@pytest.fixture
def saved(tiny_encoder_dir, tmp_path):
    """A saved student with its int8 graph, and the torch student serving that graph."""
    student = Student.from_pretrained(tiny_encoder_dir, LABELS, max_length=32, device="cpu")
    student.model.eval()
    path = tmp_path / "v"
    student.save(path)
    (path / "onnx").mkdir()
    names = build_onnx(student.model, student.encode, "int8", path / "onnx" / "model.int8.onnx", threads=1)
    forward = load_graph(path, {"file": "onnx/model.int8.onnx", "inputs": list(names)}, threads=1)
    return path, forward, student


def test_it_answers_as_the_torch_student_over_the_same_graph(saved):
    path, forward, _ = saved
    torch_served = Student.served_by(path, forward, "int8", "onnxruntime")
    served = GraphStudent.served_by(path, forward, "int8")
    assert (served.labels, served.max_length, served.graph, served.quantize) == (LABELS, 32, "onnxruntime", "int8")
    for batch_size in (1, 3, 64):  # the same passes: int8 activations are quantized per pass
        np.testing.assert_allclose(served.predict_proba(TEXTS, batch_size), torch_served.predict_proba(TEXTS, batch_size),
                                   atol=1e-6)
    assert served.predict(TEXTS) == torch_served.predict(TEXTS)
    assert served.predict_proba([]).shape == (0, 3)
    with pytest.raises(TypeError, match="single str"):
        served.predict_proba("one text")


def test_its_tokenizer_gives_transformers_ids_and_a_difference_is_named(saved):
    path, _, student = saved
    assert tokenizer_matches(student, path, TRACE_EXAMPLE) == ""
    ids = [e.ids for e in GraphTokenizer(path, 32).encode(CHECK_TEXTS)]
    assert ids == student.tokenizer(list(CHECK_TEXTS), truncation=True, max_length=32)["input_ids"]
    assert max(map(len, ids)) == 32  # truncated with its special tokens

    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "[UNK]"}))
    assert tokenizer_matches(student, path, TRACE_EXAMPLE) == "the tokenizers library pads otherwise than transformers"
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "no such token"}))
    assert tokenizer_matches(student, path, TRACE_EXAMPLE).endswith("names no pad token the tokenizer knows")


def test_an_unexpected_failure_of_the_tokenizer_check_only_withholds_the_record(saved, monkeypatch):
    path, _, student = saved

    def broken(self, texts):
        raise RuntimeError("encode_batch blew up\nwith a second line")

    monkeypatch.setattr(GraphTokenizer, "encode", broken)
    assert tokenizer_matches(student, path, TRACE_EXAMPLE) == (
        "the tokenizer check failed: RuntimeError: encode_batch blew up")


def test_a_directory_it_cannot_serve_is_a_model_error(saved):
    path, forward, _ = saved
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"^cannot load .*tokenizer\.json: "):
        GraphStudent.served_by(path, forward, "int8")
    (path / "labels.json").unlink()
    with pytest.raises(ModelError, match=r"has no labels\.json"):
        GraphStudent.served_by(path, forward, "int8")


def test_softmax_rows_sum_to_one_in_float32():
    logits = np.random.default_rng(0).normal(size=(5, 77)) * 30
    probs = softmax(logits)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    assert (probs.argmax(axis=1) == logits.argmax(axis=1)).all()


def test_what_the_classify_curator_and_teacher_workers_import_leaves_torch_out():
    # torch and transformers: ~12 s of CPU at each start on 2 cores, ~750 MB, ~400k objects for the GC
    import subprocess
    import sys

    modules = ["pgkd.serving", "pgkd.graph_student", "pgkd.inference_onnx", "pgkd.retrain", "pgkd.curation",
               "pgkd.teacher", "pgkd.labelling", "streams.hotswap", "streams.drift_metrics", "streams.delivery"]
    probe = f"import sys; import {', '.join(modules)}; print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_a_worker_serving_a_model_directory_by_onnx_runtime_never_imports_torch(saved):
    # PGKD_SERVE_MODEL (no registry): the graph is built by a child process, which checks the
    # tokenizer; this process then serves it as a GraphStudent (the registry's case: test_registry)
    import os
    import socket
    import subprocess
    import sys

    path, _, _ = saved
    with socket.socket() as sock:  # a port nothing listens on: the registry's Redis is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")} | {
        "PGKD_SERVE_MODEL": str(path), "PGKD_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "PGKD_INFERENCE_GRAPH": "onnxruntime", "PGKD_INFERENCE_QUANTIZE": "int8", "PGKD_TORCH_THREADS": "1"}
    probe = ("import sys; from pgkd.serving import load_serving_model; from pgkd.settings import load_settings; "
             "m = load_serving_model(load_settings()); m.student.predict_proba(['x']); "
             "print(type(m.student).__name__, sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0 and done.stdout.split() == ["GraphStudent", "[]"], done.stderr[-2000:]


def test_default_threads_are_torchs_default_without_importing_torch(monkeypatch):
    import os
    import subprocess
    import sys

    from pgkd.graph_student import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    probe = "import torch; from pgkd.graph_student import default_threads; print(torch.get_num_threads(), default_threads())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env, check=True)
    torch_default, ours = done.stdout.split()
    assert ours == torch_default
