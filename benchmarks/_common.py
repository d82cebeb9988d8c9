"""Shared by the benchmarks: environment record and robust timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import schedulefree
        env["schedulefree"] = getattr(schedulefree, "__version__", "installed")
    except ImportError:
        env["schedulefree"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device_name=p.name, sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                env["device_name"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            env["device_name"] = env["cpu"]
    return env


def median_time(fn: Callable[[], None], device: torch.device, *, warmup: int = 3,
                repeats: int = 20, min_seconds: float = 0.0) -> float:
    """Median seconds per call: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def spawn_gloo(fn, world_size: int, *args):
    """Run fn(rank, world_size, *args) on world_size CPU processes over gloo;
    returns what rank 0's call returned (it must be JSON-serializable)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_entry, args=(fn, world_size, tmp, args), nprocs=world_size, join=True)
        with open(os.path.join(tmp, "result.json")) as f:
            return json.load(f)


def _gloo_entry(rank, fn, world_size, tmp, args):
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                            rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            with open(os.path.join(tmp, "result.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()
