"""Bookkeeping shared by the single-device optimizers: validation when a
group is added and again before each step, gradient checks before any state
changes, and state-dict loading that keeps fp32 state fp32 and refuses a
checkpoint of another model.  No update math lives here."""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, Optional

import torch
from torch import Tensor

from ..functional import check_backend, is_dtensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype_for(p: Tensor, group: Optional[dict] = None) -> torch.dtype:
    """The dtype of p's state tensors (z, v, ...).  ``group["state_dtype"]``
    when set ("float32" or "bfloat16", the ``state_dtype`` argument).  By
    default fp32 for bf16/fp16 parameters: a bf16 v rounded to nearest loses
    the 1-b2 = 1e-3 increments entirely (bf16 has 8 bits of mantissa), and a
    bf16 z drops any update below 2**-9 of its magnitude, which is why bf16
    state is rounded stochastically.  Otherwise the param's dtype."""
    name = group.get("state_dtype") if group is not None else None
    if name is not None:
        return getattr(torch, name)
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


# -- compressed state (docs/design.md §11) ----------------------------------
STATE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                "float32": "float32", "bfloat16": "bfloat16", "fp32": "float32", "bf16": "bfloat16"}
ROUNDINGS = ("stochastic", "nearest")
STORAGE_KEYS = ("state_dtype", "state_rounding", "master_weights")
# What the sharded loaders (zero_sf.load, zsd.load_checkpoint) keep from the
# loading optimizer: how state is stored, and the backend (a checkpoint of a
# GPU run that named "triton" loads on a CPU).
KEEP_ON_LOAD = STORAGE_KEYS + ("backend",)


def state_dtype_name(value: Any) -> Optional[str]:
    """``state_dtype`` as stored in the param groups: None (the default
    rule), "float32" or "bfloat16" (a string, so groups stay JSON: the
    sharded checkpoint's metadata and DeepSpeed configs hold them)."""
    if value is None:
        return None
    try:
        return STATE_DTYPES[value]
    except (KeyError, TypeError):
        raise ValueError(f"Invalid state_dtype value: {value!r} (expected torch.float32 or "
                         "torch.bfloat16, or the strings 'float32' / 'bfloat16')") from None


def check_compression(group: dict[str, Any]) -> None:
    """``state_dtype``, ``state_rounding``, ``master_weights``, ``seed``."""
    if group.get("state_dtype") not in (None, "float32", "bfloat16"):
        raise ValueError(f"Invalid state_dtype value: {group.get('state_dtype')!r} (expected "
                         "torch.float32 or torch.bfloat16)")
    if group.get("state_rounding") not in ROUNDINGS:
        raise ValueError(f"Invalid state_rounding value: {group.get('state_rounding')!r} "
                         f"(expected one of {ROUNDINGS})")
    if group.get("master_weights") not in (None, "remainder"):
        raise ValueError(f"Invalid master_weights value: {group.get('master_weights')!r} "
                         "(expected None or 'remainder'; ZeroOptimizer also takes 'fp32')")
    check_int("seed", group.get("seed"))


def compression_defaults(state_dtype, state_rounding, master_weights, seed) -> dict[str, Any]:
    return dict(state_dtype=state_dtype_name(state_dtype), state_rounding=state_rounding,
                master_weights=master_weights, seed=seed)


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
            raise ValueError(f"Invalid {label}: {value} (a Tensor {name} is not supported; pass a float)")
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


def _local_offset(p: Tensor) -> int:
    """Flat index of a DTensor's first local element in the full tensor
    (dim-0 sharding); 0 for plain tensors."""
    if not is_dtensor(p):
        return 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(pl, (Shard, Replicate)) or (isinstance(pl, Shard) and pl.dim != 0)
           for pl in p.placements):
        raise NotImplementedError(
            f"stochastic rounding of a DTensor sharded as {tuple(p.placements)}: only dim-0 "
            "sharding (FSDP2's Shard(0)) keeps a shard's elements contiguous in the full "
            "parameter; use state_rounding='nearest' or fp32 state")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0] * math.prod(p.shape[1:]) if p.dim() > 0 else 0


def remainder_bits(value: Tensor) -> Tensor:
    """A saved remainder as int16: as saved, or from the bfloat16 view of its
    bits that FSDP2 state dicts carry (:meth:`ZeroSFOptimizer.export_param_state`)."""
    if value.dtype == torch.int16:
        return value
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16)
    raise ValueError(f"Invalid remainder dtype: {value.dtype} (a remainder is int16, or its "
                     "bits viewed as bfloat16); is it the state of another optimizer?")


def check_int(name: str, value: Any, *, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name} value: {value!r} (expected an integer >= {low})")


