"""The served model honours PGKD_INFERENCE_QUANTIZE (the registry is unreachable
here, so the PGKD_SERVE_MODEL fallback is what loads)."""

import socket

import pytest
import torch

from pgkd.serving import load_serving_model
from pgkd.settings import load_settings
from pgkd.student import Student

LABELS = ["neg", "neu", "pos"]


@pytest.fixture
def model_dir(tiny_encoder_dir, tmp_path):
    path = tmp_path / "v1"
    Student.from_pretrained(tiny_encoder_dir, LABELS, max_length=32, device="cpu").save(path)
    return path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


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


@pytest.mark.parametrize("quantize", ["fp32", "int8"])
def test_the_onnxruntime_graph_serves_when_asked(model_dir, tmp_path, quantize):
    settings = load_settings(serve_model=str(model_dir), model_store=tmp_path / "store", redis_timeout_s=0.5,
                             redis_url=f"redis://127.0.0.1:{_closed_port()}/0", inference_quantize=quantize,
                             inference_graph="onnxruntime")
    served = load_serving_model(settings)
    assert served.student.graph == "onnxruntime" and served.student.quantize == quantize
    assert served.student.predict_proba(["hello"]).shape == (1, 3)


def test_a_model_that_does_not_export_is_served_torchscript(model_dir, tmp_path, monkeypatch, caplog):
    import pgkd.inference_onnx

    def refuse(model, encode, quantize):
        raise pgkd.inference_onnx.OnnxError("onnxruntime is not installed (pip install onnxruntime onnx)")

    monkeypatch.setattr(pgkd.inference_onnx, "export_forward", refuse)
    settings = load_settings(serve_model=str(model_dir), model_store=tmp_path / "store", redis_timeout_s=0.5,
                             redis_url=f"redis://127.0.0.1:{_closed_port()}/0", inference_quantize="int8",
                             inference_graph="onnxruntime")
    served = load_serving_model(settings)
    assert served.student.graph == "torchscript" and served.student.quantize == "int8"  # torch's int8 then
    assert ("PGKD_INFERENCE_GRAPH=onnxruntime refused for this model (onnxruntime is not installed (pip install "
            "onnxruntime onnx)); serving torchscript") in caplog.text
