"""Resharding: which saved pieces this rank reads for the elements it owns
now (at any world size), and the copies that write them into the model and
the optimizer once everything was read and verified.

A checkpoint's optimizer pieces are keyed ``optim/<param index>/<key>/<start>``
(elements ``[start, start + len)`` of the flattened parameter): for every
range a rank owns (:meth:`ShardedState.shard_pieces`), the plan lists the
saved pieces that overlap it and where each overlap goes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from ..layout import overlap
from ..sharding.state_view import ShardedState
from ..sharding.zero import ZeroOptimizer
from .collective import CheckpointError, Mismatch, dcp_call
from .verify import check_files, check_reads, read_meta, signature, signature_error

# One copy: (param index, start of the rank's piece, key, offset in that piece,
#            source name, offset in the source, length)
Copy = tuple[int, int, str, int, str, int, int]


def read(target: str, model: nn.Module, optimizer: ZeroOptimizer):
    """Read and verify everything this rank needs from ``target`` into new
    tensors; write nothing.  Returns (meta, model values, copy plan, reads)."""
    reader = FileSystemReader(target)
    try:
        md = reader.read_metadata()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read the metadata of checkpoint {target!r}: {e}") from e
    entries = md.state_dict_metadata
    check_files(target, md)
    if "meta" not in entries:
        raise CheckpointError(f"checkpoint {target!r} has no zero_sf metadata")
    meta = read_meta(target, entries)
    problem = signature_error(target, meta, signature(model, optimizer))
    if problem:
        raise Mismatch(f"checkpoint {target!r} does not match this model/optimizer "
                       f"({problem}); is it a checkpoint of another model?")
    plan, reads = plan_reads(target, entries, model, optimizer.sharded_state)
    fresh = model_buffers(model, entries)
    # Every rank reads on its own (no collective inside DCP): a rank that
    # fails cannot leave the others waiting; collective.agree decides after.
    dcp_call(dcp.load, {"model": fresh, **reads}, checkpoint_id=target, no_dist=True)
    check_reads(target, md, meta, fresh, reads)
    return meta, fresh, plan, reads


def saved_pieces(entries) -> dict[tuple[int, str], list[tuple[int, int]]]:
    """(param index, key) -> [(start, length)] of the saved optimizer pieces."""
    saved: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for name, emd in entries.items():
        if name.startswith("optim/"):
            _, index, key, start = name.split("/")
            saved.setdefault((int(index), key), []).append((int(start), emd.size[0]))
    return saved


def plan_reads(target: str, entries, model: nn.Module,
               view: ShardedState) -> tuple[list[Copy], dict[str, torch.Tensor]]:
    """The copies that fill every range this rank owns, and the saved
    pieces they read (empty tensors for DCP to fill).  Raises
    CheckpointError when the saved pieces do not cover a range."""
    saved = saved_pieces(entries)
    keys = sorted({k for _, k in saved} - {"master"})

    def overlaps(index, key, start, end):
        for s0, n in saved.get((index, key), []):
            lo, hi = overlap(start, end, s0, s0 + n)
            if lo < hi:
                yield f"optim/{index}/{key}/{s0}", s0, n, lo, hi

    # The fp32 y ("master"): from the saved master where the saved parameter
    # was low precision, else from the saved (fp32) weights themselves -- per
    # parameter: a bf16 model with fp32 norms saves masters for the bf16 ones.
    with_master = {index for index, k in saved if k == "master"}
    named = list(model.named_parameters())
    names = {id(p): n for n, p in named}
    reads: dict[str, torch.Tensor] = {}
    plan: list[Copy] = []  # (param index, key, offset in the rank's piece, source, offset, length)
    for index, start, length, _ in view.shard_pieces(y=True):
        has_master = index in with_master
        if not has_master:
            # by identity; by position where the optimizer holds other tensors
            # than this model's (the same architecture, as the signature checked)
            name = f"model.{names.get(id(view.params[index])) or named[index][0]}"
            plan.append((index, start, "master", 0, name, start, length))
        for key in dict.fromkeys(keys + (["master"] if has_master else [])):
            found = 0
            for name, s0, n, lo, hi in overlaps(index, key, start, start + length):
                reads.setdefault(name, torch.empty(n, dtype=entries[name].properties.dtype))
                plan.append((index, start, key, lo - start, name, lo - s0, hi - lo))
                found += hi - lo
            if found != length:
                raise CheckpointError(
                    f"checkpoint {target!r} lacks optimizer state {key!r} for elements "
                    f"[{start}, {start + length}) of parameter #{index}")
    return plan, reads


def model_buffers(model: nn.Module, entries) -> dict[str, Any]:
    """Empty CPU tensors for the model's saved values, in the saved dtype
    (exact fp32 weights for a bf16 model's master)."""
    model_sd = model.state_dict()
    return {k: torch.empty_like(v, device="cpu", dtype=entries[f"model.{k}"].properties.dtype)
             if torch.is_tensor(v) and f"model.{k}" in entries else
             torch.empty_like(v, device="cpu") if torch.is_tensor(v) else v
             for k, v in model_sd.items()}


@torch.no_grad()
def write(model: nn.Module, optimizer: ZeroOptimizer, meta, fresh, plan, reads) -> None:
    model_sd = model.state_dict()  # the parameters themselves (views of the flat buffers)
    for k, v in fresh.items():
        if torch.is_tensor(v):
            model_sd[k].copy_(v)
    keys = sorted({key for _, _, key, *_ in plan} - {"master"})
    view = optimizer.sharded_state
    view.reset_state(keys)
    joined: dict = {}  # master_weights="remainder": fp32 y, split after the copies
    pieces = {(index, start): tensors
              for index, start, _, tensors in view.shard_pieces(y=True, joined=joined)}
    for index, start, key, d0, name, s0, n in plan:
        source = reads[name] if name in reads else fresh[name[len("model."):]].reshape(-1)
        # (a state dtype other than the saved one converts here: bf16 <-> fp32)
        pieces[(index, start)][key][d0:d0 + n].copy_(source[s0:s0 + n])
    view.store_master(joined)
    view.load_scalar_state(meta["scalars"])
    # Every rank wrote y for the elements it owns: all-gather, so the model
    # holds y rounded to its dtype (a fp32 model loading a bf16 run's master;
    # an offloaded master lives on the host, so it is copied over first).
    view.publish()
