"""One optimizer step on an FSDP2-sharded GPT, per rank, measured.

    python benchmarks/fsdp_step.py [--params 25e6] [--world-sizes 1 2]

For each world size it spawns that many ranks (CPU processes over gloo here;
one GPU each under CUDA), shards the same GPT with ``fully_shard`` (per block
and at the root, fp32 parameters), runs one backward, and times ``step()``
alone (median) for:

* ``zero_sf local shards``: ``zero_sf.ScheduleFreeAdamW`` as shipped -- the
  update runs on each DTensor's local shard (the fused kernel on CUDA, the
  chunked torch path on CPU), batched over all of the rank's shards;
* ``zero_sf spec on DTensors``: the same math (:func:`zero_sf.spec.sf_adamw_update`)
  applied to the DTensors themselves, every op through DTensor dispatch
  (what zero_sf did before, and what a plain torch optimizer does);
* ``schedulefree foreach on DTensors``: ``schedulefree.AdamWScheduleFree``;
* ``torch AdamW foreach on DTensors``, for scale.

Prints a table and writes ``benchmarks/results/fsdp_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "launch"))
from _common import environment, median_time, spawn_gloo, write_json  # noqa: E402

SYSTEMS = ["zero_sf local shards", "zero_sf spec on DTensors",
           "schedulefree foreach on DTensors", "torch AdamW foreach on DTensors"]


class _SpecOnDTensors:
    """zero_sf's Schedule-Free step with the spec applied to the DTensors."""

    def __init__(self, params, lr=2.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.lr, self.betas, self.eps, self.wd = list(params), lr, betas, eps, weight_decay
        self.k, self.lr_max, self.weight_sum = 0, -1.0, 0.0
        self.z = [p.detach().clone() for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        from zero_sf import spec
        b1, b2 = self.betas
        sc = spec.sf_scalars(k=self.k, lr=self.lr, beta1=b1, beta2=b2, warmup_steps=0, r=0.0,
                             weight_lr_power=2.0, lr_max=self.lr_max, weight_sum=self.weight_sum)
        for p, z, v in zip(self.params, self.z, self.v):
            spec.sf_adamw_update(p, p.grad, z, v, lr=sc.lr, ck=sc.ck, y_coef=sc.y_coef, beta2=b2,
                                 bias_correction2=sc.bias_correction2, eps=self.eps,
                                 weight_decay=self.wd)
        self.k, self.lr_max, self.weight_sum = self.k + 1, sc.lr_max, sc.weight_sum


def _worker(rank, world, n_params, repeats, out_dir):
    import schedulefree
    from gpt import batch, corpus, sized
    from torch.distributed.fsdp import fully_shard

    import zero_sf
    device = torch.device(f"cuda:{rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = sized(n_params, seq=64).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    params = list(model.parameters())
    x, y = (t.to(device) for t in batch(corpus(), 2, 64, torch.Generator().manual_seed(rank)))
    model(x, y).backward()
    local = sum(p.to_local().numel() for p in params)
    out = {"rank": rank, "world_size": world, "local_elements": local,
           "n_params": sum(p.numel() for p in params), "step_ms": {}}
    for system in SYSTEMS:
        if system == "zero_sf local shards":
            opt = zero_sf.ScheduleFreeAdamW(params)
            opt.train()
        elif system == "zero_sf spec on DTensors":
            opt = _SpecOnDTensors(params)
        elif system == "schedulefree foreach on DTensors":
            opt = schedulefree.AdamWScheduleFree(params, foreach=True)
            opt.train()
        else:
            opt = torch.optim.AdamW(params, foreach=True)
        out["step_ms"][system] = median_time(opt.step, device, warmup=2, repeats=repeats) * 1e3
        del opt
    with open(os.path.join(out_dir, f"{world}_{rank}.json"), "w") as f:
        json.dump(out, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--world-sizes", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.world_sizes:
            spawn_gloo(_worker, world, args.params, args.repeats, tmp)
            recs = [json.load(open(os.path.join(tmp, f"{world}_{r}.json"))) for r in range(world)]
            # The slowest rank sets the pace of a synchronous step.
            run = {"world_size": world, "n_params": recs[0]["n_params"], "per_rank": recs,
                   "step_ms": {s: max(r["step_ms"][s] for r in recs) for s in SYSTEMS}}
            runs.append(run)
    print(f"\nstep() on an FSDP2 GPT of {runs[0]['n_params'] / 1e6:.1f}M fp32 params, slowest rank, "
          f"median ms ({env.get('device_name')}, torch {env['torch']}, {env['cpu_count']} cores)")
    print("| optimizer | " + " | ".join(f"N={r['world_size']}" for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    base = "zero_sf local shards"
    for s in SYSTEMS:
        cells = [f"{r['step_ms'][s]:.1f} ({r['step_ms'][s] / r['step_ms'][base]:.2f}x)" for r in runs]
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("(in brackets: time relative to zero_sf's local-shard step)")
    write_json(os.path.join(args.out, f"fsdp_step_{env['device'].split(':')[0]}.json"),
               {"env": env, "runs": runs, "systems": SYSTEMS})


if __name__ == "__main__":
    main()
