"""Host side of the kernels: bucket tensors, build chunk tables, launch.

Nothing here reads a device value back: the scalars arrive as Python floats,
the tables are built from host-known pointers and sizes.

Launch policy (issue #3): a tensor of at least ``_OWN_LAUNCH_NUMEL`` elements
(or a lone tensor, such as a ZeRO shard) gets one flat launch; smaller ones
sharing device and dtypes go into one multi-tensor kernel over a chunk table
(two launches: whole aligned chunks unmasked and vectorized, then the tails),
so a model of hundreds of small biases and norms costs a handful of launches,
not one per parameter.  The user's parameters are not moved or flattened.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import triton
from torch import Tensor

from ..storage import Stores
from . import triton_kernels as K

# 1024 elements x 4 warps: 8 elements a thread, two 16-byte fp32 vectors.
BLOCK = 1024
NUM_WARPS = 4
# No mul+add contraction into FMA (Triton 3.9 contracts by default, 3.10
# will not): every operation rounds once, as under TRITON_INTERPRET=1, so a
# GPU run gives the same bits as the interpreter runs that CI tests against
# the spec.  Cost: ~40 extra FP32 instructions per 8 elements in a kernel
# bound by its 28 B/element of memory traffic.  Checked on the PTX by
# tests/kernels/test_compile.py (no fma.* instruction).
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
# 64 blocks (256 KiB of fp32) is enough work that a second launch costs
# under ~5% of the tensor's own time on an H100; smaller tensors are batched.
_OWN_LAUNCH_NUMEL = 64 * BLOCK

_TABLE_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 64

Roles = Sequence[Optional[Sequence[Tensor]]]


def _role(roles: Roles, k: int) -> Sequence[Tensor]:
    """A role every launch has (the parameters, role 0; the state)."""
    r = roles[k]
    assert r is not None, f"role {k} is required"
    return r


def _chunk_table(roles: Roles, index: list[int], device: torch.device):
    """Pointer tables (one int64 tensor per role) and the chunk map.

    Cached on (pointers, sizes): equal keys give equal tables, so reuse of
    freed memory cannot make a stale entry wrong.
    """
    first = _role(roles, 0)
    key = (device, tuple(
        tuple(r[i].data_ptr() for i in index) if r is not None else None for r in roles
    ), tuple(first[i].numel() for i in index))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    numels = [first[i].numel() for i in index]
    # Full chunks (whole BLOCKs of a tensor whose pointers, in every role,
    # are 16-byte aligned) go to the unmasked, vectorized launch; the rest
    # (ragged tails, every chunk of an unaligned tensor) to the masked one.
    aligned = [all(p[t] % 16 == 0 for p in key[1] if p is not None) for t in range(len(index))]
    chunks: dict[bool, tuple[list[int], list[int]]] = {True: ([], []), False: ([], [])}
    for t, n in enumerate(numels):
        for start in range(0, n, BLOCK):
            full = aligned[t] and start + BLOCK <= n
            chunks[full][0].append(t)
            chunks[full][1].append(start)
    def as_dev(xs):
        return torch.tensor(xs, dtype=torch.int64).to(device, non_blocking=True)
    tables = [as_dev(p) if p is not None else None for p in key[1]]
    out = (tables, {full: (as_dev(ts), as_dev(starts)) for full, (ts, starts) in chunks.items()
                    if ts}, as_dev(numels))
    _TABLE_CACHE[key] = out
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return out


def _buckets(roles: Roles):
    """Group tensor indices by (device, dtype of every role)."""
    buckets: dict[tuple, list[int]] = {}
    for i, primary in enumerate(_role(roles, 0)):
        key = (primary.device,) + tuple(r[i].dtype if r is not None else None for r in roles)
        buckets.setdefault(key, []).append(i)
    return buckets.values()


def _i32(x: int) -> int:
    """The low 32 bits of x as a signed int (an i32 kernel argument)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _counters(base: int, keys: Sequence[int]) -> dict:
    """The flat kernels' counter arguments: the element index base as two
    i32 halves, and the keys of random streams 0 and 1 (0 where unused)."""
    keys = list(keys) + [0] * (2 - len(keys))
    return dict(base_lo=_i32(base), base_hi=_i32(base >> 32),
                key_a=_i32(keys[0]), key_b=_i32(keys[1]))


def _launch(flat_kernel, multi_kernel, roles: Roles, *, multi_roles: int, compressed: dict,
            **kwargs) -> None:
    """Run a kernel over every tensor index of ``roles`` (role 0 is always
    present; ``None`` roles are absent and replaced by role 0's pointer).
    The multi-tensor kernel takes the first ``multi_roles`` roles; the flat
    kernel all of them (the remainders come last).

    ``compressed``: ``HAS_REM``/``SR`` and, for SR, ``bases`` (each tensor's
    first global element index) and ``keys``.  A compressed step launches the
    flat kernel once per tensor (its counter base is a per-launch argument):
    one launch per ZeRO bucket chunk; a single-device optimizer's small
    parameters are not batched in that mode."""
    own_only = compressed["HAS_REM"] or compressed["SR"]
    bases = compressed.get("bases")
    flat_consts = dict(HAS_REM=compressed["HAS_REM"], SR=compressed["SR"])
    first = _role(roles, 0)
    for index in _buckets(roles):
        own = [i for i in index if own_only or first[i].numel() >= _OWN_LAUNCH_NUMEL]
        own_set = set(own)
        batched = [i for i in index if i not in own_set]
        if len(batched) == 1:
            own, batched = own + batched, []
        for i in own:
            n = first[i].numel()
            if n == 0:
                continue
            ptrs = [(r[i] if r is not None else first[i]) for r in roles]
            counters = _counters(bases[i] if bases is not None else 0, compressed.get("keys", ()))
            flat_kernel[(triton.cdiv(n, BLOCK),)](
                *ptrs, n, **kwargs, **counters, **flat_consts, BLOCK=BLOCK, **LAUNCH_OPTIONS)
        if batched:
            mroles = roles[:multi_roles]
            device = first[batched[0]].device
            tables, chunks, numels = _chunk_table(mroles, batched, device)
            tables = [t if t is not None else tables[0] for t in tables]
            likes = [(r[batched[0]] if r is not None else first[batched[0]]) for r in mroles]
            for full, (chunk_tensor, chunk_start) in chunks.items():
                multi_kernel[(chunk_tensor.numel(),)](
                    *tables, *likes, chunk_tensor, chunk_start, numels,
                    **kwargs, FULL=full, BLOCK=BLOCK, **LAUNCH_OPTIONS)


