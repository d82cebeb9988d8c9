"""The base class of the elementwise optimizers: validation when a group is
added and again before each step, gradient checks before any state changes,
the mode API, shard bindings (for the sharded optimizer) and the detection
of DCP's state-initializing step.  No update math lives here; state dicts
and compressed-state bookkeeping are the mixins' (:mod:`.state_dicts`,
:mod:`.compressed`)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..dispatch import check_backend, is_dtensor
from ..storage import Storage, state_dtype_name
from .compressed import CompressedState
from .split_step import SplitStep
from .state_dicts import StateDicts

# Called with the DTensor parameters a train()/eval() switch moved, after
# it.  zero_sf.integrations.fsdp registers FSDP2's reshard here when zero_sf
# is imported (the core never imports an integration): FSDP2 may hold
# unsharded copies of the old values that the next forward would use.
DTENSOR_SWITCH_HOOKS: list = []


class ElementwiseOptimizer(StateDicts, CompressedState, torch.optim.Optimizer):
    """Base class of zero_sf's elementwise optimizers: subclasses define
    ``_validate_group``, ``_init_state`` and the step.  State dicts are
    :class:`.state_dicts.StateDicts`' job, compressed-state bookkeeping
    :class:`.compressed.CompressedState`'s."""

    # group entries a step advances (Schedule-Free's k, ...); see split_step.py
    _STEP_GROUP_KEYS: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        check_backend(defaults["backend"])
        super().__init__(params, defaults)
        self._outputs: dict[int, Tensor] = {}
        self._grads: dict[int, Tensor] = {}
        self._switch_hooks: list = []
        self._switch_bindings: list = []
        self._bases: dict[int, int] = {}
        self._segments: dict[int, list[tuple[int, int, int]]] = {}
        self._base_cache: tuple = (None, {})
        self._versions: dict[int, int] = {}
        # id(p) -> the bf16 weights a loaded remainder was saved with, until
        # the next step compares them with p (see _remainders)
        self._loaded_bases: dict[int, Tensor] = {}
        self._writes_tracked_outside = False
        self._split_step = SplitStep(self._STEP_GROUP_KEYS)

    # -- the mode API (owners such as ZeroOptimizer ask, never read groups) --
    def in_train_mode(self) -> bool:
        """Whether the parameters hold the training weights (Schedule-Free:
        y, not x).  Optimizers without modes are always in train mode."""
        return True

    def check_step_allowed(self, owner: Optional[str] = None) -> None:
        """Raise before any state changes if a step now would be wrong: an
        invalid hyperparameter in any group (a scheduler may have written
        it), or eval mode.  ``owner`` names the optimizer the user stepped
        (``ZeroOptimizer``) in the message."""
        for group in self.param_groups:
            self._validate_group(group)

    def add_switch_hook(self, hook) -> None:
        """Call ``hook()`` after every train()/eval() switch that changed the
        parameters (DeepSpeed: copy the fp32 partitions into the model, so a
        switch made through Accelerate's wrapper reaches the model too).
        Idempotent; not part of the state dict or a pickle."""
        if hook not in self._switch_hooks:
            self._switch_hooks.append(hook)

    def add_switch_binding(self, binding) -> None:
        """Enter ``binding()`` (a context manager) around every train()/eval()
        switch: it puts into the param groups the tensors the switch must
        move that are not there between steps (DeepSpeed ZeRO-3 empties the
        groups and sets one sub-group partition at a time for its step
        calls).  Idempotent; not part of the state dict or a pickle."""
        if binding not in self._switch_bindings:
            self._switch_bindings.append(binding)

    # -- shard bindings (used by the sharded optimizer) --------------------
    def bind(self, param: Tensor, *, grad: Optional[Tensor] = None,
             out: Optional[Tensor] = None, index_base: Optional[int] = None,
             index_segments: Optional[list[tuple[int, int, int]]] = None) -> None:
        """Bind tensors to ``param`` in place of the usual attributes.

        ``grad``: read as ``param``'s gradient instead of ``param.grad`` (a
        bf16 gradient shard for a fp32 master shard: autograd forbids such a
        ``.grad``).  ``out``: after every update of ``param`` (step,
        train/eval switch) also write its value, rounded to ``out.dtype``,
        into ``out`` in the same fused pass (the model's bf16 parameters).
        ``index_base``: the global index of ``param``'s first element, for
        stochastic rounding (a shard's position in the whole model).
        ``index_segments``: instead, ``(offset, length, index_base)`` per run
        of ``param``'s flat elements numbered contiguously (a DeepSpeed
        ZeRO-3 partition holds a slice of each of several parameters); the
        update runs per run, elements outside every run (padding) stay.  A
        bound optimizer leaves user writes to its owner (ZeroOptimizer
        tracks them and clears the remainders they invalidate)."""
        for name, t in (("grad", grad), ("out", out)):
            if t is not None and t.shape != param.shape:
                raise ValueError(f"{name} of shape {tuple(t.shape)} for a parameter of "
                                 f"shape {tuple(param.shape)}")
        if grad is not None:
            self._grads[id(param)] = grad
        if out is not None:
            self._outputs[id(param)] = out
        if index_base is not None:
            self._bases[id(param)] = index_base
        if index_segments is not None:
            end = 0  # where the previous run ended: runs are in order and disjoint
            for offset, length, _ in index_segments:
                if offset < end or length < 0 or offset + length > param.numel():
                    raise ValueError(f"index_segments {index_segments} are not ordered, "
                                     f"disjoint runs of a parameter of {param.numel()} elements")
                end = offset + length
            self._segments[id(param)] = list(index_segments)
            self._bases[id(param)] = index_segments[0][2] if index_segments else 0
        self._writes_tracked_outside = True

    def _outs(self, params: list[Tensor]) -> Optional[list[Optional[Tensor]]]:
        if not self._outputs:
            return None
        return [self._outputs.get(id(p)) for p in params]

    # -- validation -------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "state_dtype" in param_group:
            param_group["state_dtype"] = state_dtype_name(param_group["state_dtype"])
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch raises its TypeError for sets
            params = list(params)
        param_group["params"] = params
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(merged)
        for p in params:
            if isinstance(p, Tensor) and (p.is_complex() or not p.is_floating_point()):
                raise ValueError(
                    f"{type(self).__name__} supports real floating-point parameters only, "
                    f"got one of dtype {p.dtype}; for complex parameters optimize "
                    f"torch.view_as_real(p) instead")
            if (Storage.of(merged).keeps_remainder and isinstance(p, Tensor)
                    and p.dtype != torch.bfloat16):
                raise ValueError(
                    f"master_weights='remainder' needs bfloat16 parameters, got one of dtype "
                    f"{p.dtype}: the remainder holds the 16 bits of a fp32 value that a bf16 "
                    "parameter lacks (fp16 is not the top half of fp32); convert the model "
                    "with model.bfloat16() before building the optimizer, or leave "
                    "master_weights unset")
        super().add_param_group(param_group)

    def _closure_then_active_params(self, closure):
        """Run the closure (with grad enabled), then :meth:`_active_params`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return loss, self._active_params()

    def _grad(self, p: Tensor) -> Optional[Tensor]:
        return self._grads.get(id(p), p.grad) if self._grads else p.grad

    def _active_params(self) -> list[list[tuple[Tensor, Tensor]]]:
        """Per group, (param, grad) for the params that have a gradient, after
        checking every hyperparameter and gradient: raises before any state
        changes."""
        for group in self.param_groups:
            self._validate_group(group)
        name = type(self).__name__
        active = []
        for group in self.param_groups:
            ps = []
            for p in group["params"]:
                g = self._grad(p)
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                if g.shape != p.shape or g.device != p.device:
                    raise RuntimeError(
                        f"{name}: a gradient of shape {tuple(g.shape)} on {g.device} does not "
                        f"match its parameter of shape {tuple(p.shape)} on {p.device}")
                ps.append((p, g))
            active.append(ps)
        return active

    # -- torch.distributed.checkpoint's state initialization -------------
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _may_be_state_init_call(self, closure) -> bool:
        """Cheap pre-check for :meth:`_is_state_init_call`."""
        return (closure is None and not self.state
                and all(float(g["lr"]) == 0.0 for g in self.param_groups))

    def _is_state_init_call(self, active) -> bool:
        """``torch.distributed.checkpoint.state_dict`` (``get_/set_optimizer_state_dict``,
        what FSDP2 and DCP users call) initializes an optimizer without state
        by one ``step()`` with zero gradients and every ``lr`` set to 0.  For
        Schedule-Free and bias-corrected RMSProp that step still counts
        (k = 1), so training after a save at step 0 would run one step behind
        the same training without the save.  Recognized here -- no state
        yet, every lr 0, every gradient exactly zero on every rank (one
        reduction per parameter, only in this case) -- and then only the
        state is created."""
        grads = [g for pairs in active for _, g in pairs]
        if not grads:
            return False
        for g in grads:
            total = g.abs().sum()
            if is_dtensor(total):
                total = total.full_tensor()  # every rank's shard, same answer everywhere
            if total.item() != 0.0:
                return False
        return True

    def _initialize_state_only(self, active) -> None:
        for group, pairs in zip(self.param_groups, active):
            for p, _ in pairs:
                self._init_state(p, group)


# The name before issue #22 (it read like ZeroOptimizer's, which shards; this
# class updates whole tensors or FSDP2's local shards element by element).
ZeroSFOptimizer = ElementwiseOptimizer
