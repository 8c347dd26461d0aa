"""``streams.classify`` whose served model never returns from a batch holding a
text with "never returns" (a test double of a hung runtime; not a test module).

Run by tests/integration/test_inference_hang.py as a real worker process:

    faust -A hang_app worker -l info

Everything else is the classify worker as shipped: its settings come from the
``PGKD_*`` environment, and its watchdog (``PGKD_INFERENCE_TIMEOUT_S``) is the
one under test.
"""

import dataclasses
import threading

import streams.classify as classify
from streams.classify import app  # noqa: F401 - faust -A hang_app

HANGS_ON = "never returns"


class HangingStudent:
    """The served student, except that a batch with a text containing HANGS_ON never returns."""

    def __init__(self, student):
        self._student = student

    def __getattr__(self, name):
        return getattr(self._student, name)

    def predict_proba(self, texts, batch_size=64):
        if any(HANGS_ON in t for t in texts):
            threading.Event().wait()  # forever: only the watchdog gets this worker out
        return self._student.predict_proba(texts, batch_size)


_swap = classify.classifier.swap
classify.classifier.swap = lambda model: _swap(dataclasses.replace(model, student=HangingStudent(model.student)))
