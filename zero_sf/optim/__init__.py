from .rmsprop import RMSProp
from .schedule_free import ScheduleFreeAdamW

__all__ = ["RMSProp", "ScheduleFreeAdamW"]
