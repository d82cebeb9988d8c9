"""State dicts of the elementwise optimizers: what ``state_dict()`` exports
(the format peers load), and a ``load_state_dict`` that keeps fp32 state
fp32, keeps each remainder with the weights it completes, and refuses the
state dict of another optimizer or model before anything is loaded."""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..dispatch import is_dtensor
from ..storage import STORAGE_KEYS, Storage, remainder_bits, state_dtype_for
from .split_step import SplitStep


def _looks_like(groups: list[dict[str, Any]], state_keys: set[str]) -> str:
    """A best guess at which optimizer saved a state dict, for the error of
    :meth:`ElementwiseOptimizer._check_saved_kind`."""
    keys = {k for g in groups for k in g}
    if {"exp_avg", "exp_avg_sq"} <= state_keys:
        adamw = (any(g.get("decoupled_weight_decay") for g in groups)
                 or "decoupled_weight_decay" not in keys)
        return "torch.optim.AdamW" if adamw else "torch.optim.Adam"
    if "dampening" in keys:
        return "torch.optim.SGD"
    if "square_avg" in state_keys or "alpha" in keys:
        return "torch.optim.RMSprop or zero_sf.RMSProp"
    if "z" in state_keys or "train_mode" in keys:
        return "a Schedule-Free optimizer"
    return "another optimizer"


if TYPE_CHECKING:  # what the mixin runs on: a torch optimizer with CompressedState
    from .compressed import CompressedState as _Host
else:
    _Host = object


class StateDicts(_Host):
    """Mixin of :class:`~zero_sf.optim._base.ElementwiseOptimizer` (before
    ``torch.optim.Optimizer`` in its bases, whose state-dict methods it
    wraps): subclasses say what the state dicts they load look like
    (``_SAVED_GROUP_KEYS``: keys every param group of such a state dict has;
    ``_SAVED_STATE_KEYS``: the per-parameter state keys it may hold;
    ``_PEERS``: who saves them)."""

    _SAVED_GROUP_KEYS: tuple[str, ...] = ()
    _SAVED_STATE_KEYS: frozenset[str] = frozenset()
    _PEERS = ""

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
        self.__dict__.setdefault("_switch_bindings", [])
        self.__dict__.setdefault("_bases", {})
        self.__dict__.setdefault("_segments", {})
        self.__dict__.setdefault("_base_cache", (None, {}))
        self.__dict__.setdefault("_versions", {})
        self.__dict__.setdefault("_loaded_bases", {})
        self.__dict__.setdefault("_writes_tracked_outside", False)
        self.__dict__.setdefault(
            "_split_step", SplitStep(getattr(type(self), "_STEP_GROUP_KEYS", ())))
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
        pre = self._optimizer_load_state_dict_pre_hooks
        post = self._optimizer_load_state_dict_post_hooks
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
                    if (Storage.of(group).keeps_remainder and isinstance(value, Tensor)
                            and "remainder" in saved):
                        self._loaded_bases[id(p)] = value.to(device=p.device, dtype=p.dtype,
                                                             copy=True)
                elif key == "remainder":
                    # torch's load cast it to the param's dtype; the int16 bits are
                    # the saved ones.  Without master_weights="remainder" it is
                    # dropped: y is the bf16 parameter.
                    if Storage.of(group).keeps_remainder and isinstance(value, Tensor):
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