def _compressed(remainders, sr, index_bases, state_dtype) -> dict:
    from ..storage import sr_keys

    has_rem = remainders is not None
    on = sr is not None and state_dtype == torch.bfloat16
    out = dict(HAS_REM=has_rem, SR=on)
    if on:  # the keys of random streams 0 and 1 (storage.lane_bits)
        out.update(bases=list(index_bases), keys=list(sr_keys(sr)))
    return out


def _floats(**scalars) -> dict:
    """Every runtime scalar as a Python float, so it is an fp32 kernel
    argument: an int (the default ``weight_decay=0``, ``lr=1``) would
    otherwise be specialized by Triton as i32 or, when 1, as a constant,
    compiling another kernel variant for the same math."""
    return {k: float(v) for k, v in scalars.items()}


def _partition(roles: Roles, out_role: int, state_role: int, rem_role: int):
    """Split the tensor indices on what is a per-launch constant: whether
    tensor i has an output copy, its state dtype (SR applies to bf16 state
    only) and whether it has a remainder.  Yields (roles restricted to those
    indices, the indices, has_output, state dtype); absent roles are None."""
    n = len(_role(roles, 0))
    state = _role(roles, state_role)

    def at(r, i):
        return r[i] if r is not None else None

    keys: dict = {}
    for i in range(n):
        k = (at(roles[out_role], i) is not None, state[i].dtype,
             at(roles[rem_role], i) is not None)
        keys.setdefault(k, []).append(i)
    for (has_out, sdt, has_rem), index in keys.items():
        drop = {out_role} if not has_out else set()
        drop |= {rem_role} if not has_rem else set()
        yield ([None if r is None or k in drop else [r[i] for i in index]
                for k, r in enumerate(roles)], index, has_out, sdt)


def sf_adamw(ys, grads, zs, vs, *, store: Stores, lr, ck, y_coef, beta2,
             bias_correction2, eps, weight_decay, grad_scale) -> None:
    roles_all = [ys, grads, zs, vs, store.outs, store.remainders]
    for roles, index, has_out, sdt in _partition(roles_all, 4, 3, 5):
        bases = store.pick(index).index_bases
        _launch(K.sf_adamw_flat_kernel, K.sf_adamw_multi_kernel, roles, multi_roles=5,
                compressed=_compressed(roles[5], store.sr, bases, sdt),
                **_floats(lr=lr, ck=ck, y_coef=y_coef, beta2=beta2,
                          bias_correction2=bias_correction2, eps=eps,
                          weight_decay=weight_decay, grad_scale=grad_scale),
                HAS_WD=weight_decay != 0.0, HAS_YOUT=has_out)


def rmsprop(params, grads, square_avgs, *, momentum_buffers, grad_avgs, store: Stores,
            lr, alpha, eps, weight_decay, momentum, centered, bias_correction2,
            eps_in_sqrt, maximize, grad_scale) -> None:
    roles_all = [params, grads, square_avgs, momentum_buffers if momentum > 0.0 else None,
                 grad_avgs if centered else None, store.outs, store.remainders]
    for roles, index, has_out, sdt in _partition(roles_all, 5, 2, 6):
        bases = store.pick(index).index_bases
        _launch(K.rmsprop_flat_kernel, K.rmsprop_multi_kernel, roles, multi_roles=6,
                compressed=_compressed(roles[6], store.sr, bases, sdt),
                **_floats(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                          bias_correction2=bias_correction2, momentum=momentum,
                          grad_scale=grad_scale), HAS_WD=weight_decay != 0.0,
                MAXIMIZE=bool(maximize), MOMENTUM=momentum > 0.0,
                CENTERED=bool(centered), EPS_IN_SQRT=bool(eps_in_sqrt),
                BIAS_CORRECTION=bias_correction2 != 1.0, HAS_POUT=has_out)


def sf_interpolate(ps, zs, *, weight, store: Stores) -> None:
    # Runs once per train()/eval() switch, not per step: one flat launch per
    # tensor is fine here.
    for i, p in enumerate(ps):
        out, rem = store.at(i).tensors()
        if p.numel() == 0:
            continue
        K.interpolate_flat_kernel[(triton.cdiv(p.numel(), BLOCK),)](
            p, zs[i], out if out is not None else p, rem if rem is not None else p, p.numel(),
            float(weight), HAS_POUT=out is not None, HAS_REM=rem is not None,
            BLOCK=BLOCK, **LAUNCH_OPTIONS)
