"""zero_sf under DeepSpeed ZeRO-3 (zero_sf/integrations/deepspeed_zero3.py)
on 2 and 3 gloo ranks, against a single-process ScheduleFreeAdamW fed the
average of the ranks' gradients: several sub-groups, decay / no-decay
groups, persistent and partitioned parameters, fp32 and bf16, a loss whose
gradients depend on the weights."""

import functools

import pytest
import torch
import torch.nn as nn

pytest.importorskip("deepspeed", reason="pip install zero-sf[deepspeed]")

import zero_sf  # noqa: E402
from tests.distributed import spawn  # noqa: E402
from tests.test_deepspeed import _ds_setup  # noqa: E402

SF_KW = dict(lr=2e-2, warmup_steps=2, weight_decay=0.05)


class MLP(nn.Module):
    def __init__(self, out=3):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(13, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, out)

    def forward(self, x, y):
        out = self.fc2(torch.tanh(self.norm(self.fc1(x.to(self.fc1.weight.dtype)))))
        return ((out.float() - y) ** 2).mean()


def groups(model):
    """The Trainer's split: weights decay, biases and norms do not."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 13, generator=g), torch.randn(4, 3, generator=g)


def config(bf16=False, sub_group_size=40, persistence=0, **zero):
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "steps_per_print": 10**9, "bf16": {"enabled": bf16},
            "zero_optimization": {"stage": 3, "sub_group_size": sub_group_size,
                                  "stage3_param_persistence_threshold": persistence, **zero},
            "optimizer": {"type": "ScheduleFreeAdamW", "params": SF_KW}}


class Reference:
    """Single process: ScheduleFreeAdamW on fp32 masters (under bf16 the
    engine's start from the bf16-cast model), fed the averaged gradients
    the engine's optimizer received (recorded by :func:`record_grads`)."""

    def __init__(self, bf16, cls=zero_sf.ScheduleFreeAdamW, kw=SF_KW):
        self.model = MLP()
        if bf16:
            self.model.bfloat16().float()
        self.opt = cls(groups(self.model), **kw)
        if hasattr(self.opt, "train"):
            self.opt.train()

    def step(self, grads):
        for p, g in zip(self.model.parameters(), grads):
            p.grad = g
        self.opt.step()


def full(engine, flats):
    """Per model parameter (in model order), the whole tensor put together
    from every rank's sub-group partitions ``flats`` (parameter j holds
    ceil(numel_j / N) elements of each rank's partition, in sub-group order)."""
    import torch.distributed as dist
    zopt, world_size = engine.optimizer, dist.get_world_size()
    out = {}
    for i, params in enumerate(zopt.fp16_groups):
        pieces = [torch.empty_like(flats[i]) for _ in range(world_size)]
        dist.all_gather(pieces, flats[i].contiguous())
        offset = 0
        for p in params:
            n = p.partition_numel()
            whole = torch.cat([piece[offset:offset + n] for piece in pieces])[:p.ds_numel]
            out[id(p)] = whole.reshape(p.ds_shape).float()
            offset += n
    return [out[id(p)] for p in engine.module.parameters()]


def record_grads(engine):
    """A list that receives, per engine step, the partitions' gradients as
    each step() call of the client optimizer sees them."""
    zopt = engine.optimizer
    basic, seen = zopt.optimizer, []
    inner_step = basic.step

    def step(*args, **kwargs):
        for g in basic.param_groups:
            for flat in g["params"]:
                i = next(j for j, f in enumerate(zopt.fp32_partitioned_groups_flat) if f is flat)
                seen[-1][i] = flat.grad.detach().clone()
        return inner_step(*args, **kwargs)

    basic.step = step
    return seen


def gathered(engine):
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().float().clone() for p in params]


def assert_model(engine, ref, bf16):
    """The fp32 partitions equal the reference's masters; the model's
    weights, gathered, are them rounded to the model's dtype."""
    masters = full(engine, engine.optimizer.fp32_partitioned_groups_flat)
    for got, want in zip(masters, ref.model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
    for got, want in zip(gathered(engine), masters):
        want = want.bfloat16().float() if bf16 else want
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def engine_from(cfg, route, model=None):
    import zero_sf.deepspeed as zsd
    model = model or MLP()
    if route == "config":
        engine, *_ = zsd.initialize(model=model, model_parameters=groups(model), config=cfg)
    elif route == "client":
        cfg = dict(cfg)
        del cfg["optimizer"]
        engine, *_ = zsd.initialize(model=model, model_parameters=groups(model), config=cfg,
                                    optimizer=functools.partial(zero_sf.ScheduleFreeAdamW, **SF_KW))
    else:  # register() + a plain deepspeed.initialize, as Accelerate does
        import deepspeed
        zsd.register()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups(model),
                                          config=zsd.check_config(cfg))
    return engine


