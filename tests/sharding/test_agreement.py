"""zero_sf.sharding.agreement: the step's disagreement test is exact (no
false alarm when ranks agree, a detection whenever one hash differs, at up
to 4096 ranks in float64), and the message names the key and both values."""

from __future__ import annotations

import random

import pytest
import torch

from zero_sf.sharding import agreement


def _sums(per_rank):
    # as the step's all-reduce adds them, in float64
    vec = torch.zeros(agreement.N_TERMS, dtype=torch.float64)
    for terms in per_rank:
        vec += torch.tensor(terms, dtype=torch.float64)
    return vec.tolist()


def test_hashes_are_three_12_bit_parts():
    parts = agreement.hash_parts("param group 0: lr: 0.001")
    assert len(parts) == 3 and all(0 <= h < 4096 for h in parts)
    assert len(agreement.terms({"a": "1"})) == agreement.N_TERMS


@pytest.mark.parametrize("world", [1, 2, 3, 8, 4096])
def test_equal_ranks_never_differ(world):
    mine = {"param group 0: lr": "0.001", "parameters written since the last step": "[]"}
    assert not agreement.ranks_differ(_sums([agreement.terms(mine)] * world), world)


@pytest.mark.parametrize("world", [2, 3, 8, 4096])
def test_one_rank_that_differs_is_seen(world):
    rng = random.Random(world)
    for _ in range(20):
        base = {"param group 0: lr": repr(rng.random())}
        odd = {"param group 0: lr": repr(rng.random())}
        if agreement.hash_parts(repr(sorted(base.items()))) == agreement.hash_parts(
                repr(sorted(odd.items()))):
            continue  # a 36-bit collision: the exchange would not be triggered
        ranks = [agreement.terms(base)] * world
        ranks[rng.randrange(world)] = agreement.terms(odd)
        assert agreement.ranks_differ(_sums(ranks), world)


def test_the_message_names_the_key_and_both_values():
    everyone = [{"param group 0: lr": "0.001", "x": "1"}, {"param group 0: lr": "0.002", "x": "1"}]
    with pytest.raises(ValueError, match=r"ranks differ at step\(\): param group 0: lr: 0\.002 on "
                                         r"rank 1, 0\.001 on rank 0; set them alike"):
        agreement.raise_if_ranks_differ(everyone, "set them alike", "at step()")
    agreement.raise_if_ranks_differ([{"a": 1}] * 3, "", "")  # all equal: nothing
    with pytest.raises(ValueError, match="b: 2 on rank 1, <missing> on rank 0"):
        agreement.raise_if_ranks_differ([{"a": 1}, {"a": 1, "b": 2}], "", "")
