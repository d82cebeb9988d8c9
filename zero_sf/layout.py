"""Where every element lives: flat buffers, buckets, rank chunks (docs/design.md §3).

Pure bookkeeping: integers only, no tensors, no communication, no math.

Parameters are grouped by (param group, dtype) into a *flat buffer*.  A
buffer is cut into *buckets* of whole parameters (at most ``bucket_numel``
elements unless one parameter is larger).  Each bucket is padded to a
multiple of ``world_size * align`` and split into ``world_size`` equal
*chunks*: rank r owns chunk r of every bucket (Megatron's distributed
optimizer layout).  So every rank holds the same number of elements, a
parameter may straddle ranks, and a bucket can be reduce-scattered as soon as
its gradients are ready, with one ``reduce_scatter_tensor`` whose output is
exactly the owner's chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Slot:
    """One parameter inside its flat buffer."""

    index: int  # position in the optimizer's flattened param list
    offset: int  # first element in the flat buffer
    numel: int


@dataclass
class Bucket:
    start: int  # first element in the flat buffer
    numel: int  # padded: a multiple of world_size * align
    slots: list[Slot] = field(default_factory=list)
    world_size: int = 1

    @property
    def chunk(self) -> int:
        return self.numel // self.world_size

    def chunk_range(self, rank: int) -> tuple[int, int]:
        """Rank's elements of this bucket, as a [start, end) of the flat buffer."""
        a = self.start + rank * self.chunk
        return a, a + self.chunk

    def owned(self, slot: Slot, rank: int) -> Optional[Owned]:
        """The elements of ``slot``'s parameter that ``rank`` owns (None when
        none: a parameter may lie wholly in other ranks' chunks)."""
        a0, a1 = self.chunk_range(rank)
        lo, hi = overlap(a0, a1, slot.offset, slot.offset + slot.numel)
        if lo >= hi:
            return None
        return Owned(param_start=lo - slot.offset, chunk_start=lo - a0, numel=hi - lo)


@dataclass(frozen=True)
class Owned:
    """A rank's part of one parameter: elements ``[param_start, param_start +
    numel)`` of the flattened parameter, which sit at ``[chunk_start,
    chunk_start + numel)`` of that rank's chunk of the parameter's bucket."""

    param_start: int
    chunk_start: int
    numel: int

    @property
    def in_chunk(self) -> slice:
        return slice(self.chunk_start, self.chunk_start + self.numel)

    @property
    def in_param(self) -> slice:
        return slice(self.param_start, self.param_start + self.numel)


@dataclass
class FlatBuffer:
    group: int  # param group index
    dtype: Any  # torch.dtype (kept opaque here: no torch in this module)
    buckets: list[Bucket]

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)

    @property
    def shard_numel(self) -> int:
        """Elements each rank owns: its chunks of every bucket, concatenated."""
        return sum(b.chunk for b in self.buckets)

    @property
    def slots(self) -> list[Slot]:
        return [s for b in self.buckets for s in b.slots]

    def shard_offsets(self) -> list[int]:
        """Start of each bucket's chunk inside a rank's contiguous shard."""
        out, acc = [], 0
        for b in self.buckets:
            out.append(acc)
            acc += b.chunk
        return out


def default_bucket_numel(world_size: int) -> int:
    """``bucket_numel``'s default: 2**24 elements, and at least 2**14 per rank.

    A bucket pads to a multiple of ``world_size * align``, so its padding is
    below ``world_size * align / bucket_numel``, and each rank's message is
    ``bucket_numel / world_size`` elements.  A fixed 2**24 gives, at 16,384
    ranks and align 128, up to 12.5 % padding and 1,024-element (2 KB)
    messages: latency-bound.  With >= 2**14 elements per rank the padding
    stays below 128 / 2**14 = 0.8 % and every message >= 32 KB (bf16) at any
    world size; up to 1,024 ranks the default is 2**24 as before
    (benchmarks/scale_model.py, docs/measurements.md "Capacity planning")."""
    return max(1 << 24, world_size << 14)


def build_layout(groups: Sequence[Sequence[tuple[int, int, Any]]], *, world_size: int,
                 bucket_numel: int, align: int) -> list[FlatBuffer]:
    """``groups[g]`` lists (param index, numel, dtype) in order.

    Returns one FlatBuffer per (group, dtype), in order of first appearance.
    """
    if world_size < 1 or bucket_numel < 1 or align < 1:
        raise ValueError(f"invalid layout sizes: world_size={world_size}, "
                         f"bucket_numel={bucket_numel}, align={align}")
    quantum = world_size * align
    return [FlatBuffer(group=g, dtype=dtype,
                       buckets=_buckets([(i, n) for i, n, _ in members], bucket_numel=bucket_numel,
                                        quantum=quantum, world_size=world_size))
            for g, dtype, members in _by_group_and_dtype(groups)]


def _buckets(members: list[tuple[int, int]], *, bucket_numel: int, quantum: int,
             world_size: int) -> list[Bucket]:
    """Whole parameters, in order, into buckets of at most ``bucket_numel``
    elements (a larger parameter gets one of its own), each padded to a
    multiple of ``quantum``."""
    runs: list[list[tuple[int, int]]] = []
    used = 0
    for index, numel in members:
        if not runs or (runs[-1] and used + numel > bucket_numel):
            runs.append([])
            used = 0
        runs[-1].append((index, numel))
        used += numel
    buckets, start = [], 0
    for run in runs:
        padded = _round_up(sum(n for _, n in run), quantum)
        b = Bucket(start=start, numel=padded, world_size=world_size)
        off = start
        for index, numel in run:
            b.slots.append(Slot(index=index, offset=off, numel=numel))
            off += numel
        buckets.append(b)
        start += padded
    return buckets


def _by_group_and_dtype(groups):
    """(group, dtype, members) in flat-buffer order: groups in order, and
    within a group one entry per dtype, in order of first appearance."""
    for g, params in enumerate(groups):
        by_dtype: dict[object, list] = {}
        for entry in params:
            by_dtype.setdefault(entry[2], []).append(entry)
        for dtype, members in by_dtype.items():
            yield g, dtype, members


def element_numbering(groups: Sequence[Sequence[tuple[K, int, Any]]]) -> dict[K, int]:
    """The global number of every parameter's first element, ``groups[g]``
    listing (key, numel, dtype) as for :func:`build_layout`: elements are
    numbered in flat-buffer order without the padding.  This is the one
    numbering of stochastic rounding (its random bits are a function of the
    element's number): the single-device optimizer, ZeroOptimizer's chunks,
    FSDP2 shards and DeepSpeed's partitions all number from it, so the same
    bits fall on the same element at every world size."""
    out, acc = {}, 0
    for _, _, members in _by_group_and_dtype(groups):
        for key, numel, _ in members:
            out[key] = acc
            acc += numel
    return out


def overlap(a0: int, a1: int, b0: int, b1: int) -> tuple[int, int]:
    """Intersection of [a0, a1) and [b0, b1); empty when start >= end."""
    return max(a0, b0), min(a1, b1)
