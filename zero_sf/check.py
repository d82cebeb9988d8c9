"""Self-check of a zero_sf install: ``python -m zero_sf.check`` (or ``zero-sf-check``).

Run it once on a new machine, in the spirit of ``python -m
torch.utils.collect_env`` and DeepSpeed's ``ds_report``.  It prints the
versions and the device, then one PASS/FAIL line per check:

* every kernel against the spec (:mod:`zero_sf.spec`) on small tensors of odd
  sizes, within the tolerance the test suite uses, and -- on a GPU -- bit for
  bit against the same kernel under ``TRITON_INTERPRET=1`` on the CPU (the
  path CI tests; the kernels are compiled without FMA contraction so the two
  round alike);
* one :class:`~zero_sf.ZeroOptimizer` step at world size 1 (NCCL on a GPU,
  gloo on CPU) against the single-device optimizer, bit for bit;
* a few seconds of step bandwidth: the fused step vs a device copy of the
  same bytes and ``torch.optim.AdamW(fused=True)``.

On a CPU-only machine it runs the kernels under the interpreter and says what
it skipped.  Exit status 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from .storage import Stores

RTOL = 1e-6  # the kernel tests' tolerance against the spec (fp32 state)


class Report:
    def __init__(self):
        self.lines: list[dict] = []

    def add(self, status: str, name: str, detail: str = "") -> None:
        self.lines.append(dict(status=status, check=name, detail=detail))
        print(f"{status:<5} {name}{': ' + detail if detail else ''}", flush=True)

    @property
    def failed(self) -> int:
        return sum(1 for line in self.lines if line["status"] == "FAIL")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict:
    import zero_sf

    env = {
        "zero_sf": zero_sf.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = (f"{props.name} (sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB)")
        env["NCCL"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["CUDA driver/runtime"] = str(torch.version.cuda)
    else:
        cpu = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f
                            if line.startswith("model name")), cpu)
        except OSError:
            pass
        env["device"] = f"CPU: {cpu}, {os.cpu_count()} logical cores (no CUDA device)"
        env["NCCL"] = "n/a (no CUDA)"
    return env


# --------------------------------------------------------------------------
# Kernel cases: each builds its inputs from a seed, runs one functional call
# and returns the tensors it wrote.  The same code runs on the GPU, under the
# interpreter (subprocess) and as the spec.
# --------------------------------------------------------------------------

SIZES = (1, 1000, 65537)  # a scalar, a batched tensor, one with its own launch (>= 2**16)


def _inputs(seed: int, n: int, y_dtype, g_dtype, device):
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-6, 1, (n,), generator=gen).float()
    y = torch.randn(n, generator=gen).to(y_dtype)
    g = (torch.randn(n, generator=gen) * scale).to(g_dtype)
    z = torch.randn(n, generator=gen)
    v = torch.rand(n, generator=gen) * scale * scale
    b = torch.randn(n, generator=gen) * 0.1 * scale  # a centred RMSProp's E[g]
    return [t.to(device) for t in (y, g, z, v, b)]


def _sf_case(y_dtype, g_dtype, out_dtype, wd):
    def run(device, backend):
        from . import dispatch

        ts = [_inputs(7 + i, n, y_dtype, g_dtype, device) for i, n in enumerate(SIZES)]
        outs = ([torch.zeros(n, dtype=out_dtype, device=device) for n in SIZES]
                if out_dtype else None)
        dispatch.sf_adamw([t[0] for t in ts], [t[1] for t in ts], [t[2] for t in ts],
                          [t[3] for t in ts], store=Stores(outs=outs), lr=1e-2, ck=0.3,
                          y_coef=-7e-3, beta2=0.999, bias_correction2=0.05, eps=1e-8,
                          weight_decay=wd, grad_scale=0.5, backend=backend)
        return [x for t in ts for x in (t[0], t[2], t[3])] + (outs or [])
    name = f"sf_adamw y={_short(y_dtype)} g={_short(g_dtype)}" + (
        f" y_out={_short(out_dtype)}" if out_dtype else "") + f" wd={wd}"
    return name, run, RTOL


def _rmsprop_case(momentum, centered, bias_correction, eps_in_sqrt, maximize, dtype):
    def run(device, backend):
        from . import dispatch

        ts = [_inputs(11 + i, n, dtype, dtype, device) for i, n in enumerate(SIZES)]
        if centered:  # a reachable state: E[g^2] >= E[g]^2
            for t in ts:
                t[3] += t[4] * t[4]
        dispatch.rmsprop([t[0] for t in ts], [t[1] for t in ts], [t[3] for t in ts],
                         momentum_buffers=[t[2] for t in ts] if momentum else None,
                         grad_avgs=[t[4] for t in ts] if centered else None,
                         lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=momentum,
                         centered=centered, bias_correction2=0.19 if bias_correction else 1.0,
                         eps_in_sqrt=eps_in_sqrt, maximize=maximize, grad_scale=2.0,
                         backend=backend)
        return [x for t in ts for x in (t[0], t[3], t[2], t[4])]
    name = (f"rmsprop {_short(dtype)} momentum={momentum} centered={centered} "
            f"bias_correction={bias_correction} eps_in_sqrt={eps_in_sqrt} maximize={maximize}")
    return name, run, 2 * RTOL  # the RMSProp kernel tests' tolerance (momentum: two roundings more)


def _interp_case(dtype, with_out):
    def run(device, backend):
        from . import dispatch

        ts = [_inputs(13 + i, n, torch.float32 if with_out else dtype, dtype, device)
              for i, n in enumerate(SIZES)]
        outs = [torch.zeros(n, dtype=dtype, device=device) for n in SIZES] if with_out else None
        dispatch.sf_interpolate([t[0] for t in ts], [t[2] for t in ts], weight=0.1,
                                store=Stores(outs=outs), backend=backend)
        return [t[0] for t in ts] + (outs or [])
    return f"sf_interpolate {_short(dtype)}{' (fp32 master + copy)' if with_out else ''}", run, RTOL


def _compressed_case(interpolate: bool):
    """A ZeRO shard of a bf16 model with compressed state (docs/design.md
    §11): bf16 y + int16 remainder, bf16 z and v rounded stochastically."""
    def run(device, backend):
        from . import dispatch
        from .storage import join_master, split_master

        ts = [_inputs(17 + i, n, torch.float32, torch.bfloat16, device)
              for i, n in enumerate(SIZES)]
        ys, rems = zip(*(split_master(t[0]) for t in ts))
        zs = [t[2].bfloat16() for t in ts]
        vs = [t[3].bfloat16() for t in ts]
        dispatch.sf_adamw(list(ys), [t[1] for t in ts], zs, vs, lr=1e-2, ck=0.3, y_coef=-7e-3,
                          beta2=0.999, bias_correction2=0.05, eps=1e-8, weight_decay=0.1,
                          grad_scale=0.5, backend=backend,
                          store=Stores(remainders=list(rems), sr=(3, 2**33 + 5),
                                       index_bases=[2**32 - 500, 7, 0]))
        if interpolate:
            dispatch.sf_interpolate(list(ys), zs, weight=1 - 1 / 0.9,
                                    store=Stores(remainders=list(rems)), backend=backend)
        return [join_master(y, r) for y, r in zip(ys, rems)] + zs + vs
    return (f"compressed ZeRO shard (bf16 y + remainder, bf16 state, stochastic rounding)"
            f"{' + eval switch' if interpolate else ''}", run, RTOL)


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")


def kernel_cases() -> list[tuple[str, Callable, float]]:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [
        _sf_case(fp32, fp32, None, 0.0),
        _sf_case(bf16, bf16, None, 0.1),
        _sf_case(fp16, fp16, None, 0.0),
        _sf_case(fp32, bf16, bf16, 0.0),  # a ZeRO shard of a bf16 model
        _rmsprop_case(0.0, False, True, False, False, fp32),
        _rmsprop_case(0.9, True, False, True, True, fp32),
        _rmsprop_case(0.5, True, True, False, False, bf16),
        _interp_case(fp32, False),
        _interp_case(bf16, True),
        _compressed_case(False),
        _compressed_case(True),
    ]


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _compare(out, ref, rtol) -> tuple[bool, str]:
    """The kernel tests' comparison: fp32 within ``rtol`` of the largest
    magnitude (as the tests' ``close``); a bf16/fp16 output within one ulp of
    its element plus that fp32 tolerance (the rounding of two fp32 values a
    few ulp apart).  Not bit for bit: torch's own CPU/CUDA kernels contract
    some operations into FMAs (``lerp``, ``addcmul``), the Triton kernels
    do not."""
    worst = 0.0
    for o, r in zip(out, ref):
        o32, r32 = o.float().cpu(), r.float().cpu()
        if not torch.equal(o32.isnan(), r32.isnan()):
            return False, "NaN in different places"
        o32, r32 = o32.nan_to_num(0), r32.nan_to_num(0)
        tol = torch.full_like(r32, rtol * r32.abs().max().item())
        if o.dtype != torch.float32:
            tol += torch.finfo(o.dtype).eps * r32.abs()
        ratio = ((o32 - r32).abs() / tol.clamp_min(1e-38)).max().item()
        worst = max(worst, ratio)
        if ratio > 1.0:
            return False, (f"{_short(o.dtype)} output differs from the spec by {ratio:.3g}x "
                           f"the tolerance (rtol {rtol:g})")
    return True, f"largest difference {worst:.2f}x the tolerance (rtol {rtol:g})"


def _against_spec(report: Report, name: str, passed: str, run, device, backend: str, rtol,
                  ran: Callable[[], bool] = lambda: True):
    """One case on ``backend`` and on the spec: a PASS/FAIL line named
    ``passed`` (``name`` when it crashed or ``ran()`` says it did not run
    where asked).  Returns the backend's outputs, or None."""
    try:
        out = run(device, backend)
        ref = run(device, "torch")
    except Exception as e:  # noqa: BLE001 - a crash is a FAIL line
        report.add("FAIL", name, f"{type(e).__name__}: {e}")
        return None
    if not ran():
        report.add("FAIL", name, f"the case fell back to the torch path: the {backend} "
                   "backend never ran")
        return None
    ok, detail = _compare(out, ref, rtol)
    report.add("PASS" if ok else "FAIL", passed, detail)
    return out


def check_kernels(report: Report, device: torch.device, cases=None) -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        report.add("SKIP", "kernels", "triton is not installed (pip install triton)")
        return
    cases = kernel_cases() if cases is None else cases
    gpu_outs = {}
    where = "GPU" if device.type == "cuda" else "interpreter"
    for name, run, rtol in cases:
        out = _against_spec(report, f"kernel {name}", f"kernel {name} ({where}) vs spec", run,
                            device, "triton", rtol)
        if out is not None:
            gpu_outs[name] = [t.cpu() for t in out]
    if device.type != "cuda":
        report.add("SKIP", "kernels on GPU == interpreter, bit for bit", "no CUDA device")
        return
    # The same cases under TRITON_INTERPRET=1 in a fresh process (the variable
    # must be set before Triton decorates the kernels).
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "interp.pt")
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run([sys.executable, "-m", "zero_sf.check", "--_interpret-to", path],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            report.add("FAIL", "kernels under the interpreter", proc.stderr[-2000:])
            return
        interp = torch.load(path)
    for name, outs in gpu_outs.items():
        ref = interp[name]
        diff = sum(int((_bits(a) != _bits(b)).sum()) for a, b in zip(outs, ref))
        same = diff == 0
        report.add("PASS" if same else "FAIL", f"kernel {name}: GPU == interpreter, bit for bit",
                   "identical" if same else f"{diff} elements differ")


def check_cpu_backend(report: Report, cases=None) -> None:
    """The fused CPU backend (what runs on CPU tensors by default, and under
    ``offload="cpu"``) against the spec, case by case."""
    from . import cpu as backend  # lazy: builds or loads the C library
    if not backend.available():
        report.add("SKIP", "fused CPU backend vs spec",
                   f"the backend is not available here ({backend.unavailable_reason()}); "
                   "CPU tensors use the torch path")
        return
    cases = kernel_cases() if cases is None else cases
    cpu = torch.device("cpu")
    for name, run, rtol in cases:
        def ran(before: int = backend.calls()) -> bool:  # in C, not on the fallback
            return backend.calls() > before

        _against_spec(report, f"cpu backend {name}", f"cpu backend {name} vs spec", run, cpu,
                      "cpu", rtol, ran=ran)


def _interpret_to(path: str) -> int:
    """Child process: the kernel cases under the interpreter, saved."""
    out = {name: [t.cpu() for t in run(torch.device("cpu"), "triton")]
           for name, run, _ in kernel_cases()}
    torch.save(out, path)
    return 0


# --------------------------------------------------------------------------
# A ZeroOptimizer step at world size 1
# --------------------------------------------------------------------------


def check_zero_step(report: Report, device: torch.device) -> None:
    import torch.distributed as dist

    from . import ScheduleFreeAdamW, ZeroOptimizer

    backend = "nccl" if device.type == "cuda" else "gloo"
    name = f"ZeroOptimizer step, world size 1 ({backend}) == ScheduleFreeAdamW"
    if dist.is_initialized():
        report.add("SKIP", name, "torch.distributed is already initialized in this process")
        return
    with tempfile.TemporaryDirectory() as d:
        store = dist.FileStore(os.path.join(d, "store"), 1)
        try:
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        except Exception as e:  # noqa: BLE001
            report.add("FAIL", name, f"init_process_group({backend!r}): {type(e).__name__}: {e}")
            return
        try:
            torch.manual_seed(0)
            ref = torch.nn.Sequential(torch.nn.Linear(64, 257), torch.nn.GELU(),
                                      torch.nn.Linear(257, 33)).to(device)
            model = torch.nn.Sequential(torch.nn.Linear(64, 257), torch.nn.GELU(),
                                        torch.nn.Linear(257, 33)).to(device)
            model.load_state_dict(ref.state_dict())
            opts: list[Any] = [ScheduleFreeAdamW(ref.parameters(), lr=1e-2, weight_decay=0.01),
                    ZeroOptimizer(model.parameters(), stage=2, lr=1e-2, weight_decay=0.01)]
            for opt in opts:
                opt.train()
            for step in range(3):
                x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step)).to(device)
                for m, opt in zip((ref, model), opts):
                    m(x).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
            for opt in opts:
                opt.eval()
            diffs = [int((a != b).sum()) for a, b in zip(ref.parameters(), model.parameters())]
            ok = sum(diffs) == 0
            report.add("PASS" if ok else "FAIL", name,
                       "3 steps and eval(): identical parameters" if ok
                       else f"{sum(diffs)} elements differ")
        except Exception as e:  # noqa: BLE001
            report.add("FAIL", name, f"{type(e).__name__}: {e}")
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------
# Bandwidth
# --------------------------------------------------------------------------


