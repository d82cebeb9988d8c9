"""Compile every kernel the optimizers launch for NVIDIA GPUs, without a GPU.

Triton's pipeline (frontend -> ttir -> ttgir -> llir -> ptx -> cubin) runs on
a CPU-only machine with the LLVM and ``ptxas`` inside the triton wheel; only
*launching* needs a driver.  So CI compiles here what a GPU user's first step
would compile, and catches what the interpreter cannot (type mismatches
between branches, register spills, shared memory over the per-block limit).

The specializations are not a hand-written list: :func:`record` runs the
optimizers on CPU (or meta) tensors with every Triton launch intercepted, and
Triton's own argument binder, with the CUDA backend, decides each signature
(pointer dtypes, 16-byte alignment, ``n % 16``, ``n == 1``, i32 or i64).

    python tools/aot.py              # a covering subset, sm_80 + sm_90
    python tools/aot.py --all        # every recorded specialization

Must run *without* ``TRITON_INTERPRET=1`` (under the interpreter ``triton.jit``
returns interpreter objects that cannot be compiled).  Written against the
Triton 3.9 JIT internals (``create_function_from_signature``, ``_pack_args``).
A development tool, outside the package since issue #22: it drives the
optimizers and the sharded optimizer, which the kernels must not import.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Iterable, Optional

import torch

# Per-block shared memory an NVIDIA GPU grants (with the opt-in attribute):
# A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB (CUDA programming guide, table
# "Technical specifications per compute capability").
SHARED_LIMIT = {80: 166912, 90: 232448}
ARCHS = (80, 90)
# Register spills tolerated, in bytes of spill stores + loads.  sm_90 (ptxas
# 13 from the wheel): none, anywhere.  sm_80 (the wheel's ptxas 12.9): in 6
# of the 280 sm_80 specializations (bf16 RMSProp, FULL multi-tensor launch,
# momentum + centered, or bias correction alone) ptxas keeps 64 registers --
# 8 blocks of 128 threads per SM -- and spills 8-32 bytes to the L1-cached
# stack rather than use 68; it does so even with -maxrregcount=128.  Those
# are reported as WARN lines (counted in the summary), not hidden; anything
# above this limit fails.
SPILL_LIMIT = {80: 32, 90: 0}

KERNEL_NAMES = ("sf_adamw_flat_kernel", "sf_adamw_multi_kernel", "rmsprop_flat_kernel",
                "rmsprop_multi_kernel", "interpolate_flat_kernel")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of one kernel: what Triton's cache key holds."""

    kernel: str
    signature: tuple  # ((param, type), ...): "*bf16", "i32", "i64", "fp32", "constexpr"
    constexprs: tuple  # ((param, value), ...)
    attrs: tuple  # ((param, "D" | "" ), ...): "D" = divisible by 16 (pointers: 16-byte aligned)
    options: tuple  # ((name, value), ...): the launch options (num_warps, enable_fp_fusion)
    sources: tuple = field(default=(), compare=False)  # which runs launched it

    def describe(self) -> str:
        sig = ",".join(f"{t}{'/16' if a == 'D' else ''}"
                       for (p, t), (_, a) in zip(self.signature, self.attrs) if t != "constexpr")
        const = ",".join(f"{p}={v}" for p, v in self.constexprs)
        return f"{self.kernel}[{sig}]({const})"

    def features(self) -> set:
        """What a covering subset must include at least once."""
        return ({(self.kernel, "sig", self.signature, self.attrs)}
                | {(self.kernel, "const", p, v) for p, v in self.constexprs})


class _Recorder:
    """Stands in for one kernel object: ``kernel[grid](*args, **kw)`` records
    Triton's specialization of the arguments and launches nothing."""

    def __init__(self, name: str, fn, backend, sink: dict, source: list):
        self.name, self.fn, self.backend, self.sink, self.source = name, fn, backend, sink, source

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs):
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(self.fn.signature, self.fn.params, self.backend)
        bound, spec, opts = binder(*args, **kwargs)
        _, signature, constexprs, attrs = self.fn._pack_args(self.backend, kwargs, bound, spec, opts)
        names = [p.name for p in self.fn.params]
        raw = [s[1] if s[0] != "constexpr" else None for s in spec]
        launch_opts = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
        key = Specialization(
            kernel=self.name,
            signature=tuple(signature.items()),
            constexprs=tuple((names[path[0]], v) for path, v in sorted(constexprs.items())),
            attrs=tuple((n, a if isinstance(a, str) else "") for n, a in zip(names, raw)),
            options=launch_opts)
        old = self.sink.get(key)
        tag = self.source[0] if self.source else "?"
        self.sink[key] = Specialization(**{**key.__dict__, "sources": tuple(
            sorted(set((old.sources if old else ()) + (tag,))))})


