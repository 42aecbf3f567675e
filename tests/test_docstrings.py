"""The package's docstring examples run and give what they show, and every public name is documented."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import mechnorm

MODULES = sorted(m.name for m in pkgutil.walk_packages(mechnorm.__path__, "mechnorm.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    """Examples marked ``+SKIP`` need a loaded model; every other one must reproduce its output."""
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} fail; run python -m doctest on it"


def test_every_public_name_has_a_docstring():
    missing = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            value = getattr(module, attr)
            if (inspect.isfunction(value) or inspect.isclass(value)) and not inspect.getdoc(value):
                missing.append(f"{name}.{attr}")
    assert not missing, f"public names without a docstring: {missing}"