def train(engine, rank, steps, ref, grads):
    for step in steps:
        engine.backward(engine(*batch(step, rank)))
        grads.append({})
        engine.step()
        ref.step(full(engine, grads[-1]))


def _equivalence(rank, world_size, root):
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    offload = {"offload_optimizer": {"device": "cpu", "pin_memory": True},
               "offload_param": {"device": "cpu"}}  # the fused CPU backend steps there
    cases = [(False, 12, 0, "config", {}), (False, 10**9, 10**5, "client", {}),
             (True, 12, 10**5, "plain", {}), (True, 25, 0, "config", {}),
             (False, 12, 0, "config", offload)]
    for bf16, sub_group_size, persistence, route, extra in cases:
        engine = engine_from(config(bf16, sub_group_size, persistence, **extra), route)
        assert bool(extra) == engine.zero_cpu_offload()
        zopt = engine.optimizer
        if sub_group_size == 12:
            assert len(zopt.fp16_groups) >= 3  # several sub-groups per param group
        basic = zsd._basic_optimizer(engine)
        zsd.train(engine)
        ref, grads = Reference(bf16), record_grads(engine)
        train(engine, rank, range(4), ref, grads)
        assert [g["k"] for g in basic.param_groups] == [4, 4], (route, sub_group_size)
        assert_model(engine, ref, bf16)
        # eval(): the model (gathered by ZeRO-3's hooks) holds x; train() y
        zsd.eval(engine), ref.opt.eval()
        assert not engine.module.training
        assert_model(engine, ref, bf16)
        with torch.no_grad():  # the forward sees x too
            torch.testing.assert_close(engine(*batch(0, rank)).float(),
                                       ref.model(*batch(0, rank)).float(),
                                       rtol=0.05 if bf16 else 1e-5, atol=1e-5)
        zsd.train(engine), ref.opt.train()
        assert_model(engine, ref, bf16)
        # Accelerate's optimizer.eval() reaches only the basic optimizer: the
        # model follows once resolve() has seen the engine (above)
        basic.eval(), ref.opt.eval()
        assert_model(engine, ref, bf16)
        basic.train(), ref.opt.train()
        with zero_sf.eval_mode(engine), zero_sf.eval_mode(ref.opt):
            assert_model(engine, ref, bf16)
        train(engine, rank, range(4, 6), ref, grads)
        assert [g["k"] for g in basic.param_groups] == [6, 6]
        assert_model(engine, ref, bf16)
        # zero_sf.export writes x, gathered from the partitions; training goes on at y
        import os

        from safetensors.torch import load_file
        file = zero_sf.export(os.path.join(root, f"{route}{bf16}"), engine, engine)
        ref.opt.eval()
        shipped = load_file(file)
        for name, p in ref.model.named_parameters():
            want = p.detach().bfloat16() if bf16 else p.detach()
            assert torch.equal(shipped[name], want), name
        ref.opt.train()
        assert basic.in_train_mode()
        assert_model(engine, ref, bf16)


@pytest.mark.parametrize("world_size", [2, 3])
def test_zero3_matches_single_process_in_train_and_eval_mode(tmp_path, world_size):
    spawn(_equivalence, world_size, str(tmp_path))


