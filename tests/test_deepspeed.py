"""zero_sf under DeepSpeed ZeRO-1/2 (ZeRO-3: tests/integrations/test_deepspeed_zero3.py) on 2 gloo ranks (CPU), against
single-process zero_sf runs fed the averaged gradients."""

import functools
import os

import pytest
import torch
import torch.nn as nn

pytest.importorskip("deepspeed", reason="pip install zero-sf[deepspeed]")

import zero_sf  # noqa: E402
import zero_sf.modes  # noqa: E402
from tests.distributed import spawn  # noqa: E402
from tests.helpers import averaged_reference  # noqa: E402

SHAPES = [(13, 7), (7,), (5, 3), (3,)]
SF_KW = dict(lr=1e-2, warmup_steps=2, weight_decay=0.01)
RMS_KW = dict(lr=1e-2, alpha=0.99, bias_correction=True)


class Targets(nn.Module):
    """loss = sum_i <p_i, t_i>: the gradient of p_i is exactly t_i."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s)) for s in SHAPES])

    def forward(self, *targets):
        return sum((p * t.to(p.dtype)).sum() for p, t in zip(self.ps, targets))


def _targets(step, world_size):
    # Multiples of 1/64 below 0.5: bf16-exact, and so are their sums over ranks.
    g = torch.Generator().manual_seed(step)
    return [[torch.randint(-31, 32, s, generator=g) / 64 for s in SHAPES] for _ in range(world_size)]


def _ds_setup(rank, world_size):
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import deepspeed
    # Skip the ~60 s JIT build of the shared-memory comm op (docs/design.md §6).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")  # reuses the harness's gloo group
    import deepspeed.utils.logging as dsl
    dsl.logger.setLevel("ERROR")


def _config(stage, bf16, clip, opt_name="sf", via_config=True):
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "gradient_clipping": clip,
           "bf16": {"enabled": bf16}, "steps_per_print": 10**9}
    if via_config:
        name, kw = ("ScheduleFreeAdamW", SF_KW) if opt_name == "sf" else ("ZeroSFRMSProp", RMS_KW)
        cfg["optimizer"] = {"type": name, "params": kw}
    return cfg


def _reference(opt_name, plan, clip, bf16=False):
    """Single process: fp32 master, averaged grads, torch's clipping.  Under
    bf16 DeepSpeed's fp32 master starts from the bf16-cast model."""
    cls, kw = (zero_sf.ScheduleFreeAdamW, SF_KW) if opt_name == "sf" else (zero_sf.RMSProp, RMS_KW)
    init = [p.bfloat16() if bf16 else p for p in Targets().ps]
    return averaged_reference(cls, kw, init, _targets, plan, clip=clip)


def _train(engine, rank, world_size, steps):
    for step in steps:
        loss = engine(*_targets(step, world_size)[rank])
        engine.backward(loss)
        engine.step()


def _assert_params(engine, master, bf16, ulps=0):
    for p, m in zip(engine.module.ps, master):
        if bf16:  # the model holds the fp32 master, rounded to nearest even
            torch.testing.assert_close(p.detach().float(), m.detach().bfloat16().float(),
                                       rtol=ulps * 2**-7, atol=0)
        else:
            torch.testing.assert_close(p.detach(), m.detach(), rtol=0, atol=1e-6)


def _engine(stage, bf16, clip, opt_name="sf", via_config=True):
    import zero_sf.deepspeed as zsd
    model = Targets()
    client = None
    if not via_config:
        cls, kw = (zero_sf.ScheduleFreeAdamW, SF_KW) if opt_name == "sf" else (zero_sf.RMSProp, RMS_KW)
        client = functools.partial(cls, **kw)  # a callable: DeepSpeed passes the params
    engine, *_ = zsd.initialize(model=model, model_parameters=model.parameters(),
                                config=_config(stage, bf16, clip, opt_name, via_config),
                                optimizer=client)
    zsd.train(engine)
    return engine


