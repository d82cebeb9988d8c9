"""Per-rank memory of sharded optimizers across world sizes, measured.

    python benchmarks/memory_scaling.py [--params 25e6] [--world-sizes 1 2 4 8]

For each system and world size it spawns that many ranks (CPU processes over
gloo here; one GPU each when CUDA is present), builds the same GPT, runs two
training steps, and records on every rank the bytes actually held by
tensors -- optimizer state (z, v / m, v), fp32 master weights, parameters,
gradients -- the resident memory the optimizer system added after the model
existed (CPU: /proc/self/statm after gc and malloc_trim, code paths warmed up
first), and the process's peak memory (RSS on CPU, max_memory_allocated on
GPU).  Writes JSON and a PNG (optimizer bytes/param vs world size with the
ideal 1/N lines) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "launch"))
from _common import environment, spawn_gloo, write_json  # noqa: E402

SYSTEMS = ["zero_sf_s1_fp32", "zero_sf_s2_fp32", "zero_sf_s1_bf16", "zero_sf_s2_bf16",
           "zero_sf_s1_bf16_compressed", "zero_sf_s2_bf16_compressed",
           "single_zero_sf_bf16", "single_zero_sf_bf16_compressed",
           "fsdp2_zero_sf_fp32", "fsdp2_zero_sf_mixed_bf16",
           "ddp_schedulefree_fp32", "zero_redundancy_adamw_fp32",
           "deepspeed_z1_schedulefree_fp32", "deepspeed_z2_schedulefree_fp32",
           "deepspeed_z1_zero_sf_bf16", "deepspeed_z2_zero_sf_bf16", "deepspeed_z3_zero_sf_bf16"]


def _local(t):
    """A DTensor's local shard (what this rank holds), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(ts) -> int:
    return sum(_local(t).numel() * t.element_size() for t in ts if torch.is_tensor(t) and t.dim() > 0)


def _state_bytes(opt) -> int:
    return nbytes(v for s in opt.state.values() for v in s.values())


