"""Many scenarios per spawned process group: spawning (and importing torch,
transformers, DeepSpeed) is the cost, so a pool of gloo ranks is started
once and runs every seed it is given, each scenario on the ranks 0..w-1 it
needs (one process group per world size, created once).

A scenario that kills its pool (a crash, or ranks left waiting in
mismatched collectives: the pool's gloo timeout is 60 s) is recorded as a
failure and a new pool carries on with the next seed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time

import torch.multiprocessing as mp

STALL_S = 150  # no scenario finished for this long: the pool is stuck


def _rank_main(rank: int, world: int, store: str, root: str, pool: str, seeds: list[int],
               out: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 3 ranks and another test worker share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=int(os.environ.get("ZERO_SF_POOL_TIMEOUT", "60"))))
    groups = {w: dist.new_group(list(range(w))) for w in range(1, world)}
    groups[world] = dist.group.WORLD
    if pool == "deepspeed":
        os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        import deepspeed
        import deepspeed.utils.logging as dsl

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 60 s JIT build
        deepspeed.init_distributed(dist_backend="gloo")
        dsl.logger.setLevel("ERROR")
    import warnings

    warnings.filterwarnings("ignore")
    from .generate import Scenario, generate
    from .run import Ctx, run_scenario

    ctx = Ctx(rank, groups, root)
    override = json.loads(os.environ.get("ZERO_SF_SCENARIO_OVERRIDE", "{}"))  # debugging
    for item in seeds:
        sc = item if isinstance(item, Scenario) else generate(item, pool)
        seed = sc.seed
        if override:
            sc = dataclasses.replace(sc, **{k: tuple(map(tuple, v)) if k == "ops" else v
                                            for k, v in override.items()})
        if rank == 0:
            with open(out + ".current", "w") as f:
                f.write(str(seed))
        t0 = time.perf_counter()
        failures = run_scenario(sc, ctx)
        if failures:  # before the gather: kept if a rank left waiting kills the pool
            with open(f"{out}.rank{rank}", "a") as f:
                f.write(json.dumps({"seed": seed, "failures": failures}) + "\n")
        everyone: list = [None] * world
        dist.all_gather_object(everyone, failures)
        if rank == 0:
            merged = [f"rank {r}: {m}" for r, ms in enumerate(everyone) for m in ms]
            with open(out, "a") as f:
                f.write(json.dumps({"seed": seed, "scenario": sc.describe(), "engine": sc.engine,
                                    "reproducer": sc.reproducer(), "failures": merged,
                                    "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without the interpreter's teardown, where gloo's threads may abort


def _read(out: str) -> list[dict]:
    if not os.path.exists(out):
        return []
    with open(out) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_pool(pool: str, seeds: list) -> list[dict]:
    """Run every seed (or pinned :class:`Scenario`, a regression test's);
    one result per item, in order."""
    from .generate import POOLS, Scenario, generate

    world = POOLS[pool][1]
    results: list[dict] = []
    remaining = list(seeds)
    while remaining:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.jsonl")
            context = mp.start_processes(
                _rank_main, args=(world, os.path.join(tmp, "store"), tmp, pool, remaining, out),
                nprocs=world, join=False, start_method="spawn")
            last, seen, error = time.monotonic(), 0, None
            while True:
                try:
                    if context.join(timeout=1):
                        break
                except Exception as e:  # noqa: BLE001 - a rank died: recorded below
                    error = f"{type(e).__name__}: {str(e).strip()[-3000:]}"
                    break
                done = _read(out)
                if len(done) > seen:
                    seen, last = len(done), time.monotonic()
                elif time.monotonic() - last > STALL_S:
                    error = f"no progress for {STALL_S} s (ranks waiting in a collective?)"
                    break
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            done = _read(out)
            results += done
            remaining = remaining[len(done):]
            if remaining:  # the pool died inside this seed: what its ranks said first
                item = remaining.pop(0)
                sc = item if isinstance(item, Scenario) else generate(item, pool)
                seed = sc.seed
                said = [f"rank {r}: {m}" for r in range(world) for rec in _read(f"{out}.rank{r}")
                        if rec["seed"] == seed for m in rec["failures"]]
                results.append({"seed": seed, "scenario": sc.describe(), "engine": sc.engine,
                                "reproducer": sc.reproducer(), "seconds": None,
                                "failures": said + [f"the pool died: {error or 'no result'}"]})
    return results


def report(results: list[dict]) -> str:
    lines = []
    for r in results:
        if r["failures"]:
            lines.append(f"FAILED seed {r['seed']} ({r['reproducer']}): {r['scenario']}")
            lines += ["    " + m.replace("\n", "\n    ") for m in r["failures"][:4]]
    return "\n".join(lines)
