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

from torch import Tensor

from . import spec
from .storage import Stores

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from typing_extensions import TypeGuard

__all__ = ["sf_adamw", "rmsprop", "sf_interpolate", "resolve_backend", "BACKENDS", "Stores"]

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


def _torch_chunks(tensors: tuple[Optional[Tensor], ...], store):
    """Yield (tuple of matching 1-D slices, the store of those elements)
    (None stays None); the whole tensors when small or not all contiguous."""
    first = tensors[0]
    assert first is not None, "the first role (the parameters) is always given"
    n = first.numel()
    if n <= _TORCH_CHUNK or not _all_contiguous(*tensors, *store.tensors()):
        yield tensors, store
        return
    flat = [t.view(-1) if t is not None else None for t in tensors]
    for s in range(0, n, _TORCH_CHUNK):
        m = min(_TORCH_CHUNK, n - s)
        yield tuple(t[s:s + m] if t is not None else None for t in flat), store.narrow(s, m)


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


def _local(tensor_lists, store: Stores):
    """FSDP2 / DTensor support: the update is elementwise, so each rank
    updates its local shards in place (``to_local()`` aliases the DTensor's
    storage) with the fused kernel, instead of ~10 DTensor-dispatched ops.
    Every role of index i must be laid out like role 0's tensor (same mesh
    and placements), or the local shards would not line up element for
    element.  Indices whose local shard is empty (uneven sharding: a (1, d)
    parameter at 2 ranks) are dropped from every list and from ``store``
    (its index bases are the stochastic rounding's counters, one per index),
    so that every later tensor keeps its own counter.  Returns (the lists of
    local tensors, the store of those).  The store's outputs and remainders
    are laid out like their parameters too."""
    DTensor = _dtensor_cls()  # looked up once, not per tensor
    first = tensor_lists[0]
    if DTensor is None or not any(isinstance(t, DTensor) for t in first):
        return tensor_lists, store
    n_roles = len(tensor_lists)
    tensor_lists = list(tensor_lists) + [store.outs, store.remainders]

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
    lists = [None if role is None else
             [local(t) if t is not None else None for t in (role[i] for i in keep)]
             for role in tensor_lists]
    return lists[:n_roles], Stores(lists[n_roles], lists[n_roles + 1], store.sr,
                                   _pick(store.index_bases, keep))


def _pick(xs, index):
    return None if xs is None else [xs[i] for i in index]