def _time(fn, device, seconds: float) -> float:
    """Median seconds per call, over about ``seconds`` of calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn(), sync()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def check_bandwidth(report: Report, device: torch.device, seconds: float) -> dict:
    from . import ScheduleFreeAdamW

    n = (1 << 26) if device.type == "cuda" else (1 << 22)  # 64M / 4M fp32 elements
    p = torch.zeros(n, device=device, requires_grad=True)
    p.grad = torch.randn(n, device=device) * 1e-3
    q = torch.zeros(n, device=device, requires_grad=True)
    q.grad = p.grad.clone()
    sf = ScheduleFreeAdamW([p], lr=1e-3)
    sf.train()
    adamw = torch.optim.AdamW([q], lr=1e-3, fused=True)
    # The same 28 B/element as one copy: read 14 B, write 14 B (3.5 fp32).
    src = torch.zeros(7 * n // 2, device=device)
    dst = torch.empty_like(src)
    t_sf = _time(sf.step, device, seconds)
    t_adamw = _time(adamw.step, device, seconds)
    t_copy = _time(lambda: dst.copy_(src), device, seconds)
    def gbs(t, nbytes):
        return nbytes / t / 1e9
    bytes_step = 28 * n  # read g y z v (16 B), write y z v (12 B), fp32
    out = dict(elements=n, sf_step_ms=t_sf * 1e3, adamw_fused_ms=t_adamw * 1e3,
               copy_ms=t_copy * 1e3, sf_GBps=gbs(t_sf, bytes_step),
               copy_GBps=gbs(t_copy, bytes_step))
    detail = (f"{n / 2**20:.0f}M fp32 elements: zero_sf step {t_sf * 1e3:.2f} ms "
              f"({out['sf_GBps']:.0f} GB/s at 28 B/element), AdamW(fused=True) "
              f"{t_adamw * 1e3:.2f} ms, copy of the same bytes {t_copy * 1e3:.2f} ms "
              f"({out['copy_GBps']:.0f} GB/s)")
    if device.type == "cuda":
        # A floor, not a target: a kernel gone scalar or serialized lands far below.
        ok = out["sf_GBps"] >= 0.5 * out["copy_GBps"]
        report.add("PASS" if ok else "FAIL", "fused step bandwidth >= 50% of a device copy", detail)
    else:
        from .dispatch import resolve_backend
        which = {"cpu": "the fused CPU backend", "torch": "the torch path (the spec)",
                 "triton": "Triton"}[resolve_backend("auto", [p])]
        report.add("INFO", f"step bandwidth (CPU: {which}, no threshold)", detail)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zero_sf.check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per bandwidth measurement")
    ap.add_argument("--json", default=None, help="also write the report to this file")
    ap.add_argument("--_interpret-to", dest="interpret_to", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.interpret_to:
        return _interpret_to(args.interpret_to)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda and "zero_sf.kernels" not in sys.modules:
        # Without a GPU the kernels can only run under Triton's interpreter,
        # which must be chosen before they are decorated.
        if not os.environ.get("TRITON_INTERPRET"):  # unset or empty
            os.environ["TRITON_INTERPRET"] = "1"
    env = environment(device)
    width = max(map(len, env))
    print("zero_sf self-check\n")
    for k, v in env.items():
        print(f"  {k:<{width}}  {v}")
    print()
    report = Report()
    check_kernels(report, device)
    check_cpu_backend(report)
    check_zero_step(report, device)
    bandwidth = check_bandwidth(report, device, args.seconds)
    print(f"\n{'FAILED' if report.failed else 'PASSED'}: {report.failed} failed, "
          f"{sum(1 for x in report.lines if x['status'] == 'PASS')} passed, "
          f"{sum(1 for x in report.lines if x['status'] == 'SKIP')} skipped")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, checks=report.lines, bandwidth=bandwidth), f, indent=1)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
