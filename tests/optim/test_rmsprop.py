"""zero_sf.RMSProp against torch.optim.Adam(betas=(0, b2)) and torch.optim.RMSprop."""

import copy

import pytest
import torch

import zero_sf
from tests.helpers import (assert_refuses_foreign_state, assert_unchanged, clone_params, max_diff, random_grads,
                           set_grads, snapshot)

SHAPES = [(1,), (127,), (33, 7), (5, 4, 3), (1000,)]


def _run_pair(ref, ours, p_ref, p_ours, steps=50, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = random_grads(p_ref, gen)
        set_grads(p_ref, grads), set_grads(p_ours, grads)
        ref.step(), ours.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.02])
@pytest.mark.parametrize("alpha", [0.999, 0.9])
@pytest.mark.parametrize("maximize", [False, True])
def test_bias_corrected_equals_adam_beta1_0(backend, weight_decay, alpha, maximize):
    make = clone_params(SHAPES)
    p_ref, p_ours = make(), make()
    ref = torch.optim.Adam(p_ref, lr=3e-3, betas=(0.0, alpha), eps=1e-8,
                           weight_decay=weight_decay, maximize=maximize)
    ours = zero_sf.RMSProp(p_ours, lr=3e-3, alpha=alpha, eps=1e-8, weight_decay=weight_decay,
                           maximize=maximize, bias_correction=True, backend=backend)
    _run_pair(ref, ours, p_ref, p_ours)
    assert max_diff(p_ref, p_ours) <= 2e-6
    for p in p_ours:  # exactly one elementwise state tensor per parameter (+ the 0-dim step)
        assert [k for k, v in ours.state[p].items() if torch.is_tensor(v) and v.dim()] == ["square_avg"]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_defaults_equal_torch_rmsprop(backend, momentum, centered, weight_decay):
    make = clone_params(SHAPES)
    p_ref, p_ours = make(), make()
    kw = dict(momentum=momentum, centered=centered, weight_decay=weight_decay)
    ref = torch.optim.RMSprop(p_ref, **kw)
    ours = zero_sf.RMSProp(p_ours, **kw, backend=backend)
    _run_pair(ref, ours, p_ref, p_ours)
    assert max_diff(p_ref, p_ours) <= 2e-6
    for p_r, p_o in zip(p_ref, p_ours):
        assert set(ref.state[p_r]) == set(ours.state[p_o])  # same state keys


def test_torch_rmsprop_default_signature_matches():
    import inspect
    ref = inspect.signature(torch.optim.RMSprop.__init__).parameters
    ours = inspect.signature(zero_sf.RMSProp.__init__).parameters
    for name, param in ref.items():
        assert name in ours, name
        assert ours[name].default == param.default, name


