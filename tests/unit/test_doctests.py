"""Run the docstring examples of the core modules, so they stay true."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["pgkd.data", "pgkd.report", "pgkd.mining", "pgkd.training", "pgkd.gate", "pgkd.registry",
                                    "pgkd.passes", "pgkd.graph_student", "pgkd.serving", "pgkd.errors",
                                    "pgkd.features"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
