"""The checkpoint's collective agreement: every step that can fail on one
rank (a full disk, an unreadable file) is run on every rank and then agreed
on, so that every rank raises the same error and none is left waiting in a
collective; and DCP's calls, with its errors as :class:`CheckpointError`."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..sharding import comm


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or read back intact."""


class Mismatch(ValueError):
    """The checkpoint is intact but of another model: the user's error."""


def no_dist() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def dcp_call(fn, *args, **kwargs) -> Any:
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


def agree(group, what: str, fn: Callable[[], Any], passthrough: tuple = ()) -> Any:
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
    if kind == "Mismatch":
        raise ValueError(message) from error
    if kind == "FileNotFoundError":
        raise FileNotFoundError(message) from error
    raise CheckpointError(f"{what} failed on rank {rank}: {message}") from error
