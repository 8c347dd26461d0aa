"""The model registry on a real Redis and a temporary store: publish, verify,
promote/rollback, rounds, serving from the registry, and ``pgkd models``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import redis

from pgkd import registry as registry_module
from pgkd.cli import main
from pgkd.graph_student import GraphStudent
from pgkd.errors import (
    ConfigError,
    ModelIntegrityError,
    RegistryError,
    RegistryUnavailable,
)
from pgkd import registry_cli
from pgkd.priority import ADMIN_NICE
from pgkd.registry import Registry
from pgkd.serving import load_serving_model, load_taxonomy, load_version, serve_path
from pgkd.settings import load_settings

pytestmark = pytest.mark.integration

LABELS = ["card_lost", "refund", "top_up"]
NS = "t"


@pytest.fixture(scope="module")
def student(tiny_encoder_dir):
    import torch

    from pgkd.student import Student

    torch.set_num_threads(1)
    return Student.from_pretrained(tiny_encoder_dir, LABELS, max_length=32, device="cpu")


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def registry(store, redis_db_url):
    with Registry(store, redis_db_url, namespace=NS) as reg:
        yield reg


@pytest.fixture
def env(monkeypatch, store, redis_db_url):
    """PGKD_* variables for code that reads settings (serving, the CLI); nothing else set."""
    for name in list(os.environ):
        if name.startswith("PGKD_") and not name.startswith(("PGKD_TEST_", "PGKD_SETUP_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PGKD_MODEL_STORE", str(store))
    monkeypatch.setenv("PGKD_REDIS_URL", redis_db_url)
    monkeypatch.setenv("PGKD_APP_ID_PREFIX", NS)
    return monkeypatch


def publish(registry, student, parent=None, round=0, macro_f1=0.5):
    return registry.publish(student, parent=parent, round=round, data={"train": 12, "val": 6},
                            metrics={"macro_f1": macro_f1, "accuracy": macro_f1 + 0.1}, settings={"lr": 2e-5})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- publish and verify -------------------------------------------------------------


def test_publish_writes_every_file_with_its_sha256_and_does_not_promote(registry, student, store):
    version = publish(registry, student)
    assert version == "v0001" and registry.versions() == ["v0001"]
    assert registry.current() is None  # publishing is not promoting
    path = store / version
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "labels.json", "manifest.json"} <= names
    assert not [p for p in store.iterdir() if p.name.startswith(".tmp-")]

    manifest = registry.verify(version)
    assert manifest == registry.manifest(version)
    assert manifest["files"] == {name: sha256(path / name) for name in names - {"manifest.json"}}
    assert {k: manifest[k] for k in ("version", "parent", "round", "data", "settings")} == {
        "version": "v0001", "parent": None, "round": 0, "data": {"train": 12, "val": 6}, "settings": {"lr": 2e-5}}
    assert manifest["metrics"]["macro_f1"] == 0.5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created_at"])

    assert "drift_reference" not in manifest  # only when the trainer passes one
    with_ref = registry.publish(student, parent=version, round=1, data={}, metrics={}, settings={},
                                drift_reference={"classes": {"a": 1.0}})
    assert registry.verify(with_ref)["drift_reference"] == {"classes": {"a": 1.0}}

    loaded = registry.load(version, device="cpu")
    assert loaded.labels == LABELS
    assert loaded.predict(["I lost my card"]) == student.predict(["I lost my card"])
    assert registry.labels(version) == LABELS


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: flip_byte(p / "model.safetensors"),
         (r"v0001 refused: model\.safetensors does not match its sha256 \(manifest [0-9a-f]{12}\.\.\., "
          r"file [0-9a-f]{12}\.\.\.\) in .*/store/v0001")),
        (lambda p: (p / "tokenizer.json").unlink(),
         r"v0001 refused: tokenizer\.json is missing \(listed in manifest\.json\) in .*/store/v0001"),
        (lambda p: (p / "notes.txt").write_text("hello"),
         r"v0001 refused: notes\.txt is not listed in manifest\.json \(extra file\) in .*/store/v0001"),
        (lambda p: (p / "manifest.json").unlink(), r"v0001 refused: manifest\.json is missing in .*/store/v0001"),
        (lambda p: (p / "manifest.json").write_text("{not json"),
         r"v0001 refused: manifest\.json is unreadable \(.*\) in .*/store/v0001"),
    ],
    ids=["flipped-weight-byte", "deleted-file", "extra-file", "no-manifest", "bad-manifest"],
)
def test_a_damaged_version_is_never_loaded(registry, student, store, damage, expected):
    version = publish(registry, student)
    damage(store / version)
    with pytest.raises(ModelIntegrityError, match=f"^{expected}$"):
        registry.verify(version)
    with pytest.raises(ModelIntegrityError, match=f"^{expected}$"):
        registry.load(version)


def test_names_that_are_not_versions_are_refused(registry, student):
    with pytest.raises(RegistryError, match=r"^not a version name: '\.\./etc' \(expected v0001-style\)$"):
        registry.load("../etc")
    with pytest.raises(RegistryError, match=r"^no version v0042 in the model store .*/store$"):
        registry.verify("v0042")


def test_a_publish_that_dies_midway_is_never_listed_nor_current(registry, student, store, monkeypatch):
    # An error while writing: the temporary directory is removed.
    def broken_save(path):
        student.save(path)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        registry._publish(broken_save, parent=None, round=0, data={}, metrics={}, settings={})
    assert list(store.iterdir()) == []

    # A kill just before the rename (no cleanup runs): a complete .tmp-* directory stays behind.
    def killed(src, dst):
        raise SystemExit("killed")

    monkeypatch.setattr(registry_module, "_rename_new", killed)
    monkeypatch.setattr(registry_module.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        publish(registry, student)
    monkeypatch.undo()
    (leftover,) = store.iterdir()
    assert leftover.name.startswith(".tmp-") and (leftover / "manifest.json").is_file()
    assert registry.versions() == [] and registry.current() is None
    with pytest.raises(RegistryError, match="^not a version name"):
        registry.promote(leftover.name, reason="x")

    # The next publish gets a fresh number and is the only version listed.
    version = publish(registry, student)
    assert registry.versions() == [version] and version != "v0001"  # the dead publish used v0001


def test_concurrent_publishers_get_distinct_versions(store, redis_db_url, student):
    results: list[str] = []
    errors: list[BaseException] = []

    def trainer():
        try:
            with Registry(store, redis_db_url, namespace=NS) as reg:  # its own connection, like another process
                results.extend(publish(reg, student) for _ in range(3))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=trainer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [f"v{n:04d}" for n in range(1, 7)]
    with Registry(store, redis_db_url, namespace=NS) as reg:
        assert reg.versions() == sorted(results)
        for version in results:
            reg.verify(version)


def test_a_shared_store_never_overwrites_another_namespaces_version(store, redis_db_url, student):
    with Registry(store, redis_db_url, namespace="a") as a, Registry(store, redis_db_url, namespace="b") as b:
        assert publish(a, student) == "v0001"
        assert publish(b, student) == "v0002"  # b's counter said 1; v0001 is taken
        assert a.versions() == ["v0001", "v0002"]


# --- promote, rollback, history ---------------------------------------------------------


def test_promote_rollback_and_history(registry, student):
    v1, v2, v3 = (publish(registry, student, round=i) for i in range(3))
    registry.promote(v1, reason="seed")
    registry.promote(v2, reason="round 1 passed", round=1)
    entry = registry.promote(v3, reason="round 2 passed", round=2)
    assert {k: entry[k] for k in ("action", "version", "previous", "reason", "round")} == {
        "action": "promote", "version": v3, "previous": v2, "reason": "round 2 passed", "round": 2}
    assert registry.current() == v3

    with pytest.raises(RegistryError, match="^v0003 is already the current version$"):
        registry.promote(v3, reason="again")

    assert registry.rollback(reason="bad answers")["version"] == v2
    assert registry.rollback()["version"] == v1  # a second rollback walks further back
    with pytest.raises(RegistryError, match="^nothing to roll back to: v0001 is the first promoted version$"):
        registry.rollback()
    assert registry.current() == v1

    history = registry.history()
    assert [(e["action"], e["version"], e["previous"]) for e in history] == [
        ("promote", v1, None), ("promote", v2, v1), ("promote", v3, v2),
        ("rollback", v2, v3), ("rollback", v1, v2),
    ]
    assert history[3]["reason"] == "bad answers" and history[4]["reason"] == "operator rollback"
    assert [e["version"] for e in registry.history(limit=2)] == [v2, v1]
    # promoting after a rollback, then rolling back, returns to where the rollback left it
    registry.promote(v3, reason="fixed")
    assert registry.rollback()["version"] == v1


def test_a_tampered_version_is_never_promoted_and_the_pointer_stays(registry, student, store):
    good, bad = publish(registry, student), publish(registry, student)
    registry.promote(good, reason="seed")
    flip_byte(store / bad / "model.safetensors")
    with pytest.raises(ModelIntegrityError, match=r"^v0002 refused: model\.safetensors does not match"):
        registry.promote(bad, reason="looks fine")
    assert registry.current() == good
    assert [e["version"] for e in registry.history()] == [good]


def test_a_rollback_to_a_tampered_version_is_refused(registry, student, store):
    v1, v2 = publish(registry, student), publish(registry, student)
    registry.promote(v1, reason="seed")
    registry.promote(v2, reason="next")
    (store / v1 / "labels.json").unlink()
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: labels\.json is missing"):
        registry.rollback()
    assert registry.current() == v2 and len(registry.history()) == 2


def test_a_pointer_move_hashes_only_the_files_changed_since_they_last_matched(registry, student, store, monkeypatch):
    version = publish(registry, student)
    time.sleep(3 * registry_module.RACY_S)  # past the file system's clock tick: every stamp can be trusted
    files = sorted(registry.manifest(version)["files"])
    hashed: list[str] = []
    real = registry_module.sha256_file
    monkeypatch.setattr(registry_module, "sha256_file",
                        lambda p: hashed.append(p.relative_to(store / version).as_posix()) or real(p))
    registry.verify_unchanged(version)  # what publish could not stamp (written just before it hashed them)
    assert set(hashed) <= set(files)
    hashed.clear()

    registry.promote(version, reason="seed")
    assert hashed == []  # nothing changed since: stat calls, no sha256
    registry.verify(version)
    assert sorted(hashed) == files  # a reader's verify hashes every file, every time
    hashed.clear()

    labels = store / version / "labels.json"
    labels.write_bytes(labels.read_bytes())  # the same bytes, but written: its ctime moved
    time.sleep(3 * registry_module.RACY_S)
    registry.verify_unchanged(version)
    assert hashed == ["labels.json"]
    hashed.clear()
    registry.verify_unchanged(version)
    assert hashed == []  # matched again, and recorded

    flip_byte(store / version / "model.safetensors")  # same size, other bytes: the stamp moved, so hashed
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: model\.safetensors does not match"):
        registry.promote(version, reason="again")
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: model\.safetensors does not match"):
        registry.verify_unchanged(version)  # a refusal is never recorded


def test_a_record_of_hashed_files_that_cannot_be_read_means_a_full_hash_not_a_refusal(registry, student, redis_db_url,
                                                                                       caplog):
    version = publish(registry, student)
    time.sleep(3 * registry_module.RACY_S)  # stamps that can be trusted: the promote tries to record them
    client = redis.Redis.from_url(redis_db_url, decode_responses=True)
    try:
        client.delete(f"{NS}:registry:hashed:{version}")
        client.set(f"{NS}:registry:hashed:{version}", "not a hash")  # WRONGTYPE for HGETALL and HSET
        entry = registry.promote(version, reason="seed")
    finally:
        client.close()
    assert entry["version"] == version and registry.current() == version
    assert "no record of v0001's hashed files" in caplog.text and "could not record v0001's hashed files" in caplog.text


def test_concurrent_promotions_each_record_the_previous_they_replaced(registry, student, store, redis_db_url):
    versions = [publish(registry, student) for _ in range(4)]
    barrier = threading.Barrier(4)

    def promoter(version):
        with Registry(store, redis_db_url, namespace=NS) as reg:
            barrier.wait()
            reg.promote(version, reason="race")

    threads = [threading.Thread(target=promoter, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = registry.history()
    assert sorted(e["version"] for e in history) == versions
    # MULTI/EXEC under WATCH: the entries chain, each previous is the one before it
    assert [e["previous"] for e in history] == [None] + [e["version"] for e in history[:-1]]
    assert registry.current() == history[-1]["version"]


# --- rounds -------------------------------------------------------------------------


def test_rounds_claims_and_numbers(registry):
    assert [registry.next_round() for _ in range(3)] == [1, 2, 3]
    assert registry.claim_round("req-1", ttl_s=60) is True
    assert registry.claim_round("req-1", ttl_s=60) is False  # the second trainer waits
    registry.release_round("req-1")
    assert registry.claim_round("req-1", ttl_s=60) is True

    registry.record_round({"round": 1, "candidate": "v0002", "current": "v0001", "data": {"accepted": 64},
                           "metrics": {"candidate": {"macro_f1": 0.7}, "current": {"macro_f1": 0.6}},
                           "gate": {"passed": True, "reasons": [], "margins": {"macro_f1": 0.1}},
                           "outcome": "promoted"})
    registry.record_round({"round": 2, "outcome": "failed", "error": "trainer killed", "ts": 5.0})
    rounds = registry.rounds()
    assert [(r["round"], r["outcome"]) for r in rounds] == [(1, "promoted"), (2, "failed")]
    assert isinstance(rounds[0]["ts"], float) and rounds[1]["ts"] == 5.0
    assert registry.rounds(limit=1) == rounds[1:]
    with pytest.raises(ValueError, match="outcome must be one of"):
        registry.record_round({"round": 3, "outcome": "maybe"})


def test_an_unreachable_redis_is_one_line_without_the_password(store, free_port):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with Registry(store, url) as reg, pytest.raises(RegistryUnavailable) as info:
        reg.current()
    message = str(info.value)
    assert message.startswith(f"cannot reach the registry's Redis at redis://:***@127.0.0.1:{url.split(':')[-1]}")
    assert "hunter2" not in message and "\n" not in message
    with pytest.raises(RegistryError, match=r"^not a Redis URL: http://:\*\*\*@cache/0 \(.*\)$"):
        Registry(store, "http://:hunter2@cache/0")


# --- serving from the registry ----------------------------------------------------------


def test_workers_serve_the_current_version_else_the_fallback(env, registry, student, store, tmp_path):
    fallback = tmp_path / "fallback"
    student.save(fallback)
    env.setenv("PGKD_SERVE_MODEL", str(fallback))
    served = load_serving_model(load_settings())
    assert (served.version, served.path) == ("fallback", fallback)  # no current version yet

    version = publish(registry, student)
    registry.promote(version, reason="seed")
    settings = load_settings()
    served = load_serving_model(settings)
    assert (served.version, served.path, served.labels) == (version, store / version, LABELS)
    assert serve_path(settings) == store / version
    assert load_taxonomy(settings) == LABELS
    assert load_version(settings, version).version == version

    flip_byte(store / version / "model.safetensors")
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: model\.safetensors does not match"):
        load_serving_model(settings)


def test_nothing_to_serve_is_a_clear_config_error(env, registry, free_port):
    with pytest.raises(ConfigError, match=r"^no model to serve: PGKD_SERVE_MODEL is not set and the registry "
                                          r"\(redis://.*, namespace t\) has no current version; "
                                          r"publish one with: pgkd models import DIR --promote$"):
        load_serving_model(load_settings())
    env.setenv("PGKD_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ConfigError, match=r"^no model to serve: PGKD_SERVE_MODEL is not set and cannot reach"):
        load_taxonomy(load_settings())


def test_an_unreachable_redis_falls_back_to_serve_model(env, student, tmp_path, free_port, caplog):
    fallback = tmp_path / "model"
    student.save(fallback)
    env.setenv("PGKD_SERVE_MODEL", str(fallback))
    env.setenv("PGKD_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert load_taxonomy(load_settings()) == LABELS
    assert "serving PGKD_SERVE_MODEL=" in caplog.text


# --- ONNX Runtime graphs stored with a version ---------------------------------------------


def test_a_published_graph_serves_without_a_build_and_a_tampered_one_is_refused(env, registry, student, store,
                                                                                monkeypatch):
    import pgkd.inference_onnx

    version = registry.publish(student, parent=None, round=0, data={}, metrics={}, settings={}, graphs=("int8",))
    manifest = json.loads((store / version / "manifest.json").read_text())
    graph = store / version / "onnx" / "model.int8.onnx"
    assert manifest["files"]["onnx/model.int8.onnx"] == sha256(graph)
    entry = manifest["graphs"]["int8"]
    assert (entry["file"], entry["inputs"], entry["opset"]) == ("onnx/model.int8.onnx", list(student.encode(["x"])), 17)
    assert entry["tokenizer"] == "tokenizers"  # its builder checked the tokenizers library against transformers
    registry.promote(version, reason="seed")

    def no_build(*args, **kwargs):
        raise AssertionError("the worker built a graph the version stores")

    monkeypatch.setattr(pgkd.inference_onnx, "build_graph_in_child", no_build)
    env.setenv("PGKD_INFERENCE_GRAPH", "onnxruntime")
    env.setenv("PGKD_INFERENCE_QUANTIZE", "int8")
    served = load_serving_model(load_settings())
    assert (served.version, served.student.graph, served.student.quantize) == (version, "onnxruntime", "int8")
    assert served.student.model is None  # only the session and the tokenizer
    assert isinstance(served.student, GraphStudent)
    # a worker that serves it never imports torch or transformers (start-up time, memory, GC pauses)
    probe = ("import sys; from pgkd.serving import load_serving_model; from pgkd.settings import load_settings; "
             "m = load_serving_model(load_settings()); m.student.predict_proba(['my card is lost']); "
             "print(m.version, type(m.student).__name__, sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == [version, "GraphStudent", "[]"], done.stderr[-2000:]
    texts = ["my card is lost", "refund please, it has been a week"]
    reference = pgkd.inference_onnx.session(str(graph), 1)
    encoding = student.encode(texts)
    logits = reference.run(None, {n: encoding[n].numpy() for n in entry["inputs"]})[0]
    import numpy as np

    expected = np.exp(logits - logits.max(1, keepdims=True))
    assert np.allclose(served.student.predict_proba(texts), expected / expected.sum(1, keepdims=True), atol=1e-5)
    assert np.abs(served.student.predict_proba(texts) - student.predict_proba(texts)).max() < 0.05

    flip_byte(graph)
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: onnx/model\.int8\.onnx does not match its sha256"):
        load_version(load_settings(), version)


def test_a_graph_worker_hashes_only_what_it_reads_and_a_fallback_verifies_the_rest(env, registry, student, store,
                                                                                 monkeypatch):
    import pgkd.inference_onnx

    version = registry.publish(student, parent=None, round=0, data={}, metrics={}, settings={}, graphs=("int8",))
    env.setenv("PGKD_INFERENCE_GRAPH", "onnxruntime")
    env.setenv("PGKD_INFERENCE_QUANTIZE", "int8")
    hashed: list[str] = []
    real_sha256 = registry_module.sha256_file
    monkeypatch.setattr(registry_module, "sha256_file",
                        lambda path: hashed.append(path.relative_to(store / version).as_posix()) or real_sha256(path))
    load_version(load_settings(), version)
    listed = set(registry.manifest(version)["files"])
    assert set(hashed) == listed - {"model.safetensors"}  # other graphs too: unread_by_graph's doctest
    assert {"onnx/model.int8.onnx", "tokenizer.json", "labels.json"} <= set(hashed)

    # the weights it skipped are verified before anything reads them: a build that replaces
    # a stored graph this runtime refuses, a torch worker, a promotion
    flip_byte(store / version / "model.safetensors")

    def unloadable(*args, **kwargs):
        raise pgkd.inference_onnx.OnnxError("the stored ONNX graph does not load: test")

    monkeypatch.setattr(pgkd.inference_onnx, "load_graph", unloadable)
    refused = rf"^{version} refused: model\.safetensors does not match its sha256"
    with pytest.raises(ModelIntegrityError, match=refused):
        load_version(load_settings(), version)
    env.setenv("PGKD_INFERENCE_GRAPH", "torchscript")
    with pytest.raises(ModelIntegrityError, match=refused):
        load_version(load_settings(), version)
    with pytest.raises(ModelIntegrityError, match=refused):
        registry.promote(version, reason="test")


def test_versions_with_the_same_tokenizer_files_share_one_tokenizer_while_one_is_in_memory(env, registry, student):
    """A retrained version keeps its parent's tokenizer files (Student.save), so a
    swap to it reuses the served tokenizer instead of parsing tokenizer.json again."""
    import gc

    from pgkd.serving import _TOKENIZERS, tokenizer_key

    first = registry.publish(student, parent=None, round=0, data={}, metrics={}, settings={}, graphs=("int8",))
    second = registry.publish(student, parent=first, round=1, data={}, metrics={}, settings={}, graphs=("int8",))
    key = tokenizer_key(registry.manifest(first))
    assert key == tokenizer_key(registry.manifest(second)) and "tokenizer.json" in dict(key)
    env.setenv("PGKD_INFERENCE_GRAPH", "onnxruntime")
    env.setenv("PGKD_INFERENCE_QUANTIZE", "int8")
    a = load_version(load_settings(), first)
    b = load_version(load_settings(), second)
    assert a.student.graph == b.student.graph == "onnxruntime"
    assert b.student.tokenizer is a.student.tokenizer
    texts = ["my card is lost", "I want a refund for this", "top up"]
    assert (a.student.predict_proba(texts) == b.student.predict_proba(texts)).all()
    # nothing keeps a tokenizer alive once no served version holds it
    del a, b
    gc.collect()
    assert key not in _TOKENIZERS
    assert load_version(load_settings(), first).student.tokenizer is not None


def test_a_graph_that_cannot_be_built_is_left_out_and_the_version_still_publishes(registry, student, store,
                                                                                  monkeypatch, caplog):
    import pgkd.inference_onnx

    def refuse(*args, **kwargs):
        raise pgkd.inference_onnx.OnnxError("ONNX export failed: RuntimeError: unsupported operator")

    monkeypatch.setattr(pgkd.inference_onnx, "build_graph_in_child", refuse)
    version = registry.publish(student, parent=None, round=0, data={}, metrics={}, settings={}, graphs=("int8",))
    manifest = registry.verify(version)
    assert "graphs" not in manifest and not (store / version / "onnx").exists()
    assert "publishing without the int8 ONNX graph (ONNX export failed: RuntimeError: unsupported operator)" in caplog.text


def test_a_stored_graph_this_runtime_cannot_load_is_rebuilt(env, registry, student, store, monkeypatch, caplog):
    """A graph the worker's ONNX Runtime refuses (here: not a graph at all, with its
    checksum in the manifest, as a newer exporter's opset would be) is built again."""
    import pgkd.inference_onnx

    with monkeypatch.context() as patch:
        patch.setattr(pgkd.inference_onnx, "build_graph_in_child", lambda *a, **kw: (b"not a graph", ("input_ids",), ""))
        version = registry.publish(student, parent=None, round=0, data={}, metrics={}, settings={}, graphs=("int8",))
    env.setenv("PGKD_INFERENCE_GRAPH", "onnxruntime")
    env.setenv("PGKD_INFERENCE_QUANTIZE", "int8")
    served = load_version(load_settings(), version)
    assert served.student.graph == "onnxruntime"
    assert f"the stored ONNX graph of {version} is not served (the stored ONNX graph does not load" in caplog.text
    assert served.student.predict_proba(["my card is lost"]).shape == (1, 3)


