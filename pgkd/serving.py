"""Which model the classifier workers serve, and its version.

:func:`load_serving_model` is the one place that decides it: today the
directory named by ``PGKD_SERVE_MODEL``; the model registry replaces its body
(current version pointer in Redis) without touching the workers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pgkd.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from pgkd.settings import Settings
    from pgkd.student import Student

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"  # written by the registry: {"version": ..., ...}


@dataclass(frozen=True)
class ServingModel:
    """A loaded student and the version name its answers carry."""

    student: Student
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


def serve_path(settings: Settings) -> Path:
    """The directory to serve; ConfigError when it is not set or not a directory (checked at start-up)."""
    if not settings.serve_model:
        raise ConfigError("PGKD_SERVE_MODEL is not set; point it at a directory written by Student.save()")
    path = Path(settings.serve_model)
    if not path.is_dir():
        raise ConfigError(f"PGKD_SERVE_MODEL={settings.serve_model} is not a directory")
    return path


def load_serving_model(settings: Settings) -> ServingModel:
    """Load the model to serve, ready for ``predict_proba``. Raises ConfigError/ModelError."""
    from pgkd.student import Student

    path = serve_path(settings)
    student = Student.load(path)
    version = model_version(path)
    log.info("serving model %s from %s (%d labels, device %s)", version, path, len(student.labels), student.device)
    return ServingModel(student=student, version=version, path=path)


def load_taxonomy(settings: Settings) -> list[str]:
    """The label set of the served model, without loading its weights (the teacher worker's taxonomy)."""
    path = serve_path(settings) / "labels.json"
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["labels"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"cannot read the label set from {path}: {err}") from None
