"""Convergence on the small GPT (launch/gpt.py), same budget for each:
Schedule-Free AdamW vs AdamW with warmup + cosine (the tuned baseline) vs
Adam-style RMSProp.  Each optimizer gets the same small learning-rate sweep;
the best final validation loss of each is reported.

    python benchmarks/convergence.py [--steps 600] [--lrs 1e-3 3e-3 1e-2]

``--study compressed`` compares the optimizer state's storage instead
(docs/design.md §11), on a bf16 model with ZeroOptimizer(ScheduleFreeAdamW):
fp32 state and master (the default) vs bf16 state with stochastic rounding
vs bf16 state rounded to nearest (the naive baseline) vs bf16 state with
stochastic rounding and the remainder master (6 B/param in all), each over
``--seeds`` and the same lr sweep, at each configuration's best lr (mean
final validation loss over the seeds).

Single process (CPU or one GPU).  Writes JSON and a PNG of the loss curves.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "launch"))
from _common import environment, write_json  # noqa: E402

import train  # noqa: E402  (launch/train.py)

OPTIMIZERS = {"sf": "Schedule-Free AdamW (zero_sf)", "adamw": "AdamW + warmup/cosine (torch)",
              "rmsprop": "Adam-style RMSProp (zero_sf, bias_correction)"}


COMPRESSED = {
    "fp32": ("fp32 state + fp32 master (default)", ["--state-dtype", "fp32"]),
    "bf16-sr": ("bf16 state, stochastic rounding", ["--state-dtype", "bf16"]),
    "bf16-rtn": ("bf16 state, round to nearest (naive)",
                 ["--state-dtype", "bf16", "--state-rounding", "nearest"]),
    "bf16-sr-rem": ("bf16 state (SR) + remainder master",
                    ["--state-dtype", "bf16", "--master-weights", "remainder"]),
}


def compressed_study(args, env):
    runs = []
    for key, (label, flags) in COMPRESSED.items():
        for lr in args.lrs:
            for seed in args.seeds:
                t0 = time.time()
                h = train.main(["--optimizer", "zero-sf", "--dtype", "bf16", "--lr", str(lr),
                                "--steps", str(args.steps), "--seed", str(seed),
                                "--eval-every", str(max(1, args.steps // 6)),
                                "--log-every", str(10**9), *flags, *args.model])
                runs.append({"config": key, "label": label, "lr": lr, "seed": seed, "history": h,
                             "final_val": h["val"][-1][1], "seconds": time.time() - t0})
                print(f"{label:<40} lr {lr:g} seed {seed}: final val loss "
                      f"{h['val'][-1][1]:.4f} ({time.time() - t0:.0f} s)", flush=True)
    mean = lambda xs: sum(xs) / len(xs)
    best = {}
    for key, (label, _) in COMPRESSED.items():
        by_lr = {lr: [r["final_val"] for r in runs if r["config"] == key and r["lr"] == lr]
                 for lr in args.lrs}
        lr = min(by_lr, key=lambda x: mean(by_lr[x]))
        vals = by_lr[lr]
        sd = (sum((v - mean(vals)) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
        best[key] = {"label": label, "lr": lr, "mean_final_val": mean(vals), "std": sd,
                     "per_seed": vals, "mean_by_lr": {str(k): mean(v) for k, v in by_lr.items()}}
    ref = best["fp32"]["mean_final_val"]
    for b in best.values():
        b["vs_fp32_percent"] = 100.0 * (b["mean_final_val"] - ref) / ref
    print(f"\nbf16 model, ZeroOptimizer(ScheduleFreeAdamW), {args.steps} steps, seeds {args.seeds} "
          f"({env.get('device_name')}, torch {env['torch']}):")
    print("| state | best lr | mean final val loss (± sd) | vs fp32 |\n|---|---|---|---|")
    for b in best.values():
        print(f"| {b['label']} | {b['lr']:g} | {b['mean_final_val']:.4f} ± {b['std']:.4f} | "
              f"{b['vs_fp32_percent']:+.2f} % |")
    tag = env["device"].split(":")[0]
    write_json(os.path.join(args.out, f"convergence_compressed_{tag}.json"),
               {"env": env, "steps": args.steps, "seeds": args.seeds, "lrs": args.lrs,
                "model_args": args.model, "best": best, "runs": runs})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for key, bb in best.items():
            curves = [r["history"]["val"] for r in runs if r["config"] == key and r["lr"] == bb["lr"]]
            steps = [s for s, _ in curves[0]]
            avg = [mean([c[i][1] for c in curves]) for i in range(len(steps))]
            b.plot(steps, avg, marker="o", label=f"{bb['label']} (lr {bb['lr']:g})")
            a.plot([str(lr) for lr in args.lrs], [bb["mean_by_lr"][str(lr)] for lr in args.lrs],
                   marker="o", label=bb["label"])
        a.set_title("final validation loss by lr (mean over seeds)", fontsize=9)
        a.set_xlabel("lr")
        b.set_title("validation loss at x, best lr (mean over seeds)", fontsize=9)
        b.set_xlabel("step")
        _finish(fig, (a, b), f"compressed optimizer state, bf16 GPT, {env.get('device_name')}, "
                f"torch {env['torch']}", os.path.join(args.out, f"convergence_compressed_{tag}.png"))
    except ImportError:
        print("matplotlib not installed: no plot")


def _finish(fig, axes, title, path):
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=["optimizers", "compressed"], default="optimizers")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="--study compressed: seeds per configuration")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lrs", type=float, nargs="*", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--model", nargs="*", default=["--dim", "96", "--layers", "3", "--seq", "64",
                                                   "--batch", "32"])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.study == "compressed":
        return compressed_study(args, env)
    runs = []
    for opt in OPTIMIZERS:
        for lr in args.lrs:
            t0 = time.time()
            h = train.main(["--optimizer", opt, "--lr", str(lr), "--steps", str(args.steps),
                            "--eval-every", str(max(1, args.steps // 8)), "--log-every", str(10**9),
                            *args.model])
            runs.append({"optimizer": opt, "lr": lr, "history": h, "final_val": h["val"][-1][1],
                         "seconds": time.time() - t0})
            print(f"{OPTIMIZERS[opt]:<48} lr {lr:g}: final val loss {h['val'][-1][1]:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    best = {opt: min((r for r in runs if r["optimizer"] == opt), key=lambda r: r["final_val"])
            for opt in OPTIMIZERS}
    print(f"\nbest final validation loss after {args.steps} steps ({env.get('device_name')}, torch {env['torch']}):")
    print("| optimizer | best lr | final val loss |\n|---|---|---|")
    for opt, r in best.items():
        print(f"| {OPTIMIZERS[opt]} | {r['lr']:g} | {r['final_val']:.4f} |")
    results = {"env": env, "steps": args.steps, "model_args": args.model, "runs": runs,
               "best": {k: {"lr": v["lr"], "final_val": v["final_val"]} for k, v in best.items()}}
    tag = env["device"].split(":")[0]
    write_json(os.path.join(args.out, f"convergence_{tag}.json"), results)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for opt, r in best.items():
            steps, losses = zip(*r["history"]["train"])
            k = 20  # moving average for readability
            sm = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            a.plot(steps, sm, label=f"{OPTIMIZERS[opt]}, lr {r['lr']:g}")
            b.plot(*zip(*r["history"]["val"]), marker="o", label=OPTIMIZERS[opt])
        a.set_title("training loss (moving average of 20)", fontsize=9)
        b.set_title("validation loss (SF and RMSProp at x / their params)", fontsize=9)
        for ax in (a, b):
            ax.set_xlabel("step")
        _finish(fig, (a, b), f"byte-level GPT on Python's help text, {env.get('device_name')}, "
                f"torch {env['torch']}", os.path.join(args.out, f"convergence_{tag}.png"))
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