def _rss() -> int:
    """Resident bytes after gc and malloc_trim(0), so freed temporaries do
    not count (Linux; 0 elsewhere)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _warm_up(system, device):
    """Run the code paths once on a tiny model: the first torch optimizer of a
    process imports ~150 MB of modules (measured: +8.9 B/param at 16.8M
    parameters for an AdamW with no state yet), which is not memory per
    parameter.  The resident-memory figure starts after this."""
    tiny = torch.nn.Linear(4, 4).to(device)
    opts = [torch.optim.AdamW(tiny.parameters())]
    if "zero_sf" in system:
        import zero_sf
        opts.append(zero_sf.ScheduleFreeAdamW(tiny.parameters()))
        opts[-1].train()
    if "schedulefree" in system:
        import schedulefree
        opts.append(schedulefree.AdamWScheduleFree(tiny.parameters()))
        opts[-1].train()
    if system.startswith("deepspeed"):
        import deepspeed  # noqa: F401
    for o in opts:
        tiny(torch.randn(2, 4, device=device)).sum().backward()
        o.step()
        o.zero_grad()


def _worker(rank, world, system, n_params, out_dir):
    from gpt import batch, corpus, sized
    device = torch.device(f"cuda:{rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # FSDP2 mixed precision keeps fp32 parameters and computes in bf16.
    dtype = torch.bfloat16 if "_bf16" in system and not system.startswith("fsdp2") else torch.float32
    _warm_up(system, device)
    torch.manual_seed(0)
    model = sized(n_params, seq=64).to(device=device, dtype=dtype)
    data = corpus()
    # One forward and backward of the bare model first, its gradients then
    # dropped: what the framework keeps from a training step whatever the
    # optimizer (oneDNN's primitive cache and scratchpads for the model's
    # matmuls, the corpus) is then in the baseline, not in "added".
    # Measured without it: +1.0 B/param for every system, DDP included,
    # +1.5 B/param for bf16 models (16.8M-25M params, CPU, torch 2.13).
    model(*batch(data, 2, 64, torch.Generator().manual_seed(99))).backward()
    model.zero_grad(set_to_none=True)
    rss_base = _rss()  # parameters exist, gradients do not; the optimizer system is what follows
    n = sum(p.numel() for p in model.parameters())
    params = list(model.parameters())
    master = grads = state = None
    net, opt, engine = model, None, None
    if system.startswith("zero_sf"):
        import zero_sf
        compressed = (dict(state_dtype=torch.bfloat16, master_weights="remainder")
                      if system.endswith("compressed") else {})
        opt = zero_sf.ZeroScheduleFreeAdamW(params, stage=int(system[9]), **compressed)
        opt.train()
    elif system.startswith("single_"):  # one device's optimizer; at N > 1 each rank is alone
        import zero_sf
        compressed = (dict(state_dtype=torch.bfloat16, master_weights="remainder")
                      if system.endswith("compressed") else {})
        opt = zero_sf.ScheduleFreeAdamW(params, **compressed)
        opt.train()
    elif system.startswith("fsdp2"):
        import zero_sf
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if "mixed" in system else MixedPrecisionPolicy())
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        params = list(model.parameters())  # now DTensors: this rank holds its rows
        opt = zero_sf.ScheduleFreeAdamW(params)
        opt.train()
    elif system == "ddp_schedulefree_fp32":
        import schedulefree
        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = schedulefree.AdamWScheduleFree(params)
        opt.train()
    elif system == "zero_redundancy_adamw_fp32":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3)
    else:  # DeepSpeed ZeRO-1/2 with schedulefree as client optimizer, or ZeRO-1/2/3 with ours
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
        import deepspeed
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")
        stage = int(system[11])
        cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
               "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        if "zero_sf" in system:  # the config entry, a bf16 model: what users run
            import zero_sf.deepspeed as zsd
            cfg.update(bf16={"enabled": True}, gradient_clipping=0.0,
                       optimizer={"type": "ScheduleFreeAdamW", "params": {"lr": 1e-3}})
            engine, *_ = zsd.initialize(model=model, model_parameters=params, config=cfg)
            zsd.train(engine)
        else:
            import schedulefree
            client = schedulefree.AdamWScheduleFree(params)
            client.train()
            engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=cfg,
                                              optimizer=client)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x, y = (t.to(device) for t in batch(data, 2, 64, gen))
        if engine is not None:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
        else:
            net(x, y).backward()
            opt.step()
            if not system.startswith("zero_sf"):
                opt.zero_grad(set_to_none=False)  # keep grads allocated: measured below
    # Measured from the tensors each system holds after a step.
    if system.startswith("zero_sf"):
        held = opt.memory_bytes()
        state, master, grads, pbytes = held["optimizer_state"], held["master"], held["grads"], held["params"]
    elif engine is not None:
        zopt = engine.optimizer
        state = _state_bytes(zopt.optimizer)
        grads = None  # DeepSpeed frees its gradient partitions inside step(): see peak
        if stage == 3:  # the fp32 and the model's partitions (p.data is empty between steps)
            master = nbytes(zopt.fp32_partitioned_groups_flat)
            pbytes = nbytes(p.ds_tensor for p in params)
        else:
            master = nbytes(zopt.single_partition_of_fp32_groups)
            pbytes = nbytes(params)
    else:
        state = _state_bytes(opt.optim if hasattr(opt, "optim") else opt)
        master = 0
        grads = nbytes(p.grad for p in params if p.grad is not None)
        pbytes = nbytes(params)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # From outside: what the optimizer system added to the resident memory
    # since the model existed (its gradients, state, master, buffers and
    # anything else it keeps), next to what the tensors above account for.
    rss_added = _rss() - rss_base if device.type == "cpu" else None
    rec = {"rank": rank, "world_size": world, "system": system, "n_params": n,
           "optimizer_state_bytes": state, "master_bytes": master, "param_bytes": pbytes,
           "grad_bytes": grads, "peak_bytes": peak, "peak_kind": "max_memory_allocated" if device.type == "cuda" else "rss",
           "rss_added_bytes": rss_added}
    with open(os.path.join(out_dir, f"{system}_{world}_{rank}.json"), "w") as f:
        json.dump(rec, f)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    worlds = sorted({r["world_size"] for r in results["runs"]})
    for system in results["systems"]:
        runs = sorted((r for r in results["runs"] if r["system"] == system), key=lambda r: r["world_size"])
        if not runs:
            continue
        a.plot([r["world_size"] for r in runs], [r["opt_bytes_per_param"] for r in runs],
               marker="o", label=system)
        if all(r["grad_bytes_per_param"] is not None for r in runs):
            b.plot([r["world_size"] for r in runs],
                   [r["opt_bytes_per_param"] + r["param_bytes_per_param"] + r["grad_bytes_per_param"]
                    for r in runs], marker="o", label=system)
    for ideal, style, label in ((12, "k--", "ideal 12/N (fp32 master+z+v)"), (8, "k:", "ideal 8/N (z+v)"),
                              (6, "k-.", "ideal 6/N (bf16 z+v + remainder)")):
        a.plot(worlds, [ideal / w for w in worlds], style, lw=1, label=label)
    a.set_ylabel("optimizer bytes/param per rank (state + fp32 master)")
    b.set_ylabel("params + grads + optimizer bytes/param per rank")
    b.set_title("measured tensors (DeepSpeed's gradients are freed in step(): not shown)", fontsize=8)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("data-parallel world size N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    a.set_yscale("log", base=2)
    env = results["env"]
    fig.suptitle(f"{results['n_params']/1e6:.1f}M-param GPT, {env.get('device_name')}, torch {env['torch']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--world-sizes", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--systems", nargs="*", default=SYSTEMS)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--plot-only", default=None, help="re-plot a JSON written earlier")
    ap.add_argument("--tag", default=None, help="file name tag (default: the device kind)")
    ap.add_argument("--malloc-arena-max", type=int, default=None,
                    help="set MALLOC_ARENA_MAX for the ranks: glibc keeps memory that other "
                         "threads (gloo's) freed in per-thread arenas, which malloc_trim does "
                         "not return; 1 shows the memory the tensors need")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None,
                    help="set MALLOC_MMAP_THRESHOLD_ for the ranks (bytes): a fixed threshold "
                         "turns off glibc's dynamic one, which after a large free keeps later "
                         "large temporaries (gloo's) in heap memory that malloc_trim does not "
                         "return from a thread's arena")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other systems' runs of the JSON already in --out (same device "
                         "kind), replacing only the systems measured now")
    args = ap.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), args.plot_only[:-5] + ".png")
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("deepspeed not installed: its systems are skipped")
        args.systems = [s for s in args.systems if not s.startswith("deepspeed")]
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        args.world_sizes = [w for w in args.world_sizes if w <= torch.cuda.device_count()]
    if args.malloc_arena_max is not None:
        os.environ["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)  # the spawned ranks inherit it
        env["malloc_arena_max"] = args.malloc_arena_max
    if args.malloc_mmap_threshold is not None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        env["malloc_mmap_threshold"] = args.malloc_mmap_threshold
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for system in args.systems:
            for world in args.world_sizes:
                spawn_gloo(_worker, world, system, args.params, tmp)
                recs = [json.load(open(os.path.join(tmp, f"{system}_{world}_{r}.json"))) for r in range(world)]
                n = recs[0]["n_params"]
                worst = max(recs, key=lambda r: r["optimizer_state_bytes"] + r["master_bytes"])
                run = {"system": system, "world_size": world, "n_params": n, "per_rank": recs,
                       "opt_bytes_per_param": (worst["optimizer_state_bytes"] + worst["master_bytes"]) / n,
                       "param_bytes_per_param": worst["param_bytes"] / n,
                       "grad_bytes_per_param": (worst["grad_bytes"] / n
                                                if worst["grad_bytes"] is not None else None),
                       "peak_mib": max(r["peak_bytes"] for r in recs) / 2**20}
                if recs[0].get("rss_added_bytes") is not None:
                    run["rss_added_bytes_per_param"] = max(r["rss_added_bytes"] for r in recs) / n
                runs.append(run)
                gb = run["grad_bytes_per_param"]
                rss = run.get("rss_added_bytes_per_param")
                print(f"{system:<32} N={world}  optimizer {run['opt_bytes_per_param']:6.2f} B/param  "
                      f"params {run['param_bytes_per_param']:5.2f}  grads {f'{gb:5.2f}' if gb is not None else '  n/a'}  "
                      f"resident added {f'{rss:5.2f}' if rss is not None else '  n/a'}  "
                      f"peak {run['peak_mib']:8.0f} MiB ({recs[0]['peak_kind']})", flush=True)
    tag = args.tag or env["device"].split(":")[0]
    path = os.path.join(args.out, f"memory_scaling_{tag}.json")
    systems = list(args.systems)
    if args.merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        kept = [r for r in old["runs"] if r["system"] not in args.systems]
        if kept and kept[0]["n_params"] != runs[0]["n_params"]:
            raise SystemExit(f"--merge: {path} measured {kept[0]['n_params']} params, not "
                             f"{runs[0]['n_params']}; use the same --params")
        runs = kept + runs
        systems = [s for s in SYSTEMS if any(r["system"] == s for r in runs)]
        env["merged_with"] = old["env"]
    results = {"env": env, "n_params": runs[0]["n_params"], "systems": systems, "runs": runs}
    args.systems = systems
    print(f"\nper-rank bytes per parameter, worst rank, {results['n_params']/1e6:.1f}M params, "
          f"{env.get('device_name')}, torch {env['torch']}")
    header = "| system | " + " | ".join(f"N={w}" for w in args.world_sizes) + " |"
    print(header + "\n|" + "---|" * (len(args.world_sizes) + 1))
    for system in args.systems:
        cells = []
        for w in args.world_sizes:
            r = next((r for r in runs if r["system"] == system and r["world_size"] == w), None)
            cells.append(f"{r['opt_bytes_per_param']:.2f} ({r['peak_mib']:.0f} MiB)" if r else "-")
        print(f"| {system} | " + " | ".join(cells) + " |")
    print("(optimizer state + fp32 master, bytes/param on the worst rank; in brackets its peak memory)")
    write_json(path, results)
    plot(results, os.path.join(args.out, f"memory_scaling_{tag}.png"))


if __name__ == "__main__":
    main()
