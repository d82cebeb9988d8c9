"""zero_sf in transformers.Trainer and Accelerate, with a tiny GPT-2 built
from a config (no download), on the CPU.

The checks compare with the optimizer's x computed independently: the same
model, batches and optimizer driven by a plain loop, switched to eval at the
same steps."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers", reason="pip install zero-sf[integrations]")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)
from transformers.utils import logging as hf_logging  # noqa: E402

import zero_sf  # noqa: E402
import zero_sf.modes  # noqa: E402
from tests.distributed import spawn  # noqa: E402
from zero_sf.integrations.transformers import ScheduleFreeCallback  # noqa: E402

hf_logging.set_verbosity_error()
SEQ, BATCH, STEPS = 16, 4, 6
# eps well above float noise: GPT-2's key bias gets a gradient that is 0 in
# exact arithmetic (softmax ignores it), and with eps=1e-8 Adam would turn
# its last-bit noise into full +-lr steps that differ between two runs.
SF_KW = dict(lr=3e-2, warmup_steps=2, weight_decay=0.0, eps=1e-4)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=SEQ,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def dataset(n=BATCH * STEPS * 2):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 64, (n, SEQ), generator=g)]


class InOrderTrainer(Trainer):
    """Batches in dataset order, so a plain loop can replay them."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def trainer_for(model, out, *, callback=True, save_steps=3, eval_steps=2, max_steps=STEPS,
                record=None, opt_kw=None, **extra):
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH, save_strategy="steps", save_steps=save_steps,
        eval_strategy="steps", eval_steps=eval_steps, logging_steps=1000, report_to=[],
        use_cpu=True, max_grad_norm=0.0, lr_scheduler_type="constant", seed=0,
        dataloader_num_workers=0, disable_tqdm=True, save_only_model=False, **extra)
    data = dataset()
    return InOrderTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:BATCH],
        optimizer_cls_and_kwargs=(zero_sf.ScheduleFreeAdamW, dict(SF_KW, **(opt_kw or {}))),
        callbacks=[record] * (record is not None) + [ScheduleFreeCallback()] * callback)


