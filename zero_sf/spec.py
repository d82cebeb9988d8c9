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

from typing import NamedTuple, Optional

import torch
from torch import Tensor

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
    "mix32",
    "sr_key",
    "sr_keys",
    "random_bits",
    "round_stochastic",
    "store_state",
    "split_master",
    "join_master",
    "lane_bits",
    "LANE_Z",
    "LANE_V",
    "LANE_SQUARE_AVG",
    "LANE_BUF",
    "LANE_GAVG",
]


def _upcast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; no copy when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(state: Tensor) -> torch.dtype:
    """The dtype the update is computed in: fp32 for bf16/fp16 state (a
    compressed ``z``/``exp_avg_sq`` is widened, updated and rounded once),
    else the state's own dtype (fp32, fp64)."""
    return torch.float32 if state.dtype in (torch.bfloat16, torch.float16) else state.dtype


# --------------------------------------------------------------------------
# Compressed state: stochastic rounding and 16-bit master remainders
# --------------------------------------------------------------------------
#
# Stochastic rounding (SR) of a fp32 value to bf16 adds 16 random bits to the
# 16 bits bf16 drops, then truncates: it rounds up with probability equal to
# the dropped fraction, so E[round(x)] = x.  A bf16 ``exp_avg_sq`` rounded to
# nearest loses every increment below 2**-9 of its value (beta2 = 0.999 adds
# 1e-3 of g^2 per step); rounded stochastically it keeps them on average.
#
# The random bits are a counter-based hash, not a generator: element i of a
# parameter whose first element has global index ``base`` (its position in
# the optimizer's parameters, the order of ZeroOptimizer's flat buffers) gets
# the 32-bit word ``random_bits(base + i, sr_key(seed, step, stream))``, and
# each state tensor takes 16 of those bits: its *lane* l uses stream l // 2,
# bits 16 * (l % 2) and up.  So z and v share one hash per element (the two
# halves of a well-mixed word), and the bits depend on (seed, step, state
# tensor, element) only: the same at every world size, bucket size and
# backend, and reproducible after a resume.

_M32 = 0xFFFFFFFF
LANE_Z, LANE_V = 0, 1  # Schedule-Free AdamW
LANE_SQUARE_AVG, LANE_BUF, LANE_GAVG = 0, 1, 2  # RMSProp