def _accelerate_route(rank, world_size):
    """What Accelerate (and the Trainer on top of it) does: a plain
    deepspeed.initialize from a config naming our optimizer, then
    optimizer.train()/eval() on its DeepSpeedOptimizerWrapper, which reach
    only the basic optimizer (accelerate #4159).  Once zero_sf.modes.resolve
    has seen the wrapper (ScheduleFreeCallback.on_train_begin does that),
    the model follows every switch."""
    import deepspeed
    from accelerate.utils import DeepSpeedOptimizerWrapper

    import zero_sf.deepspeed as zsd
    zsd.register()
    cfg = zsd.check_config(_config(2, True, 0.0))
    model = Targets()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    # accelerate's own class and its train()/eval() code; its __init__ needs an
    # Accelerator, which this process does not build: only .optimizer is set.
    wrapped = object.__new__(DeepSpeedOptimizerWrapper)
    wrapped.optimizer = engine.optimizer
    zero_sf.modes.resolve(wrapped)
    wrapped.train()
    _train(engine, rank, world_size, range(3))
    ref, master = _reference("sf", [(range(3), world_size)], 0.0, True)
    _assert_params(engine, master, True)
    wrapped.eval(), ref.eval()  # AcceleratedOptimizer.eval -> basic.eval()
    _assert_params(engine, master, True)
    wrapped.train(), ref.train()
    _assert_params(engine, master, True)


def _equivalence(rank, world_size):
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    for stage in (1, 2):
        for bf16 in (False, True):
            for clip in (0.0, 0.05):
                for via_config in (True, False):
                    for opt_name in (("sf", "rmsprop") if via_config and clip == 0.0 else ("sf",)):
                        engine = _engine(stage, bf16, clip, opt_name, via_config)
                        basic = zsd._basic_optimizer(engine)
                        assert len(basic.param_groups[0]["params"]) == 1  # one flat partition
                        _train(engine, rank, world_size, range(5))
                        ref, master = _reference(opt_name, [(range(5), world_size)], clip, bf16)
                        _assert_params(engine, master, bf16)
                        if opt_name == "sf":
                            # eval(): the *model* now computes with x, train() restores y.
                            zsd.eval(engine), ref.eval()
                            assert not engine.module.training
                            _assert_params(engine, master, bf16)
                            zsd.train(engine), ref.train()
                            _assert_params(engine, master, bf16)
                            # Accelerate's eval() calls the basic optimizer directly
                            # (accelerate #4159): the model must follow it too.
                            basic.eval(), ref.eval()
                            _assert_params(engine, master, bf16)
                            basic.train(), ref.train()
                            with zero_sf.eval_mode(engine), zero_sf.eval_mode(ref):
                                _assert_params(engine, master, bf16)
                            _assert_params(engine, master, bf16)
    _accelerate_route(rank, world_size)
    # Stage 0 in fp32: the optimizer sees the model's own parameters.
    engine = _engine(0, False, 0.0)
    _train(engine, rank, world_size, range(5))
    _assert_params(engine, _reference("sf", [(range(5), world_size)], 0.0)[1], False)


def test_config_and_client_routes_match_single_process():
    spawn(_equivalence, 2)


def _refusals(rank, world_size):
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    with pytest.raises(ValueError, match="ZeRO stage 0 with bf16/fp16"):
        _engine(0, True, 0.0)
    cfg = _config(2, False, 0.0)
    cfg["zero_allow_untested_optimizer"] = False
    with pytest.raises(ValueError, match="zero_allow_untested_optimizer is false"):
        zsd.initialize(model=Targets(), model_parameters=Targets().parameters(), config=cfg)
    # Without the wrapper, DeepSpeed itself resolves the config name once registered.
    import deepspeed
    zsd.register()
    cfg = _config(1, False, 0.0)
    cfg["zero_allow_untested_optimizer"] = True
    model = Targets()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert type(engine.optimizer.optimizer) is zero_sf.ScheduleFreeAdamW


