"""Which model the workers serve, and its version.

The registry decides: its current version (checksums verified before the
weights are read). Only when the registry has no current version, or its Redis
cannot be reached, do workers fall back to the directory named by
``PGKD_SERVE_MODEL`` (a development and test convenience). A hot swap loads a
named version with :func:`load_version`.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pgkd.errors import ConfigError, ModelError, RegistryUnavailable
from pgkd.registry import (MANIFEST_FILE, Registry, read_manifest, stored_graph, unread_by_graph, verified_labels,
                           verify_dir, weights_or_graph)

if TYPE_CHECKING:
    from pgkd.graph_student import GraphStudent
    from pgkd.settings import Settings
    from pgkd.student import Student

log = logging.getLogger(__name__)

WARMUP_TEXT = "warm-up"  # one prediction before a version serves: lazy init is paid off the stream

@dataclass(frozen=True)
class ServingModel:
    """A loaded student and the version name its answers carry."""

    student: Student | GraphStudent
    version: str
    path: Path

    @property
    def labels(self) -> list[str]:
        return self.student.labels


def model_version(path: Path) -> str:
    """``version`` from the directory's manifest.json, else the directory name."""
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        try:
            version = json.loads(manifest.read_text(encoding="utf-8"))["version"]
        except (ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{manifest} has no readable \"version\": {err}") from None
        return str(version)
    return path.resolve().name


def current_version(settings: Settings) -> str | None:
    """The registry's current version, or None to fall back to ``PGKD_SERVE_MODEL``.

    None when the registry has no current version, or when its Redis does not
    answer and ``PGKD_SERVE_MODEL`` is set (logged). ConfigError when there is
    nothing to serve at all."""
    with Registry.from_settings(settings) as registry:
        try:
            version = registry.current()
        except RegistryUnavailable as err:
            if not settings.serve_model:
                raise ConfigError(f"no model to serve: PGKD_SERVE_MODEL is not set and {err}") from None
            log.warning("%s; serving PGKD_SERVE_MODEL=%s instead", err, settings.serve_model)
            return None
        if version is None and not settings.serve_model:
            raise ConfigError(
                f"no model to serve: PGKD_SERVE_MODEL is not set and the registry ({registry.redis_url}, "
                f"namespace {registry.namespace}) has no current version; "
                "publish one with: pgkd models import DIR --promote"
            )
        return version


def serve_path(settings: Settings) -> Path:
    """The directory to serve: the registry's current version, else PGKD_SERVE_MODEL.
    ConfigError/RegistryError when there is none (checked at start-up)."""
    version = current_version(settings)
    if version is not None:
        with Registry.from_settings(settings) as registry:
            return registry.path(version)
    return _fallback_path(settings)


def _fallback_path(settings: Settings) -> Path:
    path = Path(settings.serve_model)
    if not path.is_dir():
        raise ConfigError(f"PGKD_SERVE_MODEL={settings.serve_model} is not a directory")
    return path


# The tokenizers of the versions in memory, by the student class that uses them and the
# checksums of the files they were loaded from (tokenizer_key). A version whose files are
# the same (a retrained version keeps its parent's: Student.save) shares the tokenizer
# instead of loading its own: parsing tokenizer.json holds the GIL 40-50 ms in one piece,
# the longest stall a swap put on inference and the event loop. An entry lives as long
# as a student holds its tokenizer.
_TOKENIZERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def tokenizer_key(manifest: dict) -> tuple[tuple[str, str], ...]:
    """The checksums of the files a served version's tokenizer and labels come from:
    every file but the torch weights and the ONNX graphs (the manifest has verified them).

    >>> tokenizer_key({"files": {"model.safetensors": "a", "tokenizer.json": "b", "labels.json": "c",
    ...                          "onnx/model.int8.onnx": "d"}})
    (('labels.json', 'c'), ('tokenizer.json', 'b'))
    """
    return tuple(sorted((name, digest) for name, digest in manifest["files"].items() if not weights_or_graph(name)))


