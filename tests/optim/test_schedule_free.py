"""zero_sf.ScheduleFreeAdamW against schedulefree.AdamWScheduleFree."""

import copy

import pytest
import schedulefree
import torch

import zero_sf
from tests.helpers import (assert_refuses_foreign_state, assert_unchanged, clone_params, max_diff, random_grads,
                           set_grads, snapshot)

SHAPES = [(1,), (127,), (33, 7), (5, 4, 3), (1000,)]


def _groups(params, split):
    if not split:
        return params
    # Several groups with their own hyperparameters.
    return [{"params": params[:2]},
            {"params": params[2:4], "lr": 5e-3, "weight_decay": 0.0, "warmup_steps": 3},
            {"params": params[4:], "betas": (0.8, 0.99), "r": 1.0}]


@pytest.mark.parametrize("warmup_steps", [0, 10])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("r,weight_lr_power", [(0.0, 2.0), (2.0, 1.0)])
@pytest.mark.parametrize("split", [False, True])
def test_matches_schedulefree(backend, warmup_steps, weight_decay, r, weight_lr_power, split):
    make = clone_params(SHAPES)
    p_ref, p_ours = make(), make()
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
              warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)
    ref = schedulefree.AdamWScheduleFree(_groups(p_ref, split), **kw)
    ours = zero_sf.ScheduleFreeAdamW(_groups(p_ours, split), **kw, backend=backend)
    ref.train(), ours.train()
    gen = torch.Generator().manual_seed(1)
    for step in range(50):
        grads = random_grads(p_ref, gen)
        set_grads(p_ref, grads), set_grads(p_ours, grads)
        ref.step(), ours.step()
        if step == 25:  # train -> eval -> train round trip in the middle
            ref.eval(), ours.eval()
            assert max_diff(p_ref, p_ours) <= 5e-6  # x
            ref.train(), ours.train()
    assert max_diff(p_ref, p_ours) <= 5e-6  # y
    assert max_diff([ref.state[p]["z"] for p in p_ref], [ours.state[p]["z"] for p in p_ours]) <= 5e-6
    ref.eval(), ours.eval()
    assert max_diff(p_ref, p_ours) <= 5e-6  # x
    for g_ref, g_ours in zip(ref.param_groups, ours.param_groups):
        for key in ("k", "lr_max", "weight_sum", "scheduled_lr", "train_mode"):
            assert g_ref[key] == g_ours[key], key


def test_two_state_tensors_per_parameter_and_grad_untouched(backend):
    params = clone_params(SHAPES)()
    opt = zero_sf.ScheduleFreeAdamW(params, backend=backend)
    opt.train()
    grads = random_grads(params, torch.Generator().manual_seed(0))
    set_grads(params, grads)
    before = [p.grad.clone() for p in params]
    opt.step()
    for p, g in zip(params, before):
        tensors = {k for k, v in opt.state[p].items() if torch.is_tensor(v)}
        assert tensors == {"z", "exp_avg_sq"}
        assert len(opt.state[p]) == 2
        assert torch.equal(p.grad, g)


def _run(opt, params, grads_list):
    for grads in grads_list:
        set_grads(params, grads)
        opt.step()


@pytest.mark.parametrize("direction", ["ref_to_ours", "ours_to_ref"])
def test_state_dict_interop(direction):
    make = clone_params(SHAPES)
    gen = torch.Generator().manual_seed(3)
    p0 = make()
    grads = [random_grads(p0, gen) for _ in range(20)]
    kw = dict(lr=1e-2, warmup_steps=5, weight_decay=0.01)
    cls_a, cls_b = ((schedulefree.AdamWScheduleFree, zero_sf.ScheduleFreeAdamW)
                    if direction == "ref_to_ours" else
                    (zero_sf.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree))
    # Uninterrupted run with the first optimizer.
    p_full = make()
    full = cls_a(p_full, **kw)
    full.train()
    _run(full, p_full, grads)
    # Save after 10 steps (in eval mode, as schedulefree's docs say), load
    # into the other implementation, continue for 10 steps.
    p_a = make()
    a = cls_a(p_a, **kw)
    a.train()
    _run(a, p_a, grads[:10])
    a.eval()
    sd = copy.deepcopy(a.state_dict())
    p_b = [p.detach().clone().requires_grad_() for p in p_a]
    b = cls_b(p_b, **kw)
    b.load_state_dict(sd)
    b.train()
    _run(b, p_b, grads[10:])
    assert max_diff(p_full, p_b) <= 5e-6
    assert max_diff([full.state[p]["z"] for p in p_full], [b.state[p]["z"] for p in p_b]) <= 5e-6
    assert b.param_groups[0]["k"] == 20


