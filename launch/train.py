"""Train a small GPT on Python's own help text with zero_sf, under torchrun.

Single node, 2 CPU processes (gloo) or GPUs (NCCL, chosen automatically):

    torchrun --nproc_per_node=2 launch/train.py
    torchrun --nproc_per_node=8 launch/train.py --stage 2 --dtype bf16

Multi-node (run on every node):

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29400 --rdzv-id=job1 launch/train.py

Checkpoints (zero_sf.save/load) resume at any world size:

    torchrun --nproc_per_node=2 launch/train.py --steps 200 --save ckpt
    torchrun --nproc_per_node=1 launch/train.py --steps 300 --resume ckpt

FSDP2 (fully_shard per block and at the root) with the single-device
optimizer updating each rank's local shards; DCP checkpoints, any world size:

    torchrun --nproc_per_node=2 launch/train.py --fsdp --optimizer sf --save ckpt
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cli import HelpFormatter  # noqa: E402
from gpt import GPT, batch, corpus, split  # noqa: E402

import zero_sf  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--optimizer", default="zero-sf",
                    choices=["zero-sf", "zero-rmsprop", "sf", "rmsprop", "adamw"],
                    help="zero-sf: ZeroOptimizer(ScheduleFreeAdamW); zero-rmsprop: "
                         "ZeroOptimizer(RMSProp, bias_correction); sf / rmsprop: DDP + the "
                         "single-device optimizer; adamw: DDP + torch AdamW, warmup + cosine")
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2],
                    help="ZeRO stage of the zero-* optimizers: 1 shards the optimizer state and "
                         "fp32 master, 2 also the gradients")
    ap.add_argument("--fsdp", action="store_true",
                    help="shard the model with FSDP2 (fully_shard) instead of DDP; needs a "
                         "single-device optimizer (sf, rmsprop, adamw).  With --dtype bf16 the "
                         "parameters stay fp32 and compute runs in bf16 "
                         "(MixedPrecisionPolicy(bf16, reduce fp32))")
    ap.add_argument("--steps", type=int, default=300,
                    help="total optimizer steps: a resumed run continues up to this step")
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens (bytes) per sequence")
    ap.add_argument("--dim", type=int, default=128, help="model width")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks")
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate (default: 3e-3 for zero-sf, sf and adamw; 1e-3 for "
                         "zero-rmsprop and rmsprop)")
    ap.add_argument("--warmup", type=int, default=30,
                    help="warmup steps (Schedule-Free's warmup_steps; adamw's linear warmup); "
                         "a few percent of --steps")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-norm", type=float, default=1.0,
                    help="clip the global gradient norm to this (0: no clipping)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="parameter dtype (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--state-dtype", choices=["fp32", "bf16"], default=None,
                    help="dtype of the optimizer state (z, exp_avg_sq); default: fp32 for a bf16 "
                         "model (docs/design.md §11)")
    ap.add_argument("--state-rounding", choices=["stochastic", "nearest"], default="stochastic",
                    help="how bf16 state is rounded")
    ap.add_argument("--master-weights", choices=["fp32", "remainder"], default="fp32",
                    help="zero-*: the fp32 master copy, or int16 remainders of the bf16 weights "
                         "(--dtype bf16); sf/rmsprop: remainder adds an exact master")
    ap.add_argument("--eval-every", type=int, default=100, help="validation every N steps (at x)")
    ap.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    ap.add_argument("--save", default=None,
                    help="checkpoint directory, written at the end (zero-* optimizers: "
                         "zero_sf.save; --fsdp: DCP); refused if it already holds a "
                         "checkpoint this run did not resume from, unless --overwrite")
    ap.add_argument("--overwrite", action="store_true",
                    help="let --save write into a directory that holds another checkpoint")
    ap.add_argument("--resume", default=None,
                    help="checkpoint to resume from: a --save directory (its newest complete "
                         "version) or one version directory inside it, at any world size")
    ap.add_argument("--shard-size", default=None,
                    help="zero-*: hierarchical sharding: state sharded over groups of K ranks, "
                         "replicated across them ('local': LOCAL_WORLD_SIZE, one node)")
    ap.add_argument("--overlap-param-gather", action="store_true",
                    help="zero-*: all-gather the updated weights during the next forward")
    ap.add_argument("--reduce-dtype", choices=["fp32"], default=None,
                    help="zero-*: sum bf16 gradients in fp32 (default: in the model's dtype)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args


def _holds_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, "LATEST")) or os.path.exists(
        os.path.join(path, ".metadata"))


def check_args(ap, args) -> None:
    """Every mistake that would otherwise surface after training, before it."""
    sharded = args.optimizer.startswith("zero-")
    if args.fsdp and sharded:
        ap.error(f"--fsdp shards the model itself: use --optimizer sf, rmsprop or adamw, "
                 f"not {args.optimizer} (ZeRO would shard it again)")
    for flag, path in (("--save", args.save), ("--resume", args.resume)):
        if path and not (sharded or args.fsdp):
            ap.error(f"{flag} needs a zero-* optimizer (zero_sf.save/load) or --fsdp (DCP); "
                     f"--optimizer {args.optimizer} has no checkpoint format here")
    if args.resume and not os.path.isdir(args.resume):
        ap.error(f"--resume {args.resume}: no such directory")
    if args.save and _holds_checkpoint(args.save) and not args.overwrite:
        save = os.path.realpath(args.save)  # the directory itself or a version inside it
        resuming_it = args.resume and os.path.commonpath(
            [os.path.realpath(args.resume), save]) == save
        if not resuming_it:
            ap.error(f"--save {args.save} already holds a checkpoint that this run does not "
                     "resume from; saving would replace it. Pass --resume "
                     f"{args.save} to continue it, another --save directory, or --overwrite")
    zero_flags = (args.shard_size, args.overlap_param_gather, args.reduce_dtype)
    if any(zero_flags) and not sharded:
        ap.error("--shard-size/--overlap-param-gather/--reduce-dtype: ZeroOptimizer options; "
                 f"use --optimizer zero-sf or zero-rmsprop, not {args.optimizer}")
    if args.shard_size not in (None, "local") and not str(args.shard_size).isdigit():
        ap.error(f"--shard-size {args.shard_size}: expected a number of ranks or 'local'")
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: expected at least 1")
    if args.optimizer == "adamw" and (args.state_dtype or args.master_weights != "fp32"):
        ap.error("--state-dtype/--master-weights: zero_sf optimizers only, not adamw")
    if args.master_weights == "remainder" and (args.fsdp or args.dtype == "fp32" or (
            args.dtype is None and not torch.cuda.is_available())):
        ap.error("--master-weights remainder needs a bf16 model: add --dtype bf16 (and no "
                 "--fsdp, which keeps fp32 sharded parameters)")


def steps_done(opt) -> int:
    """Optimizer steps a (resumed) optimizer has taken: Schedule-Free's k, or
    the per-parameter step counts of RMSProp and AdamW."""
    group = opt.param_groups[0]
    if "k" in group:
        return int(group["k"])
    inner = getattr(opt, "inner", opt)
    steps = [int(s["step"]) for s in inner.state.values() if isinstance(s, dict) and "step" in s]
    return max(steps, default=0)


def setup():
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return rank, world, device


def compression(args, sharded: bool) -> dict:
    """The compressed-state keywords the flags ask for (none by default)."""
    kw = {}
    if args.state_dtype:
        kw["state_dtype"] = torch.bfloat16 if args.state_dtype == "bf16" else torch.float32
        kw["state_rounding"] = args.state_rounding
    if args.master_weights == "remainder":
        kw["master_weights"] = "remainder"
    elif sharded:
        kw["master_weights"] = "fp32"
    return kw


def zero_options(args, model) -> dict:
    """ZeroOptimizer's scale keywords from the flags (none by default)."""
    kw: dict = {}
    if args.shard_size is not None:
        size = (int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if args.shard_size == "local"
                else int(args.shard_size))
        kw["shard_group"], kw["replicate_group"] = zero_sf.hierarchical_groups(size)
    if args.overlap_param_gather:
        kw.update(overlap_param_gather=True, model=model)
    if args.reduce_dtype == "fp32":
        kw["reduce_dtype"] = torch.float32
    return kw


