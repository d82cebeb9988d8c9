"""What a checkpoint must be before anything is written from it: of this
model and optimizer (its signature), intact (every file present and long
enough, the metadata and every tensor matching its CRC-32), and sane
(finite state, second moments >= 0)."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ..sharding.zero import ZeroOptimizer
from .collective import CheckpointError, dcp_call
from .versions import FORMAT, READABLE

NONNEGATIVE = ("exp_avg_sq", "square_avg")  # second moments: never negative


def signature(model: nn.Module, optimizer: ZeroOptimizer) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "optimizer": optimizer.optimizer_class.__name__,
        "params": [[name, list(p.shape), str(p.dtype)] for name, p in model.named_parameters()],
        "groups": [len(g["params"]) for g in optimizer.param_groups],
    }


def meta_tensors(meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The metadata as one JSON blob (DCP flattens nested dicts into keys),
    and its CRC-32 beside it: the blob holds the group scalars (k, lr,
    weight_sum, ...) and the tensors' checksums, so a flipped byte in it
    would load silently otherwise."""
    blob = json.dumps(meta).encode()
    return {"meta": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
            "meta_crc32": torch.tensor([zlib.crc32(blob)], dtype=torch.int64)}


def crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (any dtype, any device)."""
    return zlib.crc32(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().data)


def check_files(target: str, md) -> None:
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


def file_of(target: str, md, key: str) -> str:
    rel = next((info.relative_path for idx, info in md.storage_data.items() if idx.fqn == key), "?")
    return os.path.join(target, rel)


def signature_error(target: str, meta: dict[str, Any], mine: dict[str, Any]) -> Optional[str]:
    if meta.get("format") not in READABLE:
        return f"format {meta.get('format')!r} is not one of {READABLE}"
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


def read_meta(target: str, entries) -> dict[str, Any]:
    """The metadata blob, checked against its CRC-32 before it is parsed
    (format zero_sf/3; older formats have none)."""
    want = {"meta": torch.empty(entries["meta"].size, dtype=torch.uint8)}
    if "meta_crc32" in entries:
        want["meta_crc32"] = torch.empty(entries["meta_crc32"].size, dtype=torch.int64)
    dcp_call(dcp.load, want, checkpoint_id=target, no_dist=True)
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
    if meta.get("format") == FORMAT and "meta_crc32" not in want:
        raise CheckpointError(f"checkpoint {target!r} of format {FORMAT} lacks the checksum "
                              "of its metadata: the checkpoint is damaged")
    return meta


def check_reads(target: str, md, meta: dict[str, Any], fresh: dict[str, Any],
                reads: dict[str, torch.Tensor]) -> None:
    """The model values and optimizer pieces read: their CRC-32s (formats
    /2 on), finite values, and second moments that are not negative."""
    crcs = meta.get("crc32")
    if crcs is not None:
        checks = [(f"model.{k}", f"model.{k}", v) for k, v in fresh.items() if torch.is_tensor(v)]
        checks += [(name, name, t) for name, t in reads.items()]
        for label, key, t in checks:
            if crcs.get(key) != crc(t):
                raise CheckpointError(
                    f"checkpoint {target!r}: {label} fails its CRC-32 check (stored "
                    f"{crcs.get(key)}, read {crc(t)}): file "
                    f"{file_of(target, md, key)!r} is damaged")
    for name, t in reads.items():
        key = name.split("/")[2]
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint {target!r}: {name} holds non-finite values")
        if key in NONNEGATIVE and (t < 0).any():
            raise CheckpointError(f"checkpoint {target!r}: {name} holds negative values "
                                  f"(min {t.min().item():.3g}); a second moment never is")
