"""Adam-style RMSProp: ``torch.optim.RMSprop`` plus bias correction, eps
placement and initial scale (optax ``scale_by_rms``)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import functional as F
from ..spec import rms_bias_correction
from ._base import ZeroSFOptimizer, check_number, state_dtype_for

__all__ = ["RMSProp"]


class RMSProp(ZeroSFOptimizer):
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
    * ``backend``: ``"auto" | "torch" | "triton"``.

    The step count is kept per parameter as a Python int (not a tensor:
    bias correction is computed on the host, without a device sync).  State
    dicts carry it as torch's 0-dim float tensor, so they load into
    ``torch.optim.RMSprop`` and back.  State is fp32 for bf16/fp16 params.
    ``capturable``, ``differentiable`` are accepted for signature
    compatibility but must be False; ``foreach`` is accepted and ignored.
    """

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
    ) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, capturable=capturable,
                        foreach=foreach, maximize=maximize, differentiable=differentiable,
                        bias_correction=bias_correction, eps_in_sqrt=eps_in_sqrt,
                        initial_scale=initial_scale, backend=backend)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], label="learning rate")
        check_number("eps", group["eps"], label="epsilon value")
        check_number("momentum", group["momentum"])
        check_number("weight_decay", group["weight_decay"])
        # alpha == 1 freezes v; with bias correction 1 - alpha**t would be 0.
        check_number("alpha", group["alpha"], high=1.0, high_open=group["bias_correction"])
        check_number("initial_scale", group["initial_scale"])
        for flag in ("capturable", "differentiable"):
            if group[flag]:
                raise ValueError(f"Invalid {flag} value: True (zero_sf.RMSProp does not support it)")
        F.check_backend(group["backend"])

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if len(state) == 0:
            dtype = state_dtype_for(p)
            state["step"] = 0
            state["square_avg"] = torch.full_like(
                p, group["initial_scale"], dtype=dtype, memory_format=torch.preserve_format)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format)
            if group["centered"]:
                state["grad_avg"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, *,
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
                self.state[p]["step"] += 1
            # Params of one group share a step count unless some skipped
            # steps (no grad): one fused call per distinct count.
            by_step: dict[int, list[Tensor]] = {}
            for p in params:
                by_step.setdefault(self.state[p]["step"], []).append(p)
            for step, ps in by_step.items():
                states = [self.state[p] for p in ps]
                F.rmsprop(
                    ps, [grads[id(p)] for p in ps], [s["square_avg"] for s in states],
                    momentum_buffers=[s["momentum_buffer"] for s in states] if group["momentum"] > 0 else None,
                    grad_avgs=[s["grad_avg"] for s in states] if group["centered"] else None,
                    lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                    weight_decay=group["weight_decay"], momentum=group["momentum"],
                    centered=group["centered"],
                    bias_correction2=rms_bias_correction(group["alpha"], step) if group["bias_correction"] else 1.0,
                    eps_in_sqrt=group["eps_in_sqrt"], maximize=group["maximize"],
                    grad_scale=grad_scale, param_outs=self._outs(ps),
                    backend=group["backend"])
        return loss

    def export_param_state(self, state: dict[str, Any]) -> dict[str, Any]:
        # torch.optim.RMSprop keeps `step` as a 0-dim float tensor per param.
        if "step" not in state:
            return state
        return {**state, "step": torch.tensor(float(state["step"]))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if isinstance(state.get("step"), Tensor):
                state["step"] = int(state["step"].item())  # once, at load time
