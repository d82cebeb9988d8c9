"""zero_sf.layout's integers from first principles (as Megatron's
``test_param_and_grad_buffer.py::test_bucket_sizes`` recomputes padded
sizes): no tensors, no processes.  Every expected value is computed here
from the rules in the module docstring, not read back from the layout."""

from __future__ import annotations

import random

import pytest

from zero_sf.layout import Owned, build_layout, element_numbering, overlap


def _round_up(n, q):
    return (n + q - 1) // q * q


def test_a_hand_computed_layout():
    # world 2, align 4 (quantum 8), buckets of at most 10 elements:
    # [3, 5] = 8 (adding 7 would make 15), [7] -> 8, [20] alone -> 24.
    (buf,) = build_layout([[(0, 3, "bf16"), (1, 5, "bf16"), (2, 7, "bf16"), (3, 20, "bf16")]],
                          world_size=2, bucket_numel=10, align=4)
    assert [(b.start, b.numel, b.chunk) for b in buf.buckets] == [(0, 8, 4), (8, 8, 4), (16, 24, 12)]
    assert [[(s.index, s.offset, s.numel) for s in b.slots] for b in buf.buckets] == [
        [(0, 0, 3), (1, 3, 5)], [(2, 8, 7)], [(3, 16, 20)]]
    assert buf.shard_numel == 20 and buf.shard_offsets() == [0, 4, 8]
    # parameter 1 (elements 3..7 of the buffer) straddles ranks 0 and 1
    b0 = buf.buckets[0]
    assert b0.owned(b0.slots[1], 0) == Owned(param_start=0, chunk_start=3, numel=1)
    assert b0.owned(b0.slots[1], 1) == Owned(param_start=1, chunk_start=0, numel=4)
    assert b0.owned(b0.slots[0], 1) is None
    # numbering skips the padding: 0, 3, 8, 15
    assert element_numbering([[(0, 3, "bf16"), (1, 5, "bf16"), (2, 7, "bf16"),
                               (3, 20, "bf16")]]) == {0: 0, 1: 3, 2: 8, 3: 15}


def test_dtypes_split_a_group_in_order_of_first_appearance():
    groups = [[(0, 4, "bf16"), (1, 2, "fp32"), (2, 3, "bf16")], [(3, 5, "fp32")]]
    bufs = build_layout(groups, world_size=1, bucket_numel=100, align=1)
    assert [(b.group, b.dtype, [s.index for s in b.slots]) for b in bufs] == [
        (0, "bf16", [0, 2]), (0, "fp32", [1]), (1, "fp32", [3])]
    assert element_numbering(groups) == {0: 0, 2: 4, 1: 7, 3: 9}


def _random_case(rng):
    dtypes = ["bf16", "fp32", "fp16"]
    groups, index = [], 0
    for _ in range(rng.randint(1, 3)):
        group = []
        for _ in range(rng.randint(0, 7)):
            group.append((index, rng.choice([0, 1, 2, 3, 7, 16, 100, 129, 1000, 4097]),
                          rng.choice(dtypes)))
            index += 1
        groups.append(group)
    return groups, dict(world_size=rng.randint(1, 9), bucket_numel=rng.choice([1, 5, 64, 1000, 1 << 24]),
                        align=rng.choice([1, 2, 8, 128]))


def _expected_buffers(groups):
    """(group, dtype) -> the members in order, by the rule: groups in order,
    dtypes in order of first appearance within a group."""
    out = []
    for g, params in enumerate(groups):
        seen = []
        for _, _, dt in params:
            if dt not in seen:
                seen.append(dt)
        for dt in seen:
            out.append((g, dt, [(i, n) for i, n, d in params if d == dt]))
    return out


def _expected_runs(members, bucket_numel):
    """Greedy: a parameter joins the open bucket unless that would exceed
    bucket_numel; a parameter larger than bucket_numel gets its own."""
    runs, used = [], 0
    for i, n in members:
        if not runs or used + n > bucket_numel:
            runs.append([])
            used = 0
        runs[-1].append((i, n))
        used += n
    return runs


