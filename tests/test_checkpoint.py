"""zero_sf.save / zero_sf.load: resharding, atomicity, wrong-model refusal,
and the consolidated state dict."""

import os

import pytest
import schedulefree
import torch
import torch.nn as nn

import zero_sf
from tests.distributed import spawn
from tests.helpers import averaged_reference
from tests.sharding.test_zero import LAYOUT, RMS_KW, SF_KW, _assert_model_is, _model, _targets

CONFIGS = [(stage, dtype, opt) for stage in (1, 2) for dtype in (torch.float32, torch.bfloat16)
           for opt in ("sf", "rmsprop")]


def _cls(opt_name):
    return (zero_sf.ScheduleFreeAdamW, SF_KW) if opt_name == "sf" else (zero_sf.RMSProp, RMS_KW)


def _steps(model, opt, rank, world_size, steps):
    for step in steps:
        for p, t in zip(model, _targets(step, world_size)[rank]):
            (p * t.to(p.dtype)).sum().backward()
        opt.step()


def _reference(dtype, opt_name, plan):
    cls, kw = _cls(opt_name)
    return averaged_reference(cls, kw, _model(dtype), _targets, plan)


def _save_at(rank, world_size, root):
    for i, (stage, dtype, opt_name) in enumerate(CONFIGS):
        cls, kw = _cls(opt_name)
        model = _model(dtype)
        opt = zero_sf.ZeroOptimizer(model.parameters(), cls, stage=stage, **LAYOUT, **kw)
        if opt_name == "sf":
            opt.train()
        _steps(model, opt, rank, world_size, range(5))
        zero_sf.save(os.path.join(root, str(i)), model, opt)


def _load_at(rank, world_size, root, saved_world_size):
    for i, (stage, dtype, opt_name) in enumerate(CONFIGS):
        cls, kw = _cls(opt_name)
        model = _model(dtype)
        with torch.no_grad():
            for p in model:
                p.add_(1.0)  # the load must overwrite these
        opt = zero_sf.ZeroOptimizer(model.parameters(), cls, stage=stage, **LAYOUT, **kw)
        zero_sf.load(os.path.join(root, str(i)), model, opt)
        assert opt.param_groups[0].get("train_mode", True)  # saved in train mode
        _assert_state_is(opt, *_reference(dtype, opt_name, [(range(5), saved_world_size)]))
        _steps(model, opt, rank, world_size, range(5, 10))
        ref, master = _reference(dtype, opt_name, [(range(5), saved_world_size),
                                                   (range(5, 10), world_size)])
        _assert_model_is(model, master, dtype)
        if opt_name == "sf":
            opt.eval(), ref.eval()
            _assert_model_is(model, master, dtype)


def _assert_state_is(opt, ref, master):
    """Every state tensor (consolidated: z and exp_avg_sq, or square_avg and
    RMSProp's step as torch exports it) and this rank's fp32 master pieces."""
    sd = opt.consolidated_state_dict()
    for i, m in enumerate(master):
        assert set(sd["state"][i]) == set(ref.state[m]), (sd["state"][i].keys(), ref.state[m].keys())
        for key, want in ref.state[m].items():
            got = sd["state"][i][key]
            if torch.is_tensor(want) and want.dim() > 0:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=key)
            else:
                assert torch.is_tensor(got) or key != "step"  # torch's format: a tensor
                assert float(got) == float(want), key
    for index, start, length, tensors in opt.sharded_state.shard_pieces():
        if "master" in tensors:
            torch.testing.assert_close(tensors["master"],
                                       master[index].detach().reshape(-1)[start:start + length],
                                       rtol=0, atol=1e-6)


# 4 -> 1 (consolidated) and 4 -> 3 (uneven) by default; 4 -> 2 in `make test-all`.
@pytest.mark.parametrize("loads", [(1, 3), pytest.param((2,), marks=pytest.mark.slow)])
def test_save_at_4_load_at(tmp_path, loads):
    spawn(_save_at, 4, str(tmp_path))
    for world_size in loads:
        spawn(_load_at, world_size, str(tmp_path), 4)


