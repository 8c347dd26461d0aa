"""Fast-layer settings. The tiny random BERT (``tiny_encoder_dir``) lives in
tests/conftest.py, so integration tests can use it too."""

import json

import pytest
import torch

# Two cores on the CI box; more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def version_copy(tiny_encoder_dir, tmp_path_factory):
    """A registry version's directory as an operator copies it out of the store
    (under another name): the student, its stored int8 graph, and a manifest that
    names v0007 and lists every file's sha256. Written here as ``Registry.publish``
    writes it, without the Redis that numbers versions."""
    from model_support import LABELS

    from pgkd.inference_onnx import add_graph
    from pgkd.registry import sha256_file
    from pgkd.student import Student

    path = tmp_path_factory.mktemp("copied") / "fallback"
    Student.from_pretrained(tiny_encoder_dir, LABELS, max_length=32, device="cpu").save(path)
    graph = add_graph(path, "int8")
    files = {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    (path / "manifest.json").write_text(json.dumps({"version": "v0007", "files": files, "graphs": {"int8": graph}}))
    return path
