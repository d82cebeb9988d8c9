from ..layout import build_layout
from .topology import hierarchical_groups
from .zero import ZeroOptimizer, ZeroScheduleFreeAdamW

__all__ = ["ZeroOptimizer", "ZeroScheduleFreeAdamW", "build_layout", "hierarchical_groups"]