# --- pgkd models ------------------------------------------------------------------------


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


REAL_YIELD_CPU = registry_cli._yield_cpu  # the autouse fixture of tests/conftest.py replaces it


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are set with setpriority(2)")
def test_commands_that_hash_a_version_run_at_a_lower_cpu_priority(env, registry, student, capsys, monkeypatch):
    monkeypatch.setattr(registry_cli, "_yield_cpu", REAL_YIELD_CPU)
    version = registry.publish(student, parent=None, round=0, data={}, metrics={}, settings={})
    nice = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # noqa: E731
    seen = {}

    def command(argv):  # on a thread of its own: the niceness is the calling thread's
        before = nice()
        seen[argv[1]] = (main(argv), nice() - before)

    for argv in (["models", "show", version], ["models", "list"]):
        thread = threading.Thread(target=command, args=(argv,))
        thread.start()
        thread.join()
    capsys.readouterr()
    assert seen == {"show": (0, ADMIN_NICE), "list": (0, 0)}  # list reads manifests only


@pytest.fixture
def announced(monkeypatch):
    """A stand-in for streams.announce: records every (settings, entry) it is given."""
    calls: list[tuple] = []
    module = types.ModuleType("streams.announce")
    module.announce_model_update = lambda settings, entry: calls.append((settings, entry))
    monkeypatch.setitem(sys.modules, "streams.announce", module)
    return calls


