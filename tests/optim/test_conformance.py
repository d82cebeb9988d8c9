"""torch.optim conformance, driven by torch's own optimizer test metadata.

``torch.testing._internal.common_optimizers`` (in the torch wheel) describes
each optimizer with an :class:`OptimizerInfo`: the configurations to try
(``optim_inputs_func``) and the inputs that must fail, with torch's error
wording (``optim_error_inputs_func``).  Here both zero_sf optimizers get an
entry -- ``RMSProp`` reuses torch's RMSprop inputs and error inputs
verbatim -- and every configuration goes through the generic contract that
torch's ``TestOptimRenewed`` checks: same result as the reference optimizer,
tensor lr == float lr, hooks (step, state_dict, load_state_dict, pre and
post), deterministic state-dict and pickle round trips, loading older state
dicts, params without gradients left alone, schedulers, closures.

Documented exclusions (docs/limitations.md): complex parameters (refused
with a ValueError that says to use ``torch.view_as_real``),
``differentiable=True`` and ``capturable=True`` (refused), sparse gradients
(refused), ``fused`` (no such argument: the fused kernel is ``backend``).
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import schedulefree
import torch
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
    optim_error_inputs_func_rmsprop,
    optim_inputs_func_rmsprop,
)

import zero_sf

DEVICE = "cpu"


def _rmsprop_inputs(device, dtype=None):
    """torch's RMSprop configurations, plus the Adam-style ones of ours."""
    return optim_inputs_func_rmsprop(device, dtype) + [
        OptimizerInput(params=None, kwargs=dict(bias_correction=True, alpha=0.999, lr=1e-2),
                       desc="bias_correction (Adam with beta1=0)"),
        OptimizerInput(params=None, kwargs=dict(bias_correction=True, weight_decay=0.1,
                                                maximize=True),
                       desc="bias_correction, weight_decay, maximize"),
        OptimizerInput(params=None, kwargs=dict(lr=torch.tensor(1e-3)), desc="Tensor lr"),
    ]


def _sf_inputs(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs=dict(lr=1e-2, weight_decay=0.1), desc="weight_decay"),
        OptimizerInput(params=None, kwargs=dict(warmup_steps=3, betas=(0.95, 0.98)),
                       desc="warmup, betas"),
        OptimizerInput(params=None, kwargs=dict(r=1.0, weight_lr_power=1.0, eps=1e-6),
                       desc="r, weight_lr_power"),
        OptimizerInput(params=None, kwargs=dict(lr=torch.tensor(1e-2)), desc="Tensor lr"),
    ]


