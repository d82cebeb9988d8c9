"""Compressed state on the single-device optimizers (issue #14): bf16 state
with stochastic rounding, exact remainder masters, user writes, state-dict
round trips and conversions, and the misuse errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import zero_sf
from zero_sf import storage

BF16_STATE = dict(state_dtype=torch.bfloat16)
COMPRESSED = dict(state_dtype=torch.bfloat16, master_weights="remainder")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(33, 70), nn.GELU(), nn.Linear(70, 5)).bfloat16()


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 33, generator=g).bfloat16()


def _loss(model, i):
    return model(_batch(i)).float().square().mean()


def _y32(opt, p):
    st = opt.state[p]
    return storage.join_master(p.detach(), st["remainder"]) if "remainder" in st else p.detach().float()


def _backend_ok(backend):
    if backend == "triton" and not zero_sf.functional.triton_available():
        pytest.skip("triton not installed")


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("cls, kw", [(zero_sf.ScheduleFreeAdamW, dict(lr=1e-2, warmup_steps=2,
                                                                      weight_decay=0.01)),
                                     (zero_sf.RMSProp, dict(lr=1e-2, momentum=0.9,
                                                            bias_correction=True))],
                         ids=["sf", "rmsprop"])
def test_remainder_master_is_the_fp32_master_bit_for_bit(backend, cls, kw):
    """The remainder path against ZeroOptimizer's fp32 master (world size
    1, the same backend) on the same bf16 model and data: after every step
    and every eval()/train() switch the joined y equals the master in all
    32 bits, z/v are equal, and the model's weights are y rounded to nearest
    (ties away from zero)."""
    _backend_ok(backend)
    a, b = _model(), _model()
    opt = cls(a.parameters(), backend=backend, master_weights="remainder", **kw)
    ref = zero_sf.ZeroOptimizer(b.parameters(), cls, stage=1, backend=backend, **kw)
    modes = hasattr(opt, "train")
    if modes:
        opt.train(), ref.train()
    for i in range(6):
        _loss(a, i).backward()
        _loss(b, i).backward()
        opt.step(), ref.step()
        opt.zero_grad()
        if modes and i in (2, 5):
            opt.eval(), ref.eval()
            _check_same(opt, ref, a)
            opt.train(), ref.train()
        _check_same(opt, ref, a)


def _check_same(opt, ref, model):
    pieces = {index: t for index, _, _, t in ref.sharded_state.shard_pieces(y=True)}
    for i, p in enumerate(model.parameters()):
        y32 = _y32(opt, p).flatten()
        assert torch.equal(y32.view(torch.int32), pieces[i]["master"].view(torch.int32))
        assert torch.equal(p.detach().flatten(), storage.split_master(y32)[0])
        for key, t in pieces[i].items():
            if key != "master":
                assert torch.equal(opt.state[p][key].flatten(), t), key


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_state_rounded_stochastically_tracks_fp32_and_nearest_stalls(backend):
    """RMSProp's v under a constant gradient 1 (alpha = 0.999, 1500 steps):
    fp32 v = 1 - 0.999**1500 = 0.777.  Rounded to nearest, bf16 v stops
    where the increment 1e-3 (1 - v) falls below half an ulp: at 0.25
    (7.5e-4 < 2**-10, half an ulp in [0.25, 0.5)).  Rounded stochastically
    its mean over 4096 elements is within 1 % of fp32."""
    n, steps = 4096, 1500
    means = {}
    for name, kw in (("fp32", {}), ("sr", BF16_STATE),
                     ("nearest", dict(BF16_STATE, state_rounding="nearest"))):
        p = nn.Parameter(torch.zeros(n))
        opt = zero_sf.RMSProp([p], lr=0.0, alpha=0.999, backend=backend, **kw)
        p.grad = torch.ones(n)
        for _ in range(steps):
            opt.step()
        v = opt.state[p]["square_avg"]
        assert v.dtype == (torch.float32 if name == "fp32" else torch.bfloat16)
        means[name] = v.float().mean().item()
    assert abs(means["fp32"] - (1 - 0.999**steps)) < 1e-4
    assert abs(means["sr"] - means["fp32"]) < 0.01 * means["fp32"], means
    assert means["nearest"] <= 0.25, means


def test_stochastic_rounding_is_reproducible_and_seeded():
    def run(seed):
        m = _model()
        opt = zero_sf.ScheduleFreeAdamW(m.parameters(), lr=1e-2, seed=seed, **BF16_STATE)
        opt.train()
        for i in range(3):
            _loss(m, i).backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([opt.state[p]["z"].flatten() for p in m.parameters()])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_weights_loaded_after_construction_restart_from_the_loaded_values():
    """model.load_state_dict after some steps: the remainder of every
    written parameter is zeroed, so y is exactly what was loaded (without
    that, y would be the loaded bf16 value plus the old low bits)."""
    m = _model()
    opt = zero_sf.ScheduleFreeAdamW(m.parameters(), lr=1e-2, **COMPRESSED)
    opt.train()
    for i in range(3):
        _loss(m, i).backward()
        opt.step()
        opt.zero_grad()
    assert any(opt.state[p]["remainder"].any() for p in m.parameters())
    loaded = _model(seed=5).state_dict()
    m.load_state_dict(loaded)
    zs = {n: opt.state[p]["z"].float().clone() for n, p in m.named_parameters()}
    opt.eval()  # x = y + (1 - 1/beta1)(z - y), y = the loaded weights exactly
    for n, p in m.named_parameters():
        want = loaded[n].float().lerp(zs[n], 1 - 1 / 0.9)
        assert torch.equal(_y32(opt, p), want), n


def test_state_dict_round_trip_resumes_bit_exactly():
    """Save model + optimizer, continue; a fresh model and optimizer that
    load both (model first, as torch and the HF Trainer do) continue to the
    same bits: the remainders travel in the optimizer's state dict."""
    def steps(m, opt, rng):
        for i in rng:
            _loss(m, i).backward()
            opt.step()
            opt.zero_grad()

    m = _model()
    opt = zero_sf.ScheduleFreeAdamW(m.parameters(), lr=1e-2, **COMPRESSED)
    opt.train()
    steps(m, opt, range(3))
    msd = {k: v.clone() for k, v in m.state_dict().items()}
    osd = opt.state_dict()
    osd = {"state": {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                     for k, v in osd["state"].items()}, "param_groups": osd["param_groups"]}
    assert all(v["remainder"].dtype == torch.int16 for v in osd["state"].values())
    steps(m, opt, range(3, 6))
    m2 = _model(seed=9)
    opt2 = zero_sf.ScheduleFreeAdamW(m2.parameters(), lr=1e-2, **COMPRESSED)
    m2.load_state_dict(msd)
    opt2.load_state_dict(osd)
    steps(m2, opt2, range(3, 6))
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(_y32(opt, p).view(torch.int32), _y32(opt2, q).view(torch.int32))
        for key in ("z", "exp_avg_sq", "remainder"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key


def test_state_dicts_convert_between_fp32_and_bf16_state():
    m = _model()
    opt = zero_sf.ScheduleFreeAdamW(m.parameters(), lr=1e-2, **COMPRESSED)
    opt.train()
    _loss(m, 0).backward()
    opt.step()
    sd = opt.state_dict()
    # compressed -> defaults: fp32 state (exact upcast), remainder dropped
    plain = zero_sf.ScheduleFreeAdamW(m.parameters(), lr=1e-2)
    plain.load_state_dict(sd)
    for p in m.parameters():
        st = plain.state[p]
        assert set(st) == {"z", "exp_avg_sq"} and st["z"].dtype == torch.float32
        assert torch.equal(st["z"], opt.state[p]["z"].float())
        assert plain.param_groups[0]["state_dtype"] is None  # the loader's configuration
    # defaults -> compressed: bf16 to nearest even, remainder zeros at the next step
    back = zero_sf.ScheduleFreeAdamW(m.parameters(), lr=1e-2, **COMPRESSED)
    back.load_state_dict(plain.state_dict())
    for p in m.parameters():
        assert back.state[p]["z"].dtype == torch.bfloat16
        assert torch.equal(back.state[p]["z"], plain.state[p]["z"].bfloat16())
    assert back.param_groups[0]["state_dtype"] == "bfloat16"


def test_misuse_raises_clear_errors():
    fp32 = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="master_weights='remainder' needs bfloat16 parameters"):
        zero_sf.ScheduleFreeAdamW(fp32.parameters(), master_weights="remainder")
    with pytest.raises(ValueError, match="needs bfloat16 parameters, got one of dtype torch.float16"):
        zero_sf.RMSProp(nn.Linear(3, 2).half().parameters(), master_weights="remainder")
    with pytest.raises(ValueError, match="Invalid state_dtype value: torch.float16"):
        zero_sf.ScheduleFreeAdamW(fp32.parameters(), state_dtype=torch.float16)
    with pytest.raises(ValueError, match="Invalid state_rounding value: 'up'"):
        zero_sf.RMSProp(fp32.parameters(), state_dtype=torch.bfloat16, state_rounding="up")
    with pytest.raises(ValueError, match="Invalid master_weights value: 'fp32'"):
        zero_sf.ScheduleFreeAdamW(fp32.parameters(), master_weights="fp32")
    with pytest.raises(ValueError, match="Invalid seed value: -1"):
        zero_sf.ScheduleFreeAdamW(fp32.parameters(), seed=-1)
    # strings, as a DeepSpeed JSON config passes them
    opt = zero_sf.ScheduleFreeAdamW(fp32.parameters(), state_dtype="bfloat16")
    assert opt.param_groups[0]["state_dtype"] == "bfloat16"