@pytest.mark.parametrize("bad, match", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(lr=float("nan")), "Invalid learning rate: nan"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(betas=(0.0, 0.999)), "Invalid beta parameter at index 0: 0.0"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(1.5, 0.999)), "Invalid beta parameter at index 0: 1.5"),
    (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    (dict(betas=(0.9,)), "Invalid betas"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(warmup_steps=-1), "Invalid warmup_steps value: -1"),
    (dict(warmup_steps=2.5), "Invalid warmup_steps value: 2.5"),
    (dict(r=-1.0), "Invalid r value: -1.0"),
    (dict(weight_lr_power=float("inf")), "Invalid weight_lr_power value: inf"),
    (dict(backend="cuda"), "Invalid backend: 'cuda'"),
    (dict(lr=torch.tensor([0.1, 0.1])), "Tensor lr must be 1-element"),
    (dict(lr=torch.tensor(-0.1)), "Invalid learning rate"),
])
def test_invalid_hyperparameters(bad, match):
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        zero_sf.ScheduleFreeAdamW([p], **bad)
    # Per-group values are validated too, before the group is added.
    opt = zero_sf.ScheduleFreeAdamW([p])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], **bad})
    assert len(opt.param_groups) == 1


def _trained(backend="torch"):
    params = clone_params([(4, 3), (7,)])()
    opt = zero_sf.ScheduleFreeAdamW(params, lr=1e-2, backend=backend)
    opt.train()
    _run(opt, params, [random_grads(params, torch.Generator().manual_seed(s)) for s in range(3)])
    set_grads(params, random_grads(params, torch.Generator().manual_seed(9)))
    return opt, params


def test_step_in_eval_mode_raises_and_changes_nothing():
    opt, params = _trained()
    opt.eval()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="called in eval mode"):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


def test_first_step_without_train_says_the_optimizer_starts_in_eval_mode():
    p = torch.randn(3, requires_grad=True)
    opt = zero_sf.ScheduleFreeAdamW([p])
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"starts in eval mode.*optimizer.train\(\) before the first step"):
        opt.step()


def test_hyperparameter_broken_after_construction_raises_before_any_change():
    opt, params = _trained()
    opt.add_param_group({"params": [torch.randn(5, requires_grad=True)]})
    opt.param_groups[1]["lr"] = -3.0  # e.g. a bad scheduler; group 0 must not step
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="Invalid learning rate: -3.0"):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


def test_sparse_gradient_raises_before_any_change():
    opt, params = _trained()
    extra = torch.randn(6, 2, requires_grad=True)
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.randn(6, 2).to_sparse()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


def test_complex_parameter_rejected():
    with pytest.raises(ValueError, match="real floating-point parameters only"):
        zero_sf.ScheduleFreeAdamW([torch.randn(3, dtype=torch.complex64, requires_grad=True)])


