"""Hierarchical sharding (zero_sf/sharding/topology.py): state sharded within
groups of S ranks, replicated across them, at 4 gloo ranks as 1x4, 2x2 and
4x1 against a single process; checkpoints across layouts; misfit groups."""

import os

import pytest
import torch

import zero_sf
from tests.distributed import spawn
from tests.helpers import averaged_reference
from tests.sharding.test_zero import LAYOUT, SF_KW, SHAPES, _assert_model_is, _model, _targets


def _train(model, opt, rank, world_size, steps, micro=(0.5, 0.5)):
    """Gradients k/64: every sum over ranks and micro-batches is exact in
    bf16, so any reduction order gives the same bits as the reference."""
    for step in steps:
        targets = _targets(step, world_size)
        for part in micro:
            sum((p * (t * part).to(p.dtype)).sum() for p, t in zip(model, targets[rank])).backward()
        opt.step()


def _layouts(rank, world_size, root):
    for shard_size in (1, 2, 4):
        shard, replicate = zero_sf.hierarchical_groups(shard_size)
        for stage in (1, 2):
            for dtype in (torch.float32, torch.bfloat16):
                model = _model(dtype)
                opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage, **LAYOUT, **SF_KW,
                                            shard_group=shard, replicate_group=replicate)
                assert (opt.world_size, opt.dp_size) == (shard_size, world_size)
                opt.train()
                _train(model, opt, rank, world_size, range(5))
                # z and exp_avg_sq sharded over S ranks: 1/S of them here.
                numel = sum(buf.shard_numel for buf in opt.buffers)
                assert opt.memory_bytes()["optimizer_state"] == 2 * 4 * numel
                _, master = averaged_reference(zero_sf.ScheduleFreeAdamW, SF_KW, _model(dtype),
                                               _targets, [(range(5), world_size)])
                try:
                    _assert_model_is(model, master, dtype)
                except AssertionError as e:
                    raise AssertionError(f"{world_size // shard_size}x{shard_size}, stage "
                                         f"{stage}, {dtype}") from e
                assert opt.grad_norm == pytest.approx(_norm(4, world_size), rel=1e-6)
    # A 2x2 checkpoint, loaded here as 4x1 (flat), continues as one process.
    shard, replicate = zero_sf.hierarchical_groups(2)
    model = _model(torch.bfloat16)
    opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW, shard_group=shard,
                                replicate_group=replicate)
    opt.train()
    _train(model, opt, rank, world_size, range(3))
    zero_sf.save(os.path.join(root, "ckpt"), model, opt)
    whole = opt.consolidated_state_dict()
    if rank == 0:
        torch.save(whole, os.path.join(root, "consolidated.pt"))
    assert sorted(os.listdir(os.path.join(root, "ckpt")))[0] == "LATEST"  # one version, once
    model = _model(torch.bfloat16)
    opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
    zero_sf.load(os.path.join(root, "ckpt"), model, opt)
    opt.train()
    _train(model, opt, rank, world_size, range(3, 6))
    _, master = averaged_reference(zero_sf.ScheduleFreeAdamW, SF_KW, _model(torch.bfloat16),
                                   _targets, [(range(6), world_size)])
    _assert_model_is(model, master, torch.bfloat16)


def _norm(step, world_size):
    """The averaged gradient's 2-norm at ``step`` (what grad_norm reports)."""
    targets = _targets(step, world_size)
    avg = [sum(t[i] for t in targets) / world_size for i in range(len(SHAPES))]
    return torch.sqrt(sum(a.double().pow(2).sum() for a in avg)).item()


def _load_elsewhere(rank, world_size, root):
    model = _model(torch.bfloat16)
    opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
    zero_sf.load(os.path.join(root, "ckpt"), model, opt)
    saved = torch.load(os.path.join(root, "consolidated.pt"))
    loaded = opt.consolidated_state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    for i, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(loaded["state"][i][key]),
                               torch.as_tensor(value)), (world_size, i, key)


def test_hierarchical_layouts_at_4_ranks_and_checkpoints_across_them(tmp_path):
    spawn(_layouts, 4, str(tmp_path))
    spawn(_load_elsewhere, 3, str(tmp_path))
    _load_elsewhere(0, 1, str(tmp_path))


def _misfits(rank, world_size):
    model = _model(torch.float32)
    ptrs = [p.data_ptr() for p in model]
    shard, replicate = zero_sf.hierarchical_groups(2)
    with pytest.raises(ValueError, match="pass both shard_group and replicate_group"):
        zero_sf.ZeroOptimizer(model.parameters(), shard_group=shard)
    with pytest.raises(ValueError, match="do not fit together"):  # 2 x 4 ranks != 4
        zero_sf.ZeroOptimizer(model.parameters(), shard_group=shard,
                              replicate_group=torch.distributed.group.WORLD)
    with pytest.raises(ValueError, match="Invalid shard_size value: 3"):
        zero_sf.hierarchical_groups(3)
    assert ptrs == [p.data_ptr() for p in model]


def test_hierarchical_groups_that_do_not_fit_raise():
    spawn(_misfits, 4)
