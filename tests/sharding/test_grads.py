"""Gradient arrival (zero_sf/sharding/grads.py) against torch's semantics:
gradients of any number of backward passes before step() sum, zero_grad()
discards, and stage 1 and 2 agree with a single process fed the same sums."""

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import zero_sf
from tests.distributed import spawn
from tests.helpers import averaged_reference
from tests.sharding.test_zero import LAYOUT, SF_KW, SHAPES, _assert_model_is, _model, _targets

# Each step is a list of backward passes; each pass names the params it
# touches and a target multiplier: loss = sum_i <p_i, c * t_i>, so the
# gradient of a pass is exactly c * t_i.  With |t| <= 7/64 and c multiples
# of 1/4, every sum over passes and 3 ranks is a multiple of 1/256 below 1:
# exact in bf16 (8 significant bits), so bf16 reductions are exact too.
ALL = list(range(len(SHAPES)))
PATTERNS = {
    # An auxiliary loss on a few params before the main one (small buckets:
    # the aux pass completes a bucket that is not first in launch order).
    "aux_then_main": [([5, 4], 0.5), (ALL, 1.0)],
    # ... and after it: the aux gradients arrive once every bucket was reduced.
    "main_then_aux": [(ALL, 1.0), ([0, 2], 0.25)],
    # Two micro-batches of unequal weight, then an aux pass on one param.
    "two_micro_then_aux": [(ALL, 0.75), (ALL, 0.25), ([1], 2.0)],
}


def _small_targets(step, world_size):
    g = torch.Generator().manual_seed(7 + step)
    return [[torch.randint(-7, 8, s, generator=g) / 64 for s in SHAPES] for _ in range(world_size)]


def _backward(model, targets, passes, dtype):
    for touched, c in passes:
        sum((model[i] * (c * targets[i]).to(dtype)).sum() for i in touched).backward()


def _expected(passes):
    """Targets for the reference: the sum of every pass's gradient."""
    def targets(step, world_size):
        per_rank = _small_targets(step, world_size)
        return [[sum((c * t[i] for touched, c in passes if i in touched), torch.zeros(SHAPES[i]))
                 for i in ALL] for t in per_rank]
    return targets


def _several_passes(rank, world_size):
    for stage in (1, 2):
        for dtype in (torch.float32, torch.bfloat16):
            for name, passes in PATTERNS.items():
                model = _model(dtype)
                opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage, **LAYOUT, **SF_KW)
                opt.train()
                for step in range(4):
                    _backward(model, _small_targets(step, world_size)[rank], passes, dtype)
                    opt.step()
                _, master = averaged_reference(zero_sf.ScheduleFreeAdamW, SF_KW, _model(dtype),
                                               _expected(passes), [(range(4), world_size)])
                try:
                    _assert_model_is(model, master, dtype)
                except AssertionError as e:
                    raise AssertionError(f"stage {stage}, {dtype}, {name}") from e
                if stage == 2:  # only the gradient shard is left: no staging leaks on
                    shard = sum(buf.shard_numel for buf in opt.buffers) * model[0].element_size()
                    assert opt.memory_bytes()["grads"] == shard, (name, dtype)


@pytest.mark.parametrize("world_size", [2, 3])
def test_several_backward_passes_per_step_sum_as_in_torch(world_size):
    spawn(_several_passes, world_size)


