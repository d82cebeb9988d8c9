"""zero_sf: Schedule-Free AdamW and Adam-style RMSProp, fused and sharded."""

from . import dispatch, functional, spec

# Bound here, not lazily: once anything imports the module zero_sf.export
# (ZeRO-3's glue does, below) a lazy lookup would find the module.
from .export import export

# The integrations plug into the core here (the core never imports them):
# FSDP2's reshard after a train()/eval() switch, and eval_mode()'s view of a
# DeepSpeed engine.  Neither imports its engine until it is used.
from .integrations import deepspeed as _deepspeed_glue  # noqa: F401
from .integrations import fsdp as _fsdp_glue  # noqa: F401
from .optim import RMSProp, ScheduleFreeAdamW
from .sharding import ZeroOptimizer, ZeroScheduleFreeAdamW, hierarchical_groups

__version__ = "0.1.0"

__all__ = ["RMSProp", "ScheduleFreeAdamW", "ZeroOptimizer", "ZeroScheduleFreeAdamW", "save", "load",
           "CheckpointError", "eval_mode", "export", "dispatch", "functional", "spec",
           "hierarchical_groups",
           "__version__"]

# The checkpoint functions import torch.distributed.checkpoint, which costs
# ~1 s at import (it pulls in DTensor): loaded on first use instead, so a
# process that only trains (every torchrun rank, every spawned test rank)
# does not pay for it.
_LAZY = {"save": "checkpoint", "load": "checkpoint", "CheckpointError": "checkpoint",
         "eval_mode": "modes"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
