"""schedulefree 1.4.1's own test file (``schedulefree/test_schedulefree.py``,
shipped in its wheel), run against ``zero_sf.ScheduleFreeAdamW``.

The file is imported from the installed package, not copied; the only
adaptations are the two its tests need to reach our class on this machine:
the module's ``AdamWScheduleFree`` name is bound to ours, and ``.cuda()``
returns the tensor itself when there is no GPU.  Its Adam tests then compare
our optimizer with schedulefree's closure and reference implementations
(``test_schedulefree_adam``), with itself across param groups, params
without gradients and empty groups (``test_foreach``), and step by step
(``test_compile``).  Its SGD / RAdam / wrapper tests do not involve
AdamW and are not run here.
"""

import pytest
import torch

import zero_sf

sf_tests = pytest.importorskip("schedulefree.test_schedulefree")

TESTS = ["test_schedulefree_adam", "test_foreach", "test_compile", "test_equiv"]


@pytest.fixture
def ours(monkeypatch):
    monkeypatch.setattr(sf_tests, "AdamWScheduleFree", zero_sf.ScheduleFreeAdamW)
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    torch.manual_seed(1)  # as the file's __main__ does


@pytest.mark.parametrize("name", TESTS)
def test_schedulefree_suite(ours, name):
    assert sf_tests.AdamWScheduleFree is zero_sf.ScheduleFreeAdamW
    getattr(sf_tests, name)()


def test_suite_would_catch_a_wrong_optimizer(ours, monkeypatch):
    """The borrowed test is not vacuous: an optimizer whose warmup is off by
    one step fails it."""
    class OffByOne(zero_sf.ScheduleFreeAdamW):
        def __init__(self, params, warmup_steps=0, **kw):
            super().__init__(params, warmup_steps=warmup_steps + 1, **kw)

    monkeypatch.setattr(sf_tests, "AdamWScheduleFree", OffByOne)
    with pytest.raises(AssertionError):
        sf_tests.test_schedulefree_adam()
