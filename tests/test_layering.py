"""The package's dependency rules (issue #22), measured by the same code as
``python tools/arch_report.py``: no import cycles, no module importing a
layer above its own, no private name of one zero_sf module used in another,
and the core importing no engine (DeepSpeed, transformers) at import time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tools import arch_report as A


def test_no_import_cycles():
    assert A.cycles(A.import_graph(A.modules())) == []


def test_no_upward_imports():
    assert A.upward_imports(A.modules()) == []


def test_no_private_names_across_modules():
    ours, _ = A.private_accesses(A.modules())
    assert ours == []


def test_every_module_has_a_layer():
    unplaced = [m for m in A.modules() if A.layer_of(m) >= len(A.LAYERS)]
    assert unplaced == []


def test_the_rules_catch_what_they_are_for(tmp_path):
    """The checks above can fail: a tree with a cycle, an upward lazy import
    and a private name used across modules is reported as such."""
    pkg = tmp_path / "zero_sf"
    (pkg / "optim").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "spec.py").write_text(textwrap.dedent("""
        def f():
            from .optim import thing  # lazy, still upward
            return thing._hidden()
        """))
    (pkg / "optim" / "__init__.py").write_text("from .a import thing\n")
    (pkg / "optim" / "a.py").write_text("from . import b\nclass T:\n    def _hidden(self): ...\nthing = T()\n")
    (pkg / "optim" / "b.py").write_text("from . import a\n")
    mods = A.modules(tmp_path)
    assert ["zero_sf.optim.a", "zero_sf.optim.b"] in A.cycles(A.import_graph(mods))
    assert any("zero_sf.spec (math and formats) imports zero_sf.optim" in u
               for u in A.upward_imports(mods))
    ours, _ = A.private_accesses(mods)
    assert any(p.endswith(": _hidden") and p.startswith("zero_sf/spec.py") for p in ours)


def test_importing_zero_sf_imports_no_engine():
    code = ("import sys, zero_sf, zero_sf.deepspeed, zero_sf.integrations.fsdp; "
            "print(sorted(m for m in ('deepspeed', 'transformers', 'accelerate', 'safetensors', "
            "'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_old_module_names_are_the_new_modules():
    import zero_sf.deepspeed
    import zero_sf.integrations.deepspeed
    import zero_sf.layout
    import zero_sf.sharding.layout

    import zero_sf.dispatch
    import zero_sf.functional
    import zero_sf.kernels.host
    import zero_sf.kernels.launch
    from zero_sf.optim import ElementwiseOptimizer, ZeroSFOptimizer

    assert zero_sf.deepspeed is zero_sf.integrations.deepspeed
    assert zero_sf.sharding.layout is zero_sf.layout
    assert zero_sf.functional is zero_sf.dispatch
    assert zero_sf.kernels.launch is zero_sf.kernels.host
    assert ZeroSFOptimizer is ElementwiseOptimizer


def test_public_functions_are_not_shadowed_by_their_modules():
    # zero_sf.export is the function, also after something imported the
    # module zero_sf.export (ZeRO-3's glue does, at import zero_sf)
    code = ("import zero_sf, zero_sf.integrations.deepspeed_zero3, zero_sf.modes; "
            "print(callable(zero_sf.export), callable(zero_sf.eval_mode))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True True"
