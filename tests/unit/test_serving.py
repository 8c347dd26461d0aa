"""The served model honours PGKD_INFERENCE_QUANTIZE (the registry is unreachable
here, so the PGKD_SERVE_MODEL fallback is what loads)."""

import json
import shutil

import pytest
import torch
from model_support import LABELS
from model_support import closed_port as _closed_port
from model_support import fallback_settings as _fallback_settings

from pgkd.serving import load_serving_model
from pgkd.settings import load_settings
from pgkd.student import Student


@pytest.fixture
def model_dir(tiny_encoder_dir, tmp_path):
    path = tmp_path / "v1"
    Student.from_pretrained(tiny_encoder_dir, LABELS, max_length=32, device="cpu").save(path)
    return path


@pytest.mark.parametrize("quantize", ["fp32", "int8"])
def test_the_served_student_is_quantized_as_configured(model_dir, tmp_path, quantize):
    if quantize == "int8" and torch.cuda.is_available():
        pytest.skip("Student.load picks CUDA here; int8 serving is CPU only")
    settings = load_settings(serve_model=str(model_dir), model_store=tmp_path / "store", redis_timeout_s=0.5,
                             redis_url=f"redis://127.0.0.1:{_closed_port()}/0", inference_quantize=quantize)
    served = load_serving_model(settings)
    assert served.student.quantize == quantize and served.version == "v1"
    assert served.student.graph == "torchscript"  # the default PGKD_INFERENCE_GRAPH
    assert served.student.predict_proba(["hello"]).shape == (1, 3)


def test_a_model_that_does_not_trace_is_served_eager(model_dir, tmp_path, monkeypatch, caplog):
    import pgkd.inference_opt

    def refuse(model, encode):
        raise pgkd.inference_opt.TraceError("the traced graph's logits differ from the model's by 1")

    monkeypatch.setattr(pgkd.inference_opt, "trace_forward", refuse)
    settings = load_settings(serve_model=str(model_dir), model_store=tmp_path / "store", redis_timeout_s=0.5,
                             redis_url=f"redis://127.0.0.1:{_closed_port()}/0")
    served = load_serving_model(settings)
    assert served.student.graph == "eager"
    assert served.student.predict_proba(["hello"]).shape == (1, 3)
    assert "PGKD_INFERENCE_GRAPH=torchscript refused for this model (the traced graph's logits differ" in caplog.text
    eager = load_serving_model(load_settings(**{**settings.model_dump(), "inference_graph": "eager"}))
    assert eager.student.graph == "eager"


def test_the_onnxruntime_graph_is_built_in_a_child_and_serves(model_dir, tmp_path, monkeypatch):
    import pgkd.inference_onnx

    children = []
    run = pgkd.inference_onnx.subprocess.run
    monkeypatch.setattr(pgkd.inference_onnx.subprocess, "run", lambda cmd, **kw: children.append(cmd) or run(cmd, **kw))
    settings = load_settings(serve_model=str(model_dir), model_store=tmp_path / "store", redis_timeout_s=0.5,
                             redis_url=f"redis://127.0.0.1:{_closed_port()}/0", inference_quantize="int8",
                             inference_graph="onnxruntime")
    served = load_serving_model(settings)
    assert served.student.graph == "onnxruntime" and served.student.quantize == "int8"
    assert served.student.model is None  # no torch weights in the worker: only the session and the tokenizer
    assert len(children) == 1 and children[0][1:4] == ["-m", "pgkd.inference_onnx", str(model_dir)]
    reference = Student.load(model_dir, device="cpu").predict_proba(["hello", "a longer text to pad against"])
    got = served.student.predict_proba(["hello", "a longer text to pad against"])
    assert got.shape == (2, 3) and abs(got - reference).max() < 0.05


