"""zero_sf's optimizers on FSDP2 (``fully_shard``) parameters, gloo ranks on
CPU: each rank updates its DTensor's local shards with the fused kernel
(``backend="triton"`` under TRITON_INTERPRET=1) or the torch path, state is
sharded like the parameters, and torch's DCP state-dict API reshards it.

References: a single-process ``zero_sf.ScheduleFreeAdamW`` fed the average of
every rank's gradient (what FSDP2's reduce-scatter computes), and the
uninterrupted run for checkpoints.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import zero_sf

from ..distributed import spawn

GLOBAL_BATCH = 12  # divisible by 1, 2, 3, 4: the same global batch at every world size
KW = dict(lr=2e-2, betas=(0.9, 0.99), weight_decay=0.01, warmup_steps=2)


def _model(seed=0):
    """Dims that do not divide by 2, 3 or 4 (7 rows: shards of 3,3,1 at N=3;
    a 2-row weight leaves the third rank an empty shard)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 2))


def _shard(model, mesh=None, mp=None):
    kw = dict(mesh=mesh) if mesh is not None else {}
    if mp is not None:
        kw["mp_policy"] = mp
    for layer in (model[0], model[3]):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 2, generator=g)


def _rows(rank, world_size):
    n = GLOBAL_BATCH // world_size
    return slice(rank * n, (rank + 1) * n)


def _loss(model, x, y):
    return (model(x.to(next(model.parameters()).dtype)).float() - y).square().mean()


def _full(params):
    """Full-size copies (never aliases: the run goes on after a snapshot)."""
    return [p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in params]


def _sharded(opt):
    """The sharded parameters (the optimizer's).  Not model.parameters():
    while FSDP2 holds a module unsharded (the root after a forward), those
    are its unsharded, possibly bf16, copies."""
    return [p for g in opt.param_groups for p in g["params"]]


def _fsdp_steps(model, opt, steps, rank, world_size, clip=None):
    for step in steps:
        x, y = _batch(step)
        rows = _rows(rank, world_size)
        _loss(model, x[rows], y[rows]).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def _reference_steps(ref, opt, steps, world_size, clip=None, low=None):
    """The averaged gradient of every rank's rows, computed unsharded; with
    ``low`` (a bf16 copy of the model) the forward/backward runs in bf16 and
    the gradients are averaged in fp32, as MixedPrecisionPolicy(bf16, fp32)."""
    for step in steps:
        x, y = _batch(step)
        grads = [torch.zeros_like(p) for p in ref.parameters()]
        for r in range(world_size):
            net = ref
            if low is not None:
                low.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
                net = low
            net.zero_grad()
            rows = _rows(r, world_size)
            _loss(net, x[rows], y[rows]).backward()
            for acc, p in zip(grads, net.parameters()):
                acc += p.grad.float()
        for p, g in zip(ref.parameters(), grads):
            p.grad = (g / world_size).to(p.dtype)
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
        opt.zero_grad()


