"""The spec against the real references: torch.optim.Adam, torch.optim.RMSprop
and schedulefree.AdamWScheduleFree (single tensors, fp32)."""

import pytest
import schedulefree
import torch

from zero_sf import spec

SHAPES = [(1,), (127,), (33, 7), (5, 4, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("beta2", [0.999, 0.9])
def test_rms_core_with_bias_correction_is_adam_beta1_0(shape, weight_decay, beta2):
    p_ref = torch.randn(shape, requires_grad=True)
    p = p_ref.detach().clone()
    v = torch.zeros_like(p)
    adam = torch.optim.Adam([p_ref], lr=3e-3, betas=(0.0, beta2), eps=1e-8,
                            weight_decay=weight_decay)
    for t in range(1, 61):
        g = torch.randn(shape)
        p_ref.grad = g.clone()
        adam.step()
        spec.rmsprop_update(p, g, v, lr=3e-3, alpha=beta2, eps=1e-8,
                            weight_decay=weight_decay,
                            bias_correction2=spec.rms_bias_correction(beta2, t))
    assert (p - p_ref.detach()).abs().max().item() <= 2e-6
    assert torch.allclose(v, adam.state[p_ref]["exp_avg_sq"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("maximize", [False, True])
def test_rmsprop_update_is_torch_rmsprop(momentum, centered, weight_decay, maximize):
    p_ref = torch.randn(65, requires_grad=True)
    p = p_ref.detach().clone()
    v, buf, gavg = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    ref = torch.optim.RMSprop([p_ref], lr=1e-2, alpha=0.95, eps=1e-6, momentum=momentum,
                              centered=centered, weight_decay=weight_decay, maximize=maximize)
    for _ in range(50):
        g = torch.randn(65)
        p_ref.grad = g.clone()
        ref.step()
        spec.rmsprop_update(p, g, v, lr=1e-2, alpha=0.95, eps=1e-6, momentum=momentum,
                            centered=centered, weight_decay=weight_decay, maximize=maximize,
                            momentum_buffer=buf, grad_avg=gavg)
    assert (p - p_ref.detach()).abs().max().item() <= 2e-6


def test_eps_in_sqrt_and_initial_scale_follow_the_formula():
    # Independent float64 evaluation of optax's scale_by_rms formula.
    p64 = torch.randn(50, dtype=torch.float64)
    p = p64.float()
    v = torch.full_like(p, 0.5)
    v64 = torch.full_like(p64, 0.5)
    for t in range(1, 21):
        g64 = torch.randn(50, dtype=torch.float64)
        spec.rmsprop_update(p, g64.float(), v, lr=1e-2, alpha=0.9, eps=1e-3,
                            eps_in_sqrt=True,
                            bias_correction2=spec.rms_bias_correction(0.9, t))
        v64 = 0.9 * v64 + 0.1 * g64 * g64
        p64 = p64 - 1e-2 * g64 / torch.sqrt(v64 / (1 - 0.9**t) + 1e-3)
    assert (p.double() - p64).abs().max().item() <= 1e-5
    assert (v.double() - v64).abs().max().item() <= 1e-5


@pytest.mark.parametrize("warmup_steps", [0, 7])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("r,weight_lr_power", [(0.0, 2.0), (1.0, 0.0), (0.5, 1.0)])
def test_sf_adamw_update_is_schedulefree(warmup_steps, weight_decay, r, weight_lr_power):
    y_ref = torch.randn(129, requires_grad=True)
    y = y_ref.detach().clone()
    z, v = y.clone(), torch.zeros_like(y)
    kw = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay,
              warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)
    ref = schedulefree.AdamWScheduleFree([y_ref], **kw)
    ref.train()
    lr_max, weight_sum = -1.0, 0.0
    for k in range(50):
        g = torch.randn(129)
        y_ref.grad = g.clone()
        ref.step()
        sc = spec.sf_scalars(k=k, lr=2e-2, beta1=0.9, beta2=0.99, warmup_steps=warmup_steps,
                             r=r, weight_lr_power=weight_lr_power, lr_max=lr_max,
                             weight_sum=weight_sum)
        lr_max, weight_sum = sc.lr_max, sc.weight_sum
        spec.sf_adamw_update(y, g, z, v, lr=sc.lr, ck=sc.ck, y_coef=sc.y_coef, beta2=0.99,
                             bias_correction2=sc.bias_correction2, eps=1e-8,
                             weight_decay=weight_decay)
    group = ref.param_groups[0]
    assert (lr_max, weight_sum) == (group["lr_max"], group["weight_sum"])
    assert (y - y_ref.detach()).abs().max().item() <= 5e-6
    assert (z - ref.state[y_ref]["z"]).abs().max().item() <= 5e-6
    # eval(): x = lerp(y, z, 1 - 1/beta1), as the reference's eval().
    spec.sf_interpolate(y, z, weight=spec.sf_eval_weight(0.9))
    ref.eval()
    assert (y - y_ref.detach()).abs().max().item() <= 5e-6


def test_sf_scalars_zero_lr_gives_zero_ck():
    sc = spec.sf_scalars(k=0, lr=0.0, beta1=0.9, beta2=0.999, warmup_steps=0, r=0.0,
                         weight_lr_power=2.0, lr_max=-1.0, weight_sum=0.0)
    assert sc.ck == 0.0 and sc.weight_sum == 0.0 and sc.lr == 0.0


def test_low_precision_y_is_updated_in_fp32_and_rounded_once():
    y32 = torch.randn(300)
    y16 = y32.bfloat16()
    g = torch.randn(300)
    z, v = y16.float(), torch.zeros(300)
    z2, v2, yref = z.clone(), v.clone(), y16.float()
    kw = dict(lr=1e-2, ck=0.3, y_coef=-0.01, beta2=0.999, bias_correction2=0.001, eps=1e-8,
              weight_decay=0.1)
    spec.sf_adamw_update(y16, g.bfloat16(), z, v, **kw)
    spec.sf_adamw_update(yref, g.bfloat16().float(), z2, v2, **kw)
    assert torch.equal(y16, yref.bfloat16())
    assert torch.equal(z, z2) and torch.equal(v, v2)
