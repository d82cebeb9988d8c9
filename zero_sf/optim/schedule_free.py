"""Schedule-Free AdamW on the RMS core, two state tensors per parameter."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import dispatch
from ..spec import sf_eval_weight, sf_scalars, sf_train_weight
from ..storage import Storage, Stores, check_compression, compression_defaults, state_dtype_for
from ._base import DTENSOR_SWITCH_HOOKS, ElementwiseOptimizer
from .validation import check_int, check_number, host_float

__all__ = ["ScheduleFreeAdamW"]


def validate_sf_group(group: dict[str, Any]) -> None:
    """Schedule-Free AdamW hyperparameters, torch's wording.  Shared with
    the sharded optimizer, which stores the same group keys."""
    check_number("lr", group["lr"], label="learning rate", tensor_ok=True)
    check_number("eps", group["eps"], label="epsilon value")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    # eval() computes x = y + (1 - 1/beta1)(z - y): beta1 = 0 divides by zero,
    # beta1 = 1 makes y == x and train()/eval() no-ops that lose z's lead.
    check_number("beta1", betas[0], low_open=True, high=1.0, high_open=True,
                 label="beta parameter at index 0")
    check_number("beta2", betas[1], high=1.0, high_open=True,
                 label="beta parameter at index 1")
    check_number("weight_decay", group["weight_decay"])
    check_int("warmup_steps", group["warmup_steps"])
    check_number("r", group["r"])
    check_number("weight_lr_power", group["weight_lr_power"])
    dispatch.check_backend(group["backend"])
    check_compression(group)


def eval_mode_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name}.step() was called in eval mode: the parameters hold x, not y. The "
        "optimizer starts in eval mode (as schedulefree.AdamWScheduleFree does): call "
        "optimizer.train() before the first step and after every optimizer.eval() "
        "(evaluation, saving)")


class ScheduleFreeAdamW(ElementwiseOptimizer):
    r"""Schedule-Free AdamW (Defazio et al., 2024), a drop-in for
    ``schedulefree.AdamWScheduleFree`` 1.4.x.

    Same arguments, defaults, ``train()``/``eval()`` semantics (the
    parameters hold ``y`` in train mode and ``x`` in eval mode; like the
    reference the optimizer starts in eval mode, so call ``train()`` first),
    group keys (``k``, ``train_mode``, ``weight_sum``, ``lr_max``,
    ``scheduled_lr``) and per-parameter state keys (``z``, ``exp_avg_sq``
    and nothing else), so state dicts load both ways.

    Differences from the reference: ``p.grad`` is left untouched; the update
    is one fused kernel per batch of tensors on CUDA (``backend``); ``step()``
    in eval mode raises ``RuntimeError``; bf16/fp16 parameters keep fp32
    ``z`` and ``exp_avg_sq`` (the parameter itself holds ``y`` in its own
    dtype; for a fp32 master copy of ``y`` use the sharded
    :class:`zero_sf.ZeroOptimizer`, or ``master_weights="remainder"``).
    ``foreach`` is accepted and ignored.

    Args (schedulefree's, with its defaults):
        lr: peak learning rate (after warmup).
        betas: ``(beta1, beta2)``: beta1 is the interpolation between z and
            x that gives y (``y = (1 - beta1) z + beta1 x``), beta2 the
            second-moment decay.
        eps: added to the RMS of the gradient, as in Adam.
        weight_decay: decoupled, evaluated at y (as schedulefree does).
        warmup_steps: linear warmup of the learning rate over this many steps.
        r: the iterate averaging's polynomial power (0: uniform weights).
        weight_lr_power: the averaging weights scale with ``lr_max **
            weight_lr_power``.
        backend: ``"auto"`` (Triton on CUDA, the fused CPU backend on CPU),
            ``"torch"`` (the spec), ``"cpu"`` or ``"triton"``.

    Compressed state (docs/design.md §11; defaults change nothing):

    * ``state_dtype``: ``torch.float32`` or ``torch.bfloat16`` for ``z`` and
      ``exp_avg_sq`` (default: fp32 for bf16/fp16 params, else the param's
      dtype).  Stored in the groups as the string ``"bfloat16"``.
    * ``state_rounding``: ``"stochastic"`` (default; bf16 state is rounded
      up with probability equal to the dropped fraction, from a hash of
      ``(seed, step, element index)``: reproducible, and the same at any
      world size) or ``"nearest"``.
    * ``master_weights="remainder"`` (bf16 params): keep, per element, the
      16 bits of the fp32 y that the bf16 parameter lacks (state key
      ``remainder``, int16), so updates and train()/eval() run on the exact
      fp32 y for 2 bytes per parameter.  A parameter written by the user
      (``model.load_state_dict``) restarts from the written bf16 value.
    * ``seed``: the stochastic rounding's seed.
    """

    # schedulefree.AdamWScheduleFree's state dicts load too (the same keys).
    _SAVED_GROUP_KEYS = ("k", "train_mode", "weight_sum", "lr_max", "betas", "warmup_steps")
    _SAVED_STATE_KEYS = frozenset({"z", "exp_avg_sq", "remainder", "remainder_base"})
    _PEERS = "zero_sf.ScheduleFreeAdamW and schedulefree.AdamWScheduleFree"
    # the group entries a step advances (one step split over several calls
    # advances them once: split_step.py)
    _STEP_GROUP_KEYS = ("k", "lr_max", "weight_sum", "scheduled_lr")

    def __init__(
        self,
        params,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: Optional[bool] = None,
        *,
        backend: str = "auto",
        state_dtype: Optional[torch.dtype] = None,
        state_rounding: str = "stochastic",
        master_weights: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps,
                        train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0,
                        weight_lr_power=weight_lr_power, weight_decay=weight_decay,
                        foreach=foreach, backend=backend,
                        **compression_defaults(state_dtype, state_rounding, master_weights, seed))
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_sf_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A group added mid-training (e.g. unfrozen layers) has no z yet, so
        # its mode is only a flag: take the optimizer's current mode, or the
        # next step() would refuse to run.
        if self.param_groups and "train_mode" not in param_group:
            param_group["train_mode"] = self.param_groups[0]["train_mode"]
        super().add_param_group(param_group)

    @torch.no_grad()
    def _switch(self, to_train: bool) -> None:
        with contextlib.ExitStack() as bound:
            for binding in self._switch_bindings:  # e.g. ZeRO-3's sub-group partitions
                bound.enter_context(binding())
            self._check_state_in_groups(to_train)
            switched = self._switch_groups(to_train)
            if switched:
                for hook in self._switch_hooks:  # e.g. DeepSpeed's copy into the model
                    hook()

    def _check_state_in_groups(self, to_train: bool) -> None:
        """A switch moves the tensors in the param groups.  State held for a
        tensor in none of them (DeepSpeed ZeRO-3 empties the groups between
        steps) would stay at the old weights while the flag flips: refuse."""
        if not any(g["train_mode"] != to_train for g in self.param_groups):
            return
        in_groups = {id(p) for g in self.param_groups for p in g["params"]}
        orphans = [p for p in self.state if id(p) not in in_groups and "z" in self.state[p]]
        if orphans:
            raise RuntimeError(
                f"{type(self).__name__}.{'train' if to_train else 'eval'}(): the optimizer "
                f"holds state for {len(orphans)} tensor(s) that are in none of its param "
                "groups, so the switch cannot move them (DeepSpeed ZeRO-3 empties the groups "
                "between steps); switch through the engine: zero_sf.deepspeed.eval(engine) / "
                "train(engine), zero_sf.eval_mode(engine), or call zero_sf.modes.resolve("
                "engine) once (zero_sf's ScheduleFreeCallback does) and then "
                "optimizer.eval()/train() reach the partitions")

    def _switch_groups(self, to_train: bool) -> bool:
        sharded, switched = [], False
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            switched = True
            beta1 = group["betas"][0]
            ps = [p for p in group["params"] if "z" in self.state.get(p, {})]
            if ps:
                weight = sf_train_weight(beta1) if to_train else sf_eval_weight(beta1)
                rems = self._remainders(ps, group)
                dispatch.sf_interpolate(ps, [self.state[p]["z"] for p in ps], weight=weight,
                                        store=Stores(outs=self._outs(ps), remainders=rems),
                                        backend=group["backend"])
                self._mark_written(ps, rems)
                sharded += [p for p in ps if dispatch.is_dtensor(p)]
            group["train_mode"] = to_train
        if sharded:  # FSDP2 must drop unsharded copies of the old values
            for hook in DTENSOR_SWITCH_HOOKS:  # zero_sf.integrations.fsdp's reshard
                hook(sharded)
        return switched

    def in_train_mode(self) -> bool:
        return all(g["train_mode"] for g in self.param_groups)

    def check_step_allowed(self, owner: Optional[str] = None) -> None:
        if not self.in_train_mode():
            raise eval_mode_error(owner or type(self).__name__)
        super().check_step_allowed(owner)

    def eval(self) -> None:
        """Parameters y -> x (``p.lerp_(z, 1 - 1/beta1)``): use before evaluation."""
        self._switch(False)

    def train(self) -> None:
        """Parameters x -> y (``p.lerp_(z, 1 - beta1)``): use before training."""
        self._switch(True)

    def _init_state(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if "z" not in state:
            # DTensor in, DTensor out: an FSDP2 parameter's state is sharded like it.
            dtype = state_dtype_for(p, group)
            state["z"] = p.detach().to(dtype, copy=True)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, *,  # type: ignore[override]
             grad_scale: float = 1.0) -> Optional[float]:
        """One step.  ``grad_scale`` multiplies every gradient inside the fused
        update (the sharded optimizer folds 1/world_size and clipping into it)."""
        init_call = self._may_be_state_init_call(closure)
        if not init_call and not all(g["train_mode"] for g in self.param_groups):
            raise eval_mode_error(type(self).__name__)
        loss, active = self._closure_then_active_params(closure)
        if init_call and self._is_state_init_call(active):
            self._initialize_state_only(active)  # z = p: in either mode, x = y = z before any step
            return loss
        if not all(g["train_mode"] for g in self.param_groups):
            raise eval_mode_error(type(self).__name__)
        # DeepSpeed ZeRO-3 steps each sub-group partition in its own call:
        # k and the weights advance once per engine step (split_step.py)
        self._split_step.begin(self.param_groups, [p for pairs in active for p, _ in pairs])
        for group, pairs in zip(self.param_groups, active):
            params = [p for p, _ in pairs]
            beta1, beta2 = group["betas"]
            sc = sf_scalars(k=group["k"], lr=host_float(group["lr"]), beta1=beta1, beta2=beta2,
                            warmup_steps=group["warmup_steps"], r=group["r"],
                            weight_lr_power=group["weight_lr_power"],
                            lr_max=group["lr_max"], weight_sum=group["weight_sum"])
            for p in params:
                self._init_state(p, group)
            if params:
                states = [self.state[p] for p in params]
                rems, sr = self._remainders(params, group), Storage.of(group).sr(group["k"])
                grads, zs = [g for _, g in pairs], [s["z"] for s in states]
                vs, bases = [s["exp_avg_sq"] for s in states], None
                if sr:  # a ZeRO-3 partition is stepped per contiguously numbered run
                    params, grads, zs, vs, bases = self._cut_at_numbering(params, grads, zs, vs)
                dispatch.sf_adamw(params, grads, zs, vs, lr=sc.lr, ck=sc.ck,
                                  y_coef=sc.y_coef, beta2=beta2,
                                  bias_correction2=sc.bias_correction2, eps=group["eps"],
                                  weight_decay=group["weight_decay"], grad_scale=grad_scale,
                                  store=Stores(self._outs(params), rems, sr, bases),
                                  backend=group["backend"])
                self._mark_written(params, rems)
            group.update(k=group["k"] + 1, lr_max=sc.lr_max, weight_sum=sc.weight_sum,
                         scheduled_lr=sc.lr)
        self._split_step.end(self.param_groups)
        return loss
