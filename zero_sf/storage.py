"""How optimizer state and master weights are stored (docs/design.md §11):
the one place that defines the storage formats.

A param group carries its storage choice in four JSON-friendly keys
(``state_dtype``, ``state_rounding``, ``master_weights``, ``seed``);
:class:`Storage` reads them once, and everything above asks it (the state
dtype of a parameter, whether a remainder completes the bf16 weights, the
stochastic rounding's ``(seed, step)``) instead of reading the keys.  The
bit-level formats themselves (stochastic rounding, the bf16 + int16 split of
a fp32 y) are math, in :mod:`zero_sf.spec`; the kernels implement the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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


STATE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                "float32": "float32", "bfloat16": "bfloat16", "fp32": "float32", "bf16": "bfloat16"}
ROUNDINGS = ("stochastic", "nearest")
STORAGE_KEYS = ("state_dtype", "state_rounding", "master_weights")
# What the sharded loaders (zero_sf.load, zsd.load_checkpoint) keep from the
# loading optimizer: how state is stored, and the backend (a checkpoint of a
# GPU run that named "triton" loads on a CPU).
KEEP_ON_LOAD = STORAGE_KEYS + ("backend",)


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