def _compressed(rank, world_size, root):
    """state_dtype="bfloat16" through the config's params, ZeRO-1/2, fp32 and
    bf16 models: z and exp_avg_sq are bf16 and equal, bit for bit, to the
    single-process optimizer's; this needs zsd.initialize's numbering of the
    partitions (with every rank's partition numbered from 0, rank 1 would
    draw rank 0's random bits and round a third of its elements the other
    way).  master_weights="remainder" is refused with DeepSpeed named."""
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    kw = dict(SF_KW, state_dtype="bfloat16")
    for stage, bf16 in ((1, False), (2, True)):
        cfg = _config(stage, bf16, 0.0)
        cfg["optimizer"]["params"] = kw
        model = Targets()
        engine, *_ = zsd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        zsd.train(engine)
        _train(engine, rank, world_size, range(4))
        init = [p.bfloat16() if bf16 else p for p in Targets().ps]
        ref, master = averaged_reference(zero_sf.ScheduleFreeAdamW, kw, init, _targets,
                                         [(range(4), world_size)])
        basic = zsd._basic_optimizer(engine)
        part = engine.optimizer.single_partition_of_fp32_groups[0]
        n = part.numel()
        for key in ("z", "exp_avg_sq"):
            flat = torch.cat([ref.state[m][key].reshape(-1) for m in master])[rank * n:(rank + 1) * n]
            got = basic.state[part][key]
            assert got.dtype == torch.bfloat16
            assert torch.equal(got[:flat.numel()].view(torch.int16), flat.view(torch.int16)), key
        flat = torch.cat([m.detach().reshape(-1) for m in master])[rank * n:(rank + 1) * n]
        torch.testing.assert_close(part[:flat.numel()], flat, rtol=0, atol=1e-6)
        # zsd.load_checkpoint keeps the loader's state dtype: bf16 -> bf16 exactly,
        # bf16 -> an fp32-state engine as the exact upcast
        folder = os.path.join(root, str(stage))
        engine.save_checkpoint(folder)
        saved = {k: basic.state[part][k].clone() for k in ("z", "exp_avg_sq")}
        for load_kw in (kw, SF_KW):
            cfg2 = _config(stage, bf16, 0.0)
            cfg2["optimizer"]["params"] = load_kw
            m2 = Targets()
            e2, *_ = zsd.initialize(model=m2, model_parameters=m2.parameters(), config=cfg2)
            zsd.load_checkpoint(e2, folder)
            b2 = zsd._basic_optimizer(e2)
            p2 = e2.optimizer.single_partition_of_fp32_groups[0]
            assert b2.param_groups[0]["state_dtype"] == load_kw.get("state_dtype")
            for k, v in saved.items():
                got = b2.state[p2][k]
                assert got.dtype == (torch.bfloat16 if load_kw is kw else torch.float32), k
                assert torch.equal(got, v.to(got.dtype)), k
    cfg = _config(2, True, 0.0)
    cfg["optimizer"]["params"] = dict(SF_KW, master_weights="remainder")
    with pytest.raises(ValueError, match="master_weights='remainder' cannot be used under DeepSpeed"):
        zsd.initialize(model=Targets(), model_parameters=Targets().parameters(), config=cfg)


def test_bf16_state_from_the_config_matches_single_process_bit_for_bit(tmp_path):
    spawn(_compressed, 2, str(tmp_path))


def _offload(rank, world_size, root):
    """ZeRO-Offload (offload_optimizer to the CPU, pinned or not) with our
    optimizers from the config and as client optimizers: the same numbers
    as a single process, eval/train reaching the model."""
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    for stage in (1, 2):
        for pin in (False, True):
            for via_config in (True, False):
                cfg = _config(stage, False, 0.0, via_config=via_config)
                cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
                client = None if via_config else functools.partial(zero_sf.ScheduleFreeAdamW, **SF_KW)
                model = Targets()
                engine, *_ = zsd.initialize(model=model, model_parameters=model.parameters(),
                                            config=cfg, optimizer=client)
                assert engine.zero_cpu_offload()
                zsd.train(engine)
                _train(engine, rank, world_size, range(5))
                ref, master = _reference("sf", [(range(5), world_size)], 0.0)
                _assert_params(engine, master, False)
                zsd.eval(engine), ref.eval()
                _assert_params(engine, master, False)
    cfg = _config(2, False, 0.0)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}

    def offloaded():
        model = Targets()
        engine, *_ = zsd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        zsd.train(engine)
        return engine

    # zsd.load_checkpoint under offload: the host partitions and state load
    engine = offloaded()
    _train(engine, rank, world_size, range(3))
    engine.save_checkpoint(os.path.join(root, "offload"))
    engine = offloaded()
    zsd.load_checkpoint(engine, os.path.join(root, "offload"))
    assert engine.global_steps == 3
    _assert_partition(engine, rank, *_reference("sf", [(range(3), world_size)], 0.0))
    _train(engine, rank, world_size, range(3, 6))
    _assert_params(engine, _reference("sf", [(range(6), world_size)], 0.0)[1], False)
    cfg["zero_force_ds_cpu_optimizer"] = True
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer is true"):
        zsd.check_config(cfg)


def test_zero_offload_matches_single_process_and_resumes(tmp_path):
    spawn(_offload, 2, str(tmp_path))


def test_refused_configurations_raise_clear_errors():
    spawn(_refusals, 2)


def _save(rank, world_size, root):
    _ds_setup(rank, world_size)
    for i, (stage, bf16) in enumerate([(1, False), (2, True)]):
        engine = _engine(stage, bf16, 0.0)
        _train(engine, rank, world_size, range(3))
        engine.save_checkpoint(os.path.join(root, str(i)))


