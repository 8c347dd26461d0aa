"""Model artifacts: only safetensors are read, no code shipped with a model runs,
and a version whose files differ from its manifest is refused.

What tests/integration/test_registry.py already covers (a flipped weight byte,
a deleted file, an extra file, a missing or broken manifest, through a real
Redis) is not repeated here; these run without services.
"""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch

from pgkd import registry as registry_module
from pgkd.errors import ModelError, ModelIntegrityError
from pgkd.registry import Registry
from pgkd.student import Student

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def saved(tiny_encoder_dir, tmp_path_factory) -> Path:
    """A directory written by Student.save (module-wide: copy it before changing it)."""
    path = tmp_path_factory.mktemp("artifacts") / "model"
    Student.from_pretrained(tiny_encoder_dir, LABELS, max_length=16, device="cpu").save(path)
    return path


class Trap:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(directory: Path, name: str, marker: Path) -> None:
    (directory / name).write_bytes(pickle.dumps(Trap(marker)))


def publish_by_hand(store: Path, model_dir: Path, version: str = "v0001") -> Path:
    """A stored version as Registry.publish writes it (files + manifest), without Redis."""
    path = store / version
    shutil.copytree(model_dir, path)
    files = {name: registry_module.sha256_file(path / name) for name in registry_module._files(path)}
    (path / "manifest.json").write_text(json.dumps({"version": version, "files": files}))
    return path


def offline_registry(store: Path) -> Registry:
    return Registry(store, "redis://127.0.0.1:9/0", timeout_s=0.1)  # never contacted by verify/load/labels


# --- pickle ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "extra.pkl", "training_args.bin"])
def test_a_pickle_beside_the_safetensors_is_refused_and_never_unpickled(saved, tmp_path, name):
    model = shutil.copytree(saved, tmp_path / "m")
    marker = tmp_path / "unpickled"
    plant_pickle(model, name, marker)
    with pytest.raises(ModelError) as err:
        Student.load(model, device="cpu")
    assert str(err.value) == (
        f"{model} holds a pickle file ({name!r}); only safetensors checkpoints are loaded: remove it"
    )
    assert not marker.exists()


def test_a_version_listing_a_pickle_is_refused_before_anything_is_loaded(saved, tmp_path):
    store = tmp_path / "store"
    marker = tmp_path / "unpickled"
    model = shutil.copytree(saved, tmp_path / "m")
    torch.save(Trap(marker), model / "pytorch_model.bin")  # what a pickle checkpoint really is
    publish_by_hand(store, model)  # listed in the manifest, with its right sha256
    registry = offline_registry(store)
    expected = r"^v0001 refused: pytorch_model\.bin is a pickle file \(only safetensors are loaded\) in .*/v0001$"
    with pytest.raises(ModelIntegrityError, match=expected):
        registry.verify("v0001")
    with pytest.raises(ModelIntegrityError, match=expected):
        registry.load("v0001", device="cpu")
    assert not marker.exists()


# --- code shipped with a model ----------------------------------------------------------

EVIL = """
from pathlib import Path
Path({marker!r}).touch()  # runs on import: remote code was executed
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
class EvilConfig(BertConfig): pass
class EvilModel(BertForSequenceClassification): pass
class EvilTokenizer(BertTokenizerFast): pass
"""


def test_auto_map_code_in_a_model_directory_never_runs(saved, tmp_path):
    model = shutil.copytree(saved, tmp_path / "m")
    marker = tmp_path / "executed"
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    try:
        student = Student.load(model, device="cpu")
    except ModelError as err:  # refusing is fine too; running the code is not
        assert "\n" not in str(err)
    else:
        assert type(student.model).__module__.startswith("transformers.")  # the built-in class, not evil.EvilModel
        assert student.predict(["hello"])[0] in LABELS
    assert not marker.exists()


# --- tampering the registry's checks catch (beyond the weights) ----------------------------


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "labels.json", "tokenizer_config.json"])
def test_one_flipped_byte_in_any_file_refuses_the_version(saved, tmp_path, name):
    store = tmp_path / "store"
    path = publish_by_hand(store, saved)
    registry = offline_registry(store)
    assert registry.verify("v0001")["version"] == "v0001"  # intact: accepted
    flip_byte(path / name)
    expected = rf"^v0001 refused: {name.replace('.', '[.]')} does not match its sha256 \(manifest [0-9a-f]{{12}}\.\.\., "
    with pytest.raises(ModelIntegrityError, match=expected):
        registry.load("v0001", device="cpu")
    if name == "labels.json":  # the label set is read without the weights: checked as well
        with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: labels\.json does not match its sha256"):
            registry.labels("v0001")


def test_a_manifest_that_lists_its_files_with_another_hash_is_refused(saved, tmp_path):
    """The manifest itself tampered with: a weight file's sha256 replaced by another valid one."""
    store = tmp_path / "store"
    path = publish_by_hand(store, saved)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = hashlib.sha256(b"other weights").hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: model\.safetensors does not match its sha256"):
        offline_registry(store).load("v0001", device="cpu")


