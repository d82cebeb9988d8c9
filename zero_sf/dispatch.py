"""Functional entry points: one keyword-only signature per rule, dispatching
to the plain-torch spec (:mod:`zero_sf.spec`), the fused Triton kernels (CUDA)
or the fused CPU backend (:mod:`zero_sf.cpu`).

The optimizers (single-device and sharded) keep state and compute the host
scalars; they call these functions with lists of same-role tensors (a list of
one flat shard for ZeRO).  These functions know nothing of param groups.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import Tensor

from . import spec

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from typing_extensions import TypeGuard

__all__ = ["sf_adamw", "rmsprop", "sf_interpolate", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton", "cpu")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")


def _cpu_backend():
    from . import cpu  # lazy: builds or loads the C library on first use

    return cpu


def resolve_backend(backend: str, tensors: Sequence[Tensor]) -> str:
    """``"torch"``, ``"triton"`` or ``"cpu"`` for these tensors.

    ``auto``: Triton when every tensor is on CUDA and Triton imports; the
    fused CPU backend when every tensor is on the CPU and it builds (see
    :mod:`zero_sf.cpu`); else torch.  ``triton``: CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1.  ``cpu``: CPU tensors, with the backend built.
    """
    check_backend(backend)
    on_cuda = len(tensors) > 0 and all(t.is_cuda for t in tensors)
    on_cpu = len(tensors) > 0 and all(t.device.type == "cpu" for t in tensors)
    if backend == "auto":
        if on_cuda and triton_available():
            return "triton"
        return "cpu" if on_cpu and _cpu_backend().available() else "torch"
    if backend == "cpu":
        if not on_cpu:
            raise RuntimeError("backend='cpu' needs CPU tensors; use backend='auto'")
        if not _cpu_backend().available():
            raise RuntimeError(f"backend='cpu' is unavailable here "
                               f"({_cpu_backend().unavailable_reason()}); use backend='torch'")
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


def _all_contiguous(*tensors: Optional[Tensor]) -> bool:
    """The kernels address tensors as flat arrays: all must be contiguous."""
    return all(t is None or t.is_contiguous() for t in tensors)


def _split(backend: str, n: int, tensor_lists, n_state: int = 0) -> tuple[list[int], list[int]]:
    """Indices for the fused path and for the torch fallback (non-contiguous;
    for the CPU backend also dtypes it does not take, e.g. fp64).  The
    last ``n_state`` lists are optimizer state (fp32 for the CPU backend)."""
    if backend not in ("triton", "cpu"):
        return [], list(range(n))
    fused: list[int] = []
    plain: list[int] = []
    for i in range(n):
        ts = [tl[i] if tl is not None else None for tl in tensor_lists]
        if backend == "triton":
            ok = _all_contiguous(*ts)
        else:
            cut = len(ts) - n_state
            ok = _cpu_backend().eligible(*ts[:cut], state=ts[cut:])
        (fused if ok else plain).append(i)
    return fused, plain


# The torch path walks large contiguous tensors in chunks of 64K elements
# (256 KiB fp32): its temporaries then stay in cache and in the allocator's
# free lists.  Measured on this project's 2-core CPU machine, one SF-AdamW
# step on 16M elements: 66 ms whole, 28 ms in 64K chunks (1M chunks: 66 ms).
# Elementwise math, so the result is bit-identical to the unchunked spec.
_TORCH_CHUNK = 1 << 16


def _torch_chunks(*tensors: Optional[Tensor]):
    """Yield (offset of the first element, tuple of matching 1-D slices)
    (None stays None); the whole tensors when small or not all contiguous."""
    first = tensors[0]
    assert first is not None, "the first role (the parameters) is always given"
    n = first.numel()
    if n <= _TORCH_CHUNK or not _all_contiguous(*tensors):
        yield 0, tensors
        return
    flat = [t.view(-1) if t is not None else None for t in tensors]
    for s in range(0, n, _TORCH_CHUNK):
        yield s, tuple(t[s:s + _TORCH_CHUNK] if t is not None else None for t in flat)


def _check_compressed(ys, remainders, sr, index_bases) -> None:
    """The arguments of compressed state agree with each other."""
    if remainders is not None:
        for i, (y, r) in enumerate(zip(ys, remainders)):
            if r is not None and (y.dtype != torch.bfloat16 or r.dtype != torch.int16
                                  or r.shape != y.shape):
                raise ValueError(
                    f"remainder {i}: a {r.dtype} remainder of shape {tuple(r.shape)} for a "
                    f"{y.dtype} parameter of shape {tuple(y.shape)}; remainders are int16 "
                    "tensors shaped like their bfloat16 parameters")
    if sr is not None and index_bases is None:
        raise ValueError("stochastic rounding (sr=(seed, step)) needs index_bases")


def _base(index_bases, i: int) -> int:
    return index_bases[i] if index_bases is not None else 0


def _dtensor_cls():
    """The DTensor class, or None while its module is not loaded: importing
    torch.distributed.tensor costs 0.8 s, and a DTensor can only exist once
    it is."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):  # torch >= 2.5 / 2.4
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            return cls
    return None


