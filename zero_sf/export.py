"""``zero_sf.export``: the weights people ship -- Schedule-Free's ``x`` -- as one
consolidated safetensors file, from any world size."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch
import torch.nn as nn

from .modes import eval_mode

__all__ = ["export", "consolidated_state_dict"]

SAFE_WEIGHTS_NAME = "model.safetensors"  # what transformers' from_pretrained reads


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def _unwrap(model: Any) -> nn.Module:
    """The user's module inside DDP or a DeepSpeed engine (both keep it as
    ``.module``; their own state dict would prefix every name with ``module.``)."""
    while any(c.__name__ in _WRAPPERS for c in type(model).__mro__):
        model = model.module
    return model


# ``fn(module)`` -> a context manager inside which ``module.state_dict()``
# holds whole parameters, or None when ``fn`` does not apply.
# zero_sf.integrations.deepspeed_zero3 registers ZeRO-3's gather (its
# partitioned parameters are empty tensors outside a forward).
GATHER_FOR_STATE_DICT: list = []


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on the CPU: DTensor (FSDP2) entries are
    all-gathered, DeepSpeed ZeRO-3's partitioned parameters gathered
    (collective: every rank calls this)."""
    module = _unwrap(model)
    with contextlib.ExitStack() as gathered:
        for gather in GATHER_FOR_STATE_DICT:
            context = gather(module)
            if context is not None:
                gathered.enter_context(context)
        return _to_cpu(module.state_dict())


def _to_cpu(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    from .dispatch import is_dtensor

    out = {}
    for name, value in state.items():
        if not torch.is_tensor(value):
            continue
        if is_dtensor(value):
            value = value.full_tensor()
        # a copy per name: safetensors refuses shared storage (tied embeddings)
        out[name] = value.detach().to("cpu", copy=True).contiguous()
    return out


def export(path: str, model: nn.Module, optimizer: Any = None, *,
           dtype: Optional[torch.dtype] = None) -> str:
    """Write the model's weights at ``x`` (the Schedule-Free average that is
    evaluated and shipped) as a single safetensors file.

    ``optimizer``: a zero_sf optimizer, a :class:`~zero_sf.ZeroOptimizer`, a
    DeepSpeed engine, or a wrapper of one (see :func:`zero_sf.eval_mode`);
    the model is switched to ``x`` for the write and back afterwards, so
    training continues from ``y``.  ``None`` exports the weights as they are.
    ``path``: a ``.safetensors`` file, or a directory that gets
    ``model.safetensors`` (plus ``config.json`` for a transformers model, so
    ``from_pretrained(path)`` loads it).  ``dtype``: cast floating weights
    (default: as held).  Collective when the model or optimizer is sharded:
    call it on every rank; rank 0 writes.  Returns the file's path.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    file = path if path.endswith(".safetensors") else os.path.join(path, SAFE_WEIGHTS_NAME)
    context = eval_mode(optimizer) if optimizer is not None else contextlib.nullcontext()
    with context:
        weights = consolidated_state_dict(model)
    if rank == 0:
        if dtype is not None:
            weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
        tmp = file + ".tmp"
        save_file(weights, tmp, metadata={"format": "pt", "weights": "x" if optimizer is not None
                                          else "as held", "producer": "zero_sf.export"})
        os.replace(tmp, file)  # a reader never sees half a file
        config = getattr(_unwrap(model), "config", None)
        if (config is not None and not path.endswith(".safetensors")
                and hasattr(config, "to_json_string")):
            with open(os.path.join(path, "config.json"), "w") as f:
                f.write(config.to_json_string())
    if distributed:
        dist.barrier()
    return file

