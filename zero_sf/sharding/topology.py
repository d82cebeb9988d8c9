"""Hierarchical sharding (HSDP; ZeRO++'s hpZ for the optimizer state): which
ranks share a shard and which hold replicas of it.  Bookkeeping of process
groups only: building them, and checking at construction that the ones a
user passed fit together.

With a data-parallel world of N = R * S ranks, shard group i holds the
contiguous ranks i*S .. i*S + S-1 (one node when S = LOCAL_WORLD_SIZE, as
torchrun numbers ranks node by node) and replicate group j the ranks j,
j + S, j + 2S, ... that hold chunk j of every bucket.  Reduce-scatter and
all-gather stay within a shard group; only the all-reduce of a 1/S shard
crosses nodes.
"""

from __future__ import annotations

from . import comm


def hierarchical_groups(shard_size: int):
    """``(shard_group, replicate_group)`` of this rank, for
    ``ZeroOptimizer(..., shard_group=..., replicate_group=...)`` over the
    whole world.  Collective: every rank calls it (it creates R + S groups)."""
    world, rank = comm.world(None)
    if not (isinstance(shard_size, int) and 1 <= shard_size and world % shard_size == 0):
        raise ValueError(f"Invalid shard_size value: {shard_size!r} (expected a divisor of the "
                         f"world size {world}, e.g. LOCAL_WORLD_SIZE: the GPUs of one node)")
    replicas = world // shard_size
    mine = [None, None]
    for i in range(replicas):  # every rank creates every group, in one order
        g = comm.new_group([i * shard_size + j for j in range(shard_size)])
        if rank // shard_size == i:
            mine[0] = g
    for j in range(shard_size):
        g = comm.new_group([i * shard_size + j for i in range(replicas)])
        if rank % shard_size == j:
            mine[1] = g
    return mine[0], mine[1]


def check_hierarchy(process_group, shard_group, replicate_group) -> None:
    """Collective at construction: ValueError (on every rank) unless the
    shard groups partition ``process_group`` and each replicate group holds
    one rank of every shard group, all at the same position (the ranks that
    hold the same chunk)."""
    if shard_group is None and replicate_group is None:
        return
    if shard_group is None or replicate_group is None:
        raise ValueError("ZeroOptimizer: pass both shard_group and replicate_group (or "
                         "neither); zero_sf.hierarchical_groups(shard_size) builds both")
    mine = (comm.group_ranks(shard_group), comm.group_ranks(replicate_group))
    dp = comm.group_ranks(process_group)
    by_rank = dict(zip(dp, comm.all_gather_objects(mine, process_group)))
    problem = _misfit(dp, by_rank)
    if problem:
        raise ValueError(f"ZeroOptimizer: shard_group and replicate_group do not fit together: "
                         f"{problem}; build them with zero_sf.hierarchical_groups(shard_size)")


def _misfit(dp: list[int], by_rank: dict[int, tuple[list[int], list[int]]]):
    """What is wrong with the groups every rank reported, or None."""
    shards = {tuple(s) for s, _ in by_rank.values()}
    if sorted(r for s in shards for r in s) != sorted(dp):
        return f"the shard groups {sorted(shards)} do not partition the data-parallel ranks {dp}"
    for rank, (shard, replicas) in by_rank.items():
        if len(shard) * len(replicas) != len(dp):
            return (f"rank {rank}: a shard group of {len(shard)} ranks times a replicate group "
                    f"of {len(replicas)} is not the {len(dp)} data-parallel ranks")
        position = shard.index(rank)
        owners = [by_rank[r][0] for r in replicas if r in by_rank]
        if (len(owners) != len(replicas) or len({tuple(o) for o in owners}) != len(replicas)
                or any(o.index(r) != position for o, r in zip(owners, replicas))):
            return (f"rank {rank}'s replicate group {replicas} must hold one rank of every "
                    f"shard group, each at position {position} of its shard group (the ranks "
                    "that hold the same chunk)")
    return None
