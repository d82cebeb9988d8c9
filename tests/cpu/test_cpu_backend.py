"""The fused CPU backend (zero_sf/cpu) against the spec.

Bit for bit against the spec evaluated with a correctly rounded square root
(the C code is; torch's vectorized CPU sqrt is not: on AVX512 it is one ulp
off in ~18 % of elements, so the spec's own bits depend on the CPU), and
within the kernels' tolerance against the spec on torch's sqrt."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys

import pytest
import torch

from zero_sf import functional as F
from tests.helpers import exact_sqrt
from zero_sf import spec
from zero_sf.storage import Store, Stores

cpu = pytest.importorskip("zero_sf.cpu")
if not cpu.available():  # conftest fails the run unless ZERO_SF_SKIP_MISSING=1
    pytest.skip(f"the CPU backend did not build: {cpu.unavailable_reason()}",
                allow_module_level=True)

SIZES = [1, 1023, 1025, 70_001]
LOW = [torch.bfloat16, torch.float16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_same(got, want, exact):
    for a, b in zip(got, want):
        if a is None:
            continue
        if exact:
            assert a.dtype == b.dtype and torch.equal(a, b), (a - b).abs().max()
        elif a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:  # a 1-ulp sqrt difference may flip the rounding: one ulp of the dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=torch.finfo(a.dtype).eps,
                                       atol=0)


def _sf_case(sizes, p_dtype, g_dtype, out_dtype, seed=0):
    g = _gen(seed)
    ts = []
    for n in sizes:
        y = torch.randn(n, generator=g).to(p_dtype)
        grad = torch.randn(n, generator=g).to(g_dtype)
        z = torch.randn(n, generator=g)
        v = torch.rand(n, generator=g) * 1e-2
        out = torch.empty(n, dtype=out_dtype) if out_dtype else None
        ts.append([y, grad, z, v, out])
    return ts


def _clone(ts):
    return [[t.clone() if t is not None else None for t in row] for row in ts]


SF_SCALARS = [dict(lr=1e-2, ck=0.2, y_coef=-8e-3, beta2=0.999, bias_correction2=0.3, eps=1e-8,
                   weight_decay=0.1, grad_scale=0.5),
              dict(lr=3e-3, ck=1.0, y_coef=-3e-3, beta2=0.95, bias_correction2=1.0, eps=1e-6,
                   weight_decay=0.0, grad_scale=1.0),
              # the other two loop variants: decay without bias correction and back
              dict(lr=1e-2, ck=0.6, y_coef=-4e-3, beta2=0.999, bias_correction2=1.0, eps=1e-8,
                   weight_decay=0.1, grad_scale=1.0),
              dict(lr=1e-2, ck=0.0, y_coef=-1e-2, beta2=0.99, bias_correction2=0.02, eps=1e-8,
                   weight_decay=0.0, grad_scale=2.0)]
SF_DTYPES = [(torch.float32, torch.float32, None), (torch.float32, torch.bfloat16, torch.bfloat16),
             (torch.float32, torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16, None),
             (torch.float16, torch.float16, None), (torch.float32, torch.float32, torch.float32)]


@pytest.mark.parametrize("dtypes", SF_DTYPES, ids=str)
@pytest.mark.parametrize("scalars", [0, 1, 2, 3])
@pytest.mark.parametrize("exact", [True, False], ids=["exact-sqrt", "torch-sqrt"])
def test_sf_adamw_matches_the_spec(dtypes, scalars, exact):
    ts = _sf_case(SIZES, *dtypes)
    want, got = _clone(ts), _clone(ts)
    kw = SF_SCALARS[scalars]
    with exact_sqrt() if exact else contextlib.nullcontext():
        for y, g, z, v, out in want:
            spec.sf_adamw_update(y, g, z, v, store=Store(out=out), **kw)
    F.sf_adamw(*[[row[i] for row in got] for i in range(4)],
               store=Stores(outs=[row[4] for row in got] if dtypes[2] else None), backend="cpu",
               **kw)
    for a, b in zip(got, want):
        assert torch.equal(a[3], b[3])  # v: no sqrt on its path, always exact
        _assert_same(a, b, exact)


RMS_FLAGS = list(itertools.product([0.0, 0.9], [False, True], [False, True], [False, True],
                                   [1.0, 0.3], [0.0, 0.01]))


@pytest.mark.parametrize("momentum, centered, eps_in_sqrt, maximize, bc2, wd", RMS_FLAGS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, None),
                                    (torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16, None)], ids=str)
def test_rmsprop_every_flag_matches_the_spec(momentum, centered, eps_in_sqrt, maximize, bc2, wd,
                                             dtypes):
    p_dtype, g_dtype, out_dtype = dtypes
    g = _gen(1)
    rows = []
    for n in (1025, 3):
        grad = torch.randn(n, generator=g).to(g_dtype)
        gavg = torch.randn(n, generator=g) * 0.1
        rows.append([torch.randn(n, generator=g).to(p_dtype), grad,
                     torch.rand(n, generator=g) + gavg**2,  # centred variance >= 0
                     torch.randn(n, generator=g), gavg,
                     torch.empty(n, dtype=out_dtype) if out_dtype else None])
    want, got = _clone(rows), _clone(rows)
    kw = dict(lr=1e-2, alpha=0.99, eps=1e-6, weight_decay=wd, momentum=momentum,
              centered=centered, bias_correction2=bc2, eps_in_sqrt=eps_in_sqrt,
              maximize=maximize, grad_scale=0.5)
    with exact_sqrt():
        for p, gr, v, buf, ga, out in want:
            spec.rmsprop_update(p, gr, v, momentum_buffer=buf if momentum else None,
                                grad_avg=ga if centered else None, store=Store(out=out),
                                **kw)
    col = lambda i: [row[i] for row in got]
    F.rmsprop(col(0), col(1), col(2), momentum_buffers=col(3) if momentum else None,
              grad_avgs=col(4) if centered else None,
              store=Stores(outs=col(5) if out_dtype else None), backend="cpu", **kw)
    for a, b in zip(got, want):
        _assert_same(a, b, exact=True)


@pytest.mark.parametrize("p_dtype, out_dtype", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                                (torch.bfloat16, None), (torch.float16, None)])
@pytest.mark.parametrize("weight", [1 - 1 / 0.9, 0.1, 0.75])
def test_interpolation_is_the_spec_bitwise(p_dtype, out_dtype, weight):
    g = _gen(2)
    ps = [torch.randn(n, generator=g).to(p_dtype) for n in SIZES]
    zs = [torch.randn(n, generator=g) for n in SIZES]
    outs = [torch.empty(n, dtype=out_dtype) for n in SIZES] if out_dtype else None
    want = [p.clone() for p in ps]
    want_outs = [o.clone() for o in outs] if outs else [None] * len(ps)
    for p, z, o in zip(want, zs, want_outs):
        spec.sf_interpolate(p, z, weight=weight, store=Store(out=o))
    F.sf_interpolate(ps, zs, weight=weight, store=Stores(outs=outs), backend="cpu")
    _assert_same(ps, want, exact=True)
    if outs:
        _assert_same(outs, want_outs, exact=True)


def test_rounding_is_to_nearest_even_including_specials():
    x = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1e38, 3.4e38, 65520.0,
                      float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40, 6e-8])
    z = torch.zeros_like(x)
    for low in LOW:
        out, ref = torch.empty_like(x, dtype=low), torch.empty_like(x, dtype=low)
        # weight 0: p + 0 * (z - p) is p itself (finite p), rounded once to `low`
        F.sf_interpolate([x.clone()], [z], weight=0.0, p_outs=[out], backend="cpu")
        spec.sf_interpolate(x.clone(), z, weight=0.0, store=Store(out=ref))
        nan = ref.isnan()  # (inf - inf: NaN in both; NaN payloads may differ)
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])
        finite = x.isfinite()
        assert torch.equal(out[finite], x[finite].to(low))  # torch's own rounding, overflow to inf


def test_thread_count_does_not_change_a_bit():
    kw = SF_SCALARS[0]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ts = _sf_case([70_001, 5, 3000], torch.float32, torch.bfloat16, torch.bfloat16)
            F.sf_adamw(*[[row[i] for row in ts] for i in range(4)],
                       y_outs=[row[4] for row in ts], backend="cpu", **kw)
            results.append(ts)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_auto_picks_it_and_unsupported_tensors_take_the_torch_path():
    assert F.resolve_backend("auto", [torch.zeros(3)]) == "cpu"
    # fp64 and non-contiguous tensors: the torch path, same results as the spec
    y = torch.randn(8, 6, dtype=torch.float64)[:, ::2]
    g, z, v = torch.randn_like(y), torch.randn_like(y), torch.rand_like(y)
    want = [t.clone() for t in (y, z, v)]
    kw = SF_SCALARS[0]
    F.sf_adamw([y], [g], [z], [v], backend="cpu", **kw)
    spec.sf_adamw_update(want[0], g, want[1], want[2], **kw)
    assert all(torch.equal(a, b) for a, b in zip((y, z, v), want))


def test_without_a_compiler_one_warning_then_the_torch_path(tmp_path):
    code = (
        "import warnings, torch\n"
        "from zero_sf import functional as F\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = F.resolve_backend('auto', [torch.zeros(1)])\n"
        "    b = F.resolve_backend('auto', [torch.zeros(1)])\n"
        "print(a, b, len([x for x in w if 'CPU backend is unavailable' in str(x.message)]))\n")
    env = {**os.environ, "CC": "/nonexistent/cc", "PATH": str(tmp_path),
           "ZERO_SF_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "torch", "1"]


def test_the_call_returns_only_when_every_thread_is_done():
    """Read the result the moment the call returns, many times: the chunks
    the helper threads claimed must be finished by then."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        n = 1 << 21
        z = torch.zeros(n)
        # the last element of every 1/64 of the tensor (finer than any claim):
        # each claim is written front to back, so its end is written last
        ends = torch.arange(1, 65) * (n // 64) - 1
        for _ in range(50):
            p = torch.ones(n)
            F.sf_interpolate([p], [z], weight=0.25, backend="cpu")
            assert bool((p[ends] == 0.75).all())  # one gather, at once
            assert p.max().item() == p.min().item() == 0.75
    finally:
        torch.set_num_threads(threads)