def is_dtensor(t) -> TypeGuard[DTensor]:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _local(tensor_lists, index_bases=None):
    """FSDP2 / DTensor support: the update is elementwise, so each rank
    updates its local shards in place (``to_local()`` aliases the DTensor's
    storage) with the fused kernel, instead of ~10 DTensor-dispatched ops.
    Every role of index i must be laid out like role 0's tensor (same mesh
    and placements), or the local shards would not line up element for
    element.  Indices whose local shard is empty (uneven sharding: a (1, d)
    parameter at 2 ranks) are dropped from every list, ``index_bases`` (the
    stochastic rounding's counters, one per index) included, so that every
    later tensor keeps its own counter.  Returns (the lists of local
    tensors, the index bases kept)."""
    DTensor = _dtensor_cls()  # looked up once, not per tensor
    first = tensor_lists[0]
    if DTensor is None or not any(isinstance(t, DTensor) for t in first):
        return tensor_lists, index_bases

    def where(x):
        return (f"DTensor{tuple(x.placements)} on {x.device_mesh}"
                if isinstance(x, DTensor) else "a plain tensor")

    def local(x):
        return x.to_local() if isinstance(x, DTensor) else x

    keep = []
    for i, p in enumerate(first):
        for k, role in enumerate(tensor_lists):
            t = role[i] if role is not None else None
            if t is None:
                continue
            if isinstance(t, DTensor) != isinstance(p, DTensor) or (
                    isinstance(p, DTensor) and (t.device_mesh != p.device_mesh
                                                or t.placements != p.placements)):
                raise ValueError(
                    f"tensor {i} of argument {k} is {where(t)} but its parameter is "
                    f"{where(p)}; all tensors of one parameter must share a layout "
                    "(create optimizer state with torch.zeros_like(param))")
        if local(p).numel() > 0:
            keep.append(i)
    return ([None if role is None else
             [local(t) if t is not None else None for t in (role[i] for i in keep)]
             for role in tensor_lists], _pick(index_bases, keep))


