"""How far the summed gradient of a bf16 model is from an exact (fp64) sum,
with ZeroOptimizer's default reduction (bf16) and ``reduce_dtype=torch.float32``
(issue #24 §3), at 2-4 gloo ranks with 4 micro-batches, and what the fp32
sum costs in gradient bytes per parameter (``memory_bytes()["grads"]``,
measured from the tensors after backward, before ``step()``).

The model is the demo GPT (launch/gpt.py) in bf16 with fp32 norms; each
rank's per-micro-batch bf16 gradients are all-gathered and summed in fp64
for the reference, so both reductions are judged on the same addends.

    python benchmarks/reduce_precision.py [--world-sizes 2 3 4] [--micro 4]

Writes benchmarks/results/reduce_precision_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import zero_sf  # noqa: E402
from _common import environment, spawn_gloo  # noqa: E402
from launch.gpt import GPT, batch, corpus  # noqa: E402


def _model():
    torch.manual_seed(0)
    model = GPT(dim=64, layers=2, heads=4, seq=32)
    model.bfloat16()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
    return model


def _loss(model, data, rank, mb):
    x, y = batch(data, 8, 32, torch.Generator().manual_seed(1000 * rank + mb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def _worker(rank, world, micro):
    data = corpus()
    ref_model = _model()
    exact = [torch.zeros(p.numel(), dtype=torch.float64) for p in ref_model.parameters()]
    for mb in range(micro):
        ref_model.zero_grad()
        _loss(ref_model, data, rank, mb).backward()
        for t, p in zip(exact, ref_model.parameters()):
            parts = [torch.empty(p.numel(), dtype=torch.float64) for _ in range(world)]
            dist.all_gather(parts, p.grad.double().reshape(-1))
            t += sum(parts)
    rows = []
    for stage in (1, 2):
        for reduce_dtype in (None, torch.float32):
            model = _model()
            opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage,
                                        reduce_dtype=reduce_dtype, lr=1e-3)
            opt.train()
            for mb in range(micro):
                _loss(model, data, rank, mb).backward()
            grad_bytes = opt.memory_bytes()["grads"]
            opt.grads.reduce()
            flat = [p for g in opt.param_groups for p in g["params"]]
            where = {id(p): j for j, p in enumerate(model.parameters())}
            acc = torch.zeros(4, dtype=torch.float64)  # sum|err|, sum|exact|, max|err|, max|exact|
            for bi, buf in enumerate(opt.buffers):
                for bk, b in enumerate(buf.buckets):
                    for slot in b.slots:
                        own = b.owned(slot, opt.rank)
                        if own is None:
                            continue
                        got = opt.grads.chunks[bi][bk][own.in_chunk].double()
                        ref = exact[where[id(flat[slot.index])]][own.in_param]
                        acc[0] += (got - ref).abs().sum()
                        acc[1] += ref.abs().sum()
                        acc[2] = max(acc[2], (got - ref).abs().max())
                        acc[3] = max(acc[3], ref.abs().max())
            sums, maxes = acc[:2].clone(), acc[2:].clone()
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
            n_params = sum(p.numel() for p in model.parameters())
            gb = torch.tensor([grad_bytes], dtype=torch.float64)
            dist.all_reduce(gb, op=dist.ReduceOp.MAX)
            rows.append(dict(world_size=world, stage=stage, micro_batches=micro,
                             reduce_dtype=str(reduce_dtype or "bf16 (default)"),
                             relative_l1_error=(sums[0] / sums[1]).item(),
                             max_error_over_max_gradient=(maxes[0] / maxes[1]).item(),
                             grad_bytes_per_param=gb.item() / n_params, params=n_params))
            opt.zero_grad()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reduce_precision_cpu.json"))
    args = ap.parse_args()
    rows = []
    for world in args.world_sizes:
        rows += spawn_gloo(_worker, world, args.micro)
    result = {"benchmark": "reduce_precision", "environment": environment(torch.device("cpu")),
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'ranks':>5} {'stage':>5} {'reduce':>15} {'rel L1 err':>11} {'max err/max':>11} "
          f"{'grad B/param':>12}")
    for r in rows:
        print(f"{r['world_size']:>5} {r['stage']:>5} {r['reduce_dtype']:>15} "
              f"{r['relative_l1_error']:>11.2e} {r['max_error_over_max_gradient']:>11.2e} "
              f"{r['grad_bytes_per_param']:>12.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
