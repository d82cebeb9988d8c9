"""Sharded checkpoints that load at any world size (docs/design.md §5).

Layout on disk (``path`` is a directory, on storage every rank can reach):

    path/LATEST                   name of the newest complete version (replaced atomically)
    path/v-000007-<id>/           one torch.distributed.checkpoint (DCP) save
    path/v-000007-<id>/COMMITTED  written once every rank's part is on disk

Each rank saves, with DCP, the model's state dict (replicated: DCP keeps one
copy) and its own *pieces* of every parameter's optimizer tensors, keyed
``optim/<param index>/<key>/<start>``: elements ``[start, start+len)`` of the
flattened parameter.  Loading at another world size reads, for each element
range the rank now owns, the saved pieces that overlap it -- so resharding
needs nothing but the keys.

What can go wrong, and what happens:

* a crash mid-save: the new version has no COMMITTED file and LATEST still
  names the previous one, which is what loads;
* an error on one rank only (an unwritable directory, a full disk): every
  step agrees collectively, so every rank raises :class:`CheckpointError`;
* damage on disk (a missing or truncated file, flipped bytes): every tensor
  carries a CRC-32 in the metadata, checked with the element ranges, shapes
  and value sanity (finite state, ``exp_avg_sq >= 0``) *before* the model or
  optimizer is written; the newest ``keep`` complete versions are kept, and
  ``load`` falls back to the previous one with a warning;
* a checkpoint of another model, optimizer or param-group structure: a
  ``ValueError`` before anything changes.

The package by job: :mod:`.versions` (directories, atomic files, which
version loads), :mod:`.verify` (signature, checksums, sanity),
:mod:`.reshard` (what each rank reads at the new world size, and the copies),
:mod:`.collective` (every rank agrees on success or raises the same error).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ..sharding import comm
from ..sharding.zero import ZeroOptimizer
from . import reshard, versions
from .collective import CheckpointError, Mismatch, agree, dcp_call, no_dist
from .verify import crc, meta_tensors, signature

__all__ = ["save", "load", "CheckpointError"]


def save(path: str, model: nn.Module, optimizer: ZeroOptimizer, *, keep: int = 2) -> str:
    """Collective: every rank of the optimizer's group calls it.  Saves what
    the model and ``optimizer.param_groups`` hold now (a scheduler's current
    learning rate included) and keeps the newest ``keep`` complete versions.
    Returns the version directory written.  Raises CheckpointError on every
    rank if any rank fails."""
    if not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f"Invalid keep value: {keep!r} (expected an integer >= 1)")
    group = optimizer.process_group
    view = optimizer.sharded_state
    view.adopt_model_writes()  # weights written since the last step are what we save

    def prepare():
        return versions.new_name(path) if optimizer.dp_rank == 0 else None

    version = comm.all_gather_objects(agree(group, f"creating checkpoint directory {path!r}",
                                             prepare), group)[0]
    target = os.path.join(path, version)
    meta = signature(model, optimizer)
    meta["scalars"] = view.scalar_state()
    meta["world_size"] = optimizer.world_size
    sd: dict[str, Any] = {"model": model.state_dict()}
    pieces = {}
    for index, start, _, tensors in view.shard_pieces():
        for key, t in tensors.items():
            pieces[f"optim/{index}/{key}/{start}"] = t.detach().clone()
    sd.update(pieces)
    # Checksums: this rank's pieces, and every N-th model tensor (all ranks
    # hold the same model: the work is split, then shared).
    model_items = sorted((k, v) for k, v in sd["model"].items() if torch.is_tensor(v))
    mine = {k: crc(v) for k, v in pieces.items()}
    mine.update({f"model.{k}": crc(v) for i, (k, v) in enumerate(model_items)
                 if i % optimizer.dp_size == optimizer.dp_rank})
    meta["crc32"] = {k: v for part in comm.all_gather_objects(mine, group) for k, v in part.items()}
    sd.update(meta_tensors(meta))
    agree(group, f"saving checkpoint {target!r}",
          lambda: dcp_call(dcp.save, sd, checkpoint_id=target, no_dist=no_dist(),
                           process_group=group))

    def commit():
        if optimizer.dp_rank == 0:
            versions.commit(path, version, keep)

    agree(group, f"committing checkpoint {target!r}", commit)
    return target


def load(path: str, model: nn.Module, optimizer: ZeroOptimizer, *, fallback: bool = True) -> str:
    """Collective.  Loads at any world size; returns the version loaded.

    Everything is read and verified on every rank before the model or the
    optimizer is written.  A damaged newest version raises CheckpointError,
    or with ``fallback`` (default) loads the previous complete version with a
    warning.  A checkpoint of another model, optimizer or group structure
    raises ValueError.  Either way nothing has changed when it raises."""
    group = optimizer.process_group
    found = agree(group, f"finding a checkpoint in {path!r}",
                   lambda: versions.candidates(path) if optimizer.dp_rank == 0 else None,
                   passthrough=(FileNotFoundError,))
    candidates = comm.all_gather_objects(found, group)[0]
    failures = []
    for target in candidates:
        try:
            got = agree(group, f"reading checkpoint {target!r}",
                         functools.partial(reshard.read, target, model, optimizer),
                        passthrough=(Mismatch,))
        except CheckpointError as e:
            failures.append(str(e))
            if not fallback:
                raise
            continue
        if failures:
            warnings.warn(f"zero_sf.load: {failures[0]}; loaded the previous complete "
                          f"version {target!r} instead", RuntimeWarning, stacklevel=2)
        reshard.write(model, optimizer, *got)
        comm.barrier(group)
        return target
    raise CheckpointError(f"no intact checkpoint version in {path!r}: " + "; ".join(failures))