def _wrong_model(rank, world_size, root):
    model, opt = _trained_sf(rank, world_size)
    zero_sf.save(root, model, opt)
    other = nn.ParameterList([nn.Parameter(torch.randn(s)) for s in [(31, 13), (31,)]])
    other_opt = zero_sf.ZeroOptimizer(other.parameters(), **LAYOUT, **SF_KW)
    before = [p.detach().clone() for p in other]
    with pytest.raises(ValueError, match="another model"):
        zero_sf.load(root, other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, other))
    assert len(other_opt.inner.state) == 0 and other_opt.param_groups[0]["k"] == 0
    rms = zero_sf.ZeroOptimizer(_model(torch.float32).parameters(), zero_sf.RMSProp, **LAYOUT)
    with pytest.raises(ValueError, match="optimizer differs"):
        zero_sf.load(root, _model(torch.float32), rms)


def _across_dtypes(rank, world_size, root):
    """A fp32 run (the CPU default) resumes in bf16 (the GPU default) with its
    exact fp32 y as the master, and back; the printed version path loads."""
    model = _model(torch.float32)
    opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
    opt.train()
    _steps(model, opt, rank, world_size, range(3))
    version = zero_sf.save(os.path.join(root, "fp32"), model, opt)
    y32 = [p.detach().clone() for p in model]
    state32 = opt.consolidated_state_dict()["state"]

    low = _model(torch.bfloat16)
    low_opt = zero_sf.ZeroOptimizer(low.parameters(), **LAYOUT, **SF_KW)
    assert zero_sf.load(version, low, low_opt) == version
    for p, y in zip(low, y32):
        assert torch.equal(p.detach(), y.bfloat16())
    for index, start, length, tensors in low_opt.sharded_state.shard_pieces():
        assert torch.equal(tensors["master"], y32[index].reshape(-1)[start:start + length])
    for i, st in low_opt.consolidated_state_dict()["state"].items():
        assert all(torch.equal(st[k], state32[i][k]) for k in ("z", "exp_avg_sq"))
    # the bf16 run's master follows the fp32 run (the gradients are bf16-exact)
    _steps(model, opt, rank, world_size, range(3, 5))
    _steps(low, low_opt, rank, world_size, range(3, 5))
    for index, start, length, tensors in low_opt.sharded_state.shard_pieces():
        torch.testing.assert_close(tensors["master"], model[index].detach().reshape(-1)[start:start + length],
                                   rtol=0, atol=1e-6)

    zero_sf.save(os.path.join(root, "bf16"), low, low_opt)
    back = _model(torch.float32)
    back_opt = zero_sf.ZeroOptimizer(back.parameters(), **LAYOUT, **SF_KW)
    zero_sf.load(os.path.join(root, "bf16"), back, back_opt)
    for p, q, r in zip(back, model, low):  # the fp32 master, not the bf16 weights
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
        assert not torch.equal(p.detach(), r.detach().float())


def test_resume_across_parameter_dtypes_and_from_a_version_path(tmp_path):
    spawn(_across_dtypes, 2, str(tmp_path))


def test_checkpoint_of_another_model_is_refused_before_any_change(tmp_path):
    spawn(_wrong_model, 2, str(tmp_path))


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    """Single process (no process group): save, train on, crash in the second
    save after DCP wrote part of it; the first checkpoint is what loads."""
    model = _model(torch.float32)
    opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
    opt.train()
    _steps(model, opt, 0, 1, range(3))
    zero_sf.save(str(tmp_path), model, opt)
    saved = [p.detach().clone() for p in model]
    _steps(model, opt, 0, 1, range(3, 5))

    real_save = zero_sf.checkpoint.dcp.save

    def crashing_save(sd, checkpoint_id, **kw):
        real_save(sd, checkpoint_id=checkpoint_id, **kw)  # files written ...
        raise KeyboardInterrupt("killed mid-save")  # ... but never committed

    monkeypatch.setattr(zero_sf.checkpoint.dcp, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        zero_sf.save(str(tmp_path), model, opt)
    monkeypatch.undo()
    fresh = _model(torch.float32)
    fresh_opt = zero_sf.ZeroOptimizer(fresh.parameters(), **LAYOUT, **SF_KW)
    zero_sf.load(str(tmp_path), fresh, fresh_opt)
    assert all(torch.equal(a, b.detach()) for a, b in zip(saved, fresh))
    assert fresh_opt.param_groups[0]["k"] == 3
    # Continuing from it equals the uninterrupted run.
    _steps(fresh, fresh_opt, 0, 1, range(3, 5))
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(model, fresh))


