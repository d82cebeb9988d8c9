"""zero_sf.sharding.comm on 1 process (the fallbacks) and on 3 gloo ranks,
against values computed here: sums, the in-place chunk, int16 bit patterns
(every one of the 65536, NaN patterns of their bf16 view included), a
subgroup's rank 0, objects."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed import spawn
from zero_sf.sharding import comm


def test_without_a_process_group_every_collective_is_the_identity():
    assert comm.world(None) == (1, 0)
    inp = torch.arange(6.0)
    out = torch.zeros(6)
    comm.reduce_scatter_sum(out, inp, None)
    assert torch.equal(out, inp)
    comm.all_gather(out, inp * 2, None)
    assert torch.equal(out, inp * 2)
    assert torch.equal(comm.all_reduce_sum(inp.clone(), None), inp)
    assert comm.all_gather_objects({"a": 1}, None) == [{"a": 1}]
    comm.broadcast_from_first(inp, None)
    comm.barrier(None)


def _collectives(rank, world_size):
    n = 4
    assert comm.world(None) == (world_size, rank)
    # reduce-scatter, in place: rank r's chunk of the sum lands in its own chunk
    full = torch.arange(world_size * n, dtype=torch.float32) * (rank + 1)
    mine = full[rank * n:(rank + 1) * n]
    comm.reduce_scatter_sum(mine, full, None)
    scale = sum(r + 1 for r in range(world_size))
    assert torch.equal(mine, torch.arange(rank * n, (rank + 1) * n, dtype=torch.float32) * scale)
    # all-gather of int16: the bits of every pattern survive the bf16 view
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    bits = bits.roll(rank * 1000)
    out = torch.empty(world_size * bits.numel(), dtype=torch.int16)
    comm.all_gather(out, bits, None)
    for r in range(world_size):
        assert torch.equal(out[r * bits.numel():(r + 1) * bits.numel()], bits.roll(-rank * 1000).roll(r * 1000))
    # all-reduce, objects, broadcast from rank 0
    assert torch.equal(comm.all_reduce_sum(torch.tensor([float(rank)]), None),
                       torch.tensor([float(sum(range(world_size)))]))
    assert comm.all_gather_objects({"rank": rank}, None) == [{"rank": r} for r in range(world_size)]
    t = torch.full((3,), float(rank))
    comm.broadcast_from_first(t, None)
    assert torch.equal(t, torch.zeros(3))
    # a subgroup of ranks 1 and 2: its "first" is global rank 1
    sub = dist.new_group([1, 2])
    if rank in (1, 2):
        assert comm.world(sub) == (2, rank - 1)
        t = torch.full((3,), float(rank))
        comm.broadcast_from_first(t, sub)
        assert torch.equal(t, torch.ones(3))
    comm.barrier(None)


def test_collectives_on_three_ranks():
    spawn(_collectives, 3)
