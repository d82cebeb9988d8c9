"""Hyperparameter validation in torch's wording (``Invalid learning rate:
-1``), shared by the optimizers."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def host_float(value: Any) -> Any:
    """A 1-element tensor hyperparameter (``lr=torch.tensor(1e-3)``, as
    schedulers and capturable code pass it) as a Python float; anything else
    unchanged.  The kernels take scalars by value, so a CUDA tensor costs a
    host read (a device sync) each time: in a step's validation and in its
    update."""
    return float(value.item()) if isinstance(value, Tensor) else value


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False,
                 label: str | None = None, tensor_ok: bool = False) -> None:
    """Raise ``ValueError(f"Invalid {label}: {value}")`` unless value is a
    finite real in the given interval (torch's wording).  ``tensor_ok``: a
    1-element real tensor is accepted too (torch accepts one for ``lr``)."""
    label = label or f"{name} value"
    if isinstance(value, Tensor):
        if not tensor_ok:
            raise ValueError(
                f"Invalid {label}: {value} (a Tensor {name} is not supported; pass a float)")
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        if value.is_complex() or not value.is_floating_point():
            raise ValueError(f"Invalid {label}: {value} (expected a real floating-point tensor)")
        value = host_float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {label}: {value!r} (expected a real number)")
    ok = math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"Invalid {label}: {value}")


def check_int(name: str, value: Any, *, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name} value: {value!r} (expected an integer >= {low})")