@contextlib.contextmanager
def record(sink: dict, source: list):
    """Intercept every launch of :mod:`zero_sf.kernels`; ``sink`` collects
    :class:`Specialization` keys, tagged with ``source[0]`` at launch time.

    Inside, ``backend="triton"`` is accepted for CPU and meta tensors (the
    launches are recorded, never run: the tensors keep their values)."""
    if _interpreting():
        raise RuntimeError("tools/aot.py needs TRITON_INTERPRET unset (the interpreter's "
                           "kernels cannot be compiled); run it in its own process")
    from triton.compiler import make_backend

    from zero_sf import dispatch as functional
    from zero_sf.kernels import host as launch

    backend = make_backend(_target(90))
    K = launch.K
    saved = {n: getattr(K, n) for n in KERNEL_NAMES}
    saved_interpret = functional._interpret
    try:
        for n in KERNEL_NAMES:
            setattr(K, n, _Recorder(n, saved[n], backend, sink, source))
        functional._interpret = lambda: True
        yield sink
    finally:
        for n, fn in saved.items():
            setattr(K, n, fn)
        functional._interpret = saved_interpret


# --------------------------------------------------------------------------
# The runs whose launches are recorded
# --------------------------------------------------------------------------

# Parameter shapes of a small transformer-like model: two tensors large
# enough for their own flat launch (65,536 = 2**16 elements: n % 16 == 0;
# 77,100: n % 16 == 12), the rest batched into one multi-tensor launch.
_SHAPES = [(256, 256), (300, 257), (64, 17), (64,), (33,), (7, 5)]


def _params(dtype, device="cpu", shapes=_SHAPES):
    ps = [torch.zeros(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]
    for p in ps:
        p.grad = torch.zeros_like(p)
    return ps


def _sf_runs(tag):
    from zero_sf.optim import ScheduleFreeAdamW

    for dtype, wd in itertools.product((torch.float32, torch.bfloat16, torch.float16), (0, 0.1)):
        tag[0] = f"ScheduleFreeAdamW({dtype}, weight_decay={wd})"
        for shapes in (_SHAPES, [(1,)], [(1000,)]):  # a model, a lone scalar, a lone odd tensor
            opt = ScheduleFreeAdamW(_params(dtype, shapes=shapes), lr=1e-3, weight_decay=wd,
                                    backend="triton")
            opt.train()
            opt.step()
            opt.eval()
            opt.train()


def _rmsprop_runs(tag):
    from zero_sf.optim import RMSProp

    flags = itertools.product((torch.float32, torch.bfloat16), (0, 0.9), (False, True),
                              (False, True), (False, True), (False, True), (0, 0.01))
    for dtype, mom, centered, bc, eis, maximize, wd in flags:
        tag[0] = (f"RMSProp({dtype}, momentum={mom}, centered={centered}, bias_correction={bc}, "
                  f"eps_in_sqrt={eis}, maximize={maximize}, weight_decay={wd})")
        opt = RMSProp(_params(dtype), momentum=mom, centered=centered, bias_correction=bc,
                      eps_in_sqrt=eis, maximize=maximize, weight_decay=wd, backend="triton")
        opt.step()


def _zero_runs(tag):
    from zero_sf.optim import RMSProp, ScheduleFreeAdamW
    from zero_sf.sharding import ZeroOptimizer

    # World size 1 without a process group: the shard is the whole flat
    # buffer (padded to a multiple of `align` = 128 elements), which is the
    # specialization every rank of a larger world gets too.
    for cls, dtype, stage in itertools.product((ScheduleFreeAdamW, RMSProp),
                                               (torch.float32, torch.bfloat16), (1, 2)):
        tag[0] = f"ZeroOptimizer({cls.__name__}, {dtype}, stage={stage})"
        model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 3)).to(dtype)
        opt = ZeroOptimizer(model.parameters(), cls, stage=stage, backend="triton")
        if cls is ScheduleFreeAdamW:
            opt.train()
        model(torch.zeros(2, 40, dtype=dtype)).sum().backward()
        opt.step()
        if cls is ScheduleFreeAdamW:
            opt.eval()
            opt.train()


