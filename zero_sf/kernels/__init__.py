"""Fused Triton kernels (docs/design.md §4): one pass over memory per step.

Importing this package imports Triton; :mod:`zero_sf.dispatch` imports it
lazily, only when ``backend="triton"`` (or ``"auto"`` on CUDA) asks for it.
Set ``TRITON_INTERPRET=1`` *before* the first import to run the kernels on
CPU tensors (that is how CI tests them).
"""

from .host import rmsprop, sf_adamw, sf_interpolate

__all__ = ["sf_adamw", "rmsprop", "sf_interpolate"]