class RecordY(TrainerCallback):
    """Placed before ScheduleFreeCallback: y and z after every step."""

    def __init__(self):
        self.y, self.z = {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = zero_sf.modes.resolve(optimizer).optimizer
        assert opt.param_groups[0]["train_mode"]
        self.y[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.z[state.global_step] = {n: opt.state[p]["z"].clone() for n, p in model.named_parameters()}


def x_from(y, z, beta1=0.9):
    """x from y = (1 - beta1) z + beta1 x (Defazio et al. 2024, eq. 1), in fp64."""
    return {n: ((y[n].double() - (1 - beta1) * z[n].double()) / beta1).float() for n in y}


def assert_weights(saved, expected, *, exact=False):
    for k, v in expected.items():
        if k not in saved:
            continue  # tied lm_head.weight is saved once
        if exact:
            assert torch.equal(saved[k], v), k
        else:
            torch.testing.assert_close(saved[k], v, rtol=0, atol=1e-6, msg=k)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a if k in b)


def test_trainer_checkpoints_hold_x_and_training_continues_from_y(tmp_path):
    record = RecordY()
    trainer = trainer_for(tiny_gpt2(), tmp_path / "a", record=record)
    trainer.train()
    for step in (3, 6):  # step 3: a save without an evaluation before it
        saved = load_file(os.path.join(tmp_path, "a", f"checkpoint-{step}", "model.safetensors"))
        x = x_from(record.y[step], record.z[step])
        assert_weights(saved, x)
        assert max_diff(saved, record.y[step]) > 1e-3  # a y checkpoint would fail above
    # after train() the model holds x; save_model writes it
    trainer.save_model(str(tmp_path / "final"))
    assert_weights(load_file(str(tmp_path / "final" / "model.safetensors")), x)
    # the saves and evaluations did not disturb training: the same run without
    # any reaches the same y (up to the y -> x -> y round trips' last bits)
    quiet_record = RecordY()
    quiet = trainer_for(tiny_gpt2(), tmp_path / "b", save_steps=100, eval_steps=100,
                        record=quiet_record)
    quiet.train()
    torch.testing.assert_close(quiet_record.y[STEPS], record.y[STEPS], rtol=0, atol=1e-5)


def test_without_the_callback_a_checkpoint_holds_y(tmp_path):
    """What the callback fixes: the Trainer alone saves y at a step without
    an evaluation (schedulefree #15/#22/#48/#69)."""
    record = RecordY()
    trainer = trainer_for(tiny_gpt2(), tmp_path, callback=False, record=record)
    trainer.train()
    saved = load_file(os.path.join(tmp_path, "checkpoint-3", "model.safetensors"))
    assert_weights(saved, record.y[3], exact=True)


def test_resume_from_checkpoint_continues_identically(tmp_path):
    straight = trainer_for(tiny_gpt2(), tmp_path / "a")
    straight.train()
    resumed = trainer_for(tiny_gpt2(seed=5), tmp_path / "b")  # other init: all comes from the checkpoint
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert_weights(b, a, exact=True)
    sa = straight.optimizer.state_dict()["state"]
    sb = resumed.optimizer.state_dict()["state"]
    for i in sa:
        for key in ("z", "exp_avg_sq"):
            assert torch.equal(sa[i][key], sb[i][key])


def test_resume_with_compressed_state_continues_identically(tmp_path):
    """A bf16 model with bf16 state (stochastic rounding) and remainder
    masters: the Trainer saves x (bf16 weights + the remainders' low bits in
    the optimizer state, in eval mode) and resumes from it bit for bit: it
    loads the weights first, then the optimizer state, whose remainders go
    with the weights as loaded."""
    kw = dict(state_dtype=torch.bfloat16, master_weights="remainder")
    straight = trainer_for(tiny_gpt2().bfloat16(), tmp_path / "a", opt_kw=kw)
    straight.train()
    resumed = trainer_for(tiny_gpt2(seed=5).bfloat16(), tmp_path / "b", opt_kw=kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert_weights(resumed.model.state_dict(), straight.model.state_dict(), exact=True)
    sa = straight.optimizer.state_dict()["state"]
    sb = resumed.optimizer.state_dict()["state"]
    assert sa[0]["z"].dtype == torch.bfloat16 and sa[0]["remainder"].dtype == torch.int16
    assert any(s["remainder"].any() for s in sa.values())
    for i in sa:
        for key in ("z", "exp_avg_sq", "remainder"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)


def test_zero_optimizer_is_refused_before_the_first_step(tmp_path):
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = zero_sf.ZeroOptimizer(model.parameters(), lr=1e-2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True,
                             per_device_train_batch_size=BATCH, disable_tqdm=True)
    with pytest.raises(TypeError, match="ZeroOptimizer cannot run inside transformers.Trainer"):
        Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None),
                callbacks=[ScheduleFreeCallback()])
    assert_weights(model.state_dict(), before, exact=True)


def test_accelerate_prepared_optimizer_switches_and_exports_x(tmp_path):
    from accelerate import Accelerator

    model = tiny_gpt2()
    opt = zero_sf.ScheduleFreeAdamW(model.parameters(), **SF_KW)
    acc = Accelerator(cpu=True)
    model, opt_wrapped = acc.prepare(model, opt)
    opt_wrapped.train()
    batch = torch.stack([d["input_ids"] for d in dataset()[:BATCH]])
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        opt_wrapped.step()
        opt_wrapped.zero_grad()
    y = {k: v.clone() for k, v in model.state_dict().items()}
    opt.eval()
    x = {k: v.clone() for k, v in model.state_dict().items()}
    opt.train()
    assert max_diff(x, y) > 1e-3
    # (each y -> x -> y round trip may move the last bit: compared to 1e-6)
    with zero_sf.eval_mode(opt_wrapped) as inner:  # through Accelerate's wrapper
        assert inner is opt
        assert_weights(model.state_dict(), x)
    assert opt.param_groups[0]["train_mode"]
    assert_weights(model.state_dict(), y)  # back to y for training
    file = zero_sf.export(str(tmp_path / "export"), model, opt_wrapped)
    assert_weights(load_file(file), x)
    assert opt.param_groups[0]["train_mode"]
    reloaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "export"))  # config.json written too
    assert_weights(reloaded.state_dict(), load_file(file), exact=True)


