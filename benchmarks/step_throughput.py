"""Optimizer-step throughput: zero_sf's fused kernels (Triton on a GPU, the
fused C backend on a CPU) against its torch path, schedulefree's foreach
step, torch's fused AdamW, DeepSpeed's CPU Adam and HeavyBall's compiled
Schedule-Free AdamW (CPU, when installed), and a plain copy of the same
bytes (the bandwidth ceiling).

    python benchmarks/step_throughput.py [--sizes 1e6 4e6 ...] [--out benchmarks/results]
    python benchmarks/step_throughput.py --load 2    # with 2 busy processes competing

One flat tensor per method (a ZeRO shard).  On a GPU zero_sf runs the shard
layout it is built for: bf16 gradient and bf16 output copy of y, fp32 master
y, z, v -- 14 B read + 14 B written = 28 B/param.  On a CPU (ZeRO-Offload's
step) every method runs fp32 parameters and gradients: zero_sf y, g, z, v
and AdamW p, g, m, v alike are 16 B read + 12 B written = 28 B/param;
schedulefree's foreach step makes ~10 passes, ~104 B/param.  "Bytes" below
are each method's minimum traffic; GB/s = bytes x N / time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import environment, median_time, write_json  # noqa: E402

from zero_sf import functional as F  # noqa: E402
from zero_sf.spec import sf_scalars  # noqa: E402
from zero_sf.storage import Stores  # noqa: E402

MIN_BYTES = {"zero_sf_triton": 28, "zero_sf_cpu": 28, "zero_sf_torch": 28,
             # compressed state (docs/design.md §11): read g, y, remainder, z, v, write
             # y, remainder, z, v, 2 B each
             "zero_sf_triton_compressed": 18, "zero_sf_cpu_compressed": 18,
             "schedulefree_foreach": 32, "torch_adamw_fused": 28, "deepspeed_cpu_adam": 28,
             "heavyball_sfadamw": 28, "copy": 28}


def bench_size(n: int, device: torch.device, methods: list[str], repeats: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda dtype: torch.randn(n, generator=g).to(device=device, dtype=dtype)
    out = {"numel": n}
    sc = sf_scalars(k=10, lr=1e-3, beta1=0.9, beta2=0.999, warmup_steps=0, r=0.0,
                    weight_lr_power=2.0, lr_max=1e-3, weight_sum=1e-5)
    kw = dict(lr=sc.lr, ck=sc.ck, y_coef=sc.y_coef, beta2=0.999,
              bias_correction2=sc.bias_correction2, eps=1e-8, weight_decay=0.01)
    fns = {}
    for m in methods:
        if m.endswith("_compressed"):  # a bf16 model's shard: bf16 y + remainder, bf16 z, v (SR)
            from zero_sf.storage import split_master
            y, rem = split_master(rnd(torch.float32))
            grad, z, v = rnd(torch.bfloat16), rnd(torch.bfloat16), rnd(torch.bfloat16).abs()
            backend = m[len("zero_sf_"):-len("_compressed")]
            fn = lambda y=y, rem=rem, grad=grad, z=z, v=v, backend=backend: F.sf_adamw(
                [y], [grad], [z], [v], store=Stores(remainders=[rem], sr=(0, 10), index_bases=[0]),
                backend=backend, **kw)
        elif m.startswith("zero_sf"):
            y, z, v = rnd(torch.float32), rnd(torch.float32), rnd(torch.float32).abs()
            backend = m[len("zero_sf_"):]
            if device.type == "cuda":  # the ZeRO shard of a bf16 model
                grad, y_out = rnd(torch.bfloat16), [torch.empty(n, dtype=torch.bfloat16, device=device)]
            else:  # ZeRO-Offload's CPU step: fp32 everything, as the peers
                grad, y_out = rnd(torch.float32), None
            # default arguments: bind this method's tensors now (the lambdas run later,
            # round robin, after the loop has rebound the names)
            fn = lambda y=y, grad=grad, z=z, v=v, y_out=y_out, backend=backend: F.sf_adamw(
                [y], [grad], [z], [v], store=Stores(outs=y_out), backend=backend, **kw)
        elif m == "deepspeed_cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            p = torch.nn.Parameter(rnd(torch.float32))
            p.grad = rnd(torch.float32)
            opt = DeepSpeedCPUAdam([p], lr=1e-3, weight_decay=0.01, adamw_mode=True)
            fn = opt.step
        elif m == "heavyball_sfadamw":
            import heavyball
            p = torch.nn.Parameter(rnd(torch.float32))
            opt = heavyball.SFAdamW([p], lr=1e-3, weight_decay=0.01)
            grad = rnd(torch.float32)

            def fn(p=p, opt=opt, grad=grad):
                p.grad = grad.clone()
                opt.step()
        elif m == "schedulefree_foreach":
            import schedulefree
            p = torch.nn.Parameter(rnd(torch.float32))
            opt = schedulefree.AdamWScheduleFree([p], lr=1e-3, weight_decay=0.01, foreach=True)
            opt.train()
            grad = rnd(torch.float32)

            def fn(p=p, opt=opt, grad=grad):
                p.grad = grad  # it normalizes grad in place: values drift, cost does not
                opt.step()
        elif m == "torch_adamw_fused":
            p = torch.nn.Parameter(rnd(torch.float32))
            p.grad = rnd(torch.float32)
            opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, fused=True)
            fn = opt.step
        elif m == "copy":
            src = torch.empty(n * 14, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            fn = lambda src=src, dst=dst: dst.copy_(src)
        else:
            raise ValueError(m)
        fns[m] = fn
    # Round robin: every round times each method once, so a noisy neighbour
    # (this is a shared 2-core machine) slows all methods alike; the median
    # over rounds is reported.
    times: dict[str, list[float]] = {m: [] for m in fns}
    for r in range(repeats + 3):
        for m, fn in list(fns.items()):
            try:
                t = median_time(fn, device, warmup=0, repeats=1)
            except Exception as e:  # report, don't hide: e.g. fused AdamW unsupported
                out[m] = {"error": f"{type(e).__name__}: {e}"}
                del fns[m]
                continue
            if r >= 3:  # the first rounds warm up (and compile, for HeavyBall)
                times[m].append(t)
    for m in fns:
        t = statistics.median(times[m])
        b = MIN_BYTES[m]
        out[m] = {"seconds": t, "gparam_per_s": n / t / 1e9, "bytes_per_param": b,
                  "gb_per_s": b * n / t / 1e9}
    fns.clear()
    copy = out.get("copy", {}).get("gb_per_s")
    for m in methods:
        r = out.get(m, {})
        if "seconds" not in r:
            continue
        if copy:
            r["fraction_of_copy_bw"] = r["gb_per_s"] / copy
        for peer in methods:
            if peer != m and "seconds" in out.get(peer, {}):
                r[f"speedup_vs_{peer}"] = out[peer]["seconds"] / r["seconds"]
    return out


def _busy():
    """A process that keeps one core busy until killed."""
    import subprocess
    return subprocess.Popen([sys.executable, "-c", "while True: sum(range(10**6))"])


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [r["numel"] for r in results["sizes"]]
    for m in results["methods"]:
        ys = [r.get(m, {}).get("gparam_per_s") for r in results["sizes"]]
        pts = [(s, y) for s, y in zip(sizes, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("elements per step (one flat shard)")
    ax.set_ylabel("Gparam/s")
    env = results["env"]
    busy = env.get("competing_busy_processes")
    ax.set_title(f"optimizer step throughput, {env.get('device_name')}"
                 f"{f' + {busy} busy processes' if busy else ''}\n"
                 f"torch {env['torch']}, triton {env.get('triton')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="*", default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--tag", default=None, help="file name tag (default: device type)")
    ap.add_argument("--load", type=int, default=0,
                    help="start this many busy processes (a CPU-bound loop each) for the "
                         "duration: the step's robustness when other work shares the cores")
    ap.add_argument("--methods", nargs="*", default=None,
                    help="measure only these of the methods this device has")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.sizes:
        sizes = [int(s) for s in args.sizes]
    elif device.type == "cuda":
        free = torch.cuda.mem_get_info()[0]
        # ~150 B/param live across methods at once (they run round robin),
        # keep half the card free
        sizes = [s for s in (2**20, 2**22, 2**24, 2**26, 2**28, 2**30) if s * 150 < free / 2]
    else:
        sizes = [2**20, 2**22, 2**24, 2**26]
    import importlib.util
    methods = ["copy", "zero_sf_torch", "torch_adamw_fused"]
    if importlib.util.find_spec("schedulefree"):  # not on every GPU machine
        methods.insert(2, "schedulefree_foreach")
    else:
        print("schedulefree_foreach: not measured (pip install schedulefree)")
    if device.type == "cuda" and F.triton_available():
        methods[1:1] = ["zero_sf_triton", "zero_sf_triton_compressed"]
    if device.type == "cpu":
        from zero_sf import cpu as zcpu
        if zcpu.available():
            methods[1:1] = ["zero_sf_cpu", "zero_sf_cpu_compressed"]
        else:
            print(f"zero_sf_cpu: not measured ({zcpu.unavailable_reason()})")
        for name, method in (("deepspeed", "deepspeed_cpu_adam"), ("heavyball", "heavyball_sfadamw")):
            if importlib.util.find_spec(name):
                methods.append(method)
            else:
                print(f"{method}: not measured (pip install {name})")
    if args.methods is not None:
        unknown = sorted(set(args.methods) - set(MIN_BYTES))
        if unknown:
            ap.error(f"unknown methods {unknown}; expected some of {sorted(MIN_BYTES)}")
        methods = [m for m in methods if m in args.methods]
    env = environment(device)
    env["competing_busy_processes"] = args.load
    load = [_busy() for _ in range(args.load)]
    print(f"device: {env.get('device_name')}  torch {env['torch']}  triton {env.get('triton')}")
    if "zero_sf_triton" not in methods:
        print("zero_sf_triton: not measured (needs a CUDA device; the interpreter is not a speed test)")
    results = {"env": env, "methods": methods, "sizes": []}
    for n in sizes:
        r = bench_size(n, device, methods, args.repeats)
        results["sizes"].append(r)
        print(f"\n{n:>12,d} elements")
        print(f"  {'method':<22}{'ms':>10}{'Gparam/s':>10}{'B/param':>8}{'GB/s':>9}{'of copy':>9}")
        for m in methods:
            x = r[m]
            if "error" in x:
                print(f"  {m:<22} error: {x['error'][:60]}")
                continue
            frac = x.get("fraction_of_copy_bw")
            print(f"  {m:<22}{x['seconds']*1e3:>10.3f}{x['gparam_per_s']:>10.3f}"
                  f"{x['bytes_per_param']:>8d}{x['gb_per_s']:>9.1f}"
                  f"{(f'{frac:.0%}' if frac else '-'):>9}")
        mine = next(m for m in ("zero_sf_triton", "zero_sf_cpu", "zero_sf_torch") if m in methods)
        sp = ", ".join(f"{k[11:]} {v:.2f}x" for k, v in r[mine].items() if k.startswith("speedup_vs_"))
        print(f"  {mine} speed-up vs {sp}")
    for proc in load:
        proc.kill()
    tag = args.tag or (device.type + ("_loaded" if args.load else ""))
    write_json(os.path.join(args.out, f"step_throughput_{tag}.json"), results)
    try:
        plot(results, os.path.join(args.out, f"step_throughput_{tag}.png"))
    except ImportError:
        print("matplotlib not installed: no plot (pip install zero-sf[bench])")


if __name__ == "__main__":
    main()