# ------------------------------------------------------------ zero_grad
def _zero_grad_between(rank, world_size):
    """micro-batch 1, model.zero_grad(), micro-batch 2, step == micro-batch 2 alone."""
    for stage in (1, 2):
        for set_to_none in (True, False):
            for dtype in (torch.float32, torch.bfloat16):
                model = _model(dtype)
                opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage, **LAYOUT, **SF_KW)
                opt.train()
                for step in range(3):
                    noise = _targets(100 + step, world_size)[rank]
                    _backward(model, noise, [(ALL, 1.0)], dtype)
                    model.zero_grad(set_to_none=set_to_none)
                    _backward(model, _targets(step, world_size)[rank], [(ALL, 1.0)], dtype)
                    opt.step()
                _, master = averaged_reference(zero_sf.ScheduleFreeAdamW, SF_KW, _model(dtype),
                                               _targets, [(range(3), world_size)])
                try:
                    _assert_model_is(model, master, dtype)
                except AssertionError as e:
                    raise AssertionError(f"stage {stage}, set_to_none={set_to_none}, {dtype}") from e
                # zero_grad after the last backward: as in torch, set_to_none
                # leaves no gradient (the sharded optimizer refuses to step
                # without one), zeroing leaves a zero gradient that steps.
                _backward(model, _targets(9, world_size)[rank], [(ALL, 1.0)], dtype)
                model.zero_grad(set_to_none=set_to_none)
                before = [p.detach().clone() for p in model]
                if set_to_none:
                    with pytest.raises(RuntimeError, match="received no gradient"):
                        opt.step()
                    assert all(torch.equal(a, b) for a, b in zip(before, model))
                    opt.zero_grad()
                else:
                    opt.step()
                    zeros = lambda step, ws: (_targets(step, ws) if step < 3 else
                                              [[torch.zeros(s) for s in SHAPES]] * ws)
                    _, master = averaged_reference(zero_sf.ScheduleFreeAdamW, SF_KW, _model(dtype),
                                                   zeros, [(range(4), world_size)])
                    _assert_model_is(model, master, dtype)


def test_model_zero_grad_between_micro_batches_discards_as_in_torch():
    spawn(_zero_grad_between, 2)


def _replaced_grad(rank, world_size):
    """Stage 1: a user-assigned p.grad (not the flat buffer's view) is what steps."""
    model = _model(torch.float32)
    opt = zero_sf.ZeroOptimizer(model.parameters(), stage=1, **LAYOUT, **SF_KW)
    opt.train()
    for step in range(3):
        for p, t in zip(model, _targets(step, world_size)[rank]):
            p.grad = t.clone()
        opt.step()
    _, master = averaged_reference(zero_sf.ScheduleFreeAdamW, SF_KW, _model(torch.float32),
                                   _targets, [(range(3), world_size)])
    _assert_model_is(model, master, torch.float32)


def test_stage1_uses_a_gradient_the_user_assigned():
    spawn(_replaced_grad, 2)


# ------------------------------------------------ reentrant checkpointing
class Tied(nn.Module):
    """W is used inside a reentrant activation checkpoint and again outside:
    its gradient arrives in two autograd passes of one backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 6) / 3)
        self.b = nn.Parameter(torch.randn(6) / 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = checkpoint(lambda x: torch.tanh(x @ self.w + self.b), x, use_reentrant=True)
        return self.head(torch.tanh(h @ self.w))


def _data(rank, step):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(5, 6, generator=g).requires_grad_(), torch.randn(5, 2, generator=g)


def _tied(rank, world_size):
    for stage in (1, 2):
        model, ref_model = Tied(), Tied()
        opt = zero_sf.ZeroScheduleFreeAdamW(model.parameters(), stage=stage, bucket_numel=40,
                                            align=2, lr=1e-2)
        ref = zero_sf.ScheduleFreeAdamW(ref_model.parameters(), lr=1e-2)
        opt.train(), ref.train()
        for step in range(4):
            x, y = _data(rank, step)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            grads = []
            for r in range(world_size):
                ref_model.zero_grad()
                x, y = _data(r, step)
                nn.functional.mse_loss(ref_model(x), y).backward()
                grads.append([p.grad.clone() for p in ref_model.parameters()])
            for i, p in enumerate(ref_model.parameters()):
                p.grad = sum(g[i] for g in grads) / world_size
            ref.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


def test_weight_tied_across_reentrant_checkpoint():
    spawn(_tied, 2)


# ---------------------------------------------- stage 2's freed gradients
def _reading_freed_grads(rank, world_size):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = zero_sf.ZeroScheduleFreeAdamW(model.parameters(), stage=2)
    opt.train()
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="already reduce-scattered"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match="clip_grad_norm_"):
        model[0].weight.grad.norm()
    opt.step()  # still steps normally
    assert all(p.grad is None for p in model.parameters())


def test_stage2_reading_a_freed_gradient_raises():
    spawn(_reading_freed_grads, 2)
