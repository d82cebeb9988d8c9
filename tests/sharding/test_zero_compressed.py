"""ZeroOptimizer with compressed state (issue #14) on gloo ranks: bit-exact
against the single-process compressed optimizer at 1, 2 and 3 ranks (so the
stochastic rounding is the same at every world size), checkpoints that
convert between formats, the memory it holds, and misuse."""

import pytest
import torch
import torch.nn as nn

import zero_sf
from tests.distributed import spawn
from tests.sharding.test_zero import LAYOUT, RMS_KW, SF_KW, _model, _targets
from zero_sf import storage

COMPRESSED = dict(state_dtype=torch.bfloat16, master_weights="remainder")


def _cls(name):
    return (zero_sf.ScheduleFreeAdamW, SF_KW) if name == "sf" else (
        zero_sf.RMSProp, dict(RMS_KW, momentum=0.9, centered=True))


def _y32_single(opt, p):
    st = opt.state[p]
    return (storage.join_master(p.detach(), st["remainder"]) if "remainder" in st
            else p.detach().float())


def _compare(rank, opt, ref, model, ref_model):
    """Every element this rank owns: joined y and every state tensor, in
    all their bits, against the single-process optimizer (which keeps
    remainders: its y is exact, as ZeroOptimizer's with either master)."""
    params = list(ref_model)
    checked = 0
    for index, start, n, tensors in opt.sharded_state.shard_pieces(y=True):
        p = params[index]
        want = {"master": _y32_single(ref, p).flatten()[start:start + n]}
        want.update({k: v.flatten()[start:start + n] for k, v in ref.state[p].items()
                     if torch.is_tensor(v) and v.dim() > 0 and k != "remainder"})
        assert set(want) == set(tensors), (set(want), set(tensors))
        for key, t in tensors.items():
            w = want[key]
            assert t.dtype == w.dtype, key
            bits = torch.int32 if t.element_size() == 4 else torch.int16
            assert torch.equal(t.contiguous().view(bits), w.contiguous().view(bits)), \
                (rank, index, key)
            checked += n
    for p, q in zip(model, ref_model):  # the gathered bf16 model
        if opt.master_weights == "remainder":
            assert torch.equal(p.detach(), q.detach())
        else:  # y rounded to nearest even (the reference: ties away from zero)
            assert torch.equal(p.detach(), _y32_single(ref, q).to(torch.bfloat16))
    return checked


def _equivalence(rank, world_size, stage, name, kw_extra):
    cls, kw = _cls(name)
    kw = dict(kw, **kw_extra)
    model, ref_model = _model(torch.bfloat16), _model(torch.bfloat16)
    opt = zero_sf.ZeroOptimizer(model.parameters(), cls, stage=stage, **LAYOUT, **kw)
    kw.pop("master_weights", None)
    ref = cls(ref_model.parameters(), **kw, master_weights="remainder")
    modes = name == "sf"
    if modes:
        opt.train(), ref.train()
    for step in range(6):
        targets = _targets(step, world_size)
        for p, t in zip(model, targets[rank]):
            (p * t.to(p.dtype)).sum().backward()
        # the reference: the sum over ranks (exact in bf16) and the 1/N inside
        # the fused update, as ZeroOptimizer applies it
        for i, q in enumerate(ref_model):
            q.grad = sum(t[i] for t in targets).to(torch.bfloat16)
        opt.step()
        ref.step(grad_scale=1.0 / world_size)
        if modes and step == 3:
            opt.eval(), ref.eval()
            _compare(rank, opt, ref, model, ref_model)
            opt.train(), ref.train()
    assert _compare(rank, opt, ref, model, ref_model) > 0


