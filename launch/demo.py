"""Single-device demo: a small character-level language model trained with
zero_sf.ScheduleFreeAdamW on CPU, on text that ships with Python (the source
of the standard library's ``argparse`` module), no download.

    python launch/demo.py [--steps 300] [--optimizer sf|rmsprop|adamw]
"""

import argparse
import inspect
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import zero_sf


def load_text() -> bytes:
    return inspect.getsource(argparse).encode()


class CharMLP(nn.Module):
    """Bytes in a window of ``context`` -> next byte (Bengio et al. 2003 style)."""

    def __init__(self, context=32, dim=64, hidden=512):
        super().__init__()
        self.emb = nn.Embedding(256, dim)
        self.net = nn.Sequential(nn.Linear(context * dim, hidden), nn.GELU(),
                                 nn.LayerNorm(hidden), nn.Linear(hidden, 256))

    def forward(self, x):
        return self.net(self.emb(x).flatten(1))


def batches(data, context, batch, gen):
    while True:
        ix = torch.randint(len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + context] for i in ix])
        y = data[ix + context]
        yield x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--optimizer", choices=["sf", "rmsprop", "adamw"], default="sf")
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = torch.tensor(list(load_text()), dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    model = CharMLP()
    if args.optimizer == "sf":
        opt = zero_sf.ScheduleFreeAdamW(model.parameters(), lr=args.lr or 3e-3,
                                        warmup_steps=30, weight_decay=0.01)
    elif args.optimizer == "rmsprop":
        opt = zero_sf.RMSProp(model.parameters(), lr=args.lr or 1e-3, alpha=0.999,
                              bias_correction=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr or 3e-3, weight_decay=0.01)
    train_mode = getattr(opt, "train", lambda: None)
    eval_mode = getattr(opt, "eval", lambda: None)
    gen = torch.Generator().manual_seed(1)
    it = batches(train, 32, args.batch, gen)
    print(f"zero_sf {zero_sf.__version__}, torch {torch.__version__}, {type(opt).__name__}, "
          f"{sum(p.numel() for p in model.parameters())/1e6:.2f}M params, "
          f"{len(train)} training bytes")

    @torch.no_grad()
    def val_loss():
        model.eval(), eval_mode()  # Schedule-Free: evaluate at x, not y
        vg = torch.Generator().manual_seed(2)
        losses = [F.cross_entropy(model(x), y).item()
                  for _, (x, y) in zip(range(10), batches(val, 32, 256, vg))]
        model.train(), train_mode()
        return sum(losses) / len(losses)

    print(f"step     0  val loss {val_loss():.3f}  (uniform: {math.log(256):.3f})")
    t0, running = time.time(), None
    for step in range(1, args.steps + 1):
        x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:5d}  train loss {running:.3f}  {step / (time.time() - t0):.0f} it/s")
    print(f"final val loss {val_loss():.3f} (optimizer in eval mode: x)")


if __name__ == "__main__":
    main()