def test_fp32_model_with_bf16_state():
    """state_dtype applies to fp32 parameters too (e.g. DeepSpeed's fp32
    partitions): 4 B of state per parameter instead of 8."""
    m = nn.Linear(40, 30)
    opt = zero_sf.ScheduleFreeAdamW(m.parameters(), lr=1e-2, **BF16_STATE)
    ref = zero_sf.ScheduleFreeAdamW(nn.Linear(40, 30).requires_grad_().parameters(), lr=1e-2)
    ref.load_state_dict(ref.state_dict())
    opt.train()
    x = torch.randn(8, 40)
    before = [p.detach().clone() for p in m.parameters()]
    for _ in range(5):
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for p, p0 in zip(m.parameters(), before):
        assert opt.state[p]["z"].dtype == torch.bfloat16
        assert p.dtype == torch.float32 and not torch.equal(p.detach(), p0)


def test_remainders_through_skipped_steps_loaded_weights_and_checkpoints():
    """Found by the scenario generator (make fuzz, seeds 5173 and 6133):
    RMSProp with master_weights="remainder" never created its state when a
    remainder was there first (a skipped first step, a load: KeyError
    'square_avg' at the next step); a state dict saved after
    model.load_state_dict and before the next step kept the remainder of
    the old weights with the new ones (y off by up to an ulp, NaN where the
    stale bits met a zero)."""
    from tests.scenarios.pinned import check, pin

    check(pin("rmsprop remainder skipped first step", engine="zero", world=2, model="gpt2",
              dtype="bf16", rule="rmsprop", master_weights="remainder",
              ops=(("nonfinite", 1), ("save",), ("step", 1, False), ("load",), ("step", 2, False))),
          pin("remainder saved after loaded weights", engine="single", world=1, model="gpt2",
              dtype="bf16", rule="rmsprop", grouping="per_layer_lr", master_weights="remainder",
              ops=(("step", 1, False), ("step", 1, False), ("load_weights",), ("save",),
                   ("step", 1, False), ("load_weights",), ("load",), ("step", 1, False))),
          pin("sf remainder saved after loaded weights", engine="single", world=1, model="bert",
              dtype="bf16", grouping="per_layer_lr", master_weights="remainder",
              ops=(("train",), ("step", 1, False), ("step", 2, True), ("load_weights",), ("save",),
                   ("step", 1, False), ("train",), ("load",), ("step", 1, False), ("eval",))))