def _consolidated(rank, world_size):
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(dtype)
        opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
        opt.train()
        _steps(model, opt, rank, world_size, range(4))
        opt.eval()  # schedulefree's convention: save in eval mode
        sd = opt.consolidated_state_dict()
        assert set(sd["state"][0]) == {"z", "exp_avg_sq"}
        for cls in (zero_sf.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree):
            single = [p.detach().float().clone().requires_grad_() for p in model]
            one = cls(single, **SF_KW)
            one.load_state_dict(sd)
            ref, master = _reference(dtype, "sf", [(range(4), world_size)])
            ref.eval()
            for a, b in zip([one.state[p]["z"] for p in single], [ref.state[p]["z"] for p in master]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            assert one.param_groups[0]["k"] == 4 and one.param_groups[0]["train_mode"] is False
            if dtype == torch.float32:  # continue 3 steps on both: identical
                one.train(), ref.train()
                for step in range(4, 7):
                    targets = _targets(step, world_size)
                    for i, (p, q) in enumerate(zip(single, master)):
                        # schedulefree normalizes p.grad in place: separate copies
                        p.grad = sum(t[i] for t in targets) / world_size
                        q.grad = p.grad.clone()
                    one.step(), ref.step()
                for p, q in zip(single, master):
                    torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_consolidated_state_dict_loads_into_single_device_optimizers():
    spawn(_consolidated, 2)


# ------------------------------------------------- resume with a scheduler
SCHEDULERS = {
    "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
}


def _scheduled(rank, world_size, root):
    """Save after 3 steps with a scheduler, resume (fresh model, optimizer and
    scheduler, then their state), 4 more steps: identical to never stopping."""
    for name, make in SCHEDULERS.items():
        for stage, dtype in ((1, torch.float32), (2, torch.bfloat16)):
            runs = []
            for interrupted in (False, True):
                model = _model(dtype)
                opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage, **LAYOUT, **SF_KW)
                sched = make(opt)
                opt.train()
                for step in range(7):
                    if interrupted and step == 3:
                        path = os.path.join(root, f"{name}-{stage}")
                        zero_sf.save(path, model, opt)
                        sched_state = sched.state_dict()
                        model = _model(dtype)
                        opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage, **LAYOUT, **SF_KW)
                        sched = make(opt)
                        zero_sf.load(path, model, opt)
                        sched.load_state_dict(sched_state)
                    _steps(model, opt, rank, world_size, [step])
                    sched.step()
                runs.append(([p.detach().clone() for p in model], opt.param_groups[0]["lr"]))
            (a, lr_a), (b, lr_b) = runs
            assert lr_a == lr_b, (name, lr_a, lr_b)
            for x, y in zip(a, b):
                assert torch.equal(x, y), (name, stage)


def test_lr_scheduler_resumes_to_the_identical_trajectory(tmp_path):
    spawn(_scheduled, 2, str(tmp_path))


def _trained_sf(rank, world_size, steps=2):
    """A fp32 model and its sharded Schedule-Free optimizer after ``steps`` steps."""
    model = _model(torch.float32)
    opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
    opt.train()
    _steps(model, opt, rank, world_size, range(steps))
    return model, opt


def _hand_set_lr(rank, world_size, root):
    model, opt = _trained_sf(rank, world_size)
    opt.param_groups[0]["lr"] = 1.25e-3  # set by hand after the last step
    zero_sf.save(root, model, opt)
    fresh = zero_sf.ZeroOptimizer(_model(torch.float32).parameters(), **LAYOUT, **SF_KW)
    zero_sf.load(root, _model(torch.float32), fresh)
    assert fresh.param_groups[0]["lr"] == 1.25e-3


def test_learning_rate_set_before_save_is_restored(tmp_path):
    spawn(_hand_set_lr, 2, str(tmp_path))


# ------------------------------------------------- damaged or mismatched input
def _save_versions(rank, world_size, root, versions):
    model = _model(torch.bfloat16)
    opt = zero_sf.ZeroOptimizer(model.parameters(), stage=2, **LAYOUT, **SF_KW)
    opt.train()
    for v in range(versions):
        _steps(model, opt, rank, world_size, range(3 * v, 3 * v + 3))
        zero_sf.save(root, model, opt)


