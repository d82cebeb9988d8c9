"""Rank agreement: ranks that were given different models, param groups,
hyperparameters or weights must raise before anything changes, with the
same message on every rank.

At construction the ranks exchange their full signatures (one
``all_gather_object``).  At every step that would cost too much, so each
rank contributes (h, h*h) for three 12-bit hashes h of what it must agree
on, inside the step's one all-reduce (the gradient norm's): all h are equal
iff N * sum(h*h) == sum(h)**2 (zero variance).  Only when they differ do the
ranks exchange their dicts, to say where.
"""

from __future__ import annotations

import zlib
from typing import Any

from . import comm

N_TERMS = 6  # (h, h*h) for each of three hashes


def hash_parts(text: str) -> list[int]:
    """Three 12-bit hashes of ``text``: small enough that sums of squares
    over 4096 ranks are exact in float64 (4096 * 4095**2 < 2**53)."""
    h = zlib.crc32(text.encode()) | (zlib.adler32(text.encode()) << 32)
    return [(h >> (12 * j)) & 0xFFF for j in range(3)]


def terms(agreement: dict[str, str]) -> list[float]:
    """This rank's :data:`N_TERMS` summands for the step's all-reduce."""
    return [float(x) for h in hash_parts(repr(sorted(agreement.items()))) for x in (h, h * h)]


def ranks_differ(sums: list[float], world_size: int) -> bool:
    """From the all-reduced :func:`terms`: whether any hash varies over ranks."""
    return any(world_size * sums[1 + 2 * j] != sums[2 * j] ** 2 for j in range(3))


def raise_if_ranks_differ(everyone: list[dict[str, Any]], fix: str, when: str) -> None:
    """ValueError naming the first entry on which a rank differs from rank
    0, with both values (``param group 0: lr: 0.002 on rank 1, 0.001 on rank
    0``): the same message on every rank, since all see ``everyone``."""
    first = everyone[0]
    for r, theirs in enumerate(everyone):
        if theirs == first:
            continue
        key = next(k for k in list(first) + list(theirs)
                   if first.get(k, "<missing>") != theirs.get(k, "<missing>"))
        raise ValueError(
            f"ZeroOptimizer: ranks differ {when}: {key}: {theirs.get(key, '<missing>')} on "
            f"rank {r}, {first.get(key, '<missing>')} on rank 0; {fix}")


def check_same(mine: dict[str, Any], process_group, fix: str, when: str) -> None:
    """Collective: raise (on every rank) unless every rank passed ``mine`` equal."""
    raise_if_ranks_differ(comm.all_gather_objects(mine, process_group), fix, when)
