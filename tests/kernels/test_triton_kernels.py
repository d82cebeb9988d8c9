"""Fused Triton kernels == the spec (zero_sf.spec), run under TRITON_INTERPRET=1
on CPU (conftest sets it), or compiled on a GPU with ZERO_SF_TEST_DEVICE=cuda
(``make gpu-report``: each kernel call runs on device copies of its tensors,
written back, so the checks below are the same code on both).  fp32 state
within 1e-6 relative; low-precision outputs equal to the rounding of the kernel's own fp32 value, bit for bit
(the kernels round bf16 to nearest even by hand, so the interpreter's
truncating cast does not apply)."""

import functools
import os
from types import SimpleNamespace

import pytest
import torch

from zero_sf import functional as _F
from zero_sf import spec

pytestmark = pytest.mark.skipif(not _F.triton_available(), reason="triton not installed")

DEVICE = torch.device("cuda") if os.environ.get("ZERO_SF_TEST_DEVICE") == "cuda" else None


def on_device(fn, *args, device=DEVICE, **kwargs):
    """``fn(*args, **kwargs)`` with every tensor (and list of tensors) copied
    to ``device`` and the results copied back in place; the call itself when
    ``device`` is None (CPU tensors under the interpreter)."""
    if device is None:
        return fn(*args, **kwargs)
    pairs = []

    def move(a):
        if isinstance(a, torch.Tensor):
            pairs.append((a, a.to(device, copy=True)))
            return pairs[-1][1]
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
            return [move(t) if t is not None else None for t in a]
        return a

    out = fn(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
    for host, dev in pairs:
        host.copy_(dev)
    return out


# The fused entry points, run where DEVICE says.
F = SimpleNamespace(resolve_backend=_F.resolve_backend,
                    **{name: functools.partial(on_device, getattr(_F, name))
                       for name in ("sf_adamw", "sf_interpolate", "rmsprop")})

SIZES = [1, 127, 128, 1000, 65537, 200_003]
LOW = [torch.bfloat16, torch.float16]
SF_CASES = [  # (lr0, warmup, weight_decay, r, weight_lr_power)
    (1e-2, 0, 0.0, 0.0, 2.0),
    (3e-3, 3, 0.05, 1.0, 1.0),
]


def close(out, ref, rtol=1e-6):
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * max(scale, 1e-30))


def _scale(n, gen):
    """Per-element gradient scales 1e-9 .. 1: where the scale is near eps,
    eps's placement (outside or inside the root) changes the update, so the
    tests can see it; v starts at the matching scale squared."""
    return 10.0 ** torch.randint(-9, 1, (n,), generator=gen).float()


def _sf_state(n, y_dtype, gen):
    y = torch.randn(n, generator=gen).to(y_dtype)
    s = _scale(n, gen)
    return y, y.float().clone(), torch.rand(n, generator=gen) * s * s, s


def _grad(s, gen, dtype):
    return (torch.randn(s.shape, generator=gen) * s).to(dtype)


# Every dtype combination at the small sizes; at 65,537 (64 unmasked blocks
# and a 1-element tail) and 200,003 a few combinations keep the interpreter
# run short: each grad dtype and each output dtype at least once.
FLAT_COMBOS = [(n, g, o) for n in SIZES[:-2] for g in [torch.float32] + LOW for o in [None] + LOW]
FLAT_COMBOS += [(SIZES[-2], g, o) for g, o in [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.bfloat16, None)]]
# 200,003 (a grid of 196 programs): ~80 s in the interpreter, in `make test-all`
FLAT_COMBOS += [pytest.param(SIZES[-1], torch.float32, None, marks=pytest.mark.slow),
                pytest.param(SIZES[-1], torch.bfloat16, torch.bfloat16, marks=pytest.mark.slow)]