def _fresh(dtype=torch.bfloat16):
    model = _model(dtype)
    with torch.no_grad():
        for p in model:
            p.add_(1.0)
    opt = zero_sf.ZeroOptimizer(model.parameters(), stage=2, **LAYOUT, **SF_KW)
    return model, opt


def _load_damaged(rank, world_size, root, match, kw=None):
    model, opt = _fresh()
    before = [p.detach().clone() for p in model]
    with pytest.raises(RuntimeError, match=match) as info:
        zero_sf.load(root, model, opt, **(kw or {}))
    assert isinstance(info.value, zero_sf.CheckpointError)
    assert all(torch.equal(a, b) for a, b in zip(before, model)), "model written before the error"
    assert len(opt.inner.state) == 0 and opt.param_groups[0]["k"] == 0


def _latest_files(root):
    with open(os.path.join(root, "LATEST")) as f:
        version = os.path.join(root, f.read().strip())
    return sorted(os.path.join(version, n) for n in os.listdir(version) if n.endswith(".distcp"))


def test_truncated_or_missing_file_raises_before_any_change(tmp_path):
    root = str(tmp_path)
    spawn(_save_versions, 2, root, 1)
    files = _latest_files(root)
    with open(files[-1], "r+b") as f:
        f.truncate(os.path.getsize(files[-1]) // 2)
    spawn(_load_damaged, 2, root, "is truncated")
    os.remove(files[0])
    spawn(_load_damaged, 2, root, f"{os.path.basename(files[0])}' is missing")


def _flip(file, n=64):
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.seek(size // 2)
        data = bytearray(f.read(n))
        f.seek(size // 2)
        f.write(bytes(b ^ 0x5A for b in data))


def _load_fallback(rank, world_size, root):
    model, opt = _fresh()
    with pytest.warns(RuntimeWarning, match="loaded the previous complete version"):
        zero_sf.load(root, model, opt)
    assert opt.param_groups[0]["k"] == 6  # the second of three versions: 6 steps
    _steps(model, opt, rank, world_size, range(6, 9))
    _, master = _reference(torch.bfloat16, "sf", [(range(9), world_size)])
    _assert_model_is(model, master, torch.bfloat16)


def test_flipped_bytes_are_detected_and_load_falls_back_to_the_previous_version(tmp_path):
    root = str(tmp_path)
    spawn(_save_versions, 2, root, 3)  # keep=2: the first of three is deleted
    assert len([n for n in os.listdir(root) if n.startswith("v-")]) == 2
    for file in _latest_files(root):
        _flip(file)
    spawn(_load_damaged_then_fallback, 2, root)


def _load_damaged_then_fallback(rank, world_size, root):
    # One spawn for both (each costs ~10 s of process start-up on 2 cores).
    _load_damaged(rank, world_size, root, "CRC-32|cannot read|failed", {"fallback": False})
    _load_fallback(rank, world_size, root)


def _negative_second_moment(rank, world_size, root):
    model, opt = _trained_sf(rank, world_size)
    for state in opt.inner.state.values():
        state["exp_avg_sq"][:3] = -9.4e6
    zero_sf.save(root, model, opt)  # checksums match: the values are what was saved
    fresh = zero_sf.ZeroOptimizer(_model(torch.float32).parameters(), **LAYOUT, **SF_KW)
    with pytest.raises(RuntimeError, match="exp_avg_sq.* negative values"):
        zero_sf.load(root, _model(torch.float32), fresh)


def test_negative_second_moment_is_refused(tmp_path):
    spawn(_negative_second_moment, 2, str(tmp_path))


def _save_error_on_one_rank(rank, world_size, root):
    model, opt = _trained_sf(rank, world_size)
    bad = "/proc/zero_sf_unwritable/ckpt" if rank == 0 else root  # even root cannot mkdir in /proc
    with pytest.raises(RuntimeError, match="failed on rank 0"):
        zero_sf.save(bad, model, opt)
    # Every rank raised and nobody waits in a collective: training goes on.
    _steps(model, opt, rank, world_size, range(2, 3))
    zero_sf.save(root, model, opt)


def test_save_error_on_one_rank_raises_on_every_rank(tmp_path):
    spawn(_save_error_on_one_rank, 2, str(tmp_path))


def _group_structure(rank, world_size, root):
    model = _model(torch.float32)
    ps = list(model.parameters())
    two = zero_sf.ZeroOptimizer([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}],
                                **LAYOUT, **SF_KW)
    two.train()
    _steps(model, two, rank, world_size, range(2))
    zero_sf.save(os.path.join(root, "two"), model, two)
    one = zero_sf.ZeroOptimizer(_model(torch.float32).parameters(), **LAYOUT, **SF_KW)
    with pytest.raises(ValueError, match="param groups differ: the checkpoint has 2 groups"):
        zero_sf.load(os.path.join(root, "two"), _model(torch.float32), one)
    assert len(one.inner.state) == 0
    one.train()
    m1 = _model(torch.float32)
    one = zero_sf.ZeroOptimizer(m1.parameters(), **LAYOUT, **SF_KW)
    one.train()
    _steps(m1, one, rank, world_size, range(2))
    zero_sf.save(os.path.join(root, "one"), m1, one)
    m2 = _model(torch.float32)
    ps = list(m2.parameters())
    two = zero_sf.ZeroOptimizer([{"params": ps[:2]}, {"params": ps[2:]}], **LAYOUT, **SF_KW)
    with pytest.raises(ValueError, match="param groups differ"):
        zero_sf.load(os.path.join(root, "one"), m2, two)


def test_param_group_structure_mismatch_is_refused(tmp_path):
    spawn(_group_structure, 2, str(tmp_path))


def _saved_item(root, fqn):
    """Save 3 steps of one process; the file holding ``fqn`` and its storage info."""
    from torch.distributed.checkpoint import FileSystemReader
    model = _model(torch.float32)
    opt = zero_sf.ZeroOptimizer(model.parameters(), **LAYOUT, **SF_KW)
    opt.train()
    _steps(model, opt, 0, 1, range(3))
    zero_sf.save(root, model, opt)
    version = os.path.dirname(_latest_files(root)[0])
    info = next(i for k, i in FileSystemReader(version).read_metadata().storage_data.items()
                if k.fqn == fqn)
    return os.path.join(version, info.relative_path), info


def test_flipped_bytes_inside_a_tensor_fail_its_checksum(tmp_path):
    """Bytes flipped inside one tensor's data (headers intact, values still
    finite and plausible): only the stored CRC-32 can tell.  One process."""
    root = str(tmp_path)
    file, info = _saved_item(root, "optim/0/z/0")
    with open(file, "r+b") as f:  # the middle of the item: inside z's 403 floats
        f.seek(info.offset + info.length // 2)
        data = bytearray(f.read(4))
        f.seek(info.offset + info.length // 2)
        f.write(bytes(b ^ 0x01 for b in data))  # lowest bits: tiny, finite changes
    fresh = zero_sf.ZeroOptimizer(_model(torch.float32).parameters(), **LAYOUT, **SF_KW)
    with pytest.raises(zero_sf.CheckpointError, match="optim/0/z/0 fails its CRC-32 check"):
        zero_sf.load(root, _model(torch.float32), fresh, fallback=False)


@pytest.mark.parametrize("field", ["k", "lr"])
def test_edited_metadata_fails_its_checksum(tmp_path, field):
    """Issue #21 item 4: the JSON blob of the group scalars had no checksum,
    so an edited (or bit-flipped) k or lr loaded silently.  One process:
    the blob edited in place, same length, still valid JSON."""
    root = str(tmp_path)
    file, info = _saved_item(root, "meta")
    with open(file, "r+b") as f:
        f.seek(info.offset)
        item = f.read(info.length)
        key = f'"{field}": '.encode()
        at = item.index(key) + len(key)  # the value's first digit: 3 -> 4, 0.01 -> 1.01
        digit = item[at:at + 1] if item[at:at + 1].isdigit() else item[at + 1:at + 2]
        at += 0 if item[at:at + 1].isdigit() else 1
        f.seek(info.offset + at)
        f.write(str((int(digit) + 1) % 10).encode())
    fresh = zero_sf.ZeroOptimizer(_model(torch.float32).parameters(), **LAYOUT, **SF_KW)
    with pytest.raises(zero_sf.CheckpointError, match="its metadata .* fails its CRC-32 check"):
        zero_sf.load(root, _model(torch.float32), fresh, fallback=False)
    assert fresh.param_groups[0]["k"] == 0 and not fresh.inner.state