def _huge_runs(tag):
    """Tensors of 2**31 + 16 elements on the meta device (no memory): Triton
    passes n as i64 there.  The single-device optimizer on such a parameter,
    and a ZeRO shard of that size (fp32 master, bf16 gradient and model copy:
    the roles ZeroOptimizer passes) through the functional API."""
    from zero_sf import dispatch as F
    from zero_sf.optim import ScheduleFreeAdamW

    n = 2**31 + 16
    for dtype in (torch.float32, torch.bfloat16):
        tag[0] = f"ScheduleFreeAdamW({dtype}, {n} elements)"
        opt = ScheduleFreeAdamW(_params(dtype, "meta", [(n,)]), backend="triton")
        opt.train()
        opt.step()
        opt.eval()
    tag[0] = f"ZeRO shard of {n} elements (fp32 master, bf16 model)"
    y, z, v = (torch.empty(n, device="meta") for _ in range(3))
    g, out = (torch.empty(n, device="meta", dtype=torch.bfloat16) for _ in range(2))
    F.sf_adamw([y], [g], [z], [v], y_outs=[out], lr=1e-3, ck=0.5, y_coef=-1e-3, beta2=0.999,
               bias_correction2=0.5, eps=1e-8, backend="triton")
    F.rmsprop([y], [g], [z], param_outs=[out], lr=1e-3, alpha=0.99, eps=1e-8,
              backend="triton")
    F.sf_interpolate([y], [z], weight=0.5, p_outs=[out], backend="triton")


def _compressed_runs(tag):
    """Compressed state (docs/design.md §11): bf16 state rounded
    stochastically or to nearest, remainder masters, single-device and ZeRO."""
    from zero_sf.optim import RMSProp, ScheduleFreeAdamW
    from zero_sf.sharding import ZeroOptimizer

    variants = [dict(state_dtype=torch.bfloat16), dict(state_dtype=torch.bfloat16,
                                                       state_rounding="nearest"),
                dict(master_weights="remainder"),
                dict(state_dtype=torch.bfloat16, master_weights="remainder")]
    for kw in variants:
        tag[0] = f"ScheduleFreeAdamW(bf16, {kw})"
        opt = ScheduleFreeAdamW(_params(torch.bfloat16), backend="triton", **kw)
        opt.train()
        opt.step()
        opt.eval()
        for mom, centered in itertools.product((0, 0.9), (False, True)):
            tag[0] = f"RMSProp(bf16, momentum={mom}, centered={centered}, {kw})"
            RMSProp(_params(torch.bfloat16), momentum=mom, centered=centered, bias_correction=True,
                    backend="triton", **kw).step()
    tag[0] = "ScheduleFreeAdamW(fp32, state_dtype=bf16)"
    opt = ScheduleFreeAdamW(_params(torch.float32), backend="triton", state_dtype=torch.bfloat16)
    opt.train()
    opt.step()
    for cls in (ScheduleFreeAdamW, RMSProp):
        tag[0] = f"ZeroOptimizer({cls.__name__}, bf16, state_dtype=bf16, master_weights=remainder)"
        model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 3)).bfloat16()
        opt = ZeroOptimizer(model.parameters(), cls, backend="triton", state_dtype=torch.bfloat16,
                            master_weights="remainder")
        if cls is ScheduleFreeAdamW:
            opt.train()
        model(torch.zeros(2, 40, dtype=torch.bfloat16)).sum().backward()
        opt.step()
        if cls is ScheduleFreeAdamW:
            opt.eval()


RUNS = (_sf_runs, _rmsprop_runs, _zero_runs, _huge_runs, _compressed_runs)


