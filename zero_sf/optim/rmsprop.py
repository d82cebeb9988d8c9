"""Adam-style RMSProp: ``torch.optim.RMSprop`` plus bias correction, eps
placement and initial scale (optax ``scale_by_rms``)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import dispatch
from ..spec import rms_bias_correction
from ..storage import Storage, Stores, check_compression, compression_defaults, state_dtype_for
from ._base import ElementwiseOptimizer
from .validation import check_number, host_float

__all__ = ["RMSProp"]


class RMSProp(ElementwiseOptimizer):
    r"""RMSProp with one second-moment state; Adam with ``beta1 = 0`` when
    ``bias_correction=True``.

    Positional arguments and defaults are ``torch.optim.RMSprop``'s, so the
    default configuration is a drop-in for it (same per-parameter state keys
    ``square_avg``, ``momentum_buffer``, ``grad_avg``).  New keywords:

    * ``bias_correction``: divide the second moment by ``1 - alpha**t``;
      with ``momentum=0, centered=False`` this equals
      ``torch.optim.Adam(betas=(0, alpha), eps=eps)`` and keeps exactly one
      state tensor per parameter.
    * ``eps_in_sqrt``: ``g / sqrt(v + eps)`` (optax's default) instead of
      ``g / (sqrt(v) + eps)``.
    * ``initial_scale``: initial value of ``v`` (optax's ``initial_scale``).
    * ``backend``: ``"auto" | "torch" | "triton" | "cpu"``.
    * ``state_dtype``, ``state_rounding``, ``master_weights``, ``seed``:
      compressed state, as in :class:`ScheduleFreeAdamW` (every state tensor:
      ``square_avg``, ``momentum_buffer``, ``grad_avg``; the counter is the
      parameter's step).

    The step count ``state["step"]`` is torch's: a 0-dim fp32 tensor on the
    CPU (as ``torch.optim.RMSprop`` keeps it without ``capturable``), so state
    dicts load both ways and tools may call ``.item()`` on it; being on the
    host, reading it for the bias correction costs no device sync.  State is
    fp32 for bf16/fp16 params.  A 1-element tensor ``lr`` is accepted (read
    on the host by each step's validation and again for the update).
    ``capturable``, ``differentiable`` are accepted for signature
    compatibility but must be False; ``foreach`` is accepted and ignored.
    """

    _SAVED_GROUP_KEYS = ("alpha", "momentum", "centered")
    _SAVED_STATE_KEYS = frozenset({"step", "square_avg", "momentum_buffer", "grad_avg",
                                   "remainder", "remainder_base"})
    _PEERS = "zero_sf.RMSProp and torch.optim.RMSprop"

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        bias_correction: bool = False,
        eps_in_sqrt: bool = False,
        initial_scale: float = 0.0,
        backend: str = "auto",
        state_dtype: Optional[torch.dtype] = None,
        state_rounding: str = "stochastic",
        master_weights: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, capturable=capturable,
                        foreach=foreach, maximize=maximize, differentiable=differentiable,
                        bias_correction=bias_correction, eps_in_sqrt=eps_in_sqrt,
                        initial_scale=initial_scale, backend=backend,
                        **compression_defaults(state_dtype, state_rounding, master_weights, seed))
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], label="learning rate", tensor_ok=True)
        check_number("eps", group["eps"], label="epsilon value")
        check_number("momentum", group["momentum"])
        check_number("weight_decay", group["weight_decay"])
        # torch.optim.RMSprop accepts any alpha >= 0 (alpha == 1 freezes v);
        # bias correction divides by 1 - alpha**t, so there alpha < 1.
        check_number("alpha", group["alpha"],
                     high=1.0 if group["bias_correction"] else math.inf,
                     high_open=group["bias_correction"])
        check_number("initial_scale", group["initial_scale"])
        for flag in ("capturable", "differentiable"):
            if group[flag]:
                raise ValueError(
                    f"Invalid {flag} value: True (zero_sf.RMSProp does not support it)")
        dispatch.check_backend(group["backend"])
        check_compression(group)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "square_avg" not in state:  # (a remainder may be there first)
            dtype = state_dtype_for(p, group)
            state["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU: no device sync
            state["square_avg"] = torch.full_like(
                p, group["initial_scale"], dtype=dtype, memory_format=torch.preserve_format)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format)
            if group["centered"]:
                state["grad_avg"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, *,  # type: ignore[override]
             grad_scale: float = 1.0) -> Optional[float]:
        """One step.  ``grad_scale`` multiplies every gradient inside the fused
        update (the sharded optimizer folds 1/world_size and clipping into it)."""
        init_call = self._may_be_state_init_call(closure)
        loss, active = self._closure_then_active_params(closure)
        if init_call and self._is_state_init_call(active):
            self._initialize_state_only(active)
            return loss
        for group, pairs in zip(self.param_groups, active):
            grads = {id(p): g for p, g in pairs}
            params = [p for p, _ in pairs]
            for p in params:
                self._init_state(p, group)
            if params:
                torch._foreach_add_([self.state[p]["step"] for p in params], 1.0)
            # Params of one group share a step count unless some skipped
            # steps (no grad): one fused call per distinct count.
            by_step: dict[int, list[Tensor]] = {}
            for p in params:
                by_step.setdefault(int(self.state[p]["step"]), []).append(p)
            for step, ps in by_step.items():
                states = [self.state[p] for p in ps]
                rems, sr = self._remainders(ps, group), Storage.of(group).sr(step)
                gs, avgs = [grads[id(p)] for p in ps], [s["square_avg"] for s in states]
                bufs = [s["momentum_buffer"] for s in states] if group["momentum"] > 0 else None
                gavgs = [s["grad_avg"] for s in states] if group["centered"] else None
                bases = None
                if sr:  # a ZeRO-3 partition is stepped per contiguously numbered run
                    ps, gs, avgs, bufs, gavgs, bases = self._cut_at_numbering(
                        ps, gs, avgs, bufs, gavgs)
                dispatch.rmsprop(
                    ps, gs, avgs, momentum_buffers=bufs, grad_avgs=gavgs,
                    lr=host_float(group["lr"]), alpha=group["alpha"], eps=group["eps"],
                    weight_decay=group["weight_decay"], momentum=group["momentum"],
                    centered=group["centered"],
                    bias_correction2=(rms_bias_correction(group["alpha"], step)
                                      if group["bias_correction"] else 1.0),
                    eps_in_sqrt=group["eps_in_sqrt"], maximize=group["maximize"],
                    grad_scale=grad_scale, store=Stores(self._outs(ps), rems, sr, bases),
                    backend=group["backend"])
                self._mark_written(ps, rems)
        return loss

    def import_param_state(self, state: dict[str, Any]) -> dict[str, Any]:
        # A step saved as a number (the sharded checkpoint's JSON scalars) or
        # as a tensor on another device (a capturable torch.optim.RMSprop):
        # back to the 0-dim fp32 CPU tensor the step reads without a sync.
        step = state.get("step")
        if step is not None and not (isinstance(step, Tensor) and step.device.type == "cpu"
                                     and step.dtype == torch.float32 and step.dim() == 0):
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
        return state