def _equivalence_all(rank, world_size):
    for stage in (1, 2):
        for name in ("sf", "rmsprop"):
            for extra in (COMPRESSED, dict(state_dtype=torch.bfloat16),
                          dict(COMPRESSED, state_rounding="nearest")):
                try:
                    _equivalence(rank, world_size, stage, name, extra)
                except AssertionError as e:
                    raise AssertionError(f"stage {stage}, {name}, {extra}") from e


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_compressed_is_the_single_process_compressed_bit_for_bit(world_size):
    spawn(_equivalence_all, world_size)


def _trained_compressed(rank, world_size, steps=3):
    cls, kw = _cls("sf")
    model = _model(torch.bfloat16)
    opt = zero_sf.ZeroOptimizer(model.parameters(), cls, **LAYOUT, **kw, **COMPRESSED)
    opt.train()
    for step in range(steps):
        for p, t in zip(model, _targets(step, world_size)[rank]):
            (p * t.to(p.dtype)).sum().backward()
        opt.step()
    return model, opt


def _conversions(rank, world_size, root):
    """Save with compressed state, load into the defaults (fp32 master and
    state), and back: the fp32 y is exact both ways, the state converts (bf16
    to fp32 exactly, fp32 to bf16 to nearest even), training continues."""
    cls, kw = _cls("sf")
    model, opt = _trained_compressed(rank, world_size)
    saved = {(i, s): {k: v.clone() for k, v in t.items()} for i, s, _, t in opt.sharded_state.shard_pieces()}
    assert all(set(t) == {"master", "z", "exp_avg_sq"} for t in saved.values())
    assert any(opt.inner.state[c]["remainder"].any() for c in opt.weights.y_chunks[0])
    zero_sf.save(f"{root}/c", model, opt)

    plain_model = _model(torch.bfloat16)
    plain = zero_sf.ZeroOptimizer(plain_model.parameters(), cls, **LAYOUT, **kw)
    zero_sf.load(f"{root}/c", plain_model, plain)
    for i, s, _, t in plain.sharded_state.shard_pieces():
        assert torch.equal(t["master"], saved[(i, s)]["master"])  # the exact fp32 y
        for key in ("z", "exp_avg_sq"):
            assert t[key].dtype == torch.float32
            assert torch.equal(t[key], saved[(i, s)][key].float())
    assert plain.inner.param_groups[0]["state_dtype"] is None
    for p, q in zip(model, plain_model):
        # remainder: ties away from zero; the fp32 master's model: to nearest even
        assert torch.equal(q.detach().float(), p.detach().float()) or \
            (q.detach().float() - p.detach().float()).abs().max() <= 2**-7 * p.detach().float().abs().max()
    zero_sf.save(f"{root}/d", plain_model, plain)

    back_model = _model(torch.bfloat16)
    back = zero_sf.ZeroOptimizer(back_model.parameters(), cls, **LAYOUT, **kw, **COMPRESSED)
    zero_sf.load(f"{root}/d", back_model, back)
    for i, s, _, t in back.sharded_state.shard_pieces():
        assert torch.equal(t["master"], saved[(i, s)]["master"])
        assert torch.equal(t["z"], saved[(i, s)]["z"])  # bf16 -> fp32 -> bf16: exact
    for p, q in zip(model, back_model):
        assert torch.equal(p.detach(), q.detach())
    # both continue; the compressed one exactly as the uninterrupted run
    for o, m in ((opt, model), (back, back_model), (plain, plain_model)):
        for p, t in zip(m, _targets(3, world_size)[rank]):
            (p * t.to(p.dtype)).sum().backward()
        o.step()
    for a, b in zip(opt.sharded_state.shard_pieces(), back.sharded_state.shard_pieces()):
        for key in a[3]:
            assert torch.equal(a[3][key], b[3][key]), key