def test_checkpoint_of_another_model_raises_before_any_change():
    opt, params = _trained()
    other_params = clone_params([(3, 4), (7,)])()
    other = zero_sf.ScheduleFreeAdamW(other_params)
    other.train()
    _run(other, other_params, [random_grads(other_params, torch.Generator().manual_seed(0))])
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="has shape \\(3, 4\\), but the parameter has shape \\(4, 3\\)"):
        opt.load_state_dict(other.state_dict())
    fewer = zero_sf.ScheduleFreeAdamW(other_params[:1])
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict(fewer.state_dict())
    assert_unchanged(before, snapshot(opt, params))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(backend, dtype):
    """bf16/fp16 params, fp32 z and v: schedulefree.AdamWScheduleFree on an
    fp32 copy whose value (y) is rounded to the param dtype after every step,
    with an eval/train round trip (x rounded likewise)."""
    make = clone_params([(257,), (3, 5)], dtype=dtype)
    params = make()
    ref_params = [p.detach().float().requires_grad_() for p in params]
    kw = dict(lr=1e-2, weight_decay=0.01, warmup_steps=2)
    opt = zero_sf.ScheduleFreeAdamW(params, **kw, backend=backend)
    ref = schedulefree.AdamWScheduleFree(ref_params, **kw)
    opt.train(), ref.train()
    gen = torch.Generator().manual_seed(5)

    def round_ref():
        with torch.no_grad():
            for q in ref_params:
                q.copy_(q.to(dtype))

    for k in range(10):
        grads = random_grads(params, gen)
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        opt.step(), ref.step()
        round_ref()
        if k == 5:
            opt.eval(), ref.eval()
            round_ref()
            opt.train(), ref.train()
            round_ref()
    for p, q in zip(params, ref_params):
        st, rst = opt.state[p], ref.state[q]
        assert st["z"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        assert p.dtype == dtype
        # One ulp of the param dtype: fp32 values may differ in the last bit
        # (op order), which can flip a rounding.
        torch.testing.assert_close(p.detach().float(), q.detach(),
                                   rtol=torch.finfo(dtype).eps, atol=0)
        torch.testing.assert_close(st["z"], rst["z"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_bf16_state_dict_roundtrip_keeps_fp32_state():
    params = clone_params([(8,)], dtype=torch.bfloat16)()
    opt = zero_sf.ScheduleFreeAdamW(params)
    opt.train()
    _run(opt, params, [random_grads(params, torch.Generator().manual_seed(0))])
    sd = copy.deepcopy(opt.state_dict())
    opt2 = zero_sf.ScheduleFreeAdamW([p.detach().clone().requires_grad_() for p in params])
    opt2.load_state_dict(sd)
    st = next(iter(opt2.state.values()))
    assert st["z"].dtype == torch.float32
    assert torch.equal(st["z"], opt.state[params[0]]["z"])


def test_state_dict_and_pickle_round_trips_keep_the_same_keys():
    """A round trip through state_dict()/load_state_dict() or pickle gave
    every param group a `differentiable` key (torch's __setstate__ default,
    copied into the groups): state dicts must not grow."""
    import pickle

    for cls, kw in ((zero_sf.ScheduleFreeAdamW, {}), (zero_sf.RMSProp, {})):
        opt = cls([torch.nn.Parameter(torch.randn(3))], **kw)
        sd = opt.state_dict()
        other = cls([torch.nn.Parameter(torch.randn(3))], **kw)
        other.load_state_dict(sd)
        again = pickle.loads(pickle.dumps(opt))
        for o in (other, again):
            assert o.state_dict()["param_groups"][0].keys() == sd["param_groups"][0].keys(), cls
            assert o.defaults.keys() == opt.defaults.keys(), cls


@pytest.mark.parametrize("other_cls", [torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop])
def test_another_optimizers_state_dict_is_refused_before_any_change(other_cls):
    """Issue #21 item 5: torch.optim.AdamW's state dict was accepted: its
    lr/eps/weight_decay replaced ours, k restarted at 0 and its exp_avg and
    step stayed in the state (and in every later checkpoint).  schedulefree
    raises too."""
    opt, params = _trained()
    assert_refuses_foreign_state(opt, params, other_cls, "ScheduleFreeAdamW")
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["k"] == 3


def test_schedulefree_state_dict_still_loads():
    """The peer whose state dicts are accepted: schedulefree.AdamWScheduleFree's."""
    params = clone_params([(4, 3), (7,)])()
    peer = schedulefree.AdamWScheduleFree(params, lr=1e-2)
    peer.train()
    _run(peer, params, [random_grads(params, torch.Generator().manual_seed(s)) for s in range(2)])
    opt = zero_sf.ScheduleFreeAdamW([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    opt.load_state_dict(peer.state_dict())
    assert opt.param_groups[0]["k"] == 2