def test_a_file_is_trusted_without_its_hash_only_while_its_stat_is_the_one_recorded(saved, tmp_path, monkeypatch):
    """verify_dir's ``hashed`` record (what promote and rollback pass): unchanged
    files are not read; a changed stat, or a record of another sha256, is hashed."""
    now_ns = time.time_ns  # the clock, before the test moves it
    path = publish_by_hand(tmp_path / "store", saved)
    listed = json.loads((path / "manifest.json").read_text())["files"]
    st = (path / "model.safetensors").stat()
    latest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in path.iterdir())
    monkeypatch.setattr(registry_module.time, "time_ns", lambda: latest + 10_000_000)  # 10 ms later: racy
    assert registry_module.stamp(path / "model.safetensors") is None
    monkeypatch.setattr(registry_module.time, "time_ns", lambda: latest + 10**9)
    assert registry_module.stamp(path / "model.safetensors") == (
        f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}")

    hashed: list[str] = []
    real = registry_module.sha256_file
    monkeypatch.setattr(registry_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    record: dict[str, str] = {}
    registry_module.verify_dir(path, "v0001", hashed=record)
    assert sorted(hashed) == sorted(listed) and sorted(record) == sorted(listed)  # all hashed, all recorded
    hashed.clear()
    registry_module.verify_dir(path, "v0001", hashed=record)
    assert hashed == []

    # a record that names another sha256 than the manifest's (either was changed): hashed again
    record["labels.json"] = "0" * 64 + record["labels.json"][64:]
    registry_module.verify_dir(path, "v0001", hashed=record)
    assert hashed == ["labels.json"] and record["labels.json"].startswith(listed["labels.json"])
    hashed.clear()

    flip_byte(path / "model.safetensors")  # same size; the write moved its ctime
    monkeypatch.setattr(registry_module.time, "time_ns", lambda: now_ns() + 10**9)
    with pytest.raises(ModelIntegrityError, match=r"^v0001 refused: model\.safetensors does not match"):
        registry_module.verify_dir(path, "v0001", hashed=record)
    assert hashed == ["model.safetensors"]


# --- the source never loads pickles nor trusts remote code ---------------------------------

SCANNED = ("pgkd", "streams")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def unsafe_loading(source: str, filename: str = "<src>") -> list[str]:
    """Every way ``source`` could run code shipped with a model: pickle modules,
    ``torch.load``, ``trust_remote_code`` other than False, and a transformers
    ``from_pretrained`` that does not pass ``trust_remote_code=False`` (models
    also ``use_safetensors=True``)."""
    tree = ast.parse(source, filename)
    from_transformers = {  # local name -> transformers name
        alias.asname or alias.name: alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers"
        for alias in node.names
    }
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            name = ast.unparse(func)
            if name in ("torch.load", "torch.serialization.load", "numpy.load", "np.load") or name.endswith(
                    "pickle.load") or name.endswith("pickle.loads"):
                found.append(f"{where}: {name}(")
            keywords = {k.arg: k.value for k in node.keywords}
            trust = keywords.get("trust_remote_code")
            if trust is not None and not (isinstance(trust, ast.Constant) and trust.value is False):
                found.append(f"{where}: trust_remote_code={ast.unparse(trust)}")
            if (isinstance(func, ast.Attribute) and func.attr == "from_pretrained"
                    and isinstance(func.value, ast.Name) and func.value.id in from_transformers):
                if trust is None:
                    found.append(f"{where}: {name}( without trust_remote_code=False")
                safetensors = keywords.get("use_safetensors")
                if "Model" in from_transformers[func.value.id] and not (isinstance(safetensors, ast.Constant) and safetensors.value):
                    found.append(f"{where}: {name}( without use_safetensors=True")
    return found


def test_no_source_file_loads_a_pickle_or_trusts_remote_code():
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20  # the scan really reads the packages
    found = [hit for path in files for hit in unsafe_loading(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "from joblib import load",
        "import torch\nstate = torch.load(path)",
        "from transformers import AutoModel\nm = AutoModel.from_pretrained(p, trust_remote_code=True, "
        "use_safetensors=True)",
        "from transformers import AutoTokenizer\nt = AutoTokenizer.from_pretrained(p)",
        "from transformers import AutoModelForSequenceClassification as M\nm = M.from_pretrained(p, "
        "trust_remote_code=False)",
        "x = load(p, trust_remote_code=flag)",
    ],
)
def test_the_scan_catches_each_unsafe_pattern(source):
    assert len(unsafe_loading(source)) == 1, unsafe_loading(source)


def test_the_scan_accepts_the_safe_patterns():
    source = (
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(p, trust_remote_code=False)\n"
        "m = AutoModelForSequenceClassification.from_pretrained(p, use_safetensors=True, trust_remote_code=False)\n"
        "s = Student.from_pretrained(p, labels)\n"  # ours: not a transformers class
    )
    assert unsafe_loading(source) == []