@pytest.mark.parametrize("cls", [zero_sf.ScheduleFreeAdamW, zero_sf.RMSProp])
def test_index_segments_number_a_flat_like_the_parameters_it_holds(cls):
    """A flat of 13 elements holding a (7,) and a (5,) parameter's slices
    and one padding element (a DeepSpeed ZeRO-3 partition), bound with one
    run per slice, steps bit for bit like the two parameters with their own
    numbering (bases 0 and 7 of the single process); the padding stays."""
    kw = dict(lr=1e-2, **BF16_STATE)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, generator=g), torch.randn(5, generator=g)
    ref = cls([a.clone().requires_grad_(), b.clone().requires_grad_()], **kw)  # numbered: 0, 7
    flat = torch.cat([a, torch.tensor([0.25]), b])  # the padding sits between the runs
    opt = cls([flat], **kw)
    opt.bind(flat, index_segments=[(0, 7, 0), (8, 5, 7)])
    for o in (ref, opt):
        if hasattr(o, "train"):
            o.train()
    for _ in range(3):
        ga, gb = torch.randn(7, generator=g), torch.randn(5, generator=g)
        ref.param_groups[0]["params"][0].grad, ref.param_groups[0]["params"][1].grad = ga, gb
        flat.grad = torch.cat([ga, torch.tensor([1.0]), gb])
        ref.step()
        opt.step()
    ra, rb = ref.param_groups[0]["params"]
    assert torch.equal(flat[:7], ra) and torch.equal(flat[8:], rb)
    assert flat[7] == 0.25
    for key in ref.state[ra]:
        if ref.state[ra][key].dim():
            got = opt.state[flat][key]
            assert torch.equal(got[:7], ref.state[ra][key]) and torch.equal(got[8:], ref.state[rb][key])


def test_index_segments_must_be_ordered_runs_inside_the_parameter():
    flat = torch.zeros(10)
    opt = zero_sf.ScheduleFreeAdamW([flat], **BF16_STATE)
    for bad in ([(0, 11, 0)], [(5, 3, 0), (0, 5, 3)], [(0, 6, 0), (5, 2, 6)]):
        with pytest.raises(ValueError, match="not ordered, disjoint runs"):
            opt.bind(flat, index_segments=bad)