def _rmsprop(rank, world_size, root):
    """zero_sf.RMSProp (bias-corrected: Adam with beta1=0) from the config at
    ZeRO-3: its per-partition step counts advance once per engine step, also
    after zsd.load_checkpoint (found by the scenario generator, seed 5074:
    the loaded count was one tensor shared by every partition, and each
    sub-group's step added to it)."""
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    kw = dict(lr=1e-2, alpha=0.99, bias_correction=True, weight_decay=0.05)
    cfg = config(True, sub_group_size=12)
    cfg["optimizer"] = {"type": "ZeroSFRMSProp", "params": kw}
    engine = engine_from(cfg, "config")
    ref, grads = Reference(True, zero_sf.RMSProp, kw), record_grads(engine)
    train(engine, rank, range(4), ref, grads)

    def steps(engine):
        basic = engine.optimizer.optimizer
        return {int(basic.state[f]["step"]) for f in engine.optimizer.fp32_partitioned_groups_flat}

    assert steps(engine) == {4}
    assert_model(engine, ref, True)
    engine.save_checkpoint(root)
    engine = engine_from(cfg, "config")
    zsd.load_checkpoint(engine, root)
    grads = record_grads(engine)
    train(engine, rank, range(4, 6), ref, grads)
    assert steps(engine) == {6}
    assert_model(engine, ref, True)


def test_rmsprop_under_zero3_matches_single_process_and_resumes(tmp_path):
    spawn(_rmsprop, 2, str(tmp_path))


def _unresolved_switch(rank, world_size):
    """register() + a plain deepspeed.initialize, stepped by the engine, the
    basic optimizer switched directly (Accelerate's optimizer.eval()) before
    anything resolved the engine: k still counts engine steps, and the
    switch refuses with nothing changed instead of flipping the flag while
    the partitions stay at y."""
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    engine = engine_from(config(sub_group_size=12), "plain")
    basic = engine.optimizer.optimizer
    basic.train()  # nothing to move yet: z is created at the first step
    ref, grads = Reference(False), record_grads(engine)
    train(engine, rank, range(3), ref, grads)
    assert [g["k"] for g in basic.param_groups] == [3, 3]
    before = [f.clone() for f in engine.optimizer.fp32_partitioned_groups_flat]
    with pytest.raises(RuntimeError, match="in none of its param groups.*ZeRO-3"):
        basic.eval()
    assert basic.in_train_mode()
    assert all(torch.equal(a, b) for a, b in
               zip(before, engine.optimizer.fp32_partitioned_groups_flat))
    zsd.eval(engine), ref.opt.eval()  # resolves: from now on every switch reaches the model
    assert_model(engine, ref, False)
    basic.train(), ref.opt.train()
    assert_model(engine, ref, False)
    # A model built partitioned (deepspeed.zero.Init): the same training
    import deepspeed
    cfg = config(sub_group_size=12)
    with deepspeed.zero.Init(config_dict_or_path=zsd.check_config(cfg)):
        model = MLP()
    engine = engine_from(cfg, "config", model)
    zsd.train(engine)
    ref, grads = Reference(False), record_grads(engine)
    train(engine, rank, range(3), ref, grads)
    assert_model(engine, ref, False)
    zsd.eval(engine), ref.opt.eval()
    assert_model(engine, ref, False)


def test_switching_an_unresolved_zero3_optimizer_refuses_clearly_and_zero_init_trains():
    spawn(_unresolved_switch, 2)


@pytest.mark.parametrize("zero, match", [
    ({"offload_optimizer": {"device": "nvme"}}, "offload_optimizer.device='nvme'"),
    ({"offload_param": {"device": "nvme"}}, "offload_param.device='nvme'"),
    ({"zero_quantized_weights": True}, "zero_quantized_weights=true"),
    ({"zero_quantized_gradients": True}, "zero_quantized_gradients=true"),
    ({"zero_hpz_partition_size": 2}, "zero_hpz_partition_size=2"),
])
def test_what_zero3_cannot_do_exactly_is_refused_before_anything_is_built(zero, match):
    import zero_sf.deepspeed as zsd
    with pytest.raises(ValueError, match=match):
        zsd.check_config(config(**zero))
    assert zsd.check_config(config())["zero_allow_untested_optimizer"] is True


# (bf16, sub_group_size, persistence, save in eval mode, extra zero_optimization)
CKPT_CASES = [(False, 12, 0, False, {}),
              (True, 25, 10**5, True, {"offload_optimizer": {"device": "cpu"}})]


def assert_state(engine, ref):
    basic = engine.optimizer.optimizer
    for key in ("z", "exp_avg_sq"):
        flats = [basic.state[f][key] for f in engine.optimizer.fp32_partitioned_groups_flat]
        for got, p in zip(full(engine, flats), ref.model.parameters()):
            torch.testing.assert_close(got, ref.opt.state[p][key], rtol=0, atol=1e-6)


