"""One step in several step() calls (zero_sf/optim/split_step.py), the way
DeepSpeed ZeRO-3 calls the client optimizer: once per sub-group partition,
with that group's params set to it and every other group's emptied."""

import pytest
import torch

import zero_sf
from zero_sf.optim import split_step
from tests.helpers import clone_params, random_grads, set_grads

SHAPES = [(5, 3), (7,), (4,), (2, 2)]
KW = dict(lr=1e-2, warmup_steps=3, weight_decay=0.1)


@pytest.fixture
def parts_rule(monkeypatch):
    """Tensors tagged ``_part`` are parts (DeepSpeed's rule reads ds_id)."""
    monkeypatch.setattr(split_step, "SPLIT_STEP_PARTS", [lambda t: getattr(t, "_part", False)])


def _split_like_zero3(opt, groups_of_parts, grads):
    """One engine step: every part in its own call, its group holding only it."""
    for gi, part in groups_of_parts:
        for g in opt.param_groups:
            g["params"] = []
        opt.param_groups[gi]["params"] = [part]
        part.grad = grads[id(part)]
        opt.step()
    for g in opt.param_groups:
        g["params"] = []


@pytest.mark.parametrize("cls", [zero_sf.ScheduleFreeAdamW, zero_sf.RMSProp])
def test_a_step_split_over_calls_is_one_step(parts_rule, cls):
    kw = KW if cls is zero_sf.ScheduleFreeAdamW else dict(lr=1e-2, bias_correction=True)
    ref_params = clone_params(SHAPES)()
    parts = clone_params(SHAPES)()
    for p in parts:
        p._part = True
    # two groups (decay / no decay), split 3 + 1 as ZeRO-3 sub-groups
    ref = cls([{"params": ref_params[:3]}, {"params": ref_params[3:], "weight_decay": 0.0}], **kw)
    opt = cls([{"params": parts[:3]}, {"params": parts[3:], "weight_decay": 0.0}], **kw)
    for o in (ref, opt):
        if hasattr(o, "train"):
            o.train()
    layout = [(0, parts[0]), (0, parts[1]), (0, parts[2]), (1, parts[3])]
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        grads = random_grads(ref_params, gen)
        set_grads(ref_params, grads)
        ref.step()
        _split_like_zero3(opt, layout, {id(p): g.float() for p, g in zip(parts, grads)})
        for g_ref, g in zip(ref.param_groups, opt.param_groups):
            assert {k: v for k, v in g.items() if k != "params"} == \
                {k: v for k, v in g_ref.items() if k != "params"}, step
        for a, b in zip(ref_params, parts):
            assert torch.equal(a, b), step
    if cls is zero_sf.ScheduleFreeAdamW:
        assert [g["k"] for g in opt.param_groups] == [5, 5]


def test_without_the_rule_every_call_is_a_step(parts_rule):
    # plain tensors: two calls are two steps, as in torch
    p = torch.zeros(3, requires_grad=True)
    opt = zero_sf.ScheduleFreeAdamW([p], **KW)
    opt.train()
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    assert opt.param_groups[0]["k"] == 2


def test_stepping_a_part_again_or_loading_begins_a_new_step(parts_rule):
    a, b = torch.zeros(3), torch.zeros(4)
    a._part = b._part = True
    opt = zero_sf.ScheduleFreeAdamW([a, b], **KW)
    opt.train()
    grads = {id(a): torch.ones(3), id(b): torch.ones(4)}
    _split_like_zero3(opt, [(0, a), (0, b)], grads)
    assert opt.param_groups[0]["k"] == 1
    # the same part again: a new step
    _split_like_zero3(opt, [(0, a)], grads)
    assert opt.param_groups[0]["k"] == 2
    # b was not stepped in this one, but the scalars were written in between
    # (a loaded state dict, a user): b's call begins a new step too
    opt.param_groups[0]["k"] = 7
    _split_like_zero3(opt, [(0, b)], grads)
    assert opt.param_groups[0]["k"] == 8
