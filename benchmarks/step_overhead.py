"""What the per-step safety checks of ZeroOptimizer cost (issue #9), measured
on a model with many parameter tensors, where host work per tensor matters
most.  One process, world size 1 (the checks are host-side; the collective
they ride on is the gradient-norm all-reduce every step already does).

* ``adopt_model_writes``: one pointer and one version-counter read per
  parameter, to see weights the user wrote and parameters replaced by
  ``p.data = ...``;
* the agreement hash: ``repr`` of every group's hyperparameters and a CRC,
  sent with the norm (6 more float64s in the same all-reduce).

    python benchmarks/step_overhead.py [--layers 200] [--dim 64]

Prints a JSON line with the hardware, versions and medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn as nn

import zero_sf
from zero_sf.sharding.agreement import terms


def _median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=200, help="Linear layers (2 tensors each)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.dim, args.dim) for _ in range(args.layers)]).bfloat16()
    opt = zero_sf.ZeroScheduleFreeAdamW(model.parameters(), stage=2)
    opt.train()
    x = torch.randn(8, args.dim, dtype=torch.bfloat16)

    def step():
        model(x).float().pow(2).mean().backward()
        opt.step()

    for _ in range(3):
        step()
    n_tensors = sum(1 for _ in model.parameters())
    result = {
        "benchmark": "step_overhead",
        "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "zero_sf": zero_sf.__version__,
        "param_tensors": n_tensors,
        "params": sum(p.numel() for p in model.parameters()),
        "adopt_model_writes_us": _median_us(opt.adopt_model_writes, args.reps),
        "agreement_hash_us": _median_us(lambda: terms(opt._agreement()), args.reps),
        "backward_and_step_us": _median_us(step, max(10, args.reps // 10)),
    }
    checks = result["adopt_model_writes_us"] + result["agreement_hash_us"]
    result["checks_share_of_step"] = checks / result["backward_and_step_us"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
