"""Every docstring example runs and prints what it says (docstrings end with an example that runs)."""

import doctest
import importlib

import pytest

MODULES = [
    "tl_logitlens",
    "tl_logitlens.norm",
    "tl_logitlens.readout",
    "tl_logitlens.stacks",
    "tl_logitlens.lens",
    "tl_logitlens.attribution",
    "tl_logitlens.model_access",
    "tl_logitlens.plots",
    "tl_logitlens.tokentext",
    "tl_logitlens.evaluate",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    module = importlib.import_module(name)
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0
