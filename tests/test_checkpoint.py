"""zero_sf.save / zero_sf.load: resharding, atomicity, wrong-model refusal,
and the consolidated state dict."""

import os

import pytest
import schedulefree
import torch
import torch.nn as nn

import zero_sf
from tests.distributed import spawn
from tests.helpers import averaged_reference
from tests.sharding.test_zero import LAYOUT, RMS_KW, SF_KW, _assert_model_is, _model, _targets

CONFIGS = [(stage, dtype, opt) for stage in (1, 2) for dtype in (torch.float32, torch.bfloat16)
           for opt in ("sf", "rmsprop")]


def _cls(opt_name):
    return (zero_sf.ScheduleFreeAdamW, SF_KW) if opt_name == "sf" else (zero_sf.RMSProp, RMS_KW)


def _steps(model, opt, rank, world_size, steps):
    for step in steps:
        for p, t in zip(model, _targets(step, world_size)[rank]):
            (p * t.to(p.dtype)).sum().backward()
        opt.step()


def _reference(dtype, opt_name, plan):
    cls, kw = _cls(opt_name)
    return averaged_reference(cls, kw, _model(dtype), _targets, plan)


def _save_at(rank, world_size, root):
    for i, (stage, dtype, opt_name) in enumerate(CONFIGS):
        cls, kw = _cls(opt_name)
        model = _model(dtype)
        opt = zero_sf.ZeroOptimizer(model.parameters(), cls, stage=stage, **LAYOUT, **kw)
        if opt_name == "sf":
            opt.train()
        _steps(model, opt, rank, world_size, range(5))
        zero_sf.save(os.path.join(root, str(i)), model, opt)


def _load_at(rank, world_size, root, saved_world_size):
    for i, (stage, dtype, opt_name) in enumerate(CONFIGS):
        cls, kw = _cls(opt_name)
        model = _model(dtype)
        with torch.no_grad():
            for p in model:
                p.add_(1.0)  # the load must overwrite these
        opt = zero_sf.ZeroOptimizer(model.parameters(), cls, stage=stage, **LAYOUT, **kw)
        zero_sf.load(os.path.join(root, str(i)), model, opt)
        assert opt.param_groups[0].get("train_mode", True)  # saved in train mode
        _steps(model, opt, rank, world_size, range(5, 10))
        ref, master = _reference(dtype, opt_name, [(range(5), saved_world_size),
                                                   (range(5, 10), world_size)])
        _assert_model_is(model, master, dtype)
        if opt_name == "sf":
            opt.eval(), ref.eval()
            _assert_model_is(model, master, dtype)


def test_save_at_4_load_at_1_2_3(tmp_path):
    spawn(_save_at, 4, str(tmp_path))
    for world_size in (1, 2, 3):
        spawn(_load_at, world_size, str(tmp_path), 4)


def _wrong_model(rank, world_size, root):
    model = _model(torch.float32)
    opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
    opt.train()
    _steps(model, opt, rank, world_size, range(2))
    zero_sf.save(root, model, opt)
    other = nn.ParameterList([nn.Parameter(torch.randn(s)) for s in [(31, 13), (31,)]])
    other_opt = zero_sf.ZeroOptimizer(other.parameters(), **LAYOUT, **SF_KW)
    before = [p.detach().clone() for p in other]
    with pytest.raises(ValueError, match="another model"):
        zero_sf.load(root, other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, other))
    assert len(other_opt.inner.state) == 0 and other_opt.param_groups[0]["k"] == 0
    rms = zero_sf.ZeroOptimizer(_model(torch.float32).parameters(), zero_sf.RMSProp, **LAYOUT)
    with pytest.raises(ValueError, match="optimizer differs"):
        zero_sf.load(root, _model(torch.float32), rms)


def test_checkpoint_of_another_model_is_refused_before_any_change(tmp_path):
    spawn(_wrong_model, 2, str(tmp_path))


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    """Single process (no process group): save, train on, crash in the second
    save after DCP wrote part of it; the first checkpoint is what loads."""
    model = _model(torch.float32)
    opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
    opt.train()
    _steps(model, opt, 0, 1, range(3))
    zero_sf.save(str(tmp_path), model, opt)
    saved = [p.detach().clone() for p in model]
    _steps(model, opt, 0, 1, range(3, 5))

    real_save = zero_sf.checkpoint.dcp.save

    def crashing_save(sd, checkpoint_id, **kw):
        real_save(sd, checkpoint_id=checkpoint_id, **kw)  # files written ...
        raise KeyboardInterrupt("killed mid-save")  # ... but never committed

    monkeypatch.setattr(zero_sf.checkpoint.dcp, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        zero_sf.save(str(tmp_path), model, opt)
    monkeypatch.undo()
    fresh = _model(torch.float32)
    fresh_opt = zero_sf.ZeroOptimizer(fresh.parameters(), **LAYOUT, **SF_KW)
    zero_sf.load(str(tmp_path), fresh, fresh_opt)
    assert all(torch.equal(a, b.detach()) for a, b in zip(saved, fresh))
    assert fresh_opt.param_groups[0]["k"] == 3
    # Continuing from it equals the uninterrupted run.
    _steps(fresh, fresh_opt, 0, 1, range(3, 5))
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(model, fresh))


def _consolidated(rank, world_size):
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(dtype)
        opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
        opt.train()
        _steps(model, opt, rank, world_size, range(4))
        opt.eval()  # schedulefree's convention: save in eval mode
        sd = opt.consolidated_state_dict()
        assert set(sd["state"][0]) == {"z", "exp_avg_sq"}
        for cls in (zero_sf.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree):
            single = [p.detach().float().clone().requires_grad_() for p in model]
            one = cls(single, **SF_KW)
            one.load_state_dict(sd)
            ref, master = _reference(dtype, "sf", [(range(4), world_size)])
            ref.eval()
            for a, b in zip([one.state[p]["z"] for p in single], [ref.state[p]["z"] for p in master]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            assert one.param_groups[0]["k"] == 4 and one.param_groups[0]["train_mode"] is False
            if dtype == torch.float32:  # continue 3 steps on both: identical
                one.train(), ref.train()
                for step in range(4, 7):
                    targets = _targets(step, world_size)
                    for i, (p, q) in enumerate(zip(single, master)):
                        # schedulefree normalizes p.grad in place: separate copies
                        p.grad = sum(t[i] for t in targets) / world_size
                        q.grad = p.grad.clone()
                    one.step(), ref.step()
                for p, q in zip(single, master):
                    torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_consolidated_state_dict_loads_into_single_device_optimizers():
    spawn(_consolidated, 2)
