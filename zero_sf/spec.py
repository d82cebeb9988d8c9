"""The math, once: plain-torch reference rules (docs/design.md §1).

Every other path -- the fused Triton kernels, the sharded optimizer, the
DeepSpeed path -- is tested against the functions in this module, and these
functions are tested against ``torch.optim.Adam``, ``torch.optim.RMSprop`` and
``schedulefree.AdamWScheduleFree``.

Conventions
-----------
* One function per rule, one tensor at a time, updated in place.
* Arithmetic in the state dtype (fp32 for low-precision models): a bf16/fp16
  ``y`` or gradient is upcast, updated, and rounded back once.
* Scalars (learning rates, ``ck``, bias corrections) are Python floats computed
  on the host once per step and group (see :func:`sf_scalars`); nothing here
  reads a tensor value back to the host.
* Symbols follow the Schedule-Free paper (Defazio et al., 2024): ``y`` is the
  gradient-evaluation point the model holds in train mode, ``z`` the base
  (SGD-like) sequence, ``x`` the averaged sequence used for evaluation,
  ``ck`` the averaging weight ``c_{k+1}``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .storage import LANE_BUF, LANE_GAVG, LANE_SQUARE_AVG, LANE_V, LANE_Z, PLAIN, Store, upcast

__all__ = [
    "rms_normalize",
    "rmsprop_update",
    "sf_adamw_update",
    "sf_interpolate",
    "sf_eval_weight",
    "sf_train_weight",
    "SFScalars",
    "sf_scalars",
    "rms_bias_correction",
    "compute_dtype",
]


def compute_dtype(state: Tensor) -> torch.dtype:
    """The dtype the update is computed in: fp32 for bf16/fp16 state (a
    compressed ``z``/``exp_avg_sq`` is widened, updated and rounded once),
    else the state's own dtype (fp32, fp64)."""
    return torch.float32 if state.dtype in (torch.bfloat16, torch.float16) else state.dtype


# --------------------------------------------------------------------------
# The RMS core (optax ``scale_by_rms`` with Adam-style scaling)
# --------------------------------------------------------------------------


def rms_bias_correction(beta2: float, step: int) -> float:
    """``1 - beta2**t`` for the t-th step (t >= 1), as Adam's second moment."""
    return 1.0 - beta2**step


def rms_normalize(
    g: Tensor,
    v: Tensor,
    *,
    beta2: float,
    eps: float,
    bias_correction2: float = 1.0,
    eps_in_sqrt: bool = False,
) -> Tensor:
    """Update ``v`` in place and return the normalized gradient ``u``.

    ``v <- b2*v + (1-b2)*g*g``;  ``v_hat = v / bias_correction2``;
    ``u = g / (sqrt(v_hat) + eps)`` (torch/Adam placement) or
    ``u = g / sqrt(v_hat + eps)`` (``eps_in_sqrt``, optax's default).

    ``bias_correction2 = 1`` turns bias correction off (plain RMSProp).
    With bias correction on and ``eps`` outside the root this is Adam's
    update with ``beta1 = 0``: no first-moment buffer is needed at all.
    """
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    # Same op order as torch.optim.Adam / schedulefree so fp32 results agree
    # to the last bit where the reference does the same.
    denom = v.div(bias_correction2) if bias_correction2 != 1.0 else v.clone()
    if eps_in_sqrt:
        denom.add_(eps).sqrt_()
    else:
        denom.sqrt_().add_(eps)
    return g / denom


# --------------------------------------------------------------------------
# Adam-style RMSProp (torch.optim.RMSprop semantics + bias correction)
# --------------------------------------------------------------------------


def rmsprop_update(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    bias_correction2: float = 1.0,
    eps_in_sqrt: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
    momentum_buffer: Tensor | None = None,
    grad_avg: Tensor | None = None,
    store: Store = PLAIN,
) -> None:
    """One RMSProp step on one tensor, in place.

    Follows ``torch.optim.RMSprop`` (coupled L2 weight decay ``g += wd*p``
    before the second moment, optional momentum and centering); with
    ``bias_correction2 = 1 - alpha**t`` and no momentum/centering it is
    ``torch.optim.Adam(betas=(0, alpha))``.

    ``param`` may be a fp32 master copy of a low-precision parameter; then
    ``store.out`` receives its rounded copy.  ``grad_scale`` multiplies the
    gradient first (averaging over ranks or loss-scale unscaling).  How
    ``param`` and the state are stored (a remainder, stochastic rounding) is
    ``store``'s business (:class:`zero_sf.storage.Store`).
    """
    cdt = compute_dtype(square_avg)
    g = upcast(grad, cdt)
    if grad_scale != 1.0:
        g = g * grad_scale
    if maximize:
        g = -g
    p = store.load_y(param, cdt)
    if weight_decay != 0.0:
        g = g.add(p, alpha=weight_decay)

    v = upcast(square_avg, cdt)
    v.mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
    if centered:
        assert grad_avg is not None, "centered RMSProp needs grad_avg"
        gavg = upcast(grad_avg, cdt)
        gavg.lerp_(g, 1.0 - alpha)
        # Centred second moment: E[g^2] - E[g]^2, both bias-corrected alike.
        avg = v.addcmul(gavg, gavg, value=-1.0)
        store.store_state(grad_avg, gavg, LANE_GAVG)
    else:
        avg = v.clone() if bias_correction2 == 1.0 else v
    if bias_correction2 != 1.0:
        avg = avg.div(bias_correction2)
    if eps_in_sqrt:
        avg.add_(eps).sqrt_()
    else:
        avg.sqrt_().add_(eps)
    store.store_state(square_avg, v, LANE_SQUARE_AVG)

    if momentum > 0.0:
        assert momentum_buffer is not None, "momentum needs momentum_buffer"
        buf = upcast(momentum_buffer, cdt)
        buf.mul_(momentum).addcdiv_(g, avg)
        p.add_(buf, alpha=-lr)
        store.store_state(momentum_buffer, buf, LANE_BUF)
    else:
        p.addcdiv_(g, avg, value=-lr)

    store.store_y(param, p)


