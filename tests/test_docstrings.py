"""Every docstring example runs and prints what it says, and every public name has one.

Modules are discovered, not listed, so a new module is covered the day it lands; a module
whose source holds an example must have doctest run at least one, so an example that
doctest cannot see (a lazily imported name, a misspelt prompt) fails instead of passing.
"""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import tl_logitlens

# __main__ runs the command line on import.
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(tl_logitlens.__path__, "tl_logitlens.") if not m.name.endswith("__main__")
) + ["tl_logitlens"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    module = importlib.import_module(name)
    failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0
    if ">>>" in inspect.getsource(module):
        assert attempted > 0, f"{name} holds examples but doctest ran none of them"


def test_examples_ran_at_all():
    """At least the package's own modules run examples (guards against a collection that finds none)."""
    total = 0
    for name in ("tl_logitlens.lens", "tl_logitlens.attribution", "tl_logitlens.demo"):
        total += doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS).attempted
    assert total >= 3


def test_every_public_function_and_class_has_an_example():
    missing = []
    for name in tl_logitlens.__all__:
        obj = getattr(tl_logitlens, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            continue  # error types are shown raised by the examples of the functions that raise them
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and ">>>" not in (inspect.getdoc(obj) or ""):
            missing.append(name)
    assert not missing, f"public names without a runnable example: {missing}"