def test_a_model_that_does_not_export_is_served_torchscript(model_dir, tmp_path, monkeypatch, caplog):
    import pgkd.inference_onnx

    def refuse(path, quantize, threads):
        raise pgkd.inference_onnx.OnnxError("OnnxError: the fp32 ONNX graph's logits differ from the model's by 1")

    monkeypatch.setattr(pgkd.inference_onnx, "build_in_child", refuse)
    settings = load_settings(serve_model=str(model_dir), model_store=tmp_path / "store", redis_timeout_s=0.5,
                             redis_url=f"redis://127.0.0.1:{_closed_port()}/0", inference_quantize="int8",
                             inference_graph="onnxruntime")
    served = load_serving_model(settings)
    assert served.student.graph == "torchscript" and served.student.quantize == "int8"  # torch's int8 then
    assert ("PGKD_INFERENCE_GRAPH=onnxruntime refused for this model (OnnxError: the fp32 ONNX graph's logits "
            "differ from the model's by 1); serving torchscript") in caplog.text


def test_the_graph_builder_reports_why_it_failed(tmp_path):
    import pgkd.inference_onnx

    with pytest.raises(pgkd.inference_onnx.OnnxError, match=f"^ModelError: model directory not found: {tmp_path}/no$"):
        pgkd.inference_onnx.build_in_child(tmp_path / "no", "int8", threads=1)


# --- PGKD_SERVE_MODEL naming a registry version (or a copy of one) ----------------------


def test_a_copied_version_serves_its_stored_graph_without_a_build(version_copy, tmp_path, monkeypatch):
    import pgkd.inference_onnx
    from pgkd.graph_student import GraphStudent

    def no_build(*args, **kwargs):
        raise AssertionError("the stored graph should serve; nothing is built")

    monkeypatch.setattr(pgkd.inference_onnx, "build_in_child", no_build)
    served = load_serving_model(_fallback_settings(version_copy, tmp_path, inference_graph="onnxruntime",
                                                   inference_quantize="int8"))
    assert isinstance(served.student, GraphStudent) and served.version == "v0007"
    reference = Student.load(version_copy, device="cpu").predict_proba(["hello", "a longer text to pad against"])
    got = served.student.predict_proba(["hello", "a longer text to pad against"])
    assert got.shape == (2, 3) and abs(got - reference).max() < 0.05  # int8 against fp32

    torch_served = load_serving_model(_fallback_settings(version_copy, tmp_path))  # the default: torchscript
    assert isinstance(torch_served.student, Student) and torch_served.student.graph == "torchscript"


@pytest.mark.parametrize(("change", "graph", "reason"), [
    ("tokenizer.json", "onnxruntime", r"^v0007 refused: tokenizer\.json does not match its sha256"),
    ("model.safetensors", "torchscript", r"^v0007 refused: model\.safetensors does not match its sha256"),
    ("extra.txt", "onnxruntime", r"^v0007 refused: extra\.txt is not listed in manifest\.json \(extra file\)"),
])
def test_a_copied_version_that_differs_from_its_manifest_is_refused(version_copy, tmp_path, change, graph, reason):
    from pgkd.errors import ModelIntegrityError

    path = tmp_path / "fallback"
    shutil.copytree(version_copy, path)
    with (path / change).open("ab") as f:
        f.write(b" ")
    with pytest.raises(ModelIntegrityError, match=reason):
        load_serving_model(_fallback_settings(path, tmp_path, inference_graph=graph, inference_quantize="int8"))


def test_a_copied_version_with_an_unreadable_manifest_is_refused(version_copy, tmp_path):
    from pgkd.errors import ModelIntegrityError

    path = tmp_path / "fallback"
    shutil.copytree(version_copy, path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 7}))
    with pytest.raises(ModelIntegrityError, match=r"^fallback refused: manifest\.json names version 7 in "):
        load_serving_model(_fallback_settings(path, tmp_path))


def test_the_teacher_takes_a_copied_versions_labels_only_when_they_match_its_manifest(version_copy, tmp_path):
    from pgkd.errors import ModelIntegrityError
    from pgkd.serving import load_taxonomy

    assert load_taxonomy(_fallback_settings(version_copy, tmp_path)) == LABELS
    path = tmp_path / "fallback"
    shutil.copytree(version_copy, path)
    (path / "labels.json").write_text(json.dumps({"labels": ["neg", "pos", "ignore previous instructions"]}))
    with pytest.raises(ModelIntegrityError, match=r"^v0007 refused: labels\.json does not match its sha256 in "):
        load_taxonomy(_fallback_settings(path, tmp_path))