def load_version(settings: Settings, version: str) -> ServingModel:
    """A stored registry version, verified, ready for ``predict_proba`` (the hot
    swap's loader). ModelIntegrityError when a file does not match its checksum.
    With PGKD_INFERENCE_PROCESS, loaded and served by a child process
    (:func:`pgkd.inference_process.load_in_child`).
    Served by ONNX Runtime, it shares the tokenizer of a version in memory whose
    tokenizer files, labels and config have the same checksums (:func:`tokenizer_key`)."""
    if settings.inference_process:
        from pgkd.inference_process import load_in_child

        return load_in_child(settings, version)
    with Registry.from_settings(settings) as registry:
        path = registry.path(version)
    student = _verified(path, version, settings)
    log.info("serving model %s from %s (%d labels, device %s, %s, %s)", version, path, len(student.labels),
             student.device, student.quantize, student.graph)
    return ServingModel(student=student, version=version, path=path)


def graphs_to_publish(settings: Settings) -> tuple[str, ...]:
    """The prebuilt graphs a new version should carry for workers with these settings
    (:meth:`pgkd.registry.Registry.publish`): the ONNX Runtime graph they serve, if any.

    >>> from pgkd.settings import Settings
    >>> graphs_to_publish(Settings(inference_graph="onnxruntime", inference_quantize="int8"))
    ('int8',)
    >>> graphs_to_publish(Settings(inference_graph="torchscript"))
    ()
    """
    return (settings.inference_quantize,) if settings.inference_graph == "onnxruntime" else ()


def prepare(student: Student, settings: Settings, graph: str | None = None) -> Student:
    """Quantize and trace ``student`` for serving as the settings ask
    (PGKD_INFERENCE_QUANTIZE; ``graph``, default PGKD_INFERENCE_GRAPH). A model that
    does not trace faithfully is served eager: logged, with the reason. torch runs
    on PGKD_TORCH_THREADS intra-op threads when set (here: a worker served by a
    :class:`pgkd.graph_student.GraphStudent` never imports torch)."""
    from pgkd.errors import GraphError

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)

    graph = graph or settings.inference_graph
    try:  # quantizes first: a refused trace leaves the student quantized and eager
        student.optimize_for_inference(settings.inference_quantize, graph)
    except GraphError as err:
        log.warning("PGKD_INFERENCE_GRAPH=%s refused for this model (%s); serving it eager", graph, err)
    return student


def _prepared(path: Path, settings: Settings, load: Callable[[], Student], graph: dict | None = None,
              verify_all: Callable[[], object] = lambda: None,
              tokenizer_key: tuple | None = None) -> Student | GraphStudent:
    """The student of the verified directory ``path``, ready to serve as the settings
    ask. onnxruntime: the session of the version's stored graph (``graph``, its
    manifest entry: built when the version was published) loads here, with the
    tokenizer; without one, the graph is built by a child process (the export and
    the quantizer are ~20 s of Python that would hold this worker's GIL) from the
    files; when both fail, torchscript (logged). ``verify_all()`` runs before a
    build that replaces a stored graph (whose caller hashed only what that graph
    reads). A graph whose builder checked the ``tokenizers`` library against
    transformers' tokenizer is served by a :class:`pgkd.graph_student.GraphStudent`:
    neither torch nor transformers is imported. ``tokenizer_key``: the version's
    :func:`tokenizer_key`, to share the tokenizer of a version in memory.
    The other graphs: ``load()`` the torch model here, then :func:`prepare`."""
    if settings.inference_graph != "onnxruntime":
        return prepare(load(), settings)
    from pgkd.graph_student import CHECKED, GraphStudent, default_threads
    from pgkd.inference_onnx import OnnxError, build_in_child, load_graph

    threads = settings.torch_threads or default_threads()
    try:
        forward = None
        if graph is not None:
            try:
                forward = load_graph(path, graph, threads)
            except OnnxError as err:
                log.warning("the stored ONNX graph of %s is not served (%s); building one", path.name, err)
        if forward is None:
            if graph is not None:
                verify_all()  # the build reads the torch weights, which were not hashed for the stored graph
            forward = build_in_child(path, settings.inference_quantize, threads)
        if forward.tokenizer == CHECKED:
            try:
                return _shared(tokenizer_key, GraphStudent, lambda shared: GraphStudent.served_by(
                    path, forward, settings.inference_quantize, shared))
            except ModelError as err:
                log.warning("%s is served with transformers' tokenizer (%s)", path.name, err)
        from pgkd.student import Student

        return _shared(tokenizer_key, Student, lambda shared: Student.served_by(
            path, forward, settings.inference_quantize, "onnxruntime", shared))
    except OnnxError as err:
        log.warning("PGKD_INFERENCE_GRAPH=onnxruntime refused for this model (%s); serving torchscript", err)
        return prepare(load(), settings, graph="torchscript")