def collect() -> list[Specialization]:
    """Every distinct specialization the optimizers launch, sorted."""
    sink: dict = {}
    tag = ["?"]
    with record(sink, tag):
        for run in RUNS:
            run(tag)
    return sorted(sink.values(), key=lambda s: s.describe())


def covering_subset(specs: Iterable[Specialization]) -> list[Specialization]:
    """A small subset in which every (kernel, signature) and every
    (kernel, constexpr value) occurs at least once (greedy set cover)."""
    specs = list(specs)
    todo = set().union(*(s.features() for s in specs)) if specs else set()
    chosen = []
    while todo:
        best = max(specs, key=lambda s: (len(s.features() & todo), s.describe()))
        chosen.append(best)
        todo -= best.features()
    return sorted(chosen, key=lambda s: s.describe())


# --------------------------------------------------------------------------
# Compiling and checking
# --------------------------------------------------------------------------


@dataclass
class Compiled:
    spec: Specialization
    arch: int
    ok: bool
    error: str = ""
    shared: int = 0
    registers: int = -1
    spill_bytes: int = -1
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    asm: dict = field(default_factory=dict, repr=False)
    warned: bool = False

    def line(self) -> str:
        status = "FAIL" if not self.ok else "WARN" if self.warned else "PASS"
        info = (f"regs={self.registers} spill={self.spill_bytes}B smem={self.shared}B "
                f"{self.seconds:.1f}s" if not self.error.startswith("compile") else "")
        why = f"  <- {self.error}" if self.error else ""
        return f"{status} sm_{self.arch} {self.spec.describe()} {info}{why}"


