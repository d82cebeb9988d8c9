"""zero_sf: Schedule-Free AdamW and Adam-style RMSProp, fused and sharded."""

from . import functional, spec
from .optim import RMSProp, ScheduleFreeAdamW
from .sharding import ZeroOptimizer, ZeroScheduleFreeAdamW
from .checkpoint import CheckpointError, load, save

__version__ = "0.1.0"

__all__ = ["RMSProp", "ScheduleFreeAdamW", "ZeroOptimizer", "ZeroScheduleFreeAdamW", "save", "load", "CheckpointError", "functional", "spec", "__version__"]
