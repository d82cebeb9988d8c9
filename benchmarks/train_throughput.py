"""Training throughput of the demo GPT at 2 gloo ranks on this machine
(issue #24 §5): tokens/s of ZeroOptimizer stage 2 with and without
``overlap_param_gather``, against DDP + the same single-device optimizer
(``zero_sf.ScheduleFreeAdamW``), in one run.

Both DDP and ZeroOptimizer get buckets of ``--bucket-mb`` (the same
bytes), so both can overlap their gradient communication with backward.
The three set-ups run in interleaved rounds (A B C A B C ...) in the same
processes, so machine noise falls on all of them alike; each figure is the
median over rounds of tokens per second (every rank's tokens).

    python benchmarks/train_throughput.py [--rounds 5] [--steps 10] [--dim 128]

Writes benchmarks/results/train_throughput_cpu.json and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import zero_sf  # noqa: E402
from _common import environment, spawn_gloo  # noqa: E402
from launch.gpt import GPT, batch, corpus  # noqa: E402

SETUPS = ["ddp", "zero2", "zero2_overlap"]


def _build(setup, args):
    torch.manual_seed(0)
    model = GPT(dim=args.dim, layers=args.layers, heads=max(1, args.dim // 64), seq=args.seq)
    kw = dict(lr=3e-3, warmup_steps=10, weight_decay=0.01)
    if setup == "ddp":
        ddp = DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
        opt = zero_sf.ScheduleFreeAdamW(model.parameters(), **kw)
        return ddp, opt
    extra = dict(overlap_param_gather=True, model=model) if setup == "zero2_overlap" else {}
    bucket_numel = int(args.bucket_mb * 2**20 / 4)  # the same bytes per bucket as DDP's (fp32)
    return model, zero_sf.ZeroOptimizer(model.parameters(), stage=2, bucket_numel=bucket_numel,
                                        **kw, **extra)


def _worker(rank, world, args):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    data = corpus()
    built = {s: _build(s, args) for s in SETUPS}
    gen = torch.Generator().manual_seed(rank)

    def steps(setup, n):
        model, opt = built[setup]
        opt.train()
        for _ in range(n):
            x, y = batch(data, args.batch, args.seq, gen)
            model(x, y).backward()
            opt.step()
            opt.zero_grad()

    for s in SETUPS:
        steps(s, 3)  # warm-up
    rates = {s: [] for s in SETUPS}
    for _ in range(args.rounds):
        for s in SETUPS:
            dist.barrier()
            t0 = time.perf_counter()
            steps(s, args.steps)
            dist.barrier()
            rates[s].append(args.steps * args.batch * args.seq * world / (time.perf_counter() - t0))
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bucket-mb", type=float, default=0.5,
                    help="bucket size of both DDP (bucket_cap_mb) and ZeroOptimizer: 0.5 MB "
                         "cuts this 0.9 M-parameter model into ~7 buckets, as the defaults "
                         "(25 MB, 2**24 elements) cut a model of a few hundred M")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "train_throughput_cpu.json"))
    args = ap.parse_args()
    rates = spawn_gloo(_worker, 2, args)
    median = {s: statistics.median(r) for s, r in rates.items()}
    n_params = sum(p.numel() for p in GPT(dim=args.dim, layers=args.layers,
                                         heads=max(1, args.dim // 64), seq=args.seq).parameters())
    result = {"benchmark": "train_throughput", "environment": environment(torch.device("cpu")),
              "world_size": 2, "backend": "gloo", "params": n_params, "config": vars(args),
              "tokens_per_s_rounds": rates, "tokens_per_s_median": median,
              "ratio_zero2_to_ddp": median["zero2"] / median["ddp"],
              "ratio_zero2_overlap_to_ddp": median["zero2_overlap"] / median["ddp"]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"demo GPT, {n_params / 1e6:.2f} M params, 2 gloo ranks, buckets of {args.bucket_mb} MB, "
          f"{args.batch}x{args.seq} tokens per rank per step, {args.rounds} rounds of "
          f"{args.steps} steps")
    for s in SETUPS:
        print(f"{s:>14}: {median[s]:>9.0f} tokens/s  (rounds: "
              f"{', '.join(f'{r:.0f}' for r in rates[s])})")
    print(f"ZeRO-2 / DDP: {result['ratio_zero2_to_ddp']:.3f}x; ZeRO-2 + overlap / DDP: "
          f"{result['ratio_zero2_overlap_to_ddp']:.3f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
