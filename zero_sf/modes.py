"""Which weights the model holds: ``y`` (train mode) or ``x`` (eval mode).

Schedule-Free trains at ``y`` and evaluates and ships ``x``.  Users hold the
optimizer through layers -- Accelerate's ``AcceleratedOptimizer``, a
DeepSpeed engine and its ZeRO optimizer -- and a switch that stops at the
wrong layer silently leaves the model at ``y`` (accelerate issue #4159:
under DeepSpeed the fp32 partitions switched, the model's weights did not).
:func:`resolve` finds the zero_sf optimizer under any of those layers and
the step that makes the model follow it; :func:`eval_mode` is the context
manager users call.  Bookkeeping only: the switch itself is the optimizer's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["eval_mode", "resolve", "register_engine_resolver", "Switchable"]


@dataclass
class Switchable:
    """The object whose ``eval()``/``train()`` switch the weights (what must
    run after a switch, DeepSpeed's regather, is a hook on the optimizer)."""

    optimizer: Any  # ScheduleFreeAdamW / ZeroOptimizer / RMSProp / any torch optimizer

    @property
    def has_modes(self) -> bool:
        return callable(getattr(self.optimizer, "eval", None)) and callable(
            getattr(self.optimizer, "train", None))

    def in_train_mode(self) -> Optional[bool]:
        """True (y) / False (x) / None (no modes: x == y, e.g. RMSProp, AdamW)."""
        if not self.has_modes:
            return None
        if callable(getattr(self.optimizer, "in_train_mode", None)):  # zero_sf's own
            return self.optimizer.in_train_mode()
        groups = getattr(getattr(self.optimizer, "inner", None), "param_groups", None) \
            or self.optimizer.param_groups
        return all(g.get("train_mode", True) for g in groups)

    def eval(self) -> None:
        if self.has_modes:
            self.optimizer.eval()

    def train(self) -> None:
        if self.has_modes:
            self.optimizer.train()


def _deepspeed_zero_optimizer(obj) -> bool:
    # DeepSpeedZeroOptimizer / BF16_Optimizer / FP16_Optimizer: they hold the
    # basic optimizer as .optimizer and copy fp32 partitions to the model
    # with update_lp_params().
    return callable(getattr(obj, "update_lp_params", None))


# Engines that hold a zero_sf optimizer in their own way register a
# resolver here (zero_sf.integrations.deepspeed does, when zero_sf is
# imported): ``fn(obj)`` returns the optimizer to switch when ``obj`` is such
# an engine and that optimizer's switch alone reaches the model, raises when
# the engine cannot be switched (DeepSpeed ZeRO-3), and returns None to let
# resolve() go on down ``obj.optimizer``.  Core modules never import the
# integrations; they plug in here.
_ENGINE_RESOLVERS: list[Callable[[Any], Any]] = []


def register_engine_resolver(fn: Callable[[Any], Any]) -> None:
    if fn not in _ENGINE_RESOLVERS:
        _ENGINE_RESOLVERS.append(fn)


def resolve(obj) -> Switchable:
    """The zero_sf (or other torch) optimizer under ``obj`` and its regather.

    ``obj`` may be a zero_sf optimizer, a :class:`~zero_sf.ZeroOptimizer`, a
    DeepSpeed engine or ZeRO optimizer, or any wrapper that keeps the wrapped
    optimizer in ``.optimizer`` (Accelerate's ``AcceleratedOptimizer`` and
    ``DeepSpeedOptimizerWrapper``, transformers' Trainer hands out those).
    For DeepSpeed, the basic optimizer also learns to regather the model's
    parameters after *any* later switch, so ``optimizer.eval()`` called by
    Accelerate or the Trainer reaches the model too."""
    from .optim._base import ElementwiseOptimizer
    from .sharding import ZeroOptimizer

    seen = []
    cur = obj
    while True:
        seen.append(type(cur).__name__)
        if isinstance(cur, (ElementwiseOptimizer, ZeroOptimizer)):
            return Switchable(cur)
        for engine_resolver in _ENGINE_RESOLVERS:
            found = engine_resolver(cur)
            if found is not None:
                return Switchable(found)
        if (_deepspeed_zero_optimizer(cur)
                and isinstance(getattr(cur, "optimizer", None), ElementwiseOptimizer)):
            cur.optimizer.add_switch_hook(cur.update_lp_params)
            return Switchable(cur.optimizer)
        inner = getattr(cur, "optimizer", None)
        if inner is not None and inner is not cur and len(seen) < 8:
            cur = inner
            continue
        if isinstance(cur, torch.optim.Optimizer):
            return Switchable(cur)  # no y/x: eval_mode is a no-op
        raise TypeError(
            f"zero_sf.eval_mode() expects an optimizer, an optimizer wrapper or a DeepSpeed "
            f"engine, got {' -> '.join(seen)}; pass the optimizer you step (or the engine)")


@contextlib.contextmanager
def eval_mode(obj) -> Iterator[Any]:
    """``with zero_sf.eval_mode(optimizer_or_engine):`` -- the model holds ``x``
    (what to evaluate and ship) inside the block; on exit the optimizer goes
    back to the mode it was in (``y`` after a training step).

    Works for :class:`~zero_sf.ScheduleFreeAdamW`, :class:`~zero_sf.ZeroOptimizer`
    (collective: every rank enters the block), a DeepSpeed engine, and the
    Accelerate / Trainer wrappers around them; for optimizers without modes
    (``RMSProp``, ``torch.optim.AdamW``) x is y and nothing happens.  Yields
    the resolved optimizer.
    """
    target = resolve(obj)
    was_training = target.in_train_mode()
    if was_training:
        target.eval()
    try:
        yield target.optimizer
    finally:
        if was_training:
            target.train()