def _at(xs, i):
    return xs[i] if xs is not None else None


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
    y_outs: Optional[Sequence[Optional[Tensor]]] = None,
    remainders: Optional[Sequence[Optional[Tensor]]] = None,
    sr: Optional[tuple[int, int]] = None,
    index_bases: Optional[Sequence[int]] = None,
    backend: str = "auto",
) -> None:
    """Schedule-Free AdamW step (:func:`zero_sf.spec.sf_adamw_update`) on lists.

    ``y_outs`` (optional, entries may be ``None``): tensors that receive ``y``
    rounded to their dtype, in the same pass (a ZeRO rank's slice of the
    model's bf16 parameters when ``ys`` are fp32 master shards).
    ``remainders`` (int16, entries may be ``None``): the low bits of bf16
    ``ys`` (exact fp32 y).  ``sr = (seed, step)``: bf16 state is rounded
    stochastically, element i of tensor j numbered ``index_bases[j] + i``."""
    _check_compressed(ys, remainders, sr, index_bases)
    (ys, grads, zs, vs, y_outs, remainders), index_bases = _local(
        [ys, grads, zs, vs, y_outs, remainders], index_bases)
    if not ys:  # e.g. every local shard of this rank is empty
        return
    backend = resolve_backend(backend, ys)
    fused, plain = _split(backend, len(ys), (ys, grads, y_outs, remainders, zs, vs), n_state=2)
    scalars = dict(lr=lr, ck=ck, y_coef=y_coef, beta2=beta2,
                   bias_correction2=bias_correction2, eps=eps,
                   weight_decay=weight_decay, grad_scale=grad_scale)
    if fused:
        impl = _cpu_backend() if backend == "cpu" else _kernels()
        impl.sf_adamw(_pick(ys, fused), _pick(grads, fused), _pick(zs, fused),
                      _pick(vs, fused), y_outs=_pick(y_outs, fused),
                      remainders=_pick(remainders, fused), sr=sr,
                      index_bases=_pick(index_bases, fused), **scalars)
    for i in plain:
        for off, (y, g, z, v, y_out, rem) in _torch_chunks(
                ys[i], grads[i], zs[i], vs[i], _at(y_outs, i), _at(remainders, i)):
            spec.sf_adamw_update(y, g, z, v, y_out=y_out, remainder=rem, sr=sr,
                                 index_base=_base(index_bases, i) + off, **scalars)


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
    param_outs: Optional[Sequence[Optional[Tensor]]] = None,
    remainders: Optional[Sequence[Optional[Tensor]]] = None,
    sr: Optional[tuple[int, int]] = None,
    index_bases: Optional[Sequence[int]] = None,
    backend: str = "auto",
) -> None:
    """RMSProp step (:func:`zero_sf.spec.rmsprop_update`) on lists;
    ``remainders``, ``sr``, ``index_bases`` as in :func:`sf_adamw`."""
    if momentum > 0.0 and momentum_buffers is None:
        raise ValueError("momentum > 0 needs momentum_buffers")
    if centered and grad_avgs is None:
        raise ValueError("centered=True needs grad_avgs")
    _check_compressed(params, remainders, sr, index_bases)
    (params, grads, square_avgs, momentum_buffers, grad_avgs, param_outs, remainders), \
        index_bases = _local([params, grads, square_avgs, momentum_buffers, grad_avgs,
                              param_outs, remainders], index_bases)
    if not params:
        return
    backend = resolve_backend(backend, params)
    fused, plain = _split(backend, len(params),
                          (params, grads, param_outs, remainders, square_avgs, momentum_buffers,
                           grad_avgs), n_state=3)
    scalars: dict[str, Any] = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                   momentum=momentum, centered=centered,
                   bias_correction2=bias_correction2, eps_in_sqrt=eps_in_sqrt,
                   maximize=maximize, grad_scale=grad_scale)
    if fused:
        impl = _cpu_backend() if backend == "cpu" else _kernels()
        impl.rmsprop(_pick(params, fused), _pick(grads, fused), _pick(square_avgs, fused),
                     momentum_buffers=_pick(momentum_buffers, fused),
                     grad_avgs=_pick(grad_avgs, fused), param_outs=_pick(param_outs, fused),
                     remainders=_pick(remainders, fused), sr=sr,
                     index_bases=_pick(index_bases, fused), **scalars)
    for i in plain:
        for off, (p, g, v, buf, gavg, out, rem) in _torch_chunks(
                params[i], grads[i], square_avgs[i], _at(momentum_buffers, i),
                _at(grad_avgs, i), _at(param_outs, i), _at(remainders, i)):
            spec.rmsprop_update(p, g, v, momentum_buffer=buf, grad_avg=gavg, param_out=out,
                                remainder=rem, sr=sr, index_base=_base(index_bases, i) + off,
                                **scalars)


def sf_interpolate(
    ps: Sequence[Tensor],
    zs: Sequence[Tensor],
    *,
    weight: float,
    p_outs: Optional[Sequence[Optional[Tensor]]] = None,
    remainders: Optional[Sequence[Optional[Tensor]]] = None,
    backend: str = "auto",
) -> None:
    """``p.lerp_(z, weight)`` on lists: the y<->x switch of train()/eval()
    (``remainders``: int16 low bits of bf16 ``ps``, kept exact)."""
    _check_compressed(ps, remainders, None, None)
    (ps, zs, p_outs, remainders), _ = _local([ps, zs, p_outs, remainders])
    if not ps:
        return
    backend = resolve_backend(backend, ps)
    fused, plain = _split(backend, len(ps), (ps, p_outs, remainders, zs), n_state=1)
    if fused:
        impl = _cpu_backend() if backend == "cpu" else _kernels()
        impl.sf_interpolate(_pick(ps, fused), _pick(zs, fused), weight=weight,
                            p_outs=_pick(p_outs, fused), remainders=_pick(remainders, fused))
    for i in plain:
        for _, (p, z, out, rem) in _torch_chunks(ps[i], zs[i], _at(p_outs, i), _at(remainders, i)):
            spec.sf_interpolate(p, z, weight=weight, p_out=out, remainder=rem)
