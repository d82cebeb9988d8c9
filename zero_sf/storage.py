"""How optimizer state and master weights are stored (docs/design.md §11):
the one place that defines the storage formats.

A param group carries its storage choice in four JSON-friendly keys
(``state_dtype``, ``state_rounding``, ``master_weights``, ``seed``);
:class:`Storage` reads them once, and everything above asks it (the state
dtype of a parameter, whether a remainder completes the bf16 weights, the
stochastic rounding's ``(seed, step)``) instead of reading the keys.

The bit formats (the counter-based hash of stochastic rounding, the bf16 +
int16 split of a fp32 y) are here too, and so is the object that carries a
call's storage through every layer: :class:`Store` for one tensor (what the
math in :mod:`zero_sf.spec` sees), :class:`Stores` for a list (what
:mod:`zero_sf.dispatch` and the fused backends take).  The fused kernels
implement the same formats and are tested bit for bit against these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)
# ``master_weights="remainder"``, and the state key of its int16 low bits
REMAINDER = "remainder"
STATE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                "float32": "float32", "bfloat16": "bfloat16", "fp32": "float32", "bf16": "bfloat16"}
ROUNDINGS = ("stochastic", "nearest")
STORAGE_KEYS = ("state_dtype", "state_rounding", "master_weights")
# What the sharded loaders (zero_sf.load, zsd.load_checkpoint) keep from the
# loading optimizer: how state is stored, and the backend (a checkpoint of a
# GPU run that named "triton" loads on a CPU).
KEEP_ON_LOAD = STORAGE_KEYS + ("backend",)


@dataclass(frozen=True)
class Storage:
    """One param group's storage choice (see the module docstring)."""

    state_dtype: Optional[str] = None  # None: the default rule (state_dtype_for)
    rounding: str = "stochastic"
    master: Optional[str] = None  # None (y is the parameter, or a fp32 master) or "remainder"
    seed: int = 0

    @classmethod
    def of(cls, group: dict[str, Any]) -> "Storage":
        return cls(state_dtype=group.get("state_dtype"),
                   rounding=group.get("state_rounding", "stochastic"),
                   master=group.get("master_weights"), seed=group.get("seed", 0))

    @property
    def keeps_remainder(self) -> bool:
        """bf16 parameters + int16 remainders stand for the fp32 y."""
        return self.master == REMAINDER

    def sr(self, step: int) -> Optional[tuple[int, int]]:
        """``(seed, step)`` when state is rounded stochastically (bf16 state
        only: the default rule never gives bf16 state), else None."""
        if self.state_dtype != "bfloat16" or self.rounding != "stochastic":
            return None
        return (self.seed, step)

    def dtype_for(self, p: Tensor) -> torch.dtype:
        return state_dtype_for(p, {"state_dtype": self.state_dtype})


def state_dtype_for(p: Tensor, group: Optional[dict] = None) -> torch.dtype:
    """The dtype of p's state tensors (z, v, ...).  ``group["state_dtype"]``
    when set ("float32" or "bfloat16", the ``state_dtype`` argument).  By
    default fp32 for bf16/fp16 parameters: a bf16 v rounded to nearest loses
    the 1-b2 = 1e-3 increments entirely (bf16 has 8 bits of mantissa), and a
    bf16 z drops any update below 2**-9 of its magnitude, which is why bf16
    state is rounded stochastically.  Otherwise the param's dtype."""
    name = group.get("state_dtype") if group is not None else None
    if name is not None:
        return getattr(torch, name)
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def state_dtype_name(value: Any) -> Optional[str]:
    """``state_dtype`` as stored in the param groups: None (the default
    rule), "float32" or "bfloat16" (a string, so groups stay JSON: the
    sharded checkpoint's metadata and DeepSpeed configs hold them)."""
    if value is None:
        return None
    try:
        return STATE_DTYPES[value]
    except (KeyError, TypeError):
        raise ValueError(f"Invalid state_dtype value: {value!r} (expected torch.float32 or "
                         "torch.bfloat16, or the strings 'float32' / 'bfloat16')") from None


def check_compression(group: dict[str, Any]) -> None:
    """``state_dtype``, ``state_rounding``, ``master_weights``, ``seed``."""
    if group.get("state_dtype") not in (None, "float32", "bfloat16"):
        raise ValueError(f"Invalid state_dtype value: {group.get('state_dtype')!r} (expected "
                         "torch.float32 or torch.bfloat16)")
    if group.get("state_rounding") not in ROUNDINGS:
        raise ValueError(f"Invalid state_rounding value: {group.get('state_rounding')!r} "
                         f"(expected one of {ROUNDINGS})")
    if group.get("master_weights") not in (None, "remainder"):
        raise ValueError(f"Invalid master_weights value: {group.get('master_weights')!r} "
                         "(expected None or 'remainder'; ZeroOptimizer also takes 'fp32')")
    seed = group.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r} (expected an integer >= 0)")


def compression_defaults(state_dtype, state_rounding, master_weights, seed) -> dict[str, Any]:
    return dict(state_dtype=state_dtype_name(state_dtype), state_rounding=state_rounding,
                master_weights=master_weights, seed=seed)


def remainder_bits(value: Tensor) -> Tensor:
    """A saved remainder as int16: as saved, or from the bfloat16 view of its
    bits that FSDP2 state dicts carry (:meth:`ElementwiseOptimizer.export_param_state`)."""
    if value.dtype == torch.int16:
        return value
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16)
    raise ValueError(f"Invalid remainder dtype: {value.dtype} (a remainder is int16, or its "
                     "bits viewed as bfloat16); is it the state of another optimizer?")


