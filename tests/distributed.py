"""Gloo ranks on CPU for the tests (as torch's and DeepSpeed's own harnesses).

``spawn(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on
``world_size`` ranks joined by one gloo process group; an exception in any
rank fails the calling test with that rank's traceback.

The ranks are kept between calls: a pool per world size, in each test
worker, started at its first use.  Starting ranks is what a multi-rank test
costs here: 2.7 s for two fresh processes that do nothing (python, torch,
gloo's rendezvous), more when the test module imports transformers or
DeepSpeed; a kept rank imports each module once.  A rank that raises, dies
or does not answer ends its pool (the others may be waiting in a collective:
they are killed, as ``mp.spawn`` does), and the next call starts a fresh
one.  ``ZERO_SF_FRESH_RANKS=1`` gives every call fresh processes (the old
behaviour), to tell a leak between tests from a bug.
"""

from __future__ import annotations

import atexit
import datetime
import os
import queue
import shutil
import sys
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

# A rank left waiting in a collective fails the test in 2 minutes instead of
# hanging the suite for gloo's default 30.
TIMEOUT_S = 120
# Ranks kept alive at once (each holds torch and the test modules: ~0.3-0.6
# GB); the pool used longest ago is closed first.
MAX_KEPT_RANKS = 5


def _init(rank, world_size, store):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _leave(code: int) -> None:
    # Without the interpreter's C++ teardown, where gloo's threads abort now
    # and then ("terminate called without an active exception", SIGABRT
    # after every assertion passed; seen on 4-rank checkpoint and launch
    # tests, before and after this project's changes).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _entry(rank, fn, world_size, store, args):
    _init(rank, world_size, store)
    try:
        fn(rank, world_size, *args)
        # Leave together: a rank tearing gloo down while its peer still
        # talks to it can abort.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave(0)  # a failing rank raised above and never gets here


def _serve(rank, world_size, store, tasks, results):
    _init(rank, world_size, store)
    while True:  # until the pool is closed (the process is killed)
        fn, args = tasks.get()
        try:
            fn(rank, world_size, *args)
            dist.barrier()  # every rank finished this test before the next starts
        except BaseException:  # noqa: B036 - reported to the test, then this pool ends
            results.put((rank, traceback.format_exc()))
            results.close()
            results.join_thread()  # the message is written before the process ends
            _leave(1)
        results.put((rank, None))


class RankFailed(Exception):
    """A rank of a :func:`spawn` call raised or died."""


class _Pool:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tmp = tempfile.mkdtemp(prefix="zero_sf_ranks_")
        store = os.path.join(self.tmp, "store")
        self.tasks = [ctx.SimpleQueue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, store, self.tasks[r],
                                                       self.results), daemon=True)
                      for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, args) -> None:
        for q in self.tasks:
            q.put((fn, args))
        done: set[int] = set()
        while len(done) < self.world_size:
            try:
                rank, error = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs)
                        if not p.is_alive() and r not in done]
                if dead:
                    raise RankFailed(f"rank {dead[0][0]} exited with code {dead[0][1]} "
                                     "without a result") from None
                continue
            if error is not None:
                raise RankFailed(self._errors(rank, error))
            done.add(rank)

    def _errors(self, rank: int, error: str) -> str:
        """Every rank's traceback that arrives within 3 s: the first to
        arrive may be a peer's broken connection, not the cause."""
        errors = {rank: error}
        try:
            while True:
                r, e = self.results.get(timeout=3.0)
                if e is not None:
                    errors[r] = e
        except queue.Empty:
            pass
        return "\n".join(f"rank {r} raised:\n{e}" for r, e in sorted(errors.items()))

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


_POOLS: dict[int, _Pool] = {}  # world size -> its ranks, oldest use first


def _close_all() -> None:
    while _POOLS:
        _POOLS.pop(next(iter(_POOLS))).close()


atexit.register(_close_all)


def _pool(world_size: int) -> _Pool:
    pool = _POOLS.pop(world_size, None)
    if pool is None:
        while _POOLS and sum(_POOLS) + world_size > MAX_KEPT_RANKS:
            _POOLS.pop(next(iter(_POOLS))).close()
        pool = _Pool(world_size)
    _POOLS[world_size] = pool  # most recent last
    return pool


def spawn(fn, world_size, *args):
    if os.environ.get("ZERO_SF_FRESH_RANKS", "0") not in ("", "0"):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_entry, args=(fn, world_size, os.path.join(tmp, "store"), args),
                     nprocs=world_size, join=True)
        return
    pool = _pool(world_size)
    try:
        pool.run(fn, args)
    except BaseException:
        _POOLS.pop(world_size, None)
        pool.close()
        raise
