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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
import zlib
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from .sharding import comm
from .sharding.zero import ZeroOptimizer

__all__ = ["save", "load", "CheckpointError"]

_FORMAT = "zero_sf/3"
# /1: no checksums, no group structure; /2: no checksum of the metadata itself
_READABLE = ("zero_sf/1", "zero_sf/2", "zero_sf/3")
_VERSION = re.compile(r"^v-(\d{6})-[0-9a-f]+$")
_NONNEGATIVE = ("exp_avg_sq", "square_avg")  # second moments: never negative


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or read back intact."""


def _signature(model: nn.Module, optimizer: ZeroOptimizer) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "optimizer": optimizer.optimizer_class.__name__,
        "params": [[name, list(p.shape), str(p.dtype)] for name, p in model.named_parameters()],
        "groups": [len(g["params"]) for g in optimizer.param_groups],
    }


def _meta_tensors(meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The metadata as one JSON blob (DCP flattens nested dicts into keys),
    and its CRC-32 beside it: the blob holds the group scalars (k, lr,
    weight_sum, ...) and the tensors' checksums, so a flipped byte in it
    would load silently otherwise."""
    blob = json.dumps(meta).encode()
    return {"meta": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
            "meta_crc32": torch.tensor([zlib.crc32(blob)], dtype=torch.int64)}


def _crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (any dtype, any device)."""
    return zlib.crc32(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


def _no_dist() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _dcp(fn, *args, **kwargs) -> Any:
    """DCP call; without a process group DCP warns that it assumes one
    process, which is what ``no_dist=True`` already says.  DCP's
    CheckpointException derives from BaseException (an ``except
    Exception`` would not catch it): re-raised as CheckpointError."""
    with warnings.catch_warnings():
        if kwargs.get("no_dist"):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            return fn(*args, **kwargs)
        except CheckpointException as e:
            first = next((line for line in str(e).splitlines() if "Error" in line), str(e)[:300])
            raise CheckpointError(f"torch.distributed.checkpoint failed at "
                                  f"{kwargs.get('checkpoint_id')!r}: {first.strip()}") from e


class _Mismatch(ValueError):
    """The checkpoint is intact but of another model: the user's error."""


def _agree(group, what: str, fn: Callable[[], Any], passthrough: tuple = ()) -> Any:
    """Run ``fn`` on this rank, then agree on success: if it failed on any
    rank, every rank raises (nobody is left waiting in a collective):
    CheckpointError, or for an error of a ``passthrough`` type (a checkpoint
    of another model, no checkpoint at all) that error's kind."""
    error: Optional[BaseException] = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        error = e
    kind = next((k for k in passthrough if isinstance(error, k)), None)
    report = None if error is None else (kind and kind.__name__, f"{error}")
    failed = [(r, m) for r, m in enumerate(comm.all_gather_objects(report, group)) if m]
    if not failed:
        return result
    rank, (kind, message) = failed[0]
    if kind == "_Mismatch":
        raise ValueError(message) from error
    if kind == "FileNotFoundError":
        raise FileNotFoundError(message) from error
    raise CheckpointError(f"{what} failed on rank {rank}: {message}") from error


# ------------------------------------------------------------------ save
def _versions(path: str) -> list[tuple[int, str]]:
    """(sequence number, name) of every version directory, oldest first."""
    out = []
    for name in os.listdir(path) if os.path.isdir(path) else []:
        m = _VERSION.match(name)
        if m:
            out.append((int(m.group(1)), name))
    return sorted(out)


def _committed(path: str, name: str) -> bool:
    return os.path.exists(os.path.join(path, name, "COMMITTED"))


