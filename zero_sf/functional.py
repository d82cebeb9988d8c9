"""Functional entry points: one keyword-only signature per rule, dispatching
to the plain-torch spec (:mod:`zero_sf.spec`) or the fused Triton kernels.

The optimizers (single-device and sharded) keep state and compute the host
scalars; they call these functions with lists of same-role tensors (a list of
one flat shard for ZeRO).  These functions know nothing of param groups.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import spec

__all__ = ["sf_adamw", "rmsprop", "sf_interpolate", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")


def resolve_backend(backend: str, tensors: Sequence[Tensor]) -> str:
    """``"torch"`` or ``"triton"`` for these tensors.

    ``auto``: Triton when every tensor is on CUDA and Triton imports, else
    torch.  ``triton``: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    check_backend(backend)
    on_cuda = len(tensors) > 0 and all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if not (on_cuda or _interpret()):
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                "the first import of zero_sf.kernels to run the kernels on CPU tensors; "
                "use backend='torch' or 'auto' for CPU training")
    return backend


def _kernels():
    from . import kernels  # lazy: Triton is imported only when asked for

    return kernels


def _triton_ok(*tensors: Optional[Tensor]) -> bool:
    """The kernels address tensors as flat arrays: all must be contiguous."""
    return all(t is None or t.is_contiguous() for t in tensors)


def _split(backend: str, n: int, tensor_lists) -> tuple[list[int], list[int]]:
    """Indices for the kernels and for the torch fallback (non-contiguous)."""
    if backend != "triton":
        return [], list(range(n))
    fused, plain = [], []
    for i in range(n):
        ok = _triton_ok(*(tl[i] if tl is not None else None for tl in tensor_lists))
        (fused if ok else plain).append(i)
    return fused, plain


def _pick(xs, index):
    return None if xs is None else [xs[i] for i in index]


def sf_adamw(
    ys: Sequence[Tensor],
    grads: Sequence[Tensor],
    zs: Sequence[Tensor],
    vs: Sequence[Tensor],
    *,
    lr: float,
    ck: float,
    y_coef: float,
    beta2: float,
    bias_correction2: float,
    eps: float,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    y_outs: Optional[Sequence[Tensor]] = None,
    backend: str = "auto",
) -> None:
    """Schedule-Free AdamW step (:func:`zero_sf.spec.sf_adamw_update`) on lists.

    ``y_outs`` (optional, entries may be ``None``): tensors that receive ``y``
    rounded to their dtype, in the same pass (a ZeRO rank's slice of the
    model's bf16 parameters when ``ys`` are fp32 master shards)."""
    backend = resolve_backend(backend, ys)
    fused, plain = _split(backend, len(ys), (ys, grads, zs, vs, y_outs))
    scalars = dict(lr=lr, ck=ck, y_coef=y_coef, beta2=beta2,
                   bias_correction2=bias_correction2, eps=eps,
                   weight_decay=weight_decay, grad_scale=grad_scale)
    if fused:
        _kernels().sf_adamw(_pick(ys, fused), _pick(grads, fused), _pick(zs, fused),
                            _pick(vs, fused), y_outs=_pick(y_outs, fused), **scalars)
    for i in plain:
        spec.sf_adamw_update(ys[i], grads[i], zs[i], vs[i],
                             y_out=y_outs[i] if y_outs is not None else None, **scalars)


def rmsprop(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
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
    momentum_buffers: Optional[Sequence[Tensor]] = None,
    grad_avgs: Optional[Sequence[Tensor]] = None,
    grad_scale: float = 1.0,
    param_outs: Optional[Sequence[Tensor]] = None,
    backend: str = "auto",
) -> None:
    """RMSProp step (:func:`zero_sf.spec.rmsprop_update`) on lists."""
    backend = resolve_backend(backend, params)
    if momentum > 0.0 and momentum_buffers is None:
        raise ValueError("momentum > 0 needs momentum_buffers")
    if centered and grad_avgs is None:
        raise ValueError("centered=True needs grad_avgs")
    fused, plain = _split(backend, len(params),
                          (params, grads, square_avgs, momentum_buffers, grad_avgs, param_outs))
    scalars = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                   momentum=momentum, centered=centered,
                   bias_correction2=bias_correction2, eps_in_sqrt=eps_in_sqrt,
                   maximize=maximize, grad_scale=grad_scale)
    if fused:
        _kernels().rmsprop(_pick(params, fused), _pick(grads, fused),
                           _pick(square_avgs, fused),
                           momentum_buffers=_pick(momentum_buffers, fused),
                           grad_avgs=_pick(grad_avgs, fused),
                           param_outs=_pick(param_outs, fused), **scalars)
    for i in plain:
        spec.rmsprop_update(
            params[i], grads[i], square_avgs[i],
            momentum_buffer=momentum_buffers[i] if momentum_buffers is not None else None,
            grad_avg=grad_avgs[i] if grad_avgs is not None else None,
            param_out=param_outs[i] if param_outs is not None else None, **scalars)


def sf_interpolate(
    ps: Sequence[Tensor],
    zs: Sequence[Tensor],
    *,
    weight: float,
    p_outs: Optional[Sequence[Tensor]] = None,
    backend: str = "auto",
) -> None:
    """``p.lerp_(z, weight)`` on lists: the y<->x switch of train()/eval()."""
    backend = resolve_backend(backend, ps)
    fused, plain = _split(backend, len(ps), (ps, zs, p_outs))
    if fused:
        _kernels().sf_interpolate(_pick(ps, fused), _pick(zs, fused), weight=weight,
                                  p_outs=_pick(p_outs, fused))
    for i in plain:
        spec.sf_interpolate(ps[i], zs[i], weight=weight,
                            p_out=p_outs[i] if p_outs is not None else None)