def _fused_impl(backend: str):
    return _cpu_backend() if backend == "cpu" else _kernels()


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
    store: Optional[Stores] = None,
    backend: str = "auto",
    **storage_keywords: Any,
) -> None:
    """Schedule-Free AdamW step (:func:`zero_sf.spec.sf_adamw_update`) on lists.

    ``store`` (:class:`zero_sf.storage.Stores`): where the results go besides
    ``ys``/``zs``/``vs``: ``outs`` receive ``y`` rounded to their dtype in the
    same pass (a ZeRO rank's slice of the model's bf16 parameters when ``ys``
    are fp32 master shards); ``remainders`` (int16) complete bf16 ``ys`` to
    the exact fp32 y; ``sr = (seed, step)`` rounds bf16 state stochastically,
    element i of tensor j numbered ``index_bases[j] + i``.  The keywords of
    earlier releases (``y_outs``, ``remainders``, ``sr``, ``index_bases``)
    are still accepted."""
    store = Stores.from_keywords("sf_adamw", "y_outs", store, storage_keywords)
    store.check(ys)
    (ys, grads, zs, vs), store = _local([ys, grads, zs, vs], store)
    if not ys:  # e.g. every local shard of this rank is empty
        return
    backend = resolve_backend(backend, ys)
    fused, plain = _split(backend, len(ys), (ys, grads, store.outs, store.remainders, zs, vs),
                          n_state=2)
    scalars = dict(lr=lr, ck=ck, y_coef=y_coef, beta2=beta2,
                   bias_correction2=bias_correction2, eps=eps,
                   weight_decay=weight_decay, grad_scale=grad_scale)
    if fused:
        _fused_impl(backend).sf_adamw(_pick(ys, fused), _pick(grads, fused), _pick(zs, fused),
                                      _pick(vs, fused), store=store.pick(fused), **scalars)
    for i in plain:
        for (y, g, z, v), st in _torch_chunks((ys[i], grads[i], zs[i], vs[i]), store.at(i)):
            spec.sf_adamw_update(y, g, z, v, store=st, **scalars)


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
    store: Optional[Stores] = None,
    backend: str = "auto",
    **storage_keywords: Any,
) -> None:
    """RMSProp step (:func:`zero_sf.spec.rmsprop_update`) on lists; ``store``
    as in :func:`sf_adamw` (the keywords of earlier releases: ``param_outs``,
    ``remainders``, ``sr``, ``index_bases``)."""
    store = Stores.from_keywords("rmsprop", "param_outs", store, storage_keywords)
    if momentum > 0.0 and momentum_buffers is None:
        raise ValueError("momentum > 0 needs momentum_buffers")
    if centered and grad_avgs is None:
        raise ValueError("centered=True needs grad_avgs")
    store.check(params)
    (params, grads, square_avgs, momentum_buffers, grad_avgs), store = _local(
        [params, grads, square_avgs, momentum_buffers, grad_avgs], store)
    if not params:
        return
    backend = resolve_backend(backend, params)
    fused, plain = _split(backend, len(params),
                          (params, grads, store.outs, store.remainders, square_avgs,
                           momentum_buffers, grad_avgs), n_state=3)
    scalars: dict[str, Any] = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                   momentum=momentum, centered=centered,
                                   bias_correction2=bias_correction2, eps_in_sqrt=eps_in_sqrt,
                                   maximize=maximize, grad_scale=grad_scale)
    if fused:
        _fused_impl(backend).rmsprop(
            _pick(params, fused), _pick(grads, fused), _pick(square_avgs, fused),
            momentum_buffers=_pick(momentum_buffers, fused), grad_avgs=_pick(grad_avgs, fused),
            store=store.pick(fused), **scalars)
    for i in plain:
        for (p, g, v, buf, gavg), st in _torch_chunks(
                (params[i], grads[i], square_avgs[i], _at(momentum_buffers, i),
                 _at(grad_avgs, i)), store.at(i)):
            spec.rmsprop_update(p, g, v, momentum_buffer=buf, grad_avg=gavg, store=st,
                                **scalars)


def sf_interpolate(
    ps: Sequence[Tensor],
    zs: Sequence[Tensor],
    *,
    weight: float,
    store: Optional[Stores] = None,
    backend: str = "auto",
    **storage_keywords: Any,
) -> None:
    """``p.lerp_(z, weight)`` on lists: the y<->x switch of train()/eval()
    (``store``: ``outs`` get the rounded copies, ``remainders`` keep bf16
    ``ps`` exact; the keywords of earlier releases: ``p_outs``, ``remainders``)."""
    store = Stores.from_keywords("sf_interpolate", "p_outs", store, storage_keywords)
    if store.sr is not None:
        raise ValueError("sf_interpolate stores no state: sr=(seed, step) does not apply")
    store.check(ps)
    (ps, zs), store = _local([ps, zs], store)
    if not ps:
        return
    backend = resolve_backend(backend, ps)
    fused, plain = _split(backend, len(ps), (ps, store.outs, store.remainders, zs), n_state=1)
    if fused:
        _fused_impl(backend).sf_interpolate(_pick(ps, fused), _pick(zs, fused), weight=weight,
                                            store=store.pick(fused))
    for i in plain:
        for (p, z), st in _torch_chunks((ps[i], zs[i]), store.at(i)):
            spec.sf_interpolate(p, z, weight=weight, store=st)


def _at(xs, i):
    return xs[i] if xs is not None else None
