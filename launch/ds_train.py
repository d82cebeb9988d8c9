"""Train the small GPT with DeepSpeed ZeRO and zero_sf's Schedule-Free AdamW,
selected in the DeepSpeed config (launch/ds_config.json).

    deepspeed --num_gpus 2 launch/ds_train.py                       # GPUs
    torchrun --nproc_per_node=2 launch/ds_train.py                  # GPUs or CPU
    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 launch/ds_train.py   # force CPU (gloo)

``"bf16": {"enabled": "auto"}`` in the config is resolved here: bf16 on GPU,
fp32 on CPU.  Any other value is passed to DeepSpeed unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cli import HelpFormatter  # noqa: E402
from gpt import GPT, batch, corpus, split  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
                    help="DeepSpeed config; its \"optimizer\" entry names ScheduleFreeAdamW or "
                         "ZeroSFRMSProp, its zero_optimization.stage is 1 or 2")
    ap.add_argument("--steps", type=int, default=200,
                    help="total optimizer steps: a resumed run continues up to this step")
    ap.add_argument("--seq", type=int, default=128, help="tokens (bytes) per sequence")
    ap.add_argument("--eval-every", type=int, default=100, help="validation every N steps (at x)")
    ap.add_argument("--save", default=None,
                    help="directory for engine.save_checkpoint at the end")
    ap.add_argument("--resume", default=None,
                    help="a --save directory to resume from, at any world size "
                         "(zero_sf.deepspeed.load_checkpoint)")
    ap.add_argument("--local_rank", type=int, default=None,
                    help="set by the deepspeed launcher; not for users")
    args = ap.parse_args(argv)

    import deepspeed
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # The shared-memory comm op is JIT-built (~60 s) and not needed over gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        deepspeed.init_distributed()
    import torch.distributed as dist

    import zero_sf.deepspeed as zsd

    with open(args.config) as f:
        cfg = json.load(f)
    if (cfg.get("bf16") or {}).get("enabled") == "auto":
        cfg["bf16"]["enabled"] = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(seq=args.seq)
    engine, _, _, _ = zsd.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    if args.resume:
        tag = zsd.load_checkpoint(engine, args.resume)  # any world size
        if engine.global_steps >= args.steps:
            raise SystemExit(f"--resume {args.resume}: that checkpoint is at step "
                             f"{engine.global_steps}, and --steps {args.steps} is the total step "
                             f"count, so there is nothing to do; pass --steps larger than "
                             f"{engine.global_steps}")
        if rank == 0:
            print(f"resumed {args.resume} ({tag}) at step {engine.global_steps}; training to "
                  f"step {args.steps}", flush=True)
    zsd.train(engine)
    device = engine.device
    dtype = torch.bfloat16 if cfg["bf16"]["enabled"] else torch.float32
    train_data, val_data = split(corpus())
    gen = torch.Generator().manual_seed(rank + 7919 * engine.global_steps)
    mb = engine.train_micro_batch_size_per_gpu()
    if rank == 0:
        print(f"DeepSpeed {deepspeed.__version__} | {world} rank(s) | ZeRO stage "
              f"{engine.zero_optimization_stage()} | {dtype} | optimizer "
              f"{type(zsd._basic_optimizer(engine)).__name__} from the config", flush=True)
    t0, start = time.time(), engine.global_steps
    for step in range(start, args.steps):
        x, y = (t.to(device) for t in batch(train_data, mb, args.seq, gen))
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} "
                  f"{(step + 1 - start) * mb * args.seq * world / (time.time() - t0):,.0f} tok/s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            zsd.eval(engine)  # x in the fp32 partitions *and* in the model
            with torch.no_grad():
                g = torch.Generator().manual_seed(1234 + rank)
                v = sum(engine(*(t.to(device) for t in batch(val_data, mb, args.seq, g))).item()
                        for _ in range(8)) / 8
            zsd.train(engine)
            if rank == 0:
                print(f"  eval at step {step + 1}: val loss {v:.3f} (x)", flush=True)
    if args.save:
        engine.save_checkpoint(args.save)
        if rank == 0:
            print(f"saved {args.save} at step {engine.global_steps}", flush=True)
    return engine


if __name__ == "__main__":
    main()