def _write_atomically(file: str, text: str) -> None:
    tmp = f"{file}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def save(path: str, model: nn.Module, optimizer: ZeroOptimizer, *, keep: int = 2) -> str:
    """Collective: every rank of the optimizer's group calls it.  Saves what
    the model and ``optimizer.param_groups`` hold now (a scheduler's current
    learning rate included) and keeps the newest ``keep`` complete versions.
    Returns the version directory written.  Raises CheckpointError on every
    rank if any rank fails."""
    if not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f"Invalid keep value: {keep!r} (expected an integer >= 1)")
    group = optimizer.process_group
    optimizer.adopt_model_writes()  # weights written since the last step are what we save

    def prepare():
        if optimizer.rank == 0:
            os.makedirs(path, exist_ok=True)
            seq = max((s for s, _ in _versions(path)), default=0) + 1
            return f"v-{seq:06d}-{uuid.uuid4().hex[:8]}"
        return None

    version = comm.all_gather_objects(_agree(group, f"creating checkpoint directory {path!r}",
                                             prepare), group)[0]
    target = os.path.join(path, version)
    meta = _signature(model, optimizer)
    meta["scalars"] = optimizer.scalar_state()
    meta["world_size"] = optimizer.world_size
    sd: dict[str, Any] = {"model": model.state_dict()}
    pieces = {}
    for index, start, _, tensors in optimizer.shard_pieces():
        for key, t in tensors.items():
            pieces[f"optim/{index}/{key}/{start}"] = t.detach().clone()
    sd.update(pieces)
    # Checksums: this rank's pieces, and every N-th model tensor (all ranks
    # hold the same model: the work is split, then shared).
    model_items = sorted((k, v) for k, v in sd["model"].items() if torch.is_tensor(v))
    mine = {k: _crc(v) for k, v in pieces.items()}
    mine.update({f"model.{k}": _crc(v) for i, (k, v) in enumerate(model_items)
                 if i % optimizer.world_size == optimizer.rank})
    meta["crc32"] = {k: v for part in comm.all_gather_objects(mine, group) for k, v in part.items()}
    sd.update(_meta_tensors(meta))
    _agree(group, f"saving checkpoint {target!r}",
           lambda: _dcp(dcp.save, sd, checkpoint_id=target, no_dist=_no_dist(), process_group=group))

    def commit():
        if optimizer.rank == 0:
            _write_atomically(os.path.join(target, "COMMITTED"), version)
            _write_atomically(os.path.join(path, "LATEST"), version)  # the commit point
            committed = [n for _, n in _versions(path) if _committed(path, n)]
            old = set(committed[:-keep])
            # and what crashed saves left behind (never committed, older than this one)
            old |= {n for _, n in _versions(path) if n != version and not _committed(path, n)}
            for name in old:
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)

    _agree(group, f"committing checkpoint {target!r}", commit)
    return target


# ------------------------------------------------------------------ load
def _candidates(path: str) -> list[str]:
    """LATEST first, then the older complete versions, newest first; a
    version directory (what save() returns and prints) is just itself."""
    name = os.path.basename(os.path.normpath(path))
    if _VERSION.match(name) and os.path.isdir(path):
        if not _committed(os.path.dirname(os.path.normpath(path)), name):
            raise FileNotFoundError(f"checkpoint version {path!r} is incomplete (no COMMITTED "
                                    "file: its save did not finish); load its parent directory "
                                    "for the newest complete version")
        return [path]
    latest = os.path.join(path, "LATEST")
    if not os.path.exists(latest):
        raise FileNotFoundError(f"no zero_sf checkpoint at {path!r} (no LATEST file)")
    with open(latest) as f:
        current = f.read().strip()
    older = [n for s, n in reversed(_versions(path)) if n != current and _committed(path, n)
             and (not _VERSION.match(current) or s < int(_VERSION.match(current).group(1)))]
    return [os.path.join(path, n) for n in [current] + older]


