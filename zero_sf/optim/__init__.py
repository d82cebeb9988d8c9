from ._base import ElementwiseOptimizer, ZeroSFOptimizer
from .rmsprop import RMSProp
from .schedule_free import ScheduleFreeAdamW

__all__ = ["ElementwiseOptimizer", "RMSProp", "ScheduleFreeAdamW", "ZeroSFOptimizer"]
