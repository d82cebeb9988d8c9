"""The fused CPU backend (``backend="cpu"``, and ``"auto"`` for CPU tensors).

One pass over memory per step for all three rules (Schedule-Free AdamW,
RMSProp with every flag, the y<->x interpolation), low-precision parameters,
gradients and output copies included, threaded with torch's own OpenMP
runtime: ``zsf_cpu.c``, built at
first use with the system C compiler (``$CC``, else ``cc``; 0.35 s with gcc
12 on this project's machine, 2 ms to load once cached), cached in
``$ZERO_SF_CACHE`` (default ``~/.cache/zero_sf``) under a hash of the
source, the compiler and this CPU's flags, and loaded with ctypes.  Without
a compiler the torch path runs, after one warning.

Numerics: the C code evaluates the spec's torch ops in torch's order, with
fused multiply-adds where torch's CPU kernels use them (add/sub with alpha,
lerp); ``tests/cpu/test_cpu_backend.py`` measures the distance to the spec.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..storage import Stores, sr_keys

__all__ = ["available", "library", "sf_adamw", "rmsprop", "sf_interpolate", "eligible"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zsf_cpu.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared",
          "-fopenmp"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DTYPES_T = tuple(_DTYPES)
_NONE = 3

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failed: Optional[str] = None


class _Task(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p * 6), ("n", ctypes.c_int64), ("rem", ctypes.c_void_p),
                ("base", ctypes.c_int64)]


_ARG_FIELDS: list = [(name, ctypes.c_int) for name in ("kind", "dt_p", "dt_g", "dt_out")] + \
    [(name, ctypes.c_float) for name in ("lr", "ck", "y_coef", "beta2", "one_minus_beta2",
                                          "bc2", "eps", "wd", "scale")] + \
    [(name, ctypes.c_int) for name in ("has_bc2", "has_wd")] + \
    [(name, ctypes.c_float) for name in ("alpha", "one_minus_alpha", "momentum")] + \
    [(name, ctypes.c_int) for name in ("centered", "eps_in_sqrt", "maximize", "has_momentum")] + \
    [("weight", ctypes.c_float), ("dt_s", ctypes.c_int), ("sr", ctypes.c_int),
     ("key", ctypes.c_uint32 * 2)]


class _Args(ctypes.Structure):
    _fields_ = _ARG_FIELDS


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + version.encode() + " ".join(_FLAGS).encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
    cache = os.environ.get("ZERO_SF_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "zero_sf")
    os.makedirs(cache, exist_ok=True)
    so = os.path.join(cache, f"zsf_cpu-{key}.so")
    if not os.path.exists(so):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([cc, *_FLAGS, _SOURCE, "-o", tmp, "-lm"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, so)  # atomic: concurrent builders (ranks, workers) are safe
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    lib = ctypes.CDLL(so)
    lib.zsf_run.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(_Task), ctypes.c_int,
                            ctypes.c_int]
    lib.zsf_run.restype = ctypes.c_int
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The compiled backend, built on first use; None (after one warning)
    where it cannot be built.  ``ZERO_SF_CPU_BACKEND=0`` turns it off."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            if os.environ.get("ZERO_SF_CPU_BACKEND", "1") == "0":
                _failed = "ZERO_SF_CPU_BACKEND=0"
            elif not sys.platform.startswith("linux"):
                _failed = f"not built on {sys.platform}"
            else:
                try:
                    _lib = _build()
                except Exception as e:  # noqa: BLE001 - any failure: fall back, say why once
                    _failed = str(e)
                    warnings.warn(f"zero_sf: the fused CPU backend is unavailable ({e}); CPU "
                                  "tensors use the torch path (~10 passes over memory per step)",
                                  RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> Optional[str]:
    library()
    return _failed


def eligible(*tensors: Optional[Tensor], state: Sequence[Optional[Tensor]] = ()) -> bool:
    """Contiguous CPU tensors of fp32/bf16/fp16 (int16 remainders), fp32 or
    bf16 state (all of one dtype)."""
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype not in _DTYPES_T + (torch.int16,)
                              or not t.is_contiguous()):
            return False
    present = [t for t in state if t is not None]
    for t in present:
        if (t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16)
                or t.dtype != present[0].dtype or not t.is_contiguous()):
            return False
    return True


def _dt(t: Optional[Tensor]) -> int:
    return _NONE if t is None else _DTYPES[t.dtype]


def _ptr(t: Optional[Tensor]):
    return None if t is None or t.numel() == 0 else t.data_ptr()


_CALLS = [0]  # C calls made in this process; read through calls()


def calls() -> int:
    """How many fused C calls this process has made: the self-check reads it
    before and after a case to prove the case ran here and did not fall back
    to the torch path."""
    return _CALLS[0]


def _run(args: _Args, rows: list[tuple]) -> None:
    """rows: (n, [tensors by role], remainder, index base) with equal dtypes
    per role; one C call."""
    rows = [r for r in rows if r[0] > 0]
    if not rows:
        return
    _CALLS[0] += 1
    tasks = (_Task * len(rows))()
    for task, (n, ts, rem, base) in zip(tasks, rows):
        task.n = n
        task.rem = _ptr(rem)
        task.base = base
        for i, t in enumerate(ts):
            task.p[i] = _ptr(t)
    lib = library()
    assert lib is not None  # eligible() said the backend is available
    lib.zsf_run(ctypes.byref(args), tasks, len(rows), torch.get_num_threads())


def _groups(rows, key):
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out.items()


def _compressed(args: _Args, state_dtype: torch.dtype, sr) -> _Args:
    """The state dtype and the stochastic-rounding keys (storage.sr_keys)."""
    args.dt_s = _DTYPES[state_dtype]
    args.sr = int(sr is not None and state_dtype == torch.bfloat16)
    if args.sr:
        args.key[0], args.key[1] = sr_keys(sr)
    return args


def _rows(primary, roles, store: Stores):
    def at(xs, i):
        return xs[i] if xs is not None else None
    rows = []
    for i, p in enumerate(primary):
        st = store.at(i)
        rows.append((p.numel(), [at(r, i) for r in roles], st.remainder, st.index_base))
    return rows


def sf_adamw(ys, grads, zs, vs, *, store: Stores, lr, ck, y_coef, beta2, bias_correction2, eps,
             weight_decay=0.0, grad_scale=1.0) -> None:
    rows = _rows(ys, [ys, grads, zs, vs, store.outs], store)
    for (dp, dg, do, ds), group in _groups(rows, lambda r: (_dt(r[1][0]), _dt(r[1][1]),
                                                            _dt(r[1][4]), r[1][3].dtype)):
        args = _Args(kind=0, dt_p=dp, dt_g=dg, dt_out=do, lr=lr, ck=ck, y_coef=y_coef, beta2=beta2,
                     one_minus_beta2=1.0 - beta2, bc2=bias_correction2, eps=eps, wd=weight_decay,
                     scale=grad_scale, has_bc2=bias_correction2 != 1.0, has_wd=weight_decay != 0.0)
        _run(_compressed(args, ds, store.sr), group)


def rmsprop(params, grads, square_avgs, *, momentum_buffers, grad_avgs, store: Stores, lr, alpha,
            eps, weight_decay, momentum, centered, bias_correction2, eps_in_sqrt, maximize,
            grad_scale) -> None:
    rows = _rows(params, [params, grads, square_avgs, momentum_buffers if momentum > 0.0 else None,
                          grad_avgs if centered else None, store.outs], store)
    for (dp, dg, do, ds), group in _groups(rows, lambda r: (_dt(r[1][0]), _dt(r[1][1]),
                                                            _dt(r[1][5]), r[1][2].dtype)):
        args = _Args(kind=1, dt_p=dp, dt_g=dg, dt_out=do, lr=lr, eps=eps, wd=weight_decay,
                     scale=grad_scale, bc2=bias_correction2, has_bc2=bias_correction2 != 1.0,
                     has_wd=weight_decay != 0.0, alpha=alpha,
                     one_minus_alpha=1.0 - alpha, momentum=momentum, centered=bool(centered),
                     eps_in_sqrt=bool(eps_in_sqrt), maximize=bool(maximize),
                     has_momentum=momentum > 0.0)
        _run(_compressed(args, ds, store.sr), group)


def sf_interpolate(ps, zs, *, weight, store: Stores) -> None:
    rows = _rows(ps, [ps, zs, store.outs], store)
    for (dp, do, ds), group in _groups(rows, lambda r: (_dt(r[1][0]), _dt(r[1][2]),
                                                        r[1][1].dtype)):
        _run(_compressed(_Args(kind=2, dt_p=dp, dt_out=do, weight=weight), ds, None), group)