def _check_files(target: str, md) -> None:
    """Every file the metadata points to exists and is long enough."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, length in sorted(need.items()):
        file = os.path.join(target, rel)
        if not os.path.exists(file):
            raise CheckpointError(f"checkpoint file {file!r} is missing")
        size = os.path.getsize(file)
        if size < length:
            raise CheckpointError(f"checkpoint file {file!r} is truncated: {size} bytes, "
                                  f"its metadata needs {length}")


def _file_of(target: str, md, key: str) -> str:
    rel = next((info.relative_path for idx, info in md.storage_data.items() if idx.fqn == key), "?")
    return os.path.join(target, rel)


def _signature_error(target: str, meta: dict[str, Any], mine: dict[str, Any]) -> Optional[str]:
    if meta.get("format") not in _READABLE:
        return f"format {meta.get('format')!r} is not one of {_READABLE}"
    if meta.get("optimizer") != mine["optimizer"]:
        return (f"optimizer differs: the checkpoint was saved by ZeroOptimizer("
                f"{meta.get('optimizer')}), this is ZeroOptimizer({mine['optimizer']}); build "
                f"ZeroOptimizer(params, zero_sf.{meta.get('optimizer')}, ...) to load it")
    # Parameter dtypes may differ (a fp32 CPU run resumed in bf16 on GPUs and
    # back): the optimizer state is fp32 either way, and the fp32 y comes from
    # the saved master or the saved fp32 weights.  Names and shapes may not.
    if [q[:2] for q in meta.get("params") or []] != [q[:2] for q in mine["params"]]:
        theirs = meta.get("params") or []
        diff = next((i for i, (a, b) in enumerate(zip(mine["params"], theirs)) if a[:2] != b[:2]),
                    min(len(mine["params"]), len(theirs)))
        return (f"params differ: parameter #{diff} is "
                f"{theirs[diff] if diff < len(theirs) else 'missing'} in the checkpoint, "
                f"{mine['params'][diff] if diff < len(mine['params']) else 'missing'} here")
    if "groups" in meta and meta["groups"] != mine["groups"]:
        return (f"param groups differ: the checkpoint has {len(meta['groups'])} groups of "
                f"{meta['groups']} parameters, this optimizer {len(mine['groups'])} of "
                f"{mine['groups']}; build the optimizer with the same param groups")
    return None


def _read_meta(target: str, entries) -> dict[str, Any]:
    """The metadata blob, checked against its CRC-32 before it is parsed
    (format zero_sf/3; older formats have none)."""
    want = {"meta": torch.empty(entries["meta"].size, dtype=torch.uint8)}
    if "meta_crc32" in entries:
        want["meta_crc32"] = torch.empty(entries["meta_crc32"].size, dtype=torch.int64)
    _dcp(dcp.load, want, checkpoint_id=target, no_dist=True)
    blob = want["meta"].numpy().tobytes()
    if "meta_crc32" in want and zlib.crc32(blob) != int(want["meta_crc32"][0]):
        raise CheckpointError(
            f"checkpoint {target!r}: its metadata (group scalars, checksums) fails its CRC-32 "
            f"check (stored {int(want['meta_crc32'][0])}, read {zlib.crc32(blob)}): the "
            "checkpoint is damaged")
    try:
        meta = json.loads(blob.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {target!r}: its metadata is not readable JSON "
                              f"({e}): the checkpoint is damaged") from e
    if meta.get("format") == _FORMAT and "meta_crc32" not in want:
        raise CheckpointError(f"checkpoint {target!r} of format {_FORMAT} lacks the checksum "
                              "of its metadata: the checkpoint is damaged")
    return meta


def _read(target: str, model: nn.Module, optimizer: ZeroOptimizer):
    """Read and verify everything this rank needs from ``target`` into new
    tensors; write nothing.  Returns (meta, model values, copy plan)."""
    reader = FileSystemReader(target)
    try:
        md = reader.read_metadata()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read the metadata of checkpoint {target!r}: {e}") from e
    entries = md.state_dict_metadata
    _check_files(target, md)
    if "meta" not in entries:
        raise CheckpointError(f"checkpoint {target!r} has no zero_sf metadata")
    meta = _read_meta(target, entries)
    problem = _signature_error(target, meta, _signature(model, optimizer))
    if problem:
        raise _Mismatch(f"checkpoint {target!r} does not match this model/optimizer "
                        f"({problem}); is it a checkpoint of another model?")

    # Which saved pieces overlap the element ranges this rank owns now.
    saved: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for name, emd in entries.items():
        if name.startswith("optim/"):
            _, index, key, start = name.split("/")
            saved.setdefault((int(index), key), []).append((int(start), emd.size[0]))
    keys = sorted({k for _, k in saved} - {"master"})

    def overlaps(index, key, start, end):
        for s0, n in saved.get((index, key), []):
            lo, hi = max(start, s0), min(end, s0 + n)
            if lo < hi:
                yield f"optim/{index}/{key}/{s0}", s0, n, lo, hi

    # The fp32 y ("master"): from the saved master where the saved parameter
    # was low precision, else from the saved (fp32) weights themselves -- per
    # parameter: a bf16 model with fp32 norms saves masters for the bf16 ones.
    with_master = {index for index, k in saved if k == "master"}
    named = list(model.named_parameters())
    names = {id(p): n for n, p in named}
    reads: dict[str, torch.Tensor] = {}
    plan = []  # (param index, key, offset in the rank's piece, source, offset, length)
    for index, start, length, tensors in optimizer.shard_pieces(y=True):
        has_master = index in with_master
        if not has_master:
            # by identity; by position where the optimizer holds other tensors
            # than this model's (the same architecture, as the signature checked)
            name = f"model.{names.get(id(optimizer._params[index])) or named[index][0]}"
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
    model_sd = model.state_dict()
    # read in the saved dtype (exact fp32 weights for a bf16 model's master)
    fresh = {k: torch.empty_like(v, device="cpu", dtype=entries[f"model.{k}"].properties.dtype)
             if torch.is_tensor(v) and f"model.{k}" in entries else
             torch.empty_like(v, device="cpu") if torch.is_tensor(v) else v
             for k, v in model_sd.items()}
    # Every rank reads on its own (no collective inside DCP): a rank that
    # fails cannot leave the others waiting; _agree decides after.
    _dcp(dcp.load, {"model": fresh, **reads}, checkpoint_id=target, no_dist=True)

    crcs = meta.get("crc32")
    if crcs is not None:
        checks = [(f"model.{k}", f"model.{k}", v) for k, v in fresh.items() if torch.is_tensor(v)]
        checks += [(name, name, t) for name, t in reads.items()]
        for label, key, t in checks:
            if crcs.get(key) != _crc(t):
                raise CheckpointError(
                    f"checkpoint {target!r}: {label} fails its CRC-32 check (stored "
                    f"{crcs.get(key)}, read {_crc(t)}): file "
                    f"{_file_of(target, md, key)!r} is damaged")
    for name, t in reads.items():
        key = name.split("/")[2]
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint {target!r}: {name} holds non-finite values")
        if key in _NONNEGATIVE and (t < 0).any():
            raise CheckpointError(f"checkpoint {target!r}: {name} holds negative values "
                                  f"(min {t.min().item():.3g}); a second moment never is")
    return meta, fresh, plan, reads


@torch.no_grad()
def _write(model: nn.Module, optimizer: ZeroOptimizer, meta, fresh, plan, reads) -> None:
    model_sd = model.state_dict()  # the parameters themselves (views of the flat buffers)
    for k, v in fresh.items():
        if torch.is_tensor(v):
            model_sd[k].copy_(v)
    keys = sorted({key for _, _, key, *_ in plan} - {"master"})
    optimizer.reset_state(keys)
    joined: dict = {}  # master_weights="remainder": fp32 y, split after the copies
    pieces = {(index, start): tensors
              for index, start, _, tensors in optimizer.shard_pieces(y=True, joined=joined)}
    for index, start, key, d0, name, s0, n in plan:
        source = reads[name] if name in reads else fresh[name[len("model."):]].reshape(-1)
        # (a state dtype other than the saved one converts here: bf16 <-> fp32)
        pieces[(index, start)][key][d0:d0 + n].copy_(source[s0:s0 + n])
    optimizer.store_master(joined)
    optimizer.load_scalar_state(meta["scalars"])
    # Every rank wrote y for the elements it owns: all-gather, so the model
    # holds y rounded to its dtype (a fp32 model loading a bf16 run's master;
    # an offloaded master lives on the host, so it is copied over first).
    optimizer.weights.master_to_model()
    optimizer.weights.gather(optimizer.process_group)


def load(path: str, model: nn.Module, optimizer: ZeroOptimizer, *, fallback: bool = True) -> str:
    """Collective.  Loads at any world size; returns the version loaded.

    Everything is read and verified on every rank before the model or the
    optimizer is written.  A damaged newest version raises CheckpointError,
    or with ``fallback`` (default) loads the previous complete version with a
    warning.  A checkpoint of another model, optimizer or group structure
    raises ValueError.  Either way nothing has changed when it raises."""
    group = optimizer.process_group
    found = _agree(group, f"finding a checkpoint in {path!r}",
                   lambda: _candidates(path) if optimizer.rank == 0 else None,
                   passthrough=(FileNotFoundError,))
    candidates = comm.all_gather_objects(found, group)[0]
    failures = []
    for target in candidates:
        try:
            got = _agree(group, f"reading checkpoint {target!r}",
                         lambda: _read(target, model, optimizer), passthrough=(_Mismatch,))
        except CheckpointError as e:
            failures.append(str(e))
            if not fallback:
                raise
            continue
        if failures:
            warnings.warn(f"zero_sf.load: {failures[0]}; loaded the previous complete "
                          f"version {target!r} instead", RuntimeWarning, stacklevel=2)
        _write(model, optimizer, *got)
        comm.barrier(group)
        return target
    raise CheckpointError(f"no intact checkpoint version in {path!r}: " + "; ".join(failures))
