"""tests/distributed.py: the kept gloo ranks report a rank's failure with its
traceback, end that pool, and the next call gets fresh ranks that work."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed import RankFailed, spawn


def _sum_of_ranks(rank, world_size, pids_file):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world_size))
    with open(f"{pids_file}.{rank}", "a") as f:
        f.write(f"{os.getpid()}\n")


def _fails_on_rank_1(rank, world_size):
    assert rank != 1, "the harness's planted failure"
    dist.all_reduce(torch.ones(1))  # rank 0 is left waiting: it must not hang the test


def _pids(base, rank):
    with open(f"{base}.{rank}") as f:
        return f.read().split()


def test_ranks_are_kept_between_calls_and_replaced_after_a_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("ZERO_SF_FRESH_RANKS", raising=False)
    base = str(tmp_path / "pids")
    spawn(_sum_of_ranks, 2, base)
    spawn(_sum_of_ranks, 2, base)
    first, second = _pids(base, 0)
    assert first == second  # the same process ran both calls
    with pytest.raises(RankFailed, match="rank 1 raised:(.|\n)*the harness's planted failure"):
        spawn(_fails_on_rank_1, 2)
    spawn(_sum_of_ranks, 2, base)
    assert _pids(base, 0)[2] != first  # a fresh pool after the failure
