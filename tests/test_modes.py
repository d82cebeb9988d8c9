"""zero_sf.modes: the optimizer under any wrapper, and engines plugged in
through register_engine_resolver (DeepSpeed's own: tests/test_deepspeed.py;
Accelerate's and the Trainer's: tests/integrations/test_transformers.py)."""

from __future__ import annotations

import pytest
import torch

import zero_sf
from zero_sf import modes


class _Wrapper:  # Accelerate's AcceleratedOptimizer keeps the optimizer here
    def __init__(self, optimizer):
        self.optimizer = optimizer


def _sf():
    model = torch.nn.Linear(3, 2)
    opt = zero_sf.ScheduleFreeAdamW(model.parameters(), lr=0.1)
    opt.train()
    for _ in range(3):  # after one step x == y == z (c_1 = 1)
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_resolve_goes_down_wrappers():
    _, opt = _sf()
    assert modes.resolve(_Wrapper(_Wrapper(opt))).optimizer is opt


def test_eval_mode_switches_and_restores():
    model, opt = _sf()
    y = [p.detach().clone() for p in model.parameters()]
    with zero_sf.eval_mode(_Wrapper(opt)) as inner:
        assert inner is opt and not opt.in_train_mode()
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), y))
    assert opt.in_train_mode()
    for a, b in zip(model.parameters(), y):  # y -> x -> y: two fp32 lerps, not bit-exact
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-6)


def test_optimizers_without_modes_are_left_alone():
    model = torch.nn.Linear(3, 2)
    adamw = torch.optim.AdamW(model.parameters())
    target = modes.resolve(_Wrapper(adamw))
    assert target.optimizer is adamw and target.in_train_mode() is None
    with zero_sf.eval_mode(adamw):
        pass
    rms = zero_sf.RMSProp(model.parameters())
    assert modes.resolve(rms).in_train_mode() is None  # no eval()/train(): x is y


def test_anything_else_is_refused_by_name():
    with pytest.raises(TypeError, match="expects an optimizer.*got _Wrapper -> object"):
        modes.resolve(_Wrapper(object()))


def test_a_registered_engine_resolver_is_asked_first():
    _, opt = _sf()

    class Engine:  # holds its optimizer where no wrapper rule would find it
        def __init__(self):
            self.hidden = opt

    def resolver(obj):
        return obj.hidden if isinstance(obj, Engine) else None

    modes.register_engine_resolver(resolver)
    modes.register_engine_resolver(resolver)  # idempotent
    try:
        assert modes._ENGINE_RESOLVERS.count(resolver) == 1
        assert modes.resolve(Engine()).optimizer is opt
    finally:
        modes._ENGINE_RESOLVERS.remove(resolver)