def _consolidated(rank, world_size):
    """consolidated_state_dict() gathers the int16 remainders too (gloo and
    NCCL have no int16 type: they travel as bf16 bits) and the single-device
    compressed optimizer resumes from it with the exact fp32 y."""
    cls, kw = _cls("sf")
    model, opt = _trained_compressed(rank, world_size)
    sd = opt.consolidated_state_dict()
    single_model = _model(torch.bfloat16)
    single_model.load_state_dict(model.state_dict())
    single = cls(single_model.parameters(), **kw, **COMPRESSED)
    single.load_state_dict(sd)
    pieces = {i: (s, t) for i, s, _, t in opt.sharded_state.shard_pieces()}
    for i, p in enumerate(single_model):
        assert single.state[p]["remainder"].dtype == torch.int16
        if i in pieces:
            s, t = pieces[i]
            y = _y32_single(single, p).flatten()[s:s + t["master"].numel()]
            assert torch.equal(y, t["master"])


def test_consolidated_state_dict_carries_the_remainders():
    spawn(_consolidated, 2)


def test_checkpoints_convert_between_compressed_and_fp32(tmp_path):
    spawn(_conversions, 2, str(tmp_path))


def _memory_and_misuse(rank, world_size):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).bfloat16()
    n = sum(p.numel() for p in model.parameters())
    full = zero_sf.ZeroOptimizer(_clone(model).parameters(), align=1)
    comp = zero_sf.ZeroOptimizer(_clone(model).parameters(), align=1, **COMPRESSED)
    x = torch.randn(4, 64).bfloat16()
    for o in (full, comp):  # one step creates the state
        o.train()
        out = x
        for w, b in zip(o._params[0::2], o._params[1::2]):
            out = out @ w.t() + b
        out.float().sum().backward()
        o.step()
    shard = comp.buffers[0].shard_numel
    assert shard * world_size >= n
    f, c = full.memory_bytes(), comp.memory_bytes()
    assert f["master"] == 4 * shard and f["optimizer_state"] == 8 * shard
    assert c["master"] == 2 * shard and c["optimizer_state"] == 4 * shard
    # misuse: a fp32 model with remainders, before anything is rebound
    fp32 = nn.Linear(4, 4)
    ptrs = [p.data_ptr() for p in fp32.parameters()]
    with pytest.raises(ValueError, match="master_weights='remainder' needs bfloat16 parameters"):
        zero_sf.ZeroOptimizer(fp32.parameters(), master_weights="remainder")
    assert ptrs == [p.data_ptr() for p in fp32.parameters()]
    with pytest.raises(ValueError, match="Invalid master_weights value: 'bf16'"):
        zero_sf.ZeroOptimizer(fp32.parameters(), master_weights="bf16")
    with pytest.raises(ValueError, match="offload='cpu' with master_weights='remainder'"):
        zero_sf.ZeroOptimizer(_clone(model).parameters(), offload="cpu", master_weights="remainder")
    # ranks that disagree on the state dtype: caught at construction
    with pytest.raises(ValueError, match="ranks differ at construction: param group 0: state_dtype: 'float32' on rank 1, 'bfloat16' on rank 0"):
        zero_sf.ZeroOptimizer(_clone(model).parameters(),
                              state_dtype=torch.bfloat16 if rank == 0 else torch.float32)
    # weights loaded after some steps: y restarts from them exactly
    loaded = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    m = _clone(model)
    o = zero_sf.ZeroOptimizer(m.parameters(), **COMPRESSED)
    o.train()
    for _ in range(2):
        m(x).float().sum().backward()
        o.step()
    m.load_state_dict(loaded)
    o.eval()
    pieces = {i: (s, t) for i, s, _, t in o.sharded_state.shard_pieces()}
    names = [k for k, _ in m.named_parameters()]
    for i, (s, t) in pieces.items():
        y = loaded[names[i]].flatten()[s:s + t["master"].numel()].float()
        want = y.lerp(t["z"].float(), 1 - 1 / 0.9)  # x from y = the loaded values exactly
        assert torch.equal(t["master"], want), names[i]


def _clone(model):
    import copy
    return copy.deepcopy(model)


def test_memory_accounting_and_misuse():
    spawn(_memory_and_misuse, 2)