@pytest.mark.parametrize("seed", range(20))
def test_random_layouts_follow_the_rules(seed):
    rng = random.Random(seed)
    for _ in range(25):
        groups, kw = _random_case(rng)
        world, quantum = kw["world_size"], kw["world_size"] * kw["align"]
        bufs = build_layout(groups, **kw)
        expected = _expected_buffers(groups)
        assert [(b.group, b.dtype) for b in bufs] == [(g, d) for g, d, _ in expected]
        numbering = element_numbering(groups)
        number = 0
        for buf, (_, _, members) in zip(bufs, expected):
            runs = _expected_runs(members, kw["bucket_numel"])
            assert [[(s.index, s.numel) for s in b.slots] for b in buf.buckets] == runs
            start = 0
            for b, run in zip(buf.buckets, runs):
                used = sum(n for _, n in run)
                assert b.start == start and b.numel == _round_up(used, quantum)
                assert b.chunk * world == b.numel and b.chunk % kw["align"] == 0
                offset = b.start
                for s in b.slots:
                    assert s.offset == offset
                    assert numbering[s.index] == number  # padding is not numbered
                    offset += s.numel
                    number += s.numel
                    _check_ownership(b, s, world)
                start += b.numel
            assert buf.numel == start and buf.shard_numel == start // world
            assert buf.shard_offsets() == [sum(b.chunk for b in buf.buckets[:k])
                                           for k in range(len(buf.buckets))]
        assert sorted(numbering) == sorted(i for g in groups for i, _, _ in g)


def _check_ownership(bucket, slot, world):
    """Element e of the parameter sits at flat position slot.offset + e and
    belongs to rank (slot.offset + e - bucket.start) // chunk: the ranks' owned
    parts tile the parameter exactly, each at its place in the rank's chunk."""
    owner = {}
    for r in range(world):
        own = bucket.owned(slot, r)
        if own is None:
            continue
        assert own.numel > 0 and 0 <= own.chunk_start and own.chunk_start + own.numel <= bucket.chunk
        for k in range(own.numel):
            e = own.param_start + k
            assert e not in owner
            owner[e] = r
            assert bucket.start + r * bucket.chunk + own.chunk_start + k == slot.offset + e
    assert owner == {e: (slot.offset + e - bucket.start) // bucket.chunk for e in range(slot.numel)}


def test_overlap():
    assert overlap(0, 10, 5, 20) == (5, 10)
    lo, hi = overlap(0, 4, 4, 8)
    assert lo >= hi  # touching intervals share nothing


@pytest.mark.parametrize("bad", [dict(world_size=0), dict(bucket_numel=0), dict(align=0)])
def test_invalid_sizes_raise(bad):
    kw = {**dict(world_size=2, bucket_numel=8, align=4), **bad}
    with pytest.raises(ValueError, match="invalid layout sizes"):
        build_layout([[(0, 3, "bf16")]], **kw)


@pytest.mark.parametrize("world_size", [1, 8, 1024, 1025, 4096, 16384])
def test_default_bucket_numel_keeps_padding_and_messages_in_bounds(world_size):
    """From first principles: a bucket pads by less than world_size * align
    elements, and each rank's message is bucket / world_size elements."""
    from zero_sf.layout import default_bucket_numel
    n = default_bucket_numel(world_size)
    assert n >= 1 << 24 and (n == 1 << 24) == (world_size <= 1024)
    assert world_size * 128 / n < 0.008  # padding bound at the default align
    assert n // world_size >= 1 << 14  # >= 32 KB bf16 per rank and collective
    # and the real layout of a bucket-sized parameter list obeys the bound
    bufs = build_layout([[(0, n - 1, "bf16"), (1, 3, "bf16")]], world_size=world_size,
                        bucket_numel=n, align=128)
    padded = sum(b.numel for b in bufs[0].buckets)
    assert (padded - (n + 2)) / padded < 0.008
