"""Convergence on the small GPT (launch/gpt.py), same budget for each:
Schedule-Free AdamW vs AdamW with warmup + cosine (the tuned baseline) vs
Adam-style RMSProp.  Each optimizer gets the same small learning-rate sweep;
the best final validation loss of each is reported.

    python benchmarks/convergence.py [--steps 600] [--lrs 1e-3 3e-3 1e-2]

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lrs", type=float, nargs="*", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--model", nargs="*", default=["--dim", "96", "--layers", "3", "--seq", "64",
                                                   "--batch", "32"])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
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
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"byte-level GPT on Python's help text, {env.get('device_name')}, torch {env['torch']}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(args.out, f"convergence_{tag}.png")
        fig.savefig(path, dpi=120)
        print(f"wrote {path}")
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