def build_optimizer(args, model, world):
    lr = args.lr
    ckw = compression(args, args.optimizer.startswith("zero-"))
    if args.optimizer.startswith("zero-"):
        ckw.update(zero_options(args, model))
    if args.optimizer == "zero-sf":
        return zero_sf.ZeroScheduleFreeAdamW(model.parameters(), stage=args.stage,
                                             lr=lr or 3e-3, warmup_steps=args.warmup,
                                             weight_decay=args.weight_decay,
                                             max_norm=args.max_norm or None, seed=args.seed,
                                             **ckw)
    if args.optimizer == "zero-rmsprop":
        return zero_sf.ZeroOptimizer(model.parameters(), zero_sf.RMSProp, stage=args.stage,
                                     lr=lr or 1e-3, alpha=0.999, bias_correction=True,
                                     max_norm=args.max_norm or None, seed=args.seed, **ckw)
    if args.optimizer == "sf":
        return zero_sf.ScheduleFreeAdamW(model.parameters(), lr=lr or 3e-3,
                                         warmup_steps=args.warmup, weight_decay=args.weight_decay,
                                         seed=args.seed, **ckw)
    if args.optimizer == "rmsprop":
        return zero_sf.RMSProp(model.parameters(), lr=lr or 1e-3, alpha=0.999,
                               bias_correction=True, seed=args.seed, **ckw)
    return torch.optim.AdamW(model.parameters(), lr=lr or 3e-3, weight_decay=args.weight_decay)