@pytest.mark.parametrize("n,grad_dtype,out_dtype", FLAT_COMBOS)
@pytest.mark.parametrize("case", SF_CASES)
def test_sf_adamw_flat_fp32_master(n, grad_dtype, out_dtype, case):
    """A ZeRO shard: fp32 master y, z, v; optional bf16/fp16 copy of y."""
    gen = torch.Generator().manual_seed(n)
    lr0, warmup, wd, r, wlp = case
    y, z, v, scale = _sf_state(n, torch.float32, gen)
    y_ref, z_ref, v_ref = y.clone(), z.clone(), v.clone()
    y_out = torch.full((n,), float("nan"), dtype=out_dtype) if out_dtype else None
    lr_max, wsum = -1.0, 0.0
    for k in range(3):  # consecutive steps, with an eval/train round trip
        g = _grad(scale, gen, grad_dtype)
        sc = spec.sf_scalars(k=k, lr=lr0, beta1=0.9, beta2=0.999, warmup_steps=warmup, r=r,
                             weight_lr_power=wlp, lr_max=lr_max, weight_sum=wsum)
        lr_max, wsum = sc.lr_max, sc.weight_sum
        kw = dict(lr=sc.lr, ck=sc.ck, y_coef=sc.y_coef, beta2=0.999,
                  bias_correction2=sc.bias_correction2, eps=1e-8, weight_decay=wd,
                  grad_scale=0.5)
        F.sf_adamw([y], [g], [z], [v], y_outs=[y_out] if out_dtype else None,
                   backend="triton", **kw)
        spec.sf_adamw_update(y_ref, g, z_ref, v_ref, **kw)
        close(y, y_ref), close(z, z_ref), close(v, v_ref)
        if out_dtype:
            assert torch.equal(y_out, y.to(out_dtype))  # every element written, RTNE
        if k == 1:
            for w in (spec.sf_eval_weight(0.9), spec.sf_train_weight(0.9)):
                F.sf_interpolate([y], [z], weight=w, p_outs=[y_out] if out_dtype else None,
                                 backend="triton")
                spec.sf_interpolate(y_ref, z_ref, weight=w)
                close(y, y_ref)
                if out_dtype:
                    assert torch.equal(y_out, y.to(out_dtype))


@pytest.mark.parametrize("n", [1, 127, 1000, 65537])
@pytest.mark.parametrize("dtype", LOW)
def test_sf_adamw_low_precision_y_in_place(n, dtype):
    """Single-device bf16/fp16 params: y is the param itself, state fp32."""
    gen = torch.Generator().manual_seed(7)
    y, z, v, scale = _sf_state(n, dtype, gen)
    g = _grad(scale, gen, dtype)
    kw = dict(lr=1e-2, ck=0.25, y_coef=1e-2 * (0.9 * 0.75 - 1), beta2=0.99,
              bias_correction2=1 - 0.99**4, eps=1e-8, weight_decay=0.1)
    # The kernel's own fp32 y, from an fp32 run on the same inputs:
    y32, z32, v32 = y.float(), z.clone(), v.clone()
    F.sf_adamw([y32], [g], [z32], [v32], backend="triton", **kw)
    F.sf_adamw([y], [g], [z], [v], backend="triton", **kw)
    assert torch.equal(y, y32.to(dtype))
    assert torch.equal(z, z32) and torch.equal(v, v32)
    # ... and that fp32 run agrees with the spec.
    yr, zr, vr, _ = _sf_state(n, dtype, torch.Generator().manual_seed(7))
    yr32 = yr.float()
    spec.sf_adamw_update(yr32, g, zr, vr, **kw)
    close(y32, yr32), close(z, zr), close(v, vr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_launch_matches_spec(dtype):
    """Many small tensors of mixed sizes go through one chunk-table launch."""
    from zero_sf.kernels import host as launch
    sizes = [1, 3, 127, 128, 129, 1024, 1025, 5000, 17]
    gen = torch.Generator().manual_seed(3)
    ys = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    scales = [_scale(s, gen) for s in sizes]
    gs = [_grad(s, gen, dtype) for s in scales]
    zs = [torch.randn(s, generator=gen) for s in sizes]
    vs = [torch.rand(s.shape, generator=gen) * s * s for s in scales]
    refs = [(y.clone(), z.clone(), v.clone()) for y, z, v in zip(ys, zs, vs)]
    kw = dict(lr=1e-2, ck=0.1, y_coef=-5e-3, beta2=0.999, bias_correction2=0.01,
              eps=1e-8, weight_decay=0.01)
    calls = []
    orig = launch.K.sf_adamw_multi_kernel
    launch.K.sf_adamw_multi_kernel = type("Spy", (), {"__getitem__": lambda s, grid: (calls.append(grid), orig[grid])[1]})()
    try:
        F.sf_adamw(ys, gs, zs, vs, backend="triton", **kw)
    finally:
        launch.K.sf_adamw_multi_kernel = orig
    assert len(calls) == 2  # nine tensors: one launch of whole aligned chunks, one of tails
    for (y, z, v), (yr, zr, vr), g in zip(zip(ys, zs, vs), refs, gs):
        spec.sf_adamw_update(yr, g, zr, vr, **kw)
        close(z, zr), close(v, vr)
        if dtype == torch.float32:
            close(y, yr)
        else:  # one bf16 ulp: the fp32 values may differ in their last bit
            torch.testing.assert_close(y.float(), yr.float(), rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("n", [1, 127, 1000, 65537])
@pytest.mark.parametrize("momentum,centered", [(0.0, False), (0.9, False), (0.0, True), (0.5, True)])
@pytest.mark.parametrize("bias_correction,eps_in_sqrt", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_rmsprop_flat(n, momentum, centered, bias_correction, eps_in_sqrt, out_dtype):
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen)
    buf = torch.randn(n, generator=gen) if momentum else None
    gavg = torch.randn(n, generator=gen) * 0.1 if centered else None
    # A reachable state: E[g^2] >= E[g]^2, so the centred variance is >= 0.
    scale = _scale(n, gen)
    if centered:
        gavg = gavg * scale
    v = torch.rand(n, generator=gen) * scale * scale + (gavg**2 if centered else 0)
    refs = [t.clone() if t is not None else None for t in (p, v, buf, gavg)]
    p_out = torch.full((n,), float("nan"), dtype=out_dtype) if out_dtype else None
    for t in range(1, 3):
        g = _grad(scale, gen, torch.bfloat16)
        kw = dict(lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=momentum,
                  centered=centered, eps_in_sqrt=eps_in_sqrt, maximize=t == 2,
                  bias_correction2=1 - 0.9**t if bias_correction else 1.0, grad_scale=2.0)
        F.rmsprop([p], [g], [v], momentum_buffers=[buf] if momentum else None,
                  grad_avgs=[gavg] if centered else None,
                  param_outs=[p_out] if out_dtype else None, backend="triton", **kw)
        spec.rmsprop_update(refs[0], g, refs[1], momentum_buffer=refs[2], grad_avg=refs[3], **kw)
        close(p, refs[0], rtol=2e-6), close(v, refs[1])
        if momentum:
            close(buf, refs[2], rtol=2e-6)
        if centered:
            close(gavg, refs[3])
        if out_dtype:
            assert torch.equal(p_out, p.to(out_dtype))


def test_rounding_is_to_nearest_even_including_specials():
    x = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8) , 1e38, 3.4e38,
                      float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40])
    out = torch.empty_like(x, dtype=torch.bfloat16)
    z = x.clone()
    F.sf_interpolate([x], [z], weight=0.0, p_outs=[out], backend="triton")
    ref = x.bfloat16()
    assert torch.equal(out[~x.isnan()], ref[~x.isnan()]) and out[x.isnan()].isnan().all()


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        F.resolve_backend("triton", [torch.zeros(1)])
    from zero_sf import cpu
    # the fused CPU backend where it builds, else the torch path
    assert F.resolve_backend("auto", [torch.zeros(1)]) == ("cpu" if cpu.available() else "torch")