def test_initial_scale_and_eps_in_sqrt(backend):
    p = torch.randn(300, requires_grad=True)
    p64 = p.detach().double()
    opt = zero_sf.RMSProp([p], lr=1e-2, alpha=0.9, eps=1e-4, initial_scale=0.25,
                          eps_in_sqrt=True, bias_correction=True, backend=backend)
    v64 = torch.full_like(p64, 0.25)
    for t in range(1, 11):
        g = torch.randn(300)
        p.grad = g.clone()
        opt.step()
        # optax scale_by_rms(initial_scale, eps_in_sqrt=True, bias_correction=True)
        v64 = 0.9 * v64 + 0.1 * g.double() ** 2
        p64 -= 1e-2 * g.double() / torch.sqrt(v64 / (1 - 0.9**t) + 1e-4)
    assert (p.detach().double() - p64).abs().max().item() <= 1e-5


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_interop_with_torch_rmsprop(direction):
    make = clone_params(SHAPES)
    kw = dict(lr=1e-2, momentum=0.5, centered=True)
    p_full, p_a = make(), make()
    cls_a, cls_b = ((torch.optim.RMSprop, zero_sf.RMSProp) if direction == "torch_to_ours"
                    else (zero_sf.RMSProp, torch.optim.RMSprop))
    full = cls_a(p_full, **kw)
    a = cls_a(p_a, **kw)
    gen = torch.Generator().manual_seed(2)
    grads = [random_grads(p_full, gen) for _ in range(20)]
    for i, gs in enumerate(grads):
        set_grads(p_full, gs)
        full.step()
        if i < 10:
            set_grads(p_a, gs)
            a.step()
    p_b = [p.detach().clone().requires_grad_() for p in p_a]
    b = cls_b(p_b, **kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for gs in grads[10:]:
        set_grads(p_b, gs)
        b.step()
    assert max_diff(p_full, p_b) <= 2e-6


@pytest.mark.parametrize("bad, match", [
    (dict(lr=-0.1), "Invalid learning rate: -0.1"),
    (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (dict(momentum=-0.5), "Invalid momentum value: -0.5"),
    (dict(weight_decay=-1e-3), "Invalid weight_decay value: -0.001"),
    (dict(alpha=-0.1), "Invalid alpha value: -0.1"),
    (dict(alpha=1.5, bias_correction=True), "Invalid alpha value: 1.5"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    (dict(lr=torch.tensor(-1e-3)), "Invalid learning rate"),
    (dict(alpha=1.0, bias_correction=True), "Invalid alpha value: 1.0"),
    (dict(initial_scale=-1.0), "Invalid initial_scale value: -1.0"),
    (dict(capturable=True), "Invalid capturable value: True"),
    (dict(backend="gpu"), "Invalid backend: 'gpu'"),
])
def test_invalid_hyperparameters(bad, match):
    with pytest.raises(ValueError, match=match):
        zero_sf.RMSProp([torch.randn(3, requires_grad=True)], **bad)


def test_bad_gradient_raises_before_any_change():
    params = clone_params([(4,), (5,)])()
    opt = zero_sf.RMSProp(params, momentum=0.9)
    set_grads(params, random_grads(params, torch.Generator().manual_seed(0)))
    opt.step()
    set_grads(params, random_grads(params, torch.Generator().manual_seed(1)))
    params[1].grad = torch.randn(5).to_sparse()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(backend, dtype):
    """bf16/fp16 params, fp32 state: torch.optim.Adam(betas=(0, b2)) on an
    fp32 copy whose value is rounded to the param dtype after every step
    (what "the param holds y in its own dtype, state fp32" means)."""
    make = clone_params([(300,), (7, 3)], dtype=dtype)
    params = make()
    ref_params = [p.detach().float().requires_grad_() for p in params]
    opt = zero_sf.RMSProp(params, lr=1e-2, bias_correction=True, backend=backend)
    ref = torch.optim.Adam(ref_params, lr=1e-2, betas=(0.0, 0.99), eps=1e-8)
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        for p, q in zip(params, ref_params):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g, g.float()
        opt.step(), ref.step()
        with torch.no_grad():
            for q in ref_params:
                q.copy_(q.to(dtype))
        for p, q in zip(params, ref_params):
            assert opt.state[p]["square_avg"].dtype == torch.float32
            torch.testing.assert_close(opt.state[p]["square_avg"], ref.state[q]["exp_avg_sq"],
                                       rtol=1e-6, atol=0)
            # One ulp of the param dtype: the fp32 values may differ in the
            # last bit (op order), which can flip a rounding.
            torch.testing.assert_close(p.detach().float(), q.detach(),
                                       rtol=torch.finfo(dtype).eps, atol=0)


def test_per_parameter_step_counts_match_adam(backend):
    """Params of one group that skip steps (no gradient) keep their own step
    count for the bias correction, as torch.optim.Adam does."""
    make = clone_params([(5,), (6,), (7,)])
    p_ref, p_ours = make(), make()
    ref = torch.optim.Adam(p_ref, lr=1e-2, betas=(0.0, 0.9), eps=1e-8)
    ours = zero_sf.RMSProp(p_ours, lr=1e-2, alpha=0.9, eps=1e-8, bias_correction=True,
                           backend=backend)
    gen = torch.Generator().manual_seed(2)
    for step in range(8):
        grads = random_grads(p_ref, gen)
        for i, (a, b, g) in enumerate(zip(p_ref, p_ours, grads)):
            skip = (i == 0 and step < 3) or (i == 2 and step % 2)  # first param starts late
            a.grad = None if skip else g.float()
            b.grad = None if skip else g.float()
        ref.step(), ours.step()
    assert [int(ours.state[p]["step"]) for p in p_ours] == [int(ref.state[p]["step"]) for p in p_ref]
    assert max_diff(p_ref, p_ours) <= 2e-6


def test_alpha_above_one_accepted_like_torch():
    """torch.optim.RMSprop only requires alpha >= 0; without bias correction so do we."""
    ref_p, ours_p = clone_params([(3,)])(), clone_params([(3,)])()
    ref = torch.optim.RMSprop(ref_p, alpha=1.5)
    ours = zero_sf.RMSProp(ours_p, alpha=1.5)
    assert ours.defaults["alpha"] == ref.defaults["alpha"] == 1.5


@pytest.mark.parametrize("other_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_another_optimizers_state_dict_is_refused_before_any_change(other_cls):
    """Issue #21 item 5, for RMSProp: a state dict of another optimizer is
    refused naming both (torch.optim.RMSprop's loads)."""
    params = clone_params([(4, 3), (7,)])()
    opt = zero_sf.RMSProp(params, lr=1e-2)
    for s in range(2):
        set_grads(params, random_grads(params, torch.Generator().manual_seed(s)))
        opt.step()
    copies = assert_refuses_foreign_state(opt, params, other_cls, "RMSProp")
    peer = torch.optim.RMSprop(copies, lr=1e-2)
    peer.step()
    opt.load_state_dict(peer.state_dict())  # the peer's loads
