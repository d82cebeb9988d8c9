"""The model owns its weights (zero_sf/sharding/params.py): what a user does to
the model after building the optimizer reaches the fp32 master, a detached
parameter is bound again or refused, and ranks that disagree raise."""

import pytest
import torch
import torch.nn as nn

import zero_sf
from tests.distributed import spawn
from tests.helpers import averaged_reference
from tests.sharding.test_zero import LAYOUT, SF_KW, SHAPES, _assert_model_is, _model, _targets


def _grads(model, rank, world_size, step):
    for p, t in zip(model, _targets(step, world_size)[rank]):
        (p * t.to(p.dtype)).sum().backward()


def _pretrained(dtype):
    torch.manual_seed(123)
    return {f"{i}": torch.randn(s).to(dtype) for i, s in enumerate(SHAPES)}


def _weights_after_construction(rank, world_size):
    """Load a state dict after building the optimizer, train, re-init one
    layer mid-training, train: the same as a single process that did so."""
    for stage in (1, 2):
        for dtype in (torch.float32, torch.bfloat16):
            model = _model(dtype)
            opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage, **LAYOUT, **SF_KW)
            opt.train()
            model.load_state_dict(_pretrained(dtype))  # e.g. from_pretrained, fine-tuning
            start = [p.detach().clone() for p in model]
            ref, master = averaged_reference(zero_sf.ScheduleFreeAdamW, SF_KW, start, _targets, [])
            for step in range(5):
                if step == 3:
                    nn.init.zeros_(model[1])  # a layer re-initialised between steps
                    with torch.no_grad():
                        model[0][2].fill_(0.5)  # and one element written by hand
                        master[1].zero_()
                        master[0][2].fill_(0.5)
                _grads(model, rank, world_size, step)
                opt.step()
                for i, p in enumerate(master):
                    p.grad = sum(t[i] for t in _targets(step, world_size)) / world_size
                ref.step()
            try:
                _assert_model_is(model, master, dtype)
                opt.eval(), ref.eval()  # the master holds the same x
                _assert_model_is(model, master, dtype)
            except AssertionError as e:
                raise AssertionError(f"stage {stage}, {dtype}") from e


def test_weights_loaded_after_construction_are_what_trains():
    spawn(_weights_after_construction, 2)


def _dtype_round_trip(rank, world_size):
    for stage in (1, 2):
        model = _model(torch.bfloat16)
        opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage, **LAYOUT, **SF_KW)
        opt.train()
        _grads(model, rank, world_size, 0)
        opt.step()
        model.float()  # an fp32 evaluation, say
        model.bfloat16()  # p.data is a new tensor now
        for step in range(1, 4):
            _grads(model, rank, world_size, step)
            opt.step()
        _, master = averaged_reference(zero_sf.ScheduleFreeAdamW, SF_KW, _model(torch.bfloat16),
                                       _targets, [(range(4), world_size)])
        _assert_model_is(model, master, torch.bfloat16)
        # Training a model of another dtype than the one sharded: refused,
        # before anything changes, on every rank.
        model.double()
        _grads(model, rank, world_size, 4)
        state = [v.clone() for s in opt.inner.state.values() for v in s.values() if torch.is_tensor(v)]
        with pytest.raises(RuntimeError, match="was replaced by a tensor of dtype torch.float64"):
            opt.step()
        after = [v for s in opt.inner.state.values() for v in s.values() if torch.is_tensor(v)]
        assert all(torch.equal(a, b) for a, b in zip(state, after))


def test_dtype_round_trip_after_construction_keeps_training():
    spawn(_dtype_round_trip, 2)


def _disagreeing_ranks(rank, world_size):
    # Different hyperparameters at construction: refused on every rank.
    with pytest.raises(ValueError, match=r"ranks differ at construction: param group 0: lr: 0.001 on rank 1, 0.01 on rank 0; "):
        zero_sf.ZeroOptimizer(_model(torch.float32).parameters(), lr=1e-2 if rank == 0 else 1e-3)
    for stage in (1, 2):
        model = _model(torch.float32)
        opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage, **LAYOUT, **SF_KW)
        opt.train()
        _grads(model, rank, world_size, 0)
        opt.step()
        # A scheduler stepped (or an lr set) on one rank only.
        if rank == 1:
            opt.param_groups[0]["lr"] = 5e-3
        _grads(model, rank, world_size, 1)
        before = [p.detach().clone() for p in model]
        with pytest.raises(ValueError, match=r"ranks differ at step\(\): param group 0: lr: 0.005 on rank 1, 0.01 on rank 0; "):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model))
        opt.param_groups[0]["lr"] = SF_KW["lr"]
        opt.step()  # agreed again: the step goes through
        assert not all(torch.equal(a, b) for a, b in zip(before, model))
        # Weights loaded on one rank only.
        if rank == 0:
            model.load_state_dict(_pretrained(torch.float32))
        _grads(model, rank, world_size, 2)
        with pytest.raises(ValueError, match=r"ranks differ at step\(\): parameters written since the last step: \[\] on rank 1, \['#0 \(shape"):
            opt.step()


def test_ranks_that_disagree_raise_before_any_change():
    spawn(_disagreeing_ranks, 2)


def test_world_size_without_process_group_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 is set .* not initialized"):
        zero_sf.ZeroScheduleFreeAdamW(nn.Linear(2, 2).parameters())
    monkeypatch.setenv("WORLD_SIZE", "1")
    zero_sf.ZeroScheduleFreeAdamW(nn.Linear(2, 2).parameters())


# Issue #21: the configurations users run, as pinned scenarios (the engine
# against the single-process reference, tests/scenarios).
def test_bf16_models_with_decay_groups_and_fp32_norms_train_as_one_process():
    """Item 1: any bf16 model with two flat buffers (decay/no-decay groups, or
    fp32 norms in a bf16 model), and offload with two groups, crashed at
    construction ("Boolean value of Tensor with more than one value")."""
    from tests.scenarios.pinned import check, pin

    steps = (("train",), ("step", 1, False), ("step", 2, False), ("step", 1, False), ("eval",))
    check(pin("gpt2 bf16 decay groups", engine="zero", world=2, model="gpt2", dtype="bf16",
              grouping="decay", ops=steps),
          pin("llama bf16 fp32 norms", engine="zero", world=3, model="llama",
              dtype="bf16+fp32norms", stage=1, ops=steps),
          pin("llama bf16 fp32 norms resharded", engine="zero", world=2, model="llama",
              dtype="bf16+fp32norms", grouping="decay", reshard_to=3,
              ops=(("train",), ("step", 1, False), ("save",), ("load",), ("step", 1, False),
                   ("eval",))),
          pin("bert bf16 per-layer lr rmsprop", engine="zero", world=2, model="bert", dtype="bf16",
              grouping="per_layer_lr", rule="rmsprop", bucket_numel=300,
              ops=(("step", 1, False), ("step", 1, False))),
          pin("fp32 two groups offload", engine="zero", world=2, model="awkward", dtype="fp32",
              grouping="decay", offload=True, ops=steps))