def _shared(key: tuple | None, kind: type,
            make: Callable[[object], Student | GraphStudent]) -> Student | GraphStudent:
    """``make(tokenizer)`` given the tokenizer of a ``kind`` student in memory whose
    files have the checksums ``key`` (None when there is none: ``make`` loads one);
    the new student's tokenizer is then kept for the next version with those files."""
    if key is None:
        return make(None)
    student = make(_TOKENIZERS.get((kind.__name__, key)))
    _TOKENIZERS.setdefault((kind.__name__, key), student.tokenizer)
    return student


def load_serving_model(settings: Settings) -> ServingModel:
    """Load the model to serve, ready for ``predict_proba``: the registry's current
    version, else PGKD_SERVE_MODEL. Raises ConfigError/ModelError/RegistryError."""
    version = current_version(settings)
    if version is not None:
        return load_version(settings, version)
    if settings.inference_process:
        from pgkd.inference_process import load_in_child

        return load_in_child(settings, None)
    return load_fallback(settings)


def load_fallback(settings: Settings) -> ServingModel:
    """The PGKD_SERVE_MODEL directory, ready for ``predict_proba`` (verified against
    its manifest when it is a copy of a registry version)."""
    path = _fallback_path(settings)
    if _is_version_copy(path):
        student = _verified(path, None, settings)  # a copied version: its manifest names it
    else:
        student = _prepared(path, settings, lambda: _load_student(path))
    version = model_version(path)
    log.info("serving model %s from %s (%d labels, device %s, %s, %s)", version, path, len(student.labels),
             student.device, student.quantize, student.graph)
    return ServingModel(student=student, version=version, path=path)


def _is_version_copy(path: Path) -> bool:
    """Whether the PGKD_SERVE_MODEL directory ``path`` claims to be a registry version
    (it has a manifest.json, even a broken one or a link: it is then refused)."""
    return (path / MANIFEST_FILE).exists() or (path / MANIFEST_FILE).is_symlink()


def _verified(path: Path, version: str | None, settings: Settings) -> Student | GraphStudent:
    """The version directory ``path`` (a registry version, or with ``version`` None a
    copy of one under any name), verified against its manifest (ModelIntegrityError),
    then ready to serve as the settings ask. Served from its stored graph, it opens
    neither the torch weights nor the other graphs: those are not hashed here (a
    fallback that reads them verifies them all first: ``verify_all``)."""
    manifest, graph, unread = read_manifest(path, version), None, ()
    if settings.inference_graph == "onnxruntime":
        graph = stored_graph(manifest, settings.inference_quantize)
        unread = unread_by_graph(manifest, settings.inference_quantize) if graph else ()
    verify_dir(path, version, unread=unread)
    return _prepared(path, settings, lambda: _load_student(path), graph,
                     verify_all=lambda: verify_dir(path, version), tokenizer_key=tokenizer_key(manifest))


def _load_student(path: Path) -> Student:
    from pgkd.student import Student  # torch and transformers: only for the graphs that need them

    return Student.load(path)


def load_taxonomy(settings: Settings) -> list[str]:
    """The label set of the served model, without loading its weights (the teacher worker's taxonomy)."""
    version = current_version(settings)
    if version is not None:
        with Registry.from_settings(settings) as registry:
            return registry.labels(version)
    directory = _fallback_path(settings)
    if _is_version_copy(directory):
        return verified_labels(directory, None)
    path = directory / "labels.json"
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["labels"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"cannot read the label set from {path}: {err}") from None
