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


@dataclass
class FlatBuffer:
    group: int  # param group index
    dtype: object  # torch.dtype (kept opaque here)
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


def build_layout(groups: list[list[tuple[int, int, object]]], *, world_size: int,
                 bucket_numel: int, align: int) -> list[FlatBuffer]:
    """``groups[g]`` lists (param index, numel, dtype) in order.

    Returns one FlatBuffer per (group, dtype), in order of first appearance.
    """
    if world_size < 1 or bucket_numel < 1 or align < 1:
        raise ValueError(f"invalid layout sizes: world_size={world_size}, "
                         f"bucket_numel={bucket_numel}, align={align}")
    quantum = world_size * align
    buffers: list[FlatBuffer] = []
    for g, params in enumerate(groups):
        by_dtype: dict[object, list[tuple[int, int]]] = {}
        for index, numel, dtype in params:
            by_dtype.setdefault(dtype, []).append((index, numel))
        for dtype, members in by_dtype.items():
            buckets: list[Bucket] = []
            start, current, used = 0, [], 0

            def close():
                nonlocal start, current, used
                if current:
                    padded = _round_up(used, quantum)
                    b = Bucket(start=start, numel=padded, world_size=world_size)
                    off = start
                    for index, numel in current:
                        b.slots.append(Slot(index=index, offset=off, numel=numel))
                        off += numel
                    buckets.append(b)
                    start += padded
                current, used = [], 0

            for index, numel in members:
                if current and used + numel > bucket_numel:
                    close()
                current.append((index, numel))
                used += numel
            close()
            buffers.append(FlatBuffer(group=g, dtype=dtype, buckets=buckets))
    return buffers


def overlap(a0: int, a1: int, b0: int, b1: int) -> tuple[int, int]:
    """Intersection of [a0, a1) and [b0, b1); empty when start >= end."""
    return max(a0, b0), min(a1, b1)