def mix32(x: int) -> int:
    """A 32-bit integer hash (Wellons' "lowbias32": full avalanche, 2
    multiplies), on a Python int; :func:`random_bits` is the same on tensors."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_t(x: Tensor) -> Tensor:
    # int64 arithmetic on values < 2**32: the products wrap, their low 32
    # bits (all that is kept) are exact.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sr_key(seed: int, step: int, stream: int) -> int:
    """The 32-bit key of one random stream in one step (host)."""
    return mix32(mix32(mix32(seed) ^ (step & _M32)) ^ (step >> 32) ^ (stream + 1))


def sr_keys(sr: tuple[int, int]) -> tuple[int, int]:
    """The keys of random streams 0 and 1 in step ``sr = (seed, step)``: what
    the fused backends take (a lane l uses stream l // 2)."""
    return sr_key(sr[0], sr[1], 0), sr_key(sr[0], sr[1], 1)


def random_bits(numel: int, index_base: int, key: int, device=None) -> Tensor:
    """32 random bits (int64 in [0, 2**32)) for elements ``index_base + i``:
    ``mix32(mix32(lo32(idx) ^ key) ^ hi32(idx))``."""
    idx = torch.arange(index_base, index_base + numel, dtype=torch.int64, device=device)
    return _mix32_t(_mix32_t((idx & _M32) ^ key) ^ (idx >> 32))


def lane_bits(numel: int, index_base: int, sr: tuple[int, int], lane: int,
              device=None) -> Tensor:
    """The 16 random bits (int64 in [0, 2**16)) of state lane ``lane`` for
    elements ``index_base + i`` in step ``sr = (seed, step)``."""
    word = random_bits(numel, index_base, sr_key(sr[0], sr[1], lane // 2), device)
    return (word >> (16 * (lane % 2))) & 0xFFFF


def _as_int32(bits: Tensor) -> Tensor:
    """int64 values in [0, 2**32) as the int32 with the same 32 bits."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)


def round_stochastic(x: Tensor, bits: Tensor) -> Tensor:
    """fp32 ``x`` to bf16, rounding up (in magnitude) with probability equal
    to the fraction the 16 dropped bits make of one bf16 ulp: the low 16 of
    ``bits`` are added to the dropped bits before truncation.  NaN stays NaN;
    a value within one ulp of the largest bf16 may round to inf, as it can
    round to nearest."""
    b = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    b = (b + (bits & 0xFFFF)) & 0xFFFF0000
    out = _as_int32(b).view(torch.float32).view(x.shape).to(torch.bfloat16)  # exact: low bits 0
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), out)


def store_state(dst: Tensor, x: Tensor, *, sr: Optional[tuple[int, int]] = None,
                lane: int = 0, index_base: int = 0) -> None:
    """Write the updated state ``x`` (compute dtype) into ``dst``: nothing to
    do when they are the same tensor; a bf16 ``dst`` with ``sr = (seed,
    step)`` gets stochastic rounding with its lane's bits, anything else
    round-to-nearest-even (``copy_``)."""
    if x is dst:
        return
    if sr is not None and dst.dtype == torch.bfloat16:
        dst.copy_(round_stochastic(x, lane_bits(x.numel(), index_base, sr, lane, x.device)
                                   .view(x.shape)))
    else:
        dst.copy_(x)


def split_master(y: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 ``y`` as (bf16 parameter, int16 remainder), exactly.

    The parameter is the top 16 bits of y, plus one in its last place when
    the remainder (the low 16 bits) is >= 0x8000: y rounded to nearest,
    ties away from zero (torch rounds ties to even; the two differ only
    when the low 16 bits are exactly 0x8000).  The remainder is the low 16
    bits as an int16, so it is negative exactly when the parameter was
    rounded up (TransformerEngine's ``store_param_remainders`` encoding)."""
    b = y.contiguous().view(torch.int32).to(torch.int64) & _M32
    lo = b & 0xFFFF
    hi = ((b >> 16) + (lo >= 0x8000).to(torch.int64)) & 0xFFFF
    def as16(t):
        return torch.where(t >= 1 << 15, t - (1 << 16), t).to(torch.int16).view(y.shape)

    return as16(hi).view(torch.bfloat16), as16(lo)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The exact fp32 y of a bf16 ``param`` and its int16 ``remainder``
    (the inverse of :func:`split_master` for every bit pattern)."""
    lo = remainder.to(torch.int64) & 0xFFFF
    hi = (param.contiguous().view(torch.int16).to(torch.int64)
          - (lo >= 0x8000).to(torch.int64)) & 0xFFFF
    return _as_int32((hi << 16) | lo).view(torch.float32).view(param.shape)


def _load_y(y: Tensor, remainder: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """y in the compute dtype: joined with its remainder (exact), or upcast."""
    if remainder is not None:
        return join_master(y, remainder)
    return _upcast(y, dtype)


def _store_y(y: Tensor, y32: Tensor, remainder: Optional[Tensor],
             y_out: Optional[Tensor]) -> None:
    if remainder is not None:
        hi, lo = split_master(y32)
        y.copy_(hi)
        remainder.copy_(lo)
        if y_out is not None:
            y_out.copy_(hi)
        return
    if y32 is not y:
        y.copy_(y32)
    if y_out is not None:
        y_out.copy_(y32)


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
    momentum_buffer: Optional[Tensor] = None,
    grad_avg: Optional[Tensor] = None,
    grad_scale: float = 1.0,
    param_out: Optional[Tensor] = None,
    remainder: Optional[Tensor] = None,
    sr: Optional[tuple[int, int]] = None,
    index_base: int = 0,
) -> None:
    """One RMSProp step on one tensor, in place.

    Follows ``torch.optim.RMSprop`` (coupled L2 weight decay ``g += wd*p``
    before the second moment, optional momentum and centering); with
    ``bias_correction2 = 1 - alpha**t`` and no momentum/centering it is
    ``torch.optim.Adam(betas=(0, alpha))``.

    ``param`` may be a fp32 master copy of a low-precision parameter; then
    ``param_out`` receives its rounded copy.  ``grad_scale`` multiplies the
    gradient first (averaging over ranks or loss-scale unscaling).
    ``remainder`` (int16, bf16 ``param``): the low bits of the fp32 value,
    see :func:`split_master`.  bf16 state is rounded stochastically with
    ``sr = (seed, step)`` (elements numbered from ``index_base``), to
    nearest without.
    """
    cdt = compute_dtype(square_avg)
    g = _upcast(grad, cdt)
    if grad_scale != 1.0:
        g = g * grad_scale
    if maximize:
        g = -g
    p = _load_y(param, remainder, cdt)
    if weight_decay != 0.0:
        g = g.add(p, alpha=weight_decay)

    v = _upcast(square_avg, cdt)
    v.mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
    if centered:
        assert grad_avg is not None, "centered RMSProp needs grad_avg"
        gavg = _upcast(grad_avg, cdt)
        gavg.lerp_(g, 1.0 - alpha)
        # Centred second moment: E[g^2] - E[g]^2, both bias-corrected alike.
        avg = v.addcmul(gavg, gavg, value=-1.0)
        store_state(grad_avg, gavg, sr=sr, lane=LANE_GAVG, index_base=index_base)
    else:
        avg = v.clone() if bias_correction2 == 1.0 else v
    if bias_correction2 != 1.0:
        avg = avg.div(bias_correction2)
    if eps_in_sqrt:
        avg.add_(eps).sqrt_()
    else:
        avg.sqrt_().add_(eps)
    store_state(square_avg, v, sr=sr, lane=LANE_SQUARE_AVG, index_base=index_base)

    if momentum > 0.0:
        assert momentum_buffer is not None, "momentum needs momentum_buffer"
        buf = _upcast(momentum_buffer, cdt)
        buf.mul_(momentum).addcdiv_(g, avg)
        p.add_(buf, alpha=-lr)
        store_state(momentum_buffer, buf, sr=sr, lane=LANE_BUF, index_base=index_base)
    else:
        p.addcdiv_(g, avg, value=-lr)

    _store_y(param, p, remainder, param_out)


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
    y_out: Optional[Tensor] = None,
    remainder: Optional[Tensor] = None,
    sr: Optional[tuple[int, int]] = None,
    index_base: int = 0,
) -> None:
    """One Schedule-Free AdamW step on one tensor, in place.

    ``y`` is the point the gradient was evaluated at (the parameter in train
    mode, or its fp32 master copy); ``z`` and ``v`` are the only state.
    ``y_out``, when given, receives ``y`` rounded to its dtype (the model's
    bf16/fp16 parameter when ``y`` is a fp32 master).  The gradient is not
    modified (schedulefree normalizes ``p.grad`` in place; we don't).
    ``remainder``: int16 low bits of a bf16 ``y`` (:func:`split_master`),
    so the update runs on the exact fp32 y.  bf16 ``z``/``v`` are computed
    in fp32 and rounded once, stochastically with ``sr = (seed, step)``
    (elements numbered from ``index_base``), else to nearest.
    """
    cdt = compute_dtype(v)
    g = _upcast(grad, cdt)
    if grad_scale != 1.0:
        g = g * grad_scale
    # u = g / (sqrt(v / bc2) + eps): the RMS core, Adam-style.
    v32, z32 = _upcast(v, cdt), _upcast(z, cdt)
    u = rms_normalize(g, v32, beta2=beta2, eps=eps, bias_correction2=bias_correction2)
    y32 = _load_y(y, remainder, cdt)
    if weight_decay != 0.0:
        u.add_(y32, alpha=weight_decay)  # decay evaluated at y, as the reference
    # y_{k+1} = (1-ck) y_k + ck z_k + lr (beta1 (1-ck) - 1) u:
    # x and y advanced together without ever storing x.
    y32.lerp_(z32, ck)
    y32.add_(u, alpha=y_coef)
    z32.sub_(u, alpha=lr)
    store_state(v, v32, sr=sr, lane=LANE_V, index_base=index_base)
    store_state(z, z32, sr=sr, lane=LANE_Z, index_base=index_base)
    _store_y(y, y32, remainder, y_out)


def sf_eval_weight(beta1: float) -> float:
    """Weight of ``z`` that turns ``y`` into ``x``: x = y + (1-1/b1)(z-y)."""
    return 1.0 - 1.0 / beta1


def sf_train_weight(beta1: float) -> float:
    """Weight of ``z`` that turns ``x`` into ``y``: y = x + (1-b1)(z-x)."""
    return 1.0 - beta1


def sf_interpolate(
    p: Tensor, z: Tensor, *, weight: float, p_out: Optional[Tensor] = None,
    remainder: Optional[Tensor] = None,
) -> None:
    """``p <- p + weight*(z - p)`` in place (``p.lerp_(z, weight)``).

    With :func:`sf_eval_weight` this is train->eval (y to x), with
    :func:`sf_train_weight` eval->train (x to y).  ``p`` may be bf16 while
    ``z`` is fp32: the lerp is done in fp32 and rounded once (a bf16 ``z``
    is widened first; ``remainder``: ``p``'s exact fp32 value, kept exact).
    """
    cdt = compute_dtype(z)
    p32 = _load_y(p, remainder, cdt)
    p32.lerp_(_upcast(z, cdt), weight)
    _store_y(p, p32, remainder, p_out)