def test_cli_import_promote_list_show_rollback(env, capsys, student, tmp_path, store, announced):
    run_dir = tmp_path / "runs" / "x"
    student.save(run_dir / "model")
    report = {"train": {"n": 12}, "val": {"accuracy": 0.75, "macro_f1": 0.7, "n": 6, "per_class": {}}}
    (run_dir / "report.json").write_text(json.dumps(report))

    code, out, err = run(capsys, "models", "import", str(run_dir / "model"), "--promote")
    assert code == 0, err
    assert out.splitlines() == [f"imported {run_dir / 'model'} as v0001 in {store}",
                                f"promoted v0001 (previous none): import of {run_dir / 'model'}"]
    assert [entry["version"] for _, entry in announced] == ["v0001"]
    assert announced[0][0].model_store == store

    code, out, _ = run(capsys, "models", "import", str(run_dir / "model"))
    assert code == 0 and out.strip().endswith("as v0002 in " + str(store))
    manifest = json.loads((store / "v0002" / "manifest.json").read_text())
    assert (manifest["round"], manifest["metrics"]["macro_f1"], manifest["data"]) == (0, 0.7, {"train": 12, "val": 6})
    assert manifest["settings"]["imported_from"] == str((run_dir / "model").resolve())

    code, out, _ = run(capsys, "models", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["version", "round", "macro_f1", "accuracy", "parent", "graphs",
                                              "created_at"]
    assert lines[1].split()[:7] == ["*", "v0001", "0", "0.7000", "0.7500", "-", "-"]
    assert lines[2].split()[:6] == ["v0002", "0", "0.7000", "0.7500", "-", "-"]
    assert lines[-1] == "current: v0001"

    code, out, err = run(capsys, "models", "promote", "v0002", "--reason", "better on val")
    assert (code, out) == (0, "promoted v0002 (previous v0001): better on val\n")
    code, out, err = run(capsys, "models", "rollback", "--reason", "complaints")
    assert (code, out) == (0, "rolled back to v0001 (previous v0002): complaints\n")
    assert [(e["action"], e["version"]) for _, e in announced] == [
        ("promote", "v0001"), ("promote", "v0002"), ("rollback", "v0001")]

    code, out, _ = run(capsys, "models", "history")
    assert [line.split()[1:3] for line in out.splitlines()[1:]] == [
        ["promote", "v0001"], ["promote", "v0002"], ["rollback", "v0001"]]

    code, out, _ = run(capsys, "models", "show", "v0002")
    shown = json.loads(out)
    assert code == 0 and (shown["verified"], shown["problem"], shown["current"]) == (True, None, False)
    assert shown["manifest"]["version"] == "v0002"

    flip_byte(store / "v0002" / "model.safetensors")
    code, out, _ = run(capsys, "models", "show", "v0002")
    shown = json.loads(out)
    assert code == 1 and shown["verified"] is False
    assert shown["problem"].startswith("v0002 refused: model.safetensors does not match its sha256")


def test_cli_import_stores_the_onnx_graph_asked_for(env, capsys, student, tmp_path, store, monkeypatch):
    import pgkd.inference_onnx

    built = []
    monkeypatch.setattr(pgkd.inference_onnx, "build_graph_in_child",
                        lambda model_dir, quantize, *a, **kw: built.append(quantize) or (b"graph", ("input_ids",), ""))
    student.save(tmp_path / "model")
    code, out, err = run(capsys, "models", "import", str(tmp_path / "model"))
    assert (code, built) == (0, []), err  # auto: the default settings serve torchscript
    env.setenv("PGKD_INFERENCE_GRAPH", "onnxruntime")
    env.setenv("PGKD_INFERENCE_QUANTIZE", "int8")
    code, out, err = run(capsys, "models", "import", str(tmp_path / "model"))
    assert (code, built, out) == (0, ["int8"], f"imported {tmp_path / 'model'} as v0002 in {store} "
                                               "with the int8 ONNX graph\n"), err
    code, out, err = run(capsys, "models", "import", str(tmp_path / "model"), "--onnx", "none")
    assert (code, built) == (0, ["int8"]) and "graphs" not in json.loads((store / "v0003" / "manifest.json").read_text())
    code, out, err = run(capsys, "models", "import", str(tmp_path / "model"), "--onnx", "fp32")
    assert (code, built) == (0, ["int8", "fp32"])
    assert (store / "v0004" / "onnx" / "model.fp32.onnx").read_bytes() == b"graph"
    code, out, err = run(capsys, "models", "list")
    assert [line.split()[:6:5] for line in out.splitlines()[1:5]] == [
        ["v0001", "-"], ["v0002", "int8"], ["v0003", "-"], ["v0004", "fp32"]]

    monkeypatch.setattr(pgkd.inference_onnx, "build_graph_in_child", _refuse_to_build)
    code, out, err = run(capsys, "models", "import", str(tmp_path / "model"), "--onnx", "int8")
    assert code == 0 and out.endswith("as v0005 in " + str(store) + "\n")
    assert err == "warning: the int8 ONNX graph could not be built (see the log); workers serving it build their own\n"


def _refuse_to_build(*args, **kwargs):
    import pgkd.inference_onnx

    raise pgkd.inference_onnx.OnnxError("no")


def test_cli_rounds(env, capsys, registry):
    code, out, _ = run(capsys, "models", "rounds")
    assert (code, out) == (0, "no retrain rounds recorded\n")
    registry.record_round({"round": 1, "candidate": "v0002", "current": "v0001", "outcome": "promoted", "ts": 0.0,
                           "metrics": {"candidate": {"macro_f1": 0.71}, "current": {"macro_f1": 0.65}},
                           "gate": {"passed": True, "reasons": [], "margins": {"macro_f1": 0.06, "accuracy": 0.02}}})
    registry.record_round({"round": 2, "candidate": "v0003", "current": "v0002", "outcome": "rejected", "ts": 0.0,
                           "metrics": {"candidate": {"macro_f1": 0.60}, "current": {"macro_f1": 0.71}},
                           "gate": {"passed": False, "reasons": ["macro-F1 0.6000 < current 0.7100 + margin 0.0000"],
                                    "margins": {}}})
    registry.record_round({"round": 3, "outcome": "failed", "error": "trainer killed", "ts": 0.0})
    code, out, _ = run(capsys, "models", "rounds")
    assert code == 0
    assert [re.split(r"\s{2,}", line) for line in out.splitlines()] == [
        ["round", "outcome", "candidate", "current", "cand_f1", "curr_f1", "when", "gate"],
        ["1", "promoted", "v0002", "v0001", "0.7100", "0.6500", "1970-01-01T00:00:00Z",
         "passed (macro-F1 +0.0600, accuracy +0.0200)"],
        ["2", "rejected", "v0003", "v0002", "0.6000", "0.7100", "1970-01-01T00:00:00Z",
         "macro-F1 0.6000 < current 0.7100 + margin 0.0000"],
        ["3", "failed", "-", "-", "-", "-", "1970-01-01T00:00:00Z", "failed: trainer killed"],
    ]
    code, out, _ = run(capsys, "models", "rounds", "--json", "--limit", "1")
    assert json.loads(out)["error"] == "trainer killed"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["models", "show", "v0009"], r"no version v0009 in the model store .*/store"),
        (["models", "promote", "nope"], r"not a version name: 'nope' \(expected v0001-style\)"),
        (["models", "rollback"], r"nothing to roll back to: no version has been promoted"),
        (["models", "promote", "v0001"], r"v0001 refused: model\.safetensors does not match its sha256 .*"),
        (["models", "import", "/nonexistent/model"], r"model directory not found: /nonexistent/model"),
    ],
    ids=["unknown-version", "bad-name", "nothing-to-roll-back", "tampered", "import-missing"],
)
def test_cli_errors_are_one_line(env, capsys, registry, student, store, argv, expected):
    publish(registry, student)
    flip_byte(store / "v0001" / "model.safetensors")
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert re.fullmatch(f"pgkd: error: {expected}\n", err), err
    assert registry.current() is None


