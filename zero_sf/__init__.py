"""zero_sf: Schedule-Free AdamW and Adam-style RMSProp, fused and sharded."""

from . import functional, spec
from .optim import RMSProp, ScheduleFreeAdamW

__version__ = "0.1.0"

__all__ = ["RMSProp", "ScheduleFreeAdamW", "functional", "spec", "__version__"]
