"""docs/api.md is generated from the code (tools/api_doc.py) and must be
current; every public name has a docstring; the constructors and
checkpoint functions document every parameter they take."""

import inspect
import os

import pytest

import zero_sf
from tools import api_doc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_reference_is_current():
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        committed = f.read()
    assert committed == api_doc.render(), "docs/api.md is stale: run python tools/api_doc.py"


def test_every_public_name_has_a_docstring():
    for name in zero_sf.__all__:
        obj = getattr(zero_sf, name)
        if name.startswith("__"):
            continue
        assert inspect.getdoc(obj), name


@pytest.mark.parametrize("obj", [zero_sf.ZeroOptimizer, zero_sf.ScheduleFreeAdamW,
                                 zero_sf.save, zero_sf.load])
def test_every_parameter_is_documented(obj):
    fn = obj.__init__ if inspect.isclass(obj) else obj
    doc = inspect.getdoc(obj) or ""
    names = [n for n, p in inspect.signature(fn).parameters.items()
             if n not in ("self", "params", "path", "model", "optimizer")
             and p.kind is not p.VAR_KEYWORD]
    missing = [n for n in names if f"{n}" not in doc]
    assert not missing, f"{obj.__name__}: undocumented parameters {missing}"