def _sf_error_inputs(device, dtype):
    """torch's errors for every optimizer, plus AdamW's wording for ours."""
    return get_error_inputs_for_all_optims(device, dtype) + [
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs=kw, desc=regex),
                            error_type=ValueError, error_regex=regex)
        for kw, regex in [
            (dict(lr=-1.0), "Invalid learning rate: -1.0"),
            (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
            (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
            (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
            (dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
        ]]


def _rmsprop_reference(params, kwargs):
    """torch.optim.RMSprop, or Adam(beta1=0) for the bias-corrected variant
    (optax's eps_in_sqrt/initial_scale variants: tests/test_spec.py)."""
    kw = dict(kwargs)
    if kw.pop("bias_correction", False):
        return torch.optim.Adam(params, lr=kw.get("lr", 1e-2), betas=(0.0, kw.get("alpha", 0.99)),
                                eps=kw.get("eps", 1e-8), weight_decay=kw.get("weight_decay", 0),
                                maximize=kw.get("maximize", False))
    return torch.optim.RMSprop(params, **kw)


OPTIM_DB = [
    OptimizerInfo(zero_sf.RMSProp, optim_inputs_func=_rmsprop_inputs,
                  optim_error_inputs_func=optim_error_inputs_func_rmsprop,
                  supported_impls=("foreach",), supports_complex=False),
    OptimizerInfo(zero_sf.ScheduleFreeAdamW, optim_inputs_func=_sf_inputs,
                  optim_error_inputs_func=_sf_error_inputs,
                  supported_impls=("foreach",), supports_complex=False),
]
REFERENCES = {zero_sf.RMSProp: _rmsprop_reference,
              zero_sf.ScheduleFreeAdamW: lambda ps, kw: schedulefree.AdamWScheduleFree(ps, **kw)}

CASES = [pytest.param(info, inp, id=f"{info.name}-{inp.desc}")
         for info in OPTIM_DB for inp in info.optim_inputs_func(DEVICE, torch.float32)]
ERROR_CASES = [pytest.param(info, err, id=f"{info.name}-{err.optimizer_error_input.desc}")
               for info in OPTIM_DB for err in info.optim_error_inputs_func(DEVICE, torch.float32)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(10, 5, generator=g).requires_grad_()
    bias = torch.randn(10, generator=g).requires_grad_()
    return [weight, bias]


def _loss(params, x):
    weight, bias = params
    return (weight.mv(x) + bias).pow(2).sum()


def _build(info, params, kwargs):
    opt = info.optim_cls(params, **copy.deepcopy(kwargs))
    if hasattr(opt, "train"):
        opt.train()  # Schedule-Free starts in eval mode, as the reference does
    return opt


def _train(opt, params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        _loss(params, torch.randn(5, generator=g)).backward()
        opt.step()


def _equal_state_dicts(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, va in a["state"][k].items():
            vb = b["state"][k][key]
            if torch.is_tensor(va):
                assert va.dtype == vb.dtype and torch.equal(va, vb), (k, key)
            else:
                assert va == vb, (k, key)


@pytest.mark.parametrize("info, err", ERROR_CASES)
def test_errors(info, err):
    inp = err.optimizer_error_input
    params = inp.params if inp.params is not None else _params()
    assert err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type, match=err.error_regex):
            info.optim_cls(params, **inp.kwargs)
    else:
        with pytest.raises(err.error_type, match=err.error_regex):
            info.optim_cls(params, **inp.kwargs)


@pytest.mark.parametrize("info, inp", CASES)
def test_matches_reference(info, inp):
    """Same trajectory as the optimizer it replaces (torch.optim.RMSprop /
    Adam(beta1=0) / schedulefree.AdamWScheduleFree), same kwargs."""
    ours_p, ref_p = _params(), _params()
    ref = REFERENCES[info.optim_cls](ref_p, copy.deepcopy(inp.kwargs))
    ours = _build(info, ours_p, inp.kwargs)
    if hasattr(ref, "train"):
        ref.train()
    _train(ours, ours_p, 20), _train(ref, ref_p, 20)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("info, inp", CASES)
def test_tensor_lr_equals_float_lr(info, inp):
    # the float is the tensor's fp32 value, so both runs see the same number
    lr = torch.tensor(float(inp.kwargs.get("lr", info.optim_cls([torch.zeros(1)]).defaults["lr"]))).item()
    a_p, b_p = _params(), _params()
    a = _build(info, a_p, {**inp.kwargs, "lr": lr})
    b = _build(info, b_p, {**inp.kwargs, "lr": torch.tensor(lr)})
    _train(a, a_p, 5), _train(b, b_p, 5)
    for x, y in zip(a_p, b_p):
        assert torch.equal(x, y)


@pytest.mark.parametrize("info, inp", CASES)
def test_state_dict_round_trip_is_deterministic_and_resumes_exactly(info, inp):
    """state_dict -> load_state_dict -> state_dict gives the same dict (no
    key added, no dtype change), and the loaded copy continues identically."""
    a_p = _params()
    a = _build(info, a_p, inp.kwargs)
    _train(a, a_p, 3)
    sd = copy.deepcopy(a.state_dict())
    b_p = [p.detach().clone().requires_grad_() for p in a_p]
    b = info.optim_cls(b_p, **copy.deepcopy(inp.kwargs))
    b.load_state_dict(copy.deepcopy(sd))
    _equal_state_dicts(b.state_dict(), sd)
    _train(a, a_p, 3, seed=2), _train(b, b_p, 3, seed=2)
    for x, y in zip(a_p, b_p):
        assert torch.equal(x, y)
    _equal_state_dicts(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("info, inp", CASES)
def test_pickle_and_deepcopy(info, inp):
    params = _params()
    opt = _build(info, params, inp.kwargs)
    _train(opt, params, 2)
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert type(clone) is type(opt)
        assert [{k: v for k, v in g.items() if k != "params"} for g in clone.param_groups] == \
               [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    repr(opt)  # printable, like every torch optimizer


@pytest.mark.parametrize("info, inp", CASES)
def test_load_older_state_dict_without_impl_flags(info, inp):
    """A state dict saved before ``foreach``/``differentiable`` existed loads, and
    the groups get the defaults."""
    a_p = _params()
    a = _build(info, a_p, inp.kwargs)
    _train(a, a_p, 2)
    sd = copy.deepcopy(a.state_dict())
    for group in sd["param_groups"]:
        for flag in ("foreach", "differentiable", "maximize", "capturable", "backend"):
            group.pop(flag, None)
    b = info.optim_cls([p.detach().clone().requires_grad_() for p in a_p], **copy.deepcopy(inp.kwargs))
    b.load_state_dict(sd)
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert {k: v for k, v in ga.items() if k != "params"} == \
               {k: v for k, v in gb.items() if k != "params"}


@pytest.mark.parametrize("info", OPTIM_DB, ids=lambda i: i.name)
def test_hooks(info):
    params = _params()
    opt = _build(info, params, {})
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    _train(opt, params, 1)
    assert calls == ["step_pre", "step_post"]

    # state_dict: a pre-hook may write anything into state; a post-hook may edit the dict
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": "hi"})
    sd = opt.state_dict()
    assert sd["state"]["test"] == 1 and sd["extra"] == "hi"

    # load_state_dict: the pre-hook's edit of the dict is what loads, and the
    # post-hook runs last, so what it writes into state stays
    fresh = info.optim_cls([p.detach().clone().requires_grad_() for p in params])
    key = "z" if "z" in opt.state[params[0]] else "square_avg"

    def pre(o, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0][key] = torch.full_like(state_dict["state"][0][key], 7.0)
        return state_dict

    def post(o):
        o.state[o.param_groups[0]["params"][1]][key] = torch.full_like(params[1], 3.0)
        o.state["marker"] = True  # not a per-parameter dict

    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]][key],
                       torch.full_like(params[0], 7.0))
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][1]][key],
                       torch.full_like(params[1], 3.0))
    assert fresh.state["marker"] is True
    fresh.state_dict()  # a non-dict entry in state does not break the export


@pytest.mark.parametrize("info", OPTIM_DB, ids=lambda i: i.name)
def test_params_without_grad_unchanged_and_closure_loss_returned(info):
    params = _params()
    frozen = torch.randn(4, requires_grad=True)
    opt = _build(info, params + [frozen], {"weight_decay": 0.1})
    before = frozen.detach().clone()
    x = torch.randn(5)

    def closure():
        opt.zero_grad()
        loss = _loss(params, x)
        loss.backward()
        return loss

    expected = _loss(params, x).detach()
    loss = opt.step(closure)
    assert torch.equal(loss.detach(), expected)  # the loss before the update
    assert torch.equal(frozen, before) and frozen not in opt.state


@pytest.mark.parametrize("info", OPTIM_DB, ids=lambda i: i.name)
def test_schedulers_drive_lr_and_loss_falls(info):
    """torch's OptimizerInfo scheduler inputs (StepLR, ReduceLROnPlateau) run
    with our optimizers and the loss still goes down."""
    for make_scheduler in info.scheduler_inputs[0]:
        params = _params()
        opt = _build(info, params, {"lr": 1e-2})
        sched = make_scheduler(opt)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(5, generator=g)
        first = _loss(params, x).item()
        for _ in range(30):
            opt.zero_grad()
            loss = _loss(params, x)
            loss.backward()
            opt.step()
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(loss.item())
            else:
                sched.step()
        if hasattr(opt, "eval"):
            opt.eval()  # Schedule-Free: the loss at x
        assert _loss(params, x).item() < first


def test_rmsprop_step_is_a_host_tensor_like_torchs():
    """Generic tools call .item()/.detach() on state["step"]; ours is torch's
    0-dim fp32 CPU tensor (read for the bias correction without a device sync)."""
    params = _params()
    opt = zero_sf.RMSProp(params, bias_correction=True)
    ref = torch.optim.RMSprop(_params())
    _train(opt, params, 3)
    step = opt.state[params[0]]["step"]
    assert torch.is_tensor(step) and step.dim() == 0 and step.device.type == "cpu"
    assert step.item() == 3.0 and step.detach().item() == 3.0
    _train(ref, ref.param_groups[0]["params"], 3)
    ref_step = ref.state[ref.param_groups[0]["params"][0]]["step"]
    assert (ref_step.dtype, ref_step.device) == (step.dtype, step.device)


@pytest.mark.parametrize("cls", [zero_sf.RMSProp, zero_sf.ScheduleFreeAdamW])
def test_complex_params_are_refused_with_the_fix(cls):
    with pytest.raises(ValueError, match=r"view_as_real"):
        cls([torch.randn(3, dtype=torch.complex64, requires_grad=True)])


@pytest.mark.parametrize("cls", [zero_sf.RMSProp, zero_sf.ScheduleFreeAdamW])
def test_tensor_lr_through_zero_optimizer(cls):
    """ZeroOptimizer passes a tensor lr through to the inner optimizer."""
    kw = dict(bias_correction=True) if cls is zero_sf.RMSProp else {}
    a_p, b_p = _params(), _params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = zero_sf.ZeroOptimizer(a_p, cls, lr=torch.tensor(1e-2).item(), **kw)
        b = zero_sf.ZeroOptimizer(b_p, cls, lr=torch.tensor(1e-2), **kw)
    for o in (a, b):
        if hasattr(o, "train"):
            o.train()
    _train(a, a_p, 3), _train(b, b_p, 3)
    for x, y in zip(a_p, b_p):
        assert torch.equal(x, y)