# --------------------------------------------------------------------------
# Schedule-Free AdamW
# --------------------------------------------------------------------------


class SFScalars(NamedTuple):
    """Per-step, per-group host scalars of Schedule-Free AdamW."""

    lr: float  # lr0 * warmup schedule
    ck: float  # averaging weight c_{k+1} = w_k / sum_i w_i
    bias_correction2: float  # 1 - beta2**(k+1)
    y_coef: float  # lr * (beta1*(1-ck) - 1): the gradient's weight in y
    lr_max: float  # running max of lr (new value for the group)
    weight_sum: float  # running sum of weights (new value for the group)


def sf_scalars(
    *,
    k: int,
    lr: float,
    beta1: float,
    beta2: float,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
    lr_max: float,
    weight_sum: float,
) -> SFScalars:
    """The host-side schedule of step ``k`` (0-based), in Python floats.

    Matches ``schedulefree.AdamWScheduleFree`` 1.4.x: linear warmup,
    ``w = (k+1)**r * lr_max**weight_lr_power``, ``ck = w / sum(w)``
    (0 while the sum is 0, e.g. lr == 0).
    """
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr_k = lr * sched
    lr_max = max(lr_k, lr_max)
    weight = ((k + 1) ** r) * (lr_max**weight_lr_power)
    weight_sum = weight_sum + weight
    ck = weight / weight_sum if weight_sum != 0.0 else 0.0
    return SFScalars(
        lr=lr_k,
        ck=ck,
        bias_correction2=1.0 - beta2 ** (k + 1),
        y_coef=lr_k * (beta1 * (1.0 - ck) - 1.0),
        lr_max=lr_max,
        weight_sum=weight_sum,
    )


def sf_adamw_update(
    y: Tensor,
    grad: Tensor,
    z: Tensor,
    v: Tensor,
    *,
    lr: float,
    ck: float,
    y_coef: float,
    beta2: float,
    bias_correction2: float,
    eps: float,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    store: Store = PLAIN,
) -> None:
    """One Schedule-Free AdamW step on one tensor, in place.

    ``y`` is the point the gradient was evaluated at (the parameter in train
    mode, or its fp32 master copy); ``z`` and ``v`` are the only state.
    ``store.out``, when given, receives ``y`` rounded to its dtype (the
    model's bf16/fp16 parameter when ``y`` is a fp32 master).  The gradient
    is not modified (schedulefree normalizes ``p.grad`` in place; we don't).
    The update runs on fp32 values: ``store`` loads the exact y (a bf16 y
    with its remainder) and rounds ``z``/``v``/``y`` once on the way back
    (:class:`zero_sf.storage.Store`).
    """
    cdt = compute_dtype(v)
    g = upcast(grad, cdt)
    if grad_scale != 1.0:
        g = g * grad_scale
    # u = g / (sqrt(v / bc2) + eps): the RMS core, Adam-style.
    v32, z32 = upcast(v, cdt), upcast(z, cdt)
    u = rms_normalize(g, v32, beta2=beta2, eps=eps, bias_correction2=bias_correction2)
    y32 = store.load_y(y, cdt)
    if weight_decay != 0.0:
        u.add_(y32, alpha=weight_decay)  # decay evaluated at y, as the reference
    # y_{k+1} = (1-ck) y_k + ck z_k + lr (beta1 (1-ck) - 1) u:
    # x and y advanced together without ever storing x.
    y32.lerp_(z32, ck)
    y32.add_(u, alpha=y_coef)
    z32.sub_(u, alpha=lr)
    store.store_state(v, v32, LANE_V)
    store.store_state(z, z32, LANE_Z)
    store.store_y(y, y32)


def sf_eval_weight(beta1: float) -> float:
    """Weight of ``z`` that turns ``y`` into ``x``: x = y + (1-1/b1)(z-y)."""
    return 1.0 - 1.0 / beta1


def sf_train_weight(beta1: float) -> float:
    """Weight of ``z`` that turns ``x`` into ``y``: y = x + (1-b1)(z-x)."""
    return 1.0 - beta1


def sf_interpolate(p: Tensor, z: Tensor, *, weight: float, store: Store = PLAIN) -> None:
    """``p <- p + weight*(z - p)`` in place (``p.lerp_(z, weight)``).

    With :func:`sf_eval_weight` this is train->eval (y to x), with
    :func:`sf_train_weight` eval->train (x to y).  ``p`` may be bf16 while
    ``z`` is fp32: the lerp is done in fp32 and rounded once (a bf16 ``z``
    is widened first; ``store``: a remainder keeps ``p`` exact, ``store.out``
    gets the rounded copy).
    """
    cdt = compute_dtype(z)
    p32 = store.load_y(p, cdt)
    p32.lerp_(upcast(z, cdt), weight)
    store.store_y(p, p32)