def _ptxas_usage(ptx: str, arch: int, fp_fusion: bool) -> tuple[int, int]:
    """(registers, spill bytes) as ``ptxas -v`` reports them for the kernel,
    with the flags Triton 3.9 itself passes when it builds the cubin
    (``make_cubin``: ``-lineinfo``, ``--fmad=false`` without FP fusion,
    ``--regAllocOptLevel=2``, its workaround for a ptxas 13 register-allocator
    bug: without it ptxas spills 8-32 bytes at 48-64 registers)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    flags = ["-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2"]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, *flags, f"--gpu-name={sm_arch_from_capability(arch)}",
                              src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return (int(regs.group(1)) if regs else -1), sum(spills)


def code_stats(ptx: str, ttir: str) -> dict:
    """What the generated code does, counted on its text.

    ``global``: {instruction: count} of the global loads/stores per thread
    (``ld.global.v4.b32`` moves 16 B); ``fma``: fused multiply-adds (each
    rounds once where the interpreter and the spec round twice);
    ``addptr_i32``: pointer offsets narrower than 64 bits in the Triton IR."""
    counts: dict = {}
    for op in re.findall(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx):
        counts[op] = counts.get(op, 0) + 1
    addptr = re.findall(r"tt\.addptr [^:]*: ([^\n]*)", ttir)
    return {"global": counts,
            "fma": len(re.findall(r"\bfma\.", ptx)),
            "addptr": len(addptr),
            "addptr_i32": sum(1 for a in addptr if not re.search(r"\bi64\b|xi64>", a.split(",")[-1])),
            "local": len(re.findall(r"\.local\b", ptx))}


def global_bytes(counts: dict, vector_only: bool = False) -> int:
    """Bytes a thread moves through the given global instructions."""
    total = 0
    for op, n in counts.items():
        m = re.search(r"(?:\.v(\d))?\.[bfsu](\d+)$", op)
        lanes = int(m.group(1) or 1)
        if vector_only and lanes == 1:
            continue
        total += n * lanes * int(m.group(2)) // 8
    return total


def compile_one(spec: Specialization, arch: int, module: Optional[ModuleType] = None,
                keep_asm: bool = False) -> Compiled:
    """Compile one specialization down to cubin for sm_<arch>, then check it:
    shared memory within the per-block limit, no register spills."""
    import triton
    from triton.compiler import ASTSource, make_backend

    module = module or importlib.import_module("zero_sf.kernels.triton_kernels")
    fn = getattr(module, spec.kernel)
    target = _target(arch)
    options = make_backend(target).parse_options(dict(spec.options))
    names = [p.name for p in fn.params]
    signature = dict(spec.signature)
    constexprs = {(names.index(p),): v for p, v in spec.constexprs}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, a) in enumerate(spec.attrs) if a == "D"}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                           options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compile error is a FAIL line
        while e.__cause__ is not None:  # Triton chains the frames; the root says why
            e = e.__cause__
        msg = " ".join(str(e).split())
        return Compiled(spec, arch, False, f"compile error: {type(e).__name__}: {msg[:600]}",
                        seconds=time.perf_counter() - t0)
    regs, spill = _ptxas_usage(k.asm["ptx"], arch, bool(k.metadata.enable_fp_fusion))
    shared = int(k.metadata.shared)
    errors = []
    if shared > SHARED_LIMIT[arch]:
        errors.append(f"shared memory {shared} B > {SHARED_LIMIT[arch]} B per block")
    warning = ""
    if spill > SPILL_LIMIT[arch]:
        errors.append(f"{spill} bytes of register spills")
    elif spill:
        warning = f"{spill} bytes of register spills (ptxas's occupancy choice, <= {SPILL_LIMIT[arch]})"
    stats = code_stats(k.asm["ptx"], k.asm["ttir"])
    if stats["local"]:
        errors.append(f"{stats['local']} uses of local memory in the PTX")
    asm = {key: k.asm[key] for key in ("ttir", "ttgir", "ptx")} if keep_asm else {}
    return Compiled(spec, arch, not errors, "; ".join(errors) or warning, shared, regs, spill,
                    time.perf_counter() - t0, stats, asm, warned=bool(warning and not errors))


def load_kernels_from(path: str) -> ModuleType:
    """A kernels module loaded from another file (a deliberately broken copy,
    in the test of this check)."""
    spec = importlib.util.spec_from_file_location(f"_zero_sf_kernels_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # triton.jit resolves globals through the module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/aot.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true",
                    help="compile every recorded specialization (default: a covering subset)")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)),
                    help="compute capabilities, comma-separated (default: %(default)s)")
    ap.add_argument("--kernels", default=None,
                    help="path of a kernels module to compile instead of zero_sf's own")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--list", action="store_true", help="only list the specializations")
    ap.add_argument("--only", default=None,
                    help="compile only the specializations whose description contains this")
    args = ap.parse_args(argv)
    if _interpreting():
        print("error: unset TRITON_INTERPRET (compiling needs the real triton.jit)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    specs = collect()
    chosen = specs if args.all else covering_subset(specs)
    if args.only:
        chosen = [s for s in chosen if args.only in s.describe()]
    print(f"{len(specs)} specializations recorded from the optimizers' launches "
          f"({time.perf_counter() - t0:.1f}s); compiling {len(chosen)}"
          f"{'' if args.all else ' (a subset covering every signature and constexpr value; --all for every one)'}")
    if args.list:
        for s in chosen:
            print(" ", s.describe(), "<-", "; ".join(s.sources[:2]))
        return 0
    module = load_kernels_from(args.kernels) if args.kernels else None
    results = []
    for arch in (int(a) for a in args.arch.split(",")):
        for s in chosen:
            r = compile_one(s, arch, module)
            results.append(r)
            print(r.line(), flush=True)
    failed = [r for r in results if not r.ok]
    warned = [r for r in results if r.warned]
    import triton

    summary = dict(triton=triton.__version__, torch=torch.__version__, recorded=len(specs),
                   compiled=len(results), failed=len(failed), warned=len(warned),
                   seconds=round(time.perf_counter() - t0, 1),
                   results=[dict(kernel=r.spec.kernel, specialization=r.spec.describe(),
                                 arch=f"sm_{r.arch}", ok=r.ok, warned=r.warned, error=r.error,
                                 shared=r.shared,
                                 registers=r.registers, spill_bytes=r.spill_bytes,
                                 **r.stats)
                            for r in results])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"{len(results) - len(failed)}/{len(results)} compiled and checked "
          f"in {summary['seconds']}s; {len(failed)} failed, {len(warned)} passed with a warning "
          f"(small sm_80 spills: see SPILL_LIMIT)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