def _trainer_two_ranks(rank, world_size, out):
    # The spawn harness set up gloo; the Trainer (via Accelerate) joins it.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    hf_logging.set_verbosity_error()
    record = RecordY()
    trainer = trainer_for(tiny_gpt2(), out, save_steps=3, eval_steps=100, max_steps=4,
                          record=record)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    saved = load_file(os.path.join(out, "checkpoint-3", "model.safetensors"))
    assert_weights(saved, x_from(record.y[3], record.z[3]))
    assert max_diff(saved, record.y[3]) > 1e-3
    assert zero_sf.modes.resolve(trainer.optimizer).in_train_mode() is False  # x after train()
    # one replica: every rank holds the same y (so rank 0's file is everyone's x)
    flat = torch.cat([v.reshape(-1) for v in record.y[3].values()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])


def test_trainer_ddp_two_ranks_saves_x(tmp_path):
    spawn(_trainer_two_ranks, 2, str(tmp_path))


class RecordYDeepSpeed(TrainerCallback):
    """RecordY for a DeepSpeed model: the fp32 y and z of every parameter,
    assembled from the ZeRO partitions (collective)."""

    def __init__(self):
        self.y, self.z = {}, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        self.y[state.global_step] = {n: safe_get_full_fp32_param(p).clone()
                                     for n, p in model.named_parameters()}
        self.z[state.global_step] = {n: safe_get_full_optimizer_state(p, "z").clone()
                                     for n, p in model.named_parameters()}


def _trainer_deepspeed(rank, world_size, out):
    """The Trainer's own DeepSpeed route (Accelerate's deepspeed_init, the
    config naming our optimizer) at ZeRO-1, 2 and 3: the checkpoint holds x
    (accelerate #4159: ZeRO-1 saved y), and resume_from_checkpoint continues
    bit for bit."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    import deepspeed
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a 60 s JIT build, unused
    import zero_sf.deepspeed as zsd
    zsd.register()
    hf_logging.set_verbosity_error()
    for stage in (1, 2, 3):
        cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
               "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True,
               "optimizer": {"type": "ScheduleFreeAdamW", "params": dict(SF_KW)}}
        if stage == 3:
            # several sub-groups, some parameters partitioned (the rest stay
            # gathered), and the Trainer's model.safetensors gathered at save
            cfg["zero_optimization"].update(
                sub_group_size=3000, stage3_param_persistence_threshold=100,
                stage3_gather_16bit_weights_on_model_save=True)
        ds_args = dict(deepspeed=cfg, learning_rate=SF_KW["lr"], adam_epsilon=SF_KW["eps"],
                       weight_decay=SF_KW["weight_decay"])
        record = RecordYDeepSpeed()
        root = os.path.join(out, str(stage))
        straight = trainer_for(tiny_gpt2(), os.path.join(root, "a"), eval_steps=100, max_steps=5,
                               record=record, **ds_args)
        straight.train()
        saved = load_file(os.path.join(root, "a", "checkpoint-3", "model.safetensors"))
        assert_weights(saved, x_from(record.y[3], record.z[3]))
        assert max_diff(saved, record.y[3]) > 1e-3
        resumed = trainer_for(tiny_gpt2(seed=5), os.path.join(root, "b"), eval_steps=100,
                              max_steps=5, **ds_args)
        resumed.train(resume_from_checkpoint=os.path.join(root, "a", "checkpoint-3"))
        for (n, p), q in zip(_weights(straight).items(), _weights(resumed).values()):
            assert torch.equal(p, q), n
        if stage == 3:
            basic = zero_sf.modes.resolve(resumed.optimizer).optimizer
            assert [g["k"] for g in basic.param_groups] == [5] * len(basic.param_groups)
            assert not basic.in_train_mode()  # after train(): x, for save_model / evaluate


def _weights(trainer):
    """The model's weights, gathered when ZeRO-3 partitions them."""
    import deepspeed
    params = list(trainer.model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        out = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert all(v.numel() > 0 for v in out.values())
    return out


def test_trainer_deepspeed_route_saves_x_and_resumes_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    spawn(_trainer_deepspeed, 2, str(tmp_path))
