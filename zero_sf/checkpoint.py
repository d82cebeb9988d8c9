"""Sharded checkpoints that load at any world size (DESIGN.md §5).

Layout on disk (``path`` is a directory, on storage every rank can reach):

    path/LATEST             name of the current version (replaced atomically)
    path/v-<uuid>/          one torch.distributed.checkpoint (DCP) save

Each rank saves, with DCP, the model's state dict (replicated: DCP keeps one
copy) and its own *pieces* of every parameter's optimizer tensors, keyed
``optim/<param index>/<key>/<start>``: elements ``[start, start+len)`` of the
flattened parameter.  Loading at another world size reads, for each element
range the rank now owns, the saved pieces that overlap it -- so resharding
needs nothing but the keys.  A save is atomic: the new version is complete
on disk before LATEST points to it, and a crash mid-save leaves the previous
checkpoint the one that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from .sharding import comm
from .sharding.zero import ZeroOptimizer

__all__ = ["save", "load"]

_FORMAT = "zero_sf/1"


def _signature(model: nn.Module, optimizer: ZeroOptimizer) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "optimizer": optimizer.optimizer_class.__name__,
        "params": [[name, list(p.shape), str(p.dtype)] for name, p in model.named_parameters()],
    }


def _meta_tensor(meta: dict[str, Any]) -> torch.Tensor:
    # DCP flattens nested dicts into keys; one JSON blob keeps them whole.
    return torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)


def _no_dist() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _dcp(fn, *args, **kwargs):
    """DCP call; without a process group DCP warns that it assumes one
    process, which is what ``no_dist=True`` already says."""
    with warnings.catch_warnings():
        if kwargs.get("no_dist"):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs)


def save(path: str, model: nn.Module, optimizer: ZeroOptimizer) -> str:
    """Collective: every rank of the optimizer's group calls it.  Returns the
    version directory written."""
    group = optimizer.process_group
    version = comm.all_gather_objects(f"v-{uuid.uuid4().hex[:12]}", group)[0]
    target = os.path.join(path, version)
    meta = _signature(model, optimizer)
    meta["scalars"] = optimizer.scalar_state()
    meta["world_size"] = optimizer.world_size
    sd: dict[str, Any] = {"model": model.state_dict(), "meta": _meta_tensor(meta)}
    for index, start, _, tensors in optimizer.shard_pieces():
        for key, t in tensors.items():
            sd[f"optim/{index}/{key}/{start}"] = t.detach().clone()
    if optimizer.rank == 0:
        os.makedirs(path, exist_ok=True)
    comm.barrier(group)
    _dcp(dcp.save, sd, checkpoint_id=target, no_dist=_no_dist(), process_group=group)
    comm.barrier(group)
    if optimizer.rank == 0:
        tmp = os.path.join(path, f".LATEST.{version}")
        with open(tmp, "w") as f:
            f.write(version)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, "LATEST"))  # the commit point
        for old in os.listdir(path):
            if old.startswith("v-") and old != version:
                shutil.rmtree(os.path.join(path, old), ignore_errors=True)
    comm.barrier(group)
    return target


def _current(path: str) -> str:
    latest = os.path.join(path, "LATEST")
    if not os.path.exists(latest):
        raise FileNotFoundError(f"no zero_sf checkpoint at {path!r} (no LATEST file)")
    with open(latest) as f:
        return os.path.join(path, f.read().strip())


@torch.no_grad()
def load(path: str, model: nn.Module, optimizer: ZeroOptimizer) -> None:
    """Collective.  Loads at any world size.  Raises ValueError, before
    anything changes, when the checkpoint is of another model or optimizer."""
    group = optimizer.process_group
    target = _current(path)
    entries = FileSystemReader(target).read_metadata().state_dict_metadata
    meta_t = torch.empty(entries["meta"].size, dtype=torch.uint8)
    _dcp(dcp.load, {"meta": meta_t}, checkpoint_id=target, no_dist=_no_dist(), process_group=group)
    meta = json.loads(bytes(meta_t.tolist()).decode())
    mine = _signature(model, optimizer)
    for key in ("format", "optimizer", "params"):
        if meta.get(key) != mine[key]:
            detail = ""
            if key == "params":
                theirs = meta.get("params") or []
                diff = next((i for i, (a, b) in enumerate(zip(mine["params"], theirs)) if a != b),
                            min(len(mine["params"]), len(theirs)))
                detail = (f": parameter #{diff} is "
                          f"{theirs[diff] if diff < len(theirs) else 'missing'} in the checkpoint, "
                          f"{mine['params'][diff] if diff < len(mine['params']) else 'missing'} here")
            raise ValueError(f"checkpoint {target!r} does not match this model/optimizer "
                             f"({key} differs{detail}); is it a checkpoint of another model?")

    # Which saved pieces overlap the element ranges this rank owns now.
    saved: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for name, md in entries.items():
        if name.startswith("optim/"):
            _, index, key, start = name.split("/")
            saved.setdefault((int(index), key), []).append((int(start), md.size[0]))
    keys = sorted({k for _, k in saved} - {"master"})

    def overlaps(index, key, start, end):
        for s0, n in saved.get((index, key), []):
            lo, hi = max(start, s0), min(end, s0 + n)
            if lo < hi:
                yield f"optim/{index}/{key}/{s0}", s0, n, lo, hi

    # Every element this rank needs must be in the checkpoint: check before
    # creating or changing anything.
    for index, start, length, tensors in optimizer.shard_pieces():
        needed = keys + (["master"] if "master" in tensors else [])
        for key in needed:
            if sum(hi - lo for *_, lo, hi in overlaps(index, key, start, start + length)) != length:
                raise ValueError(f"checkpoint {target!r} lacks optimizer state {key!r} for "
                                 f"elements [{start}, {start + length}) of parameter #{index}")
    optimizer.ensure_state(keys)
    reads: dict[str, torch.Tensor] = {}
    plan = []
    for index, start, length, tensors in optimizer.shard_pieces():
        for key, dst in tensors.items():
            for name, s0, n, lo, hi in overlaps(index, key, start, start + length):
                reads.setdefault(name, torch.empty(n, dtype=entries[name].properties.dtype))
                plan.append((dst, lo - start, reads[name], lo - s0, hi - lo))
    model_sd = model.state_dict()
    _dcp(dcp.load, {"model": model_sd, **reads}, checkpoint_id=target, no_dist=_no_dist(),
         process_group=group)
    # model_sd's tensors are the parameters themselves (views into the flat
    # buffers), so the model is loaded in place; now the optimizer pieces.
    for dst, d0, src, s0, n in plan:
        dst[d0:d0 + n].copy_(src[s0:s0 + n])
    optimizer.load_scalar_state(meta["scalars"])
    comm.barrier(group)
