"""Run the docstring examples of the streaming helpers in pgkd/, so they stay true."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    "module", ["pgkd.inference", "pgkd.ratelimit", "pgkd.teacher_cache", "pgkd.labelling"]
)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