def _assert_close(got, want, rtol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        scale = b.abs().max().item()
        err = (a.float() - b.float()).abs().max().item()
        assert err <= rtol * max(scale, 1e-12), f"{what}: param {i} differs by {err:.3g} (scale {scale:.3g})"


CASES = [  # (name, mixed precision, backend, clip, rtol)
    ("fp32/torch", False, "torch", 0.05, 1e-6),
    ("fp32/triton", False, "triton", None, 1e-6),
    # bf16 compute: the two runs reduce the same bf16 gradients in another
    # order (gloo's reduce-scatter vs the loop above), ~1 fp32 ulp apart;
    # Adam's normalization carries that to ~1e-6 of the parameters' scale.
    ("mixed/torch", True, "torch", 0.05, 5e-6),
    ("mixed/triton", True, "triton", None, 5e-6),
]


def _matches_single_process(rank, world_size):
    for name, mixed, backend, clip, rtol in CASES:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
        model = _shard(_model(), mp=mp)
        opt = zero_sf.ScheduleFreeAdamW(model.parameters(), backend=backend, **KW)
        ref = _model()
        ref_opt = zero_sf.ScheduleFreeAdamW(ref.parameters(), backend="torch", **KW)
        low = _model().to(torch.bfloat16) if mixed else None
        for o in (opt, ref_opt):
            o.train()
        _fsdp_steps(model, opt, range(6), rank, world_size, clip)
        _reference_steps(ref, ref_opt, range(6), world_size, clip, low)
        # An eval/train round trip in the middle, checked through the model's
        # output: FSDP2 all-gathers the local shards, now x, at forward.
        for o in (opt, ref_opt):
            o.eval()
        x, _ = _batch(99)
        with torch.no_grad():
            out = model(x)
            if mixed:
                low.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
                want = low(x.bfloat16())
            else:
                want = ref(x)
        _assert_close([out], [want], 2 * rtol if not mixed else 1e-2, f"{name}: eval output")
        _assert_close(_full(_sharded(opt)), list(ref.parameters()), rtol, f"{name}: x")
        for o in (opt, ref_opt):
            o.train()
        _fsdp_steps(model, opt, range(6, 11), rank, world_size, clip)
        _reference_steps(ref, ref_opt, range(6, 11), world_size, clip, low)
        _assert_close(_full(_sharded(opt)), list(ref.parameters()), rtol, f"{name}: y")
        # The state is sharded like the parameters: DTensors on the same mesh,
        # each rank holding its rows only (1/N within FSDP2's padding).
        local = 0
        for p in _sharded(opt):
            st = opt.state[p]
            for key in ("z", "exp_avg_sq"):
                assert isinstance(st[key], DTensor) and st[key].placements == p.placements
                assert st[key].dtype == torch.float32
                local += st[key].to_local().numel()
        full = sum(p.numel() for p in ref.parameters()) * 2
        counts = [torch.tensor(local)]
        dist.all_reduce(counts[0])
        assert counts[0].item() == full
        rows = sum(-(-p.shape[0] // world_size) * (p.numel() // p.shape[0]) for p in ref.parameters())
        assert local <= 2 * rows < full
        if name == CASES[0][0]:
            # zero_sf.export all-gathers the DTensor shards at x; rank 0 writes
            from safetensors.torch import load_file
            root = [tempfile.mkdtemp() if rank == 0 else None]
            dist.broadcast_object_list(root)
            file = zero_sf.export(os.path.join(root[0], "x.safetensors"), model, opt)
            ref_opt.eval()
            saved = load_file(file)
            assert saved.keys() == ref.state_dict().keys()
            _assert_close([saved[k] for k in ref.state_dict()], list(ref.state_dict().values()),
                          rtol, f"{name}: exported x")
            ref_opt.train()
            _assert_close(_full(_sharded(opt)), list(ref.parameters()), rtol, f"{name}: y after export")


@pytest.mark.parametrize("world_size", [2, 3])
def test_matches_single_process(world_size):
    spawn(_matches_single_process, world_size)


def _bf16_params_and_rmsprop(rank, world_size):
    """bf16 sharded parameters (fp32 state, as on one device) and RMSProp.
    Gradients reduced in fp32 (FSDP2's default would sum them in bf16, which
    the reference here does not reproduce) and rounded to bf16 once."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for cls, kw in ((zero_sf.ScheduleFreeAdamW, KW),
                    (zero_sf.RMSProp, dict(lr=1e-2, momentum=0.9, centered=True,
                                           bias_correction=True))):
        model = _shard(_model().to(torch.bfloat16), mp=mp)
        opt = cls(model.parameters(), backend="triton", **kw)
        ref = _model().to(torch.bfloat16)
        ref_opt = cls(ref.parameters(), backend="torch", **kw)
        if hasattr(opt, "train"):
            opt.train(), ref_opt.train()
        _fsdp_steps(model, opt, range(5), rank, world_size)
        _reference_steps(ref, ref_opt, range(5), world_size)
        for p in _sharded(opt):
            assert opt.state[p]["exp_avg_sq" if cls is zero_sf.ScheduleFreeAdamW else "square_avg"].dtype == torch.float32
        diffs = [int((a != b).sum()) for a, b in zip(_full(_sharded(opt)), ref.parameters())]
        assert sum(diffs) == 0, (cls.__name__, diffs)


def test_bf16_sharded_parameters_and_rmsprop():
    # Two ranks: a sum of two gradients is the same in any order, so the
    # reference reproduces FSDP2's reduction bit for bit (three would not be
    # associative; the fp32 tests cover three uneven ranks within 1e-6).
    spawn(_bf16_params_and_rmsprop, 2)


# -- checkpoints: DCP reshards the DTensor state ---------------------------------


def _wrap(kind, seed=0):
    """FSDP2, or DDP with the single-device optimizer's full state."""
    if kind == "fsdp":
        return _shard(_model(seed), init_device_mesh("cpu", (dist.get_world_size(),)))
    return nn.parallel.DistributedDataParallel(_model(seed))


def _train_save_continue(rank, world_size, root, kind="fsdp"):
    model = _wrap(kind)
    opt = zero_sf.ScheduleFreeAdamW(model.parameters(), backend="torch", **KW)
    opt.train()
    _fsdp_steps(model, opt, range(5), rank, world_size)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(root, "ckpt"))
    state = {k: [_full([opt.state[p][k]])[0] for p in _sharded(opt)] for k in ("z", "exp_avg_sq")}
    _fsdp_steps(model, opt, range(5, 10), rank, world_size)
    final = _full(_sharded(opt))
    if rank == 0:
        torch.save({"state": state, "final": final, "k": opt.param_groups[0]["k"]},
                   os.path.join(root, "uninterrupted.pt"))


def _load_continue(rank, world_size, root, kind="fsdp"):
    model = _wrap(kind, seed=123)  # other weights: the checkpoint must replace them
    opt = zero_sf.ScheduleFreeAdamW(model.parameters(), backend="triton", **KW)
    msd, osd = get_state_dict(model, opt)  # a fresh optimizer: only creates the state
    assert opt.param_groups[0]["k"] == 0
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=os.path.join(root, "ckpt"))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    want = torch.load(os.path.join(root, "uninterrupted.pt"))
    assert opt.param_groups[0]["k"] == 5 and opt.param_groups[0]["train_mode"]
    for k in ("z", "exp_avg_sq"):  # exactly what was saved, resharded
        for a, b in zip([_full([opt.state[p][k]])[0] for p in _sharded(opt)], want["state"][k]):
            assert torch.equal(a, b), k
    _fsdp_steps(model, opt, range(5, 10), rank, world_size)
    assert opt.param_groups[0]["k"] == want["k"]
    # Same math at every world size (the same global batch, averaged); the
    # sums run in another order, so within fp32 rounding, not bit for bit.
    _assert_close(_full(_sharded(opt)), want["final"], 1e-6, f"resumed at {world_size}")


def test_dcp_save_at_4_load_at_2_and_1_continues_as_uninterrupted(tmp_path):
    spawn(_train_save_continue, 4, str(tmp_path))
    for world_size in (2, 1):
        spawn(_load_continue, world_size, str(tmp_path))


def test_ddp_state_through_dcp_saved_at_2_loads_at_1():
    """Plain DDP users get the same checkpoints: torch's state-dict API and
    DCP on the single-device optimizer (full state on every rank)."""
    import tempfile
    with tempfile.TemporaryDirectory() as root:
        spawn(_train_save_continue, 2, root, "ddp")
        spawn(_load_continue, 1, root, "ddp")


def _bf16_state_on_shards(rank, world_size):
    """bf16 state with stochastic rounding on FSDP2 shards (issue #14): every
    rank numbers its local rows by their offset in the full parameter, so
    the state equals the single-process optimizer's bit for bit when both
    see the same gradients (uneven shards: 7 rows over 2 or 3 ranks).  Also
    bf16 sharded parameters with remainder masters: the exact fp32 y too."""
    from torch.distributed.tensor import distribute_tensor

    from zero_sf.storage import join_master

    for dtype, extra in ((torch.float32, {}), (torch.bfloat16, dict(master_weights="remainder"))):
        model, ref_model = _shard(_model().to(dtype)), _model().to(dtype)
        kw = dict(KW, state_dtype=torch.bfloat16, **extra)
        opt = zero_sf.ScheduleFreeAdamW(model.parameters(), **kw)
        ref = zero_sf.ScheduleFreeAdamW(ref_model.parameters(), **kw)
        opt.train(), ref.train()
        params, ref_params = _sharded(opt), list(ref_model.parameters())
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p, q in zip(params, ref_params):
                full = torch.randn(q.shape, generator=g).to(dtype)
                q.grad = full.clone()
                p.grad = distribute_tensor(full, p.device_mesh, p.placements)
            opt.step(), ref.step()
            if step == 1:
                opt.eval(), ref.eval()
                opt.train(), ref.train()
        keys = ("z", "exp_avg_sq") + (("remainder",) if extra else ())
        for p, q in zip(params, ref_params):
            for key in keys:
                t = opt.state[p][key]
                assert t.dtype == (torch.int16 if key == "remainder" else torch.bfloat16)
                # (gloo and NCCL have no int16: gathered as int32 here)
                got = (t.to(torch.int32).full_tensor().to(torch.int16) if key == "remainder"
                       else t.full_tensor())
                assert torch.equal(got.view(torch.int16), ref.state[q][key].view(torch.int16)), key
            if extra:
                rem = opt.state[p]["remainder"].to(torch.int32).full_tensor().to(torch.int16)
                y = join_master(p.full_tensor(), rem)
                assert torch.equal(y, join_master(q.detach(), ref.state[q]["remainder"]))
        torch.testing.assert_close(_full(params), [q.detach() for q in ref_params], rtol=0,
                                   atol=1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_bf16_state_on_shards_matches_single_process_bit_for_bit(world_size):
    spawn(_bf16_state_on_shards, world_size)


def _hsdp_and_fresh_state_dict(rank, world_size):
    # HSDP: replicate across 2 groups, shard within each pair of ranks.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _shard(_model(), mesh)
    opt = zero_sf.ScheduleFreeAdamW(model.parameters(), backend="triton", **KW)
    # torch's state-dict API on an optimizer that has not stepped: it runs a
    # zero-gradient, zero-lr step() to create the state (in eval mode too).
    get_optimizer_state_dict(model, opt)
    assert opt.param_groups[0]["k"] == 0 and not opt.param_groups[0]["train_mode"]
    ref = _model()
    ref_opt = zero_sf.ScheduleFreeAdamW(ref.parameters(), backend="torch", **KW)
    for o in (opt, ref_opt):
        o.train()
    _fsdp_steps(model, opt, range(6), rank, world_size, clip=0.05)
    _reference_steps(ref, ref_opt, range(6), world_size, clip=0.05)
    assert opt.param_groups[0]["k"] == ref_opt.param_groups[0]["k"] == 6
    _assert_close(_full(_sharded(opt)), list(ref.parameters()), 1e-6, "HSDP")


def test_hsdp_and_the_state_dict_api_on_a_fresh_optimizer():
    spawn(_hsdp_and_fresh_state_dict, 4)


def _zero_refuses_dtensors(rank, world_size):
    model = _shard(_model())
    with pytest.raises(TypeError, match="already sharded"):
        zero_sf.ZeroOptimizer(model.parameters())


def test_zero_optimizer_refuses_fsdp2_parameters():
    spawn(_zero_refuses_dtensors, 2)


def test_single_process_state_dict_api_does_not_advance_the_optimizer():
    """The same zero-gradient, zero-lr step on a plain module (DDP users
    call torch's state-dict API too): no step is counted, for either rule."""
    for cls, kw in ((zero_sf.ScheduleFreeAdamW, KW), (zero_sf.RMSProp, dict(bias_correction=True))):
        model, ref = _model(), _model()
        opt, ref_opt = cls(model.parameters(), **kw), cls(ref.parameters(), **kw)
        get_optimizer_state_dict(model, opt)
        assert opt.state and all(p.grad is None for p in model.parameters())
        for o in (opt, ref_opt):
            if hasattr(o, "train"):
                o.train()
        for m, o in ((model, opt), (ref, ref_opt)):
            x, y = _batch(0)
            _loss(m, x, y).backward()
            o.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            assert torch.equal(a, b)


def test_users_configurations_match_single_process():
    """Issue #21 item 3: with state_dtype=bfloat16, a rank whose local shard
    of a parameter is empty (the (1, 5) embedding at 2 and 3 ranks) dropped
    it from every list but the stochastic rounding's counters, so every later
    parameter rounded with another's counter (not bit-identical to the single
    process).  And master_weights="remainder" through DCP: set_state_dict
    loads the optimizer before the model, a write that zeroed every loaded
    remainder at the next step (1-ulp differences after a resume)."""
    from tests.scenarios.pinned import check, pin

    steps = (("train",), ("step", 1, False), ("step", 2, False), ("step", 1, False), ("eval",))
    check(pin("fsdp2 bf16 state 2 ranks", engine="fsdp2", world=2, model="awkward", dtype="bf16",
              state_dtype="bfloat16", backend="cpu", ops=steps),
          pin("fsdp2 bf16 state 3 ranks rmsprop", engine="fsdp2", world=3, model="awkward",
              dtype="fp32", state_dtype="bfloat16", rule="rmsprop", grouping="decay",
              ops=(("step", 1, False),) * 3),
          pin("fsdp2 remainder dcp resume", engine="fsdp2", world=2, model="awkward", dtype="bf16",
              state_dtype="bfloat16", master_weights="remainder",
              ops=(("train",), ("step", 1, False), ("save",), ("step", 1, False), ("load",),
                   ("step", 1, False), ("eval",))))


def _remainder_full_state_dict(rank, world_size):
    model = _shard(_model().bfloat16())
    opt = zero_sf.ScheduleFreeAdamW(model.parameters(), master_weights="remainder", **KW)
    opt.train()
    _fsdp_steps(model, opt, range(3), rank, world_size)
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    # The full state loads into the single-process optimizer on the full
    # model: the same fp32 masters y, bit for bit, as the shards hold.
    ref = _model().bfloat16()
    ref.load_state_dict(msd)
    ref_opt = zero_sf.ScheduleFreeAdamW(ref.parameters(), master_weights="remainder", **KW)
    names = [n for n, _ in ref.named_parameters()]
    ref_opt.load_state_dict({"state": {names.index(k): v for k, v in osd["state"].items()},
                             "param_groups": [{**g, "params": [names.index(k) for k in g["params"]]}
                                              for g in osd["param_groups"]]})
    for p, q in zip(_sharded(opt), ref.parameters()):
        rem = opt.state[p]["remainder"].view(torch.bfloat16).full_tensor().view(torch.int16)
        want = zero_sf.storage.join_master(p.full_tensor(), rem)
        got = zero_sf.storage.join_master(q.detach(), ref_opt.state[q]["remainder"])
        assert torch.equal(got, want)
        assert ref_opt.state[q]["remainder"].dtype == torch.int16


def test_remainder_state_gathers_into_a_full_state_dict():
    """Issue #21 item 6: get_state_dict(full_state_dict=True) with
    master_weights="remainder" crashed ("Invalid scalar type": an int16
    DTensor all-gathered; neither gloo nor NCCL has int16)."""
    spawn(_remainder_full_state_dict, 2)