def test_cli_redis_unreachable_names_the_url_without_the_password(env, capsys, free_port):
    port = free_port()
    env.setenv("PGKD_REDIS_URL", f"redis://:hunter2@127.0.0.1:{port}/0")
    for argv in (["models", "list"], ["models", "rounds"], ["models", "rollback"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"pgkd: error: cannot reach the registry's Redis at redis://:***@127.0.0.1:{port}/0: ")
        assert "hunter2" not in err


def test_cli_promote_without_the_announcer_logs_a_warning(env, capsys, registry, student, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "streams.announce", None)  # as if streams/announce.py did not exist
    publish(registry, student)
    code, out, _ = run(capsys, "models", "promote", "v0001")
    assert (code, out) == (0, "promoted v0001 (previous none): operator promote\n")
    assert "streams.announce is not installed: v0001 is current but was not announced" in caplog.text


def test_cli_a_failed_announcement_keeps_the_promotion(env, capsys, registry, student, monkeypatch):
    def failing(settings, entry):
        raise ConnectionError("broker down")

    module = types.ModuleType("streams.announce")
    module.announce_model_update = failing
    monkeypatch.setitem(sys.modules, "streams.announce", module)
    publish(registry, student)
    code, out, err = run(capsys, "models", "promote", "v0001")
    assert code == 1 and out.startswith("promoted v0001")
    assert err == ("pgkd: error: v0001 is current, but announcing it on model.updates failed "
                   "(ConnectionError: broker down); classifier workers serve it after a restart\n")
    assert registry.current() == "v0001"


def test_redis_keys_live_under_the_namespace(registry, student, redis_db_url):
    registry.promote(publish(registry, student), reason="seed")
    registry.next_round()
    client = redis.Redis.from_url(redis_db_url, decode_responses=True)
    try:
        # the files hashed at publish or at the promotion: recorded unless written too recently to trust
        assert set(client.keys("*")) - {"t:registry:hashed:v0001"} == {
            "t:registry:current", "t:registry:history", "t:registry:round_seq", "t:registry:stack",
            "t:registry:version_seq"}
    finally:
        client.close()