def _assert_partition(engine, rank, ref, master):
    """This rank's fp32 partition, z and exp_avg_sq themselves, not only the
    bf16 model (a master refreshed from the bf16 model would hide there)."""
    import zero_sf.deepspeed as zsd
    basic = zsd._basic_optimizer(engine)
    part = engine.optimizer.single_partition_of_fp32_groups[0]
    order = [next(j for j, q in enumerate(engine.module.ps) if q is p)
             for p in engine.optimizer.bit16_groups[0]]
    for name, tensors in (("master", master), ("z", [ref.state[m]["z"] for m in master]),
                          ("exp_avg_sq", [ref.state[m]["exp_avg_sq"] for m in master])):
        flat = torch.cat([tensors[j].detach().reshape(-1) for j in order])
        mine = flat[rank * part.numel():(rank + 1) * part.numel()]
        got = part if name == "master" else basic.state[part][name]
        torch.testing.assert_close(got[:mine.numel()], mine, rtol=0, atol=1e-6,
                                   msg=lambda m, name=name: f"{name} (world size {engine.dp_world_size}): {m}")


def _resume(rank, world_size, root, saved_world_size):
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    for i, (stage, bf16) in enumerate([(1, False), (2, True)]):
        engine = _engine(stage, bf16, 0.0)
        zsd.load_checkpoint(engine, os.path.join(root, str(i)))
        assert engine.global_steps == 3
        _assert_partition(engine, rank, *_reference("sf", [(range(3), saved_world_size)], 0.0, bf16))
        _train(engine, rank, world_size, range(3, 6))
        ref, master = _reference("sf", [(range(3), saved_world_size), (range(3, 6), world_size)],
                                 0.0, bf16)
        if not (bf16 and world_size == 3):
            # (DeepSpeed averages bf16 gradients in bf16: /3 rounds them,
            # unlike the reference; /1 and /2 are exact.)
            _assert_partition(engine, rank, ref, master)
        # Another world size sums the gradients in another order: the fp32
        # master agrees to 1e-6, so its rounding may differ by one bf16 ulp.
        ulps = 1 if not (bf16 and world_size == 3) else 2
        _assert_params(engine, master, bf16, ulps)
        basic = zsd._basic_optimizer(engine)
        assert basic.param_groups[0]["k"] == 6
        zsd.eval(engine), ref.eval()
        _assert_params(engine, master, bf16, ulps)


# 2 -> 3 (uneven) by default; 2 -> 2 (exact resume) and 2 -> 1 in `make test-all`.
@pytest.mark.parametrize("loads", [(3,), pytest.param((2, 1), marks=pytest.mark.slow)])
def test_checkpoint_save_at_2_load_at(tmp_path, loads):
    spawn(_save, 2, str(tmp_path))
    for world_size in loads:
        spawn(_resume, world_size, str(tmp_path), 2)


def _fp16_config(stage):
    cfg = _config(stage, False, 0.0)
    del cfg["bf16"]
    # 2**30 overflows at once: the dynamic scale halves on the skipped steps,
    # so the scale at save differs from the initial one.
    cfg["fp16"] = {"enabled": True, "initial_scale_power": 30, "loss_scale_window": 1000}
    return cfg


def _fp16_engine(stage, offload=False):
    import zero_sf.deepspeed as zsd
    model = Targets()
    cfg = _fp16_config(stage)
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine, *_ = zsd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    zsd.train(engine)
    return engine


def _loss_scale_resume(rank, world_size, root):
    import zero_sf.deepspeed as zsd
    _ds_setup(rank, world_size)
    # DeepSpeed's CPU accelerator reports no fp16 support; torch's CPU ops
    # run fp16 fine, and the loss-scale bookkeeping under test is host code.
    from deepspeed.accelerator import get_accelerator
    type(get_accelerator()).is_fp16_supported = lambda self: True
    for stage, offload in ((1, False), (2, False), (2, True)):  # offload: ZeRO-Offload alike
        engine = _fp16_engine(stage, offload)
        _train(engine, rank, world_size, range(4))
        scale = engine.optimizer.loss_scaler.cur_scale
        assert scale < 2**30 and engine.skipped_steps > 0
        # an overflow step is skipped whole: Schedule-Free's k counts only real steps
        assert zsd._basic_optimizer(engine).param_groups[0]["k"] == 4 - engine.skipped_steps
        path = os.path.join(root, f"{stage}{offload}")
        engine.save_checkpoint(path)
        fresh = _fp16_engine(stage, offload)
        zsd.load_checkpoint(fresh, path)
        assert fresh.optimizer.loss_scaler.cur_scale == scale, (stage, fresh.optimizer.loss_scaler.cur_scale, scale)
        assert fresh.skipped_steps == engine.skipped_steps


def test_checkpoint_keeps_the_fp16_loss_scale(tmp_path):
    spawn(_loss_scale_resume, 2, str(tmp_path))