def test_chunk_table_sends_only_aligned_whole_blocks_down_the_unmasked_path():
    """The multi-tensor kernel's FULL launch runs its chunks unmasked, with
    16-byte alignment hints: it must get only whole BLOCKs of tensors whose
    pointers are all 16-byte aligned.  A view at a 4-byte offset (a parameter
    inside a flat buffer) must go to the masked launch, or a GPU would issue
    misaligned 128-bit accesses; the interpreter cannot tell."""
    from zero_sf.kernels import host as launch
    B = launch.BLOCK
    buf = torch.zeros(3 * B + 8)
    aligned, odd_size, unaligned = buf[: 2 * B], torch.zeros(B + 5), buf[1: B + 1]
    assert unaligned.data_ptr() % 16 == 4
    ts = [aligned, odd_size, unaligned]
    roles = [ts, [t.clone() for t in ts], None]

    def chunks(roles):
        _, table, numels = launch._chunk_table(roles, [0, 1, 2], torch.device("cpu"))
        return {full: sorted(zip(t.tolist(), s.tolist())) for full, (t, s) in table.items()}

    assert chunks(roles) == {True: [(0, 0), (0, B), (1, 0)], False: [(1, B), (2, 0)]}
    # ... and a role whose own pointer is unaligned demotes the tensor too.
    grads = [torch.zeros(2 * B + 1)[1:], torch.zeros(B + 5), torch.zeros(B)]
    assert chunks([ts[:2] + [torch.zeros(B)], grads, None]) == {
        True: [(1, 0), (2, 0)], False: [(0, 0), (0, B), (1, B)]}


def test_device_copies_write_results_back():
    """The GPU run's harness (on_device) gives what the direct call gives:
    exercised here with CPU copies."""
    gen = torch.Generator().manual_seed(5)
    y, z, v, scale = _sf_state(300, torch.float32, gen)
    g = _grad(scale, gen, torch.bfloat16)
    out = torch.empty(300, dtype=torch.bfloat16)
    copies = [t.clone() for t in (y, z, v, out)]
    kw = dict(lr=1e-2, ck=0.25, y_coef=-5e-3, beta2=0.99, bias_correction2=0.5, eps=1e-8)
    _F.sf_adamw([y], [g], [z], [v], y_outs=[out], backend="triton", **kw)
    on_device(_F.sf_adamw, [copies[0]], [g], [copies[1]], [copies[2]], y_outs=[copies[3]],
              backend="triton", device=torch.device("cpu"), **kw)
    for a, b in zip((y, z, v, out), copies):
        assert torch.equal(a, b)
    assert not torch.equal(y, _sf_state(300, torch.float32, torch.Generator().manual_seed(5))[0])