def _looks_like(groups: list[dict[str, Any]], state_keys: set[str]) -> str:
    """A best guess at which optimizer saved a state dict, for the error of
    :meth:`ZeroSFOptimizer._check_saved_kind`."""
    keys = {k for g in groups for k in g}
    if {"exp_avg", "exp_avg_sq"} <= state_keys:
        adamw = any(g.get("decoupled_weight_decay") for g in groups) or "decoupled_weight_decay" not in keys
        return "torch.optim.AdamW" if adamw else "torch.optim.Adam"
    if "dampening" in keys:
        return "torch.optim.SGD"
    if "square_avg" in state_keys or "alpha" in keys:
        return "torch.optim.RMSprop or zero_sf.RMSProp"
    if "z" in state_keys or "train_mode" in keys:
        return "a Schedule-Free optimizer"
    return "another optimizer"


class ZeroSFOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_validate_group`` and the step, and
    what the state dicts they load look like (``_SAVED_GROUP_KEYS``: keys
    every param group of such a state dict has; ``_SAVED_STATE_KEYS``: the
    per-parameter state keys it may hold; ``_PEERS``: who saves them)."""

    _SAVED_GROUP_KEYS: tuple[str, ...] = ()
    _SAVED_STATE_KEYS: frozenset[str] = frozenset()
    _PEERS = ""

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        check_backend(defaults["backend"])
        super().__init__(params, defaults)
        self._outputs: dict[int, Tensor] = {}
        self._grads: dict[int, Tensor] = {}
        self._switch_hooks: list = []
        self._bases: dict[int, int] = {}
        self._base_cache: tuple = (None, {})
        self._versions: dict[int, int] = {}
        # id(p) -> the bf16 weights a loaded remainder was saved with, until
        # the next step compares them with p (see _remainders)
        self._loaded_bases: dict[int, Tensor] = {}
        self._writes_tracked_outside = False

    def add_switch_hook(self, hook) -> None:
        """Call ``hook()`` after every train()/eval() switch that changed the
        parameters (DeepSpeed: copy the fp32 partitions into the model, so a
        switch made through Accelerate's wrapper reaches the model too).
        Idempotent; not part of the state dict or a pickle."""
        if hook not in self._switch_hooks:
            self._switch_hooks.append(hook)

    # -- shard bindings (used by the sharded optimizer) --------------------
    def bind(self, param: Tensor, *, grad: Optional[Tensor] = None,
             out: Optional[Tensor] = None, index_base: Optional[int] = None) -> None:
        """Bind tensors to ``param`` in place of the usual attributes.

        ``grad``: read as ``param``'s gradient instead of ``param.grad`` (a
        bf16 gradient shard for a fp32 master shard: autograd forbids such a
        ``.grad``).  ``out``: after every update of ``param`` (step,
        train/eval switch) also write its value, rounded to ``out.dtype``,
        into ``out`` in the same fused pass (the model's bf16 parameters).
        ``index_base``: the global index of ``param``'s first element, for
        stochastic rounding (a shard's position in the whole model).  A
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
        self._writes_tracked_outside = True

    # -- compressed state ---------------------------------------------------
    def _index_bases(self, params: list[Tensor]) -> list[int]:
        """Global index of each param's first element for stochastic
        rounding: its position in this optimizer's parameters taken in
        ZeroOptimizer's flat-buffer order (param groups in order; within a
        group by dtype, first appearance first; parameters that require
        grad), so the random bits are the same at every world size.  A
        DTensor's local shard (dim-0 sharding, FSDP2's) starts at its
        offset in the full parameter."""
        if self._bases:
            return [self._bases[id(p)] for p in params]
        # Computed once per parameter list (a DTensor's offset costs a layout
        # computation): the key changes with add_param_group, requires_grad
        # or dtype changes.
        key = tuple((id(p), p.requires_grad, p.dtype) for g in self.param_groups
                    for p in g["params"])
        if self._base_cache[0] != key:
            bases, acc = {}, 0
            for group in self.param_groups:
                by_dtype: dict = {}
                for p in group["params"]:
                    if p.requires_grad:
                        by_dtype.setdefault(p.dtype, []).append(p)
                for members in by_dtype.values():
                    for p in members:
                        bases[id(p)] = acc + _local_offset(p)
                        acc += p.numel()
            self._base_cache = (key, bases)
        bases = self._base_cache[1]
        return [bases[id(p)] if id(p) in bases else _local_offset(p) for p in params]

    @staticmethod
    def _sr(group: dict[str, Any], step: int, params: list[Tensor]) -> Optional[tuple[int, int]]:
        """``(seed, step)`` when this group's state is rounded stochastically."""
        if (group.get("state_dtype") != "bfloat16"  # the default rule never gives bf16 state
                or group.get("state_rounding", "stochastic") != "stochastic"):
            return None
        return (group.get("seed", 0), step)

    def _remainders(self, params: list[Tensor], group: dict[str, Any]) -> Optional[list[Tensor]]:
        """The int16 remainders of ``params`` (``master_weights="remainder"``),
        created as zeros (y = the bf16 parameter).  A parameter the user wrote
        since our last write (``model.load_state_dict``, ``p.copy_``: its
        version counter moved) restarts from its new value: its remainder is
        zeroed, so y is exactly what was written."""
        if group.get("master_weights") != "remainder":
            return None
        out = []
        for p in params:
            fresh = "remainder" not in self.state[p]
            rem = self.remainder_of(p)
            base = self._loaded_bases.pop(id(p), None)
            if base is not None:
                # A loaded remainder goes with the weights it was saved with,
                # wherever they are now: DCP's set_state_dict loads the
                # optimizer first and the model after (a write we cannot tell
                # from a user's), torch and HF the other way round.  Kept
                # where p still holds them, zeroed where something else was
                # written (y = that value).
                rem.masked_fill_(p.detach() != base, 0)
            elif not fresh and self._written_since_our_step(p):
                rem.zero_()
            out.append(rem)
        return out

    def _written_since_our_step(self, p: Tensor) -> bool:
        """Whether ``p`` was written by someone else since our last write
        (its version counter moved), so that its remainder no longer applies."""
        return (not self._writes_tracked_outside
                and self._versions.get(id(p), p._version) != p._version)

    def remainder_of(self, p: Tensor) -> Tensor:
        """``p``'s int16 remainder, created as zeros (y = the bf16 parameter)."""
        state = self.state[p]
        if "remainder" not in state:
            state["remainder"] = torch.zeros_like(p, dtype=torch.int16)
        return state["remainder"]

    def _mark_written(self, params: list[Tensor], remainders=()) -> None:
        """Record the version counters after our own writes (a torch-path
        update bumps them; the fused kernels write through pointers), for
        the parameters with remainders."""
        if remainders is None or self._writes_tracked_outside:
            return
        for p in params:
            if "remainder" in self.state.get(p, {}):
                self._versions[id(p)] = p._version

    def _outs(self, params: list[Tensor]) -> list[Tensor] | None:
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
            if (merged.get("master_weights") == "remainder" and isinstance(p, Tensor)
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

    # -- state dicts ------------------------------------------------------
    def export_param_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """One parameter's state as it appears in ``state_dict()`` (the
        format peers load).  A DTensor (FSDP2) remainder travels as its int16
        bits viewed as bfloat16 (a view: no copy): torch's state-dict API
        all-gathers it for ``full_state_dict=True``, and neither gloo nor
        NCCL has a 16-bit integer type.  Every zero_sf loader takes either
        dtype (:func:`remainder_bits`)."""
        rem = state.get("remainder")
        if is_dtensor(rem) and rem.dtype == torch.int16:
            state = {**state, "remainder": rem.view(torch.bfloat16)}
        return state

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # A state_dict pre-hook may have put anything in self.state (torch's
        # own tests add ``state["test"] = 1``): only per-parameter dicts convert.
        sd["state"] = {k: self.export_param_state(v) if isinstance(v, dict) else v
                       for k, v in sd["state"].items()}
        # A remainder travels with the bf16 weights it completes
        # ("remainder_base", a reference, not a copy): a load keeps it only
        # where the parameter holds them (_remainders), in whichever order the
        # model and the optimizer are loaded.
        params = [p for g in self.param_groups for p in g["params"]]
        for k, v in sd["state"].items():  # (v may be our live state dict: not written)
            if isinstance(v, dict) and "remainder" in v and isinstance(k, int) and k < len(params):
                p = params[k]
                extra = {"remainder_base": p.detach()}
                if self._written_since_our_step(p):
                    # weights loaded since our last write are y exactly (the next
                    # step would zero the remainder): save them so
                    extra["remainder"] = torch.zeros_like(v["remainder"])
                sd["state"][k] = {**v, **extra}
        return sd

    def import_param_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Inverse of :meth:`export_param_state`, in place, at load time."""
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        ours = "differentiable" in defaults
        super().__setstate__(state)
        if not ours:
            # torch's __setstate__ adds defaults["differentiable"] for old
            # pickles; copied into the groups below it made a state_dict ->
            # load_state_dict (or pickle) round trip grow a key (issue #12).
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("_outputs", {})
        self.__dict__.setdefault("_grads", {})
        self.__dict__.setdefault("_switch_hooks", [])
        self.__dict__.setdefault("_bases", {})
        self.__dict__.setdefault("_base_cache", (None, {}))
        self.__dict__.setdefault("_versions", {})
        self.__dict__.setdefault("_loaded_bases", {})
        self.__dict__.setdefault("_writes_tracked_outside", False)
        # Groups saved by a peer optimizer (torch.optim.RMSprop,
        # schedulefree.AdamWScheduleFree) lack our extra keys: use defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        # The version counters of our last writes were not kept (they belong
        # to the old tensors): the parameters as they are now go with their
        # remainders, so a write from now on (loaded weights) is seen.
        self._mark_written([p for g in self.param_groups for p in g["params"]])

    def _check_saved_kind(self, state_dict: dict[str, Any]) -> None:
        """Refuse the state dict of another optimizer (torch.optim.AdamW's in a
        ScheduleFreeAdamW): torch's load would take its lr, eps and
        weight_decay, restart k at 0 and keep its exp_avg and step in the
        state, and so in every later checkpoint."""
        groups = [g for g in state_dict["param_groups"] if isinstance(g, dict)]
        state_keys = {k for v in state_dict["state"].values() if isinstance(v, dict) for k in v}
        lacking = sorted({k for g in groups for k in self._SAVED_GROUP_KEYS if k not in g})
        foreign = sorted(state_keys - self._SAVED_STATE_KEYS)
        if not (lacking or foreign):
            return
        name = type(self).__name__
        what = "; ".join(part for part in (
            lacking and f"its param groups lack {lacking}",
            foreign and f"its state holds {foreign}") if part)
        raise ValueError(
            f"loaded state dict is not a {name} state dict ({what}): it looks like "
            f"{_looks_like(groups, state_keys)}'s. {name}.load_state_dict loads the state dicts "
            f"of {self._PEERS}; to continue another optimizer's run with {name}, load the "
            "model's weights and start this optimizer fresh")

    def _pair_saved_ids(self, state_dict: dict[str, Any]) -> dict[Any, Tensor]:
        """Saved param id -> our param, in torch's pairing order.  Raises
        ValueError (before anything is loaded) when the optimizer, the groups
        or the shapes differ."""
        self._check_saved_kind(state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"])
                for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError(
                "loaded state dict has "
                f"{[len(s['params']) for s in saved_groups]} parameters per group, this "
                f"optimizer has {[len(g['params']) for g in self.param_groups]}; "
                "is it the state of another model?")
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for index, (old_id, p) in enumerate(id_map.items()):
            saved = state_dict["state"].get(old_id, {})
            for key, value in (saved.items() if isinstance(saved, dict) else ()):
                if key == "remainder" and isinstance(value, Tensor):
                    remainder_bits(value)  # raises for a dtype no remainder has
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(
                        f"loaded state {key!r} of parameter {index} has shape "
                        f"{tuple(value.shape)}, but the parameter has shape {tuple(p.shape)}; "
                        "is it the state of another model?")
        return id_map

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch runs the pre-hooks, loads, then the post-hooks.  Our own
        # conversions (fp32 state stays fp32, host step counts) must sit
        # between the load and the post-hooks, or they would overwrite what a
        # post-hook did; so the hooks run here, around torch's load.
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        id_map = self._pair_saved_ids(state_dict)
        saved_state = state_dict["state"]
        # How state is stored is this optimizer's choice, not the checkpoint's:
        # a state dict saved with bf16 state loads into fp32 state (converted
        # below) and back; torch's load would take the saved groups' values.
        storage = [{k: g[k] for k in STORAGE_KEYS if k in g} for g in self.param_groups]
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = type(pre)()
        self._optimizer_load_state_dict_post_hooks = type(post)()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        for group, keep in zip(self.param_groups, storage):
            group.update(keep)
        # torch casts every floating state tensor to the param's dtype; keep
        # our fp32 state fp32 (it would round z and v to bf16 otherwise).
        for old_id, p in id_map.items():
            saved = saved_state.get(old_id)
            if not isinstance(saved, dict):
                continue
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            for key, value in saved.items():
                if key == "remainder_base":
                    self.state[p].pop(key, None)  # not state: checked at the next step
                    if (group.get("master_weights") == "remainder" and isinstance(value, Tensor)
                            and "remainder" in saved):
                        self._loaded_bases[id(p)] = value.to(device=p.device, dtype=p.dtype,
                                                             copy=True)
                elif key == "remainder":
                    # torch's load cast it to the param's dtype; the int16 bits are
                    # the saved ones.  Without master_weights="remainder" it is
                    # dropped: y is the bf16 parameter.
                    if group.get("master_weights") == "remainder" and isinstance(value, Tensor):
                        self.state[p][key] = remainder_bits(value).to(device=p.device,
                                                                      copy=True)
                    else:
                        self.state[p].pop(key, None)
                elif isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0:
                    # fp32 <-> bf16 state converts here (bf16 to nearest even)
                    self.state[p][key] = value.to(device=p.device,
                                                  dtype=state_dtype_for(p, group), copy=True)
            self.import_param_state(self.state[p])
            # the parameter as it is now goes with the loaded remainder (resume:
            # model.load_state_dict first, then the optimizer's, as torch and HF do)
            self._mark_written([p])
        for post_hook in post.values():
            post_hook(self)