def optimizer_bytes(opt) -> int:
    """Bytes of optimizer state this rank holds (an FSDP2 rank: its shards)."""
    if isinstance(opt, zero_sf.ZeroOptimizer):
        held = opt.memory_bytes()
        return held["optimizer_state"] + held["master"]
    local = lambda v: v.to_local() if hasattr(v, "to_local") else v
    return sum(local(v).numel() * v.element_size() for s in opt.state.values()
               for v in s.values() if torch.is_tensor(v) and v.dim() > 0)


def fsdp_shard(model, compute_dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
          if compute_dtype != torch.float32 else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def dcp_save(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    return path


def dcp_load(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)


def main(argv=None) -> dict:
    args = parse(argv)
    rank, world, device = setup()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(args.seed)
    model = GPT(dim=args.dim, layers=args.layers, seq=args.seq).to(
        device=device, dtype=torch.float32 if args.fsdp else dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if args.fsdp:
        model = fsdp_shard(model, dtype)
    opt = build_optimizer(args, model, world)
    sharded = isinstance(opt, zero_sf.ZeroOptimizer)
    net = model
    if not sharded and not args.fsdp and world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    sched = None
    if args.optimizer == "adamw":  # the baseline needs a schedule: warmup + cosine to 0
        import math
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup)
                                                  * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    has_modes = hasattr(opt, "train")
    if has_modes:
        opt.train()
    start, resumed = 0, None
    if args.resume:
        if args.fsdp:
            dcp_load(args.resume, model, opt)
            resumed = args.resume
        else:
            resumed = zero_sf.load(args.resume, model, opt)
        start = steps_done(opt)
        if start >= args.steps:
            raise SystemExit(f"--resume {resumed}: that checkpoint is at step {start}, and "
                             f"--steps {args.steps} is the total step count, so there is nothing "
                             f"to do; pass --steps larger than {start}")
        if sched is not None:  # the schedule continues where it stopped
            import warnings
            with warnings.catch_warnings():  # "step() before optimizer.step()": on purpose
                warnings.simplefilter("ignore", UserWarning)
                sched.last_epoch = start - 1
                sched.step()
        if has_modes:
            opt.train()
    train_data, val_data = split(corpus())
    gen = torch.Generator()
    if rank == 0:
        print(f"zero_sf {zero_sf.__version__} | torch {torch.__version__} | {world} rank(s) on "
              f"{device.type} ({dist.get_backend() if dist.is_initialized() else 'no process group'}) | "
              f"{args.optimizer}{f' stage {args.stage}' if sharded else ''}"
              f"{' on FSDP2' if args.fsdp else ''} | {dtype} | "
              f"{n_params/1e6:.2f}M params | {len(train_data)/1e3:.0f}K training bytes", flush=True)
        if resumed:
            print(f"resumed {resumed} at step {start}; training to step {args.steps}", flush=True)

    @torch.no_grad()
    def evaluate() -> float:
        if has_modes:
            opt.eval()  # Schedule-Free: evaluate at x
        model.eval()
        g = torch.Generator().manual_seed(1234 + rank)
        losses = [model(*(t.to(device) for t in batch(val_data, args.batch, args.seq, g))).item()
                  for _ in range(8)]
        loss = torch.tensor(sum(losses) / len(losses), device=device)
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= world
        model.train()
        if has_modes:
            opt.train()
        return loss.item()

    history = {"train": [], "val": [], "resumed": [resumed, start] if resumed else None}
    t0, tokens, running = time.time(), 0, None
    for step in range(start, args.steps):
        # Each (rank, step) draws its own batch: a run resumed at the same
        # world size sees exactly the data the uninterrupted run saw.
        gen.manual_seed(args.seed * 1000 + rank + 7919 * step)
        x, y = (t.to(device) for t in batch(train_data, args.batch, args.seq, gen))
        loss = net(x, y)
        loss.backward()
        if not sharded and args.max_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched:
            sched.step()
        tokens += x.numel() * world
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        history["train"].append((step + 1, loss.item()))
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            done = (step + 1 - start) / max(1, args.steps - start)
            bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
            print(f"[{bar}] step {step + 1}/{args.steps} loss {running:.3f} "
                  f"{tokens / (time.time() - t0):,.0f} tok/s "
                  f"optimizer {optimizer_bytes(opt) / 2**20:.2f} MiB/rank", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            v = evaluate()
            history["val"].append((step + 1, v))
            if rank == 0:
                print(f"  eval at step {step + 1}: val loss {v:.3f}"
                      f"{' (x, optimizer in eval mode)' if has_modes else ''}", flush=True)
    if args.save:
        if args.fsdp:
            path = dcp_save(args.save, model, opt)
        else:
            path = zero_sf.save(args.save, model, opt)
        if rank == 0:
            print(f"saved {path} at step {args.steps} from {world} rank(s)", flush=True)
    return history


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
