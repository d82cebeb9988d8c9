"""Spawn gloo ranks on CPU (as torch's and DeepSpeed's own harnesses do).

``spawn(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` fresh processes with a ``file://`` rendezvous; an assertion in
any rank fails the calling test with that rank's traceback.
"""

import datetime
import os
import sys
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, fn, world_size, store, args):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # A rank left waiting in a collective fails the test in 2 minutes
    # instead of hanging the suite for gloo's default 30.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, world_size, *args)
        # Leave together: a rank tearing gloo down while its peer still
        # talks to it can abort ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's C++ teardown, where gloo's
    # threads still abort now and then ("terminate called without an active
    # exception", SIGABRT after every assertion passed; seen on 4-rank
    # checkpoint and launch tests, before and after this project's changes).
    # A failing rank raised above and never gets here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world_size, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world_size, os.path.join(tmp, "store"), args),
                 nprocs=world_size, join=True)