# --------------------------------------------------------------------------
# The bit formats: stochastic rounding and 16-bit master remainders
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


# --------------------------------------------------------------------------
# Where the math puts its results: one object through every layer
# --------------------------------------------------------------------------
#
# The update rules (zero_sf.spec) compute in fp32 and never see a format:
# they load y through ``Store.load_y`` and hand every result to
# ``Store.store_y`` / ``Store.store_state``.  A new format (an 8-bit second
# moment, say) is a field here, a branch in those methods and the same in
# each fused backend -- not a keyword threaded through spec, dispatch, the
# kernels' host side and the CPU backend.


def upcast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; no copy when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


@dataclass(frozen=True)
class Store:
    """How one tensor's update is stored (the per-tensor form of :class:`Stores`).

    ``out``: receives y rounded to its dtype in the same pass (the model's
    bf16 parameter when y is a fp32 master shard).  ``remainder``: the int16
    low bits of a bf16 y, so bf16 y + remainder is the fp32 y exactly
    (:func:`split_master`).  ``sr = (seed, step)``: bf16 state is rounded
    stochastically, element i numbered ``index_base + i``; else to nearest."""

    out: Optional[Tensor] = None
    remainder: Optional[Tensor] = None
    sr: Optional[tuple[int, int]] = None
    index_base: int = 0

    def tensors(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return self.out, self.remainder

    def narrow(self, start: int, length: int) -> "Store":
        """The store of flat elements ``[start, start + length)``."""
        def cut(t):
            return None if t is None else t.view(-1).narrow(0, start, length)

        return Store(cut(self.out), cut(self.remainder), self.sr, self.index_base + start)

    def load_y(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """y in the compute dtype: joined with its remainder (exact), or upcast."""
        if self.remainder is not None:
            return join_master(y, self.remainder)
        return upcast(y, dtype)

    def store_y(self, y: Tensor, y32: Tensor) -> None:
        """Write the updated y32 into ``y`` (and ``out``, and the remainder)."""
        if self.remainder is not None:
            hi, lo = split_master(y32)
            y.copy_(hi)
            self.remainder.copy_(lo)
            if self.out is not None:
                self.out.copy_(hi)
            return
        if y32 is not y:
            y.copy_(y32)
        if self.out is not None:
            self.out.copy_(y32)

    def store_state(self, dst: Tensor, x: Tensor, lane: int) -> None:
        """Write state ``x`` (compute dtype) into ``dst`` with its lane's bits."""
        store_state(dst, x, sr=self.sr, lane=lane, index_base=self.index_base)


PLAIN = Store()  # y is the stored value, no copy, state rounded to nearest


@dataclass(frozen=True)
class Stores:
    """:class:`Store` for a list of tensors: what the dispatcher and the fused
    backends take.  ``outs`` / ``remainders`` are None or one entry (maybe
    None) per tensor; ``index_bases`` one int per tensor (needed with ``sr``)."""

    outs: Optional[Sequence[Optional[Tensor]]] = None
    remainders: Optional[Sequence[Optional[Tensor]]] = None
    sr: Optional[tuple[int, int]] = None
    index_bases: Optional[Sequence[int]] = None

    def check(self, ys: Sequence[Tensor]) -> None:
        """The fields agree with each other and with ``ys``."""
        for name, role in (("outs", self.outs), ("remainders", self.remainders),
                           ("index_bases", self.index_bases)):
            if role is not None and len(role) != len(ys):
                raise ValueError(f"Stores.{name} has {len(role)} entries for {len(ys)} "
                                 "tensors; give one per tensor (None where absent)")
        if self.remainders is not None:
            for i, (y, r) in enumerate(zip(ys, self.remainders)):
                if r is not None and (y.dtype != torch.bfloat16 or r.dtype != torch.int16
                                      or r.shape != y.shape):
                    raise ValueError(
                        f"remainder {i}: a {r.dtype} remainder of shape {tuple(r.shape)} for "
                        f"a {y.dtype} parameter of shape {tuple(y.shape)}; remainders are "
                        "int16 tensors shaped like their bfloat16 parameters")
        if self.sr is not None and self.index_bases is None:
            raise ValueError("stochastic rounding (sr=(seed, step)) needs index_bases")

    def pick(self, index: Sequence[int]) -> "Stores":
        """The stores of tensors ``index`` (in that order)."""
        def sub(xs):
            return None if xs is None else [xs[i] for i in index]

        return Stores(sub(self.outs), sub(self.remainders), self.sr, sub(self.index_bases))

    def at(self, i: int) -> Store:
        def one(xs):
            return None if xs is None else xs[i]

        return Store(one(self.outs), one(self.remainders), self.sr,
                     self.index_bases[i] if self.index_bases is not None else 0)

    @classmethod
    def from_keywords(cls, fn: str, out_name: str, store: Optional["Stores"],
                      keywords: dict[str, Any]) -> "Stores":
        """``store``, or the same from the keywords of releases before issue
        #22 (``y_outs``/``param_outs``/``p_outs``, ``remainders``, ``sr``,
        ``index_bases``), still accepted."""
        allowed = (out_name, "remainders", "sr", "index_bases")
        for k in keywords:
            if k not in allowed:
                raise TypeError(f"{fn}() got an unexpected keyword argument {k!r}")
        if not keywords:
            return store if store is not None else Stores()
        if store is not None:
            raise TypeError(f"{fn}() takes store=Stores(...) or the keywords "
                            f"{', '.join(allowed)}, not both")
        return cls(outs=keywords.get(out_name), remainders=keywords.get("remainders"),
                   sr=keywords.get("sr"), index_bases=keywords.get("index_bases"))
