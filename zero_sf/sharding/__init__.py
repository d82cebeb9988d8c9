from ..layout import build_layout
from .zero import ZeroOptimizer, ZeroScheduleFreeAdamW

__all__ = ["ZeroOptimizer", "ZeroScheduleFreeAdamW", "build_layout"]