def _save(rank, world_size, root):
    import os

    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    for c, (bf16, sub_group_size, persistence, in_eval, extra) in enumerate(CKPT_CASES):
        engine = engine_from(config(bf16, sub_group_size, persistence, **extra), "config")
        zsd.train(engine)
        ref, grads = Reference(bf16), record_grads(engine)
        train(engine, rank, range(3), ref, grads)
        if in_eval:  # as ScheduleFreeCallback saves: x in the checkpoint
            zsd.eval(engine), ref.opt.eval()
        engine.save_checkpoint(os.path.join(root, str(c)))
        if rank == 0:
            torch.save({"model": ref.model.state_dict(), "opt": ref.opt.state_dict()},
                       os.path.join(root, f"ref{c}.pt"))


def _resume(rank, world_size, root):
    import os

    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    for c, (bf16, sub_group_size, persistence, in_eval, extra) in enumerate(CKPT_CASES):
        if c == 0:  # another model's checkpoint: refused, nothing changed
            other = engine_from(config(bf16, sub_group_size, persistence), "config", MLP(out=4))
            before = [f.clone() for f in other.optimizer.fp32_partitioned_groups_flat]
            with pytest.raises(ValueError, match="checkpoint of another model"):
                zsd.load_checkpoint(other, os.path.join(root, str(c)))
            assert all(torch.equal(a, b) for a, b in
                       zip(before, other.optimizer.fp32_partitioned_groups_flat))
            assert not other.optimizer.optimizer.state
        engine = engine_from(config(bf16, sub_group_size, persistence, **extra), "config")
        zsd.load_checkpoint(engine, os.path.join(root, str(c)))
        assert engine.global_steps == 3
        ref = Reference(bf16)
        saved = torch.load(os.path.join(root, f"ref{c}.pt"))
        ref.model.load_state_dict(saved["model"])
        ref.opt.load_state_dict(saved["opt"])
        basic = zsd._basic_optimizer(engine)
        assert basic.in_train_mode() is not in_eval
        assert [g["k"] for g in basic.param_groups] == [3, 3]
        assert_model(engine, ref, bf16)
        assert_state(engine, ref)
        zsd.train(engine), ref.opt.train()
        grads = record_grads(engine)
        train(engine, rank, range(3, 6), ref, grads)
        assert [g["k"] for g in basic.param_groups] == [6, 6]
        assert_model(engine, ref, bf16)
        assert_state(engine, ref)
        zsd.eval(engine), ref.opt.eval()
        assert_model(engine, ref, bf16)


# 2 -> 3 (uneven slices) by default; 2 -> 2 and 2 -> 1 in `make test-all`.
@pytest.mark.parametrize("loads", [(3,), pytest.param((2, 1), marks=pytest.mark.slow)])
def test_checkpoint_save_at_2_load_at(tmp_path, loads):
    spawn(_save, 2, str(tmp_path))
    for world_size in loads:
        spawn(_resume, world_size, str(tmp_path))


def _compressed(rank, world_size):
    """state_dtype="bfloat16" from the config under ZeRO-3: z and exp_avg_sq
    are bf16 and equal, bit for bit, to the single-process optimizer's.  A
    partition holds a slice of each of several parameters, so its elements'
    numbers jump at every slice: with one number per partition the ranks
    would draw other random bits and round some elements the other way."""
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    kw = dict(SF_KW, state_dtype="bfloat16")
    for bf16 in (False, True):
        cfg = config(bf16, sub_group_size=12)
        cfg["optimizer"]["params"] = kw
        engine = engine_from(cfg, "config")
        zsd.train(engine)
        ref, grads = Reference(bf16), record_grads(engine)
        ref.opt = zero_sf.ScheduleFreeAdamW(groups(ref.model), **kw)
        ref.opt.train()
        train(engine, rank, range(4), ref, grads)
        basic = engine.optimizer.optimizer
        for key in ("z", "exp_avg_sq"):
            flats = [basic.state[f][key] for f in engine.optimizer.fp32_partitioned_groups_flat]
            assert all(f.dtype == torch.bfloat16 for f in flats)
            for got, p in zip(full(engine, flats), ref.model.parameters()):
                want = ref.opt.state[p][key]
                assert torch.equal(got.bfloat16().view(torch.int16), want.view(torch.int16)), key
        assert_model(engine, ref, bf16)


def test_bf16_state_matches_single_process_bit_for_bit():
    spawn(_compressed, 3)
