"""``overlap_param_gather=True``: when each bucket's all-gather runs (Megatron's
``--overlap-param-gather``).  Bookkeeping only: the collectives are
:class:`~.params.FlatParams`' (``start_gather`` / ``launch`` / ``wait`` /
``finish_gather``); this module decides when, from the model's forward.

``step()`` updates the shard and *starts* the gathers: the first bucket in
forward order is launched at once.  A forward pre-hook on every module that
owns parameters waits for its buckets (launching the queue up to them) and
launches one more, so bucket b+1's gather is in flight while module b runs.
Launches follow one order on every rank (collectives must match); waits may
come in any order.

The order is the model's forward order, recorded during the forward passes
before the first ``step()`` and agreed by the ranks at that step (one
``all_gather_object``, once); ranks that recorded different orders (data-
dependent routing) keep the layout's order, with a warning.  A later forward
that touches buckets in another order warns once; the agreed order stays
(changing it would need the ranks to agree again).

Everything that reads or writes parameters outside a forward waits first:
the optimizer's ``step``/``eval``/``train``/``clip_grad_norm_``/checkpoint
paths (through ``adopt_model_writes``), and ``model.state_dict()`` /
``model.load_state_dict()`` on any module (state-dict pre-hooks).  Code that
reads ``p`` directly between ``step()`` and the next forward (a weight norm
for logging) calls ``optimizer.finish_param_gather()`` first.
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from ..layout import FlatBuffer
from . import comm
from .params import FlatParams

Key = tuple[int, int]  # (flat buffer, bucket)


class ParamPrefetch:
    """Forward pre-hooks that wait for each module's buckets and prefetch the next."""

    def __init__(self, buffers: list[FlatBuffer], model: nn.Module, params: list, process_group,
                 gather_group, label) -> None:
        """Checks that a hook can wait for every parameter (raises before
        anything changes); :meth:`attach` registers the hooks."""
        self.model = model
        self.process_group = process_group  # every rank agrees on the order
        self.gather_group = gather_group  # the all-gathers' (the shard group)
        index = {id(p): i for i, p in enumerate(params)}
        slot_of = {s.index: (bi, bk) for bi, buf in enumerate(buffers)
                   for bk, b in enumerate(buf.buckets) for s in b.slots}
        self.order: list[Key] = [(bi, bk) for bi, buf in enumerate(buffers)
                                 for bk in range(len(buf.buckets))]
        self.recorded: list[Key] = []  # first touches since the last start()
        self._touched: set[Key] = set()
        self.agreed = False
        self._warned = False
        owners: dict[nn.Module, list[Key]] = {}
        found: set[int] = set()
        for module in model.modules():
            keys: list[Key] = []
            for _, p in module.named_parameters(recurse=False, remove_duplicate=False):
                i = index.get(id(p))
                if i is not None and i in slot_of:
                    found.add(i)
                    if slot_of[i] not in keys:
                        keys.append(slot_of[i])
            if keys:
                owners[module] = keys
        self.owners = owners
        missing = [i for i in slot_of if i not in found]
        if missing:
            raise ValueError(
                f"ZeroOptimizer(overlap_param_gather=True): parameter {label(missing[0])} is "
                "not a parameter of any module of `model`, so no forward hook can wait for its "
                "all-gather; pass the model whose forward uses every trainable parameter, or "
                "overlap_param_gather=False")
        self.hooks: list = []

    def attach(self, weights: FlatParams) -> None:
        """Hook the model: forward pre-hooks, and state-dict pre-hooks that
        finish every pending gather."""
        self.weights = weights
        model = self.model
        for module, keys in self.owners.items():
            self.hooks.append(module.register_forward_pre_hook(
                lambda _m, _args, keys=keys: self._before_forward(keys)))
            self.hooks.append(module.register_state_dict_pre_hook(self._finish))
            self.hooks.append(_load_pre_hook(module, self._finish))
        # model.state_dict() at the root enters its own pre-hook first
        self.hooks.append(model.register_state_dict_pre_hook(self._finish))
        self.hooks.append(_load_pre_hook(model, self._finish))

    def _finish(self, *_hook_args) -> None:
        self.weights.finish_gather()

    def _before_forward(self, keys: list[Key]) -> None:
        for key in keys:
            if key not in self._touched:
                self._touched.add(key)
                self.recorded.append(key)
            if self.weights.wait(key):
                self.weights.launch(1)  # the next bucket, while this module runs

    def start(self) -> None:
        """After the update: queue every bucket, launch the first."""
        self._agree_or_warn()
        self.recorded, self._touched = [], set()
        self.weights.start_gather(self.order, self.gather_group)
        self.weights.launch(1)

    def _agree_or_warn(self) -> None:
        recorded = self.recorded + [k for k in self.order if k not in self._touched]
        if not self.agreed:  # the first step(): every rank gets here at once
            self.agreed = True
            everyone = comm.all_gather_objects(recorded, self.process_group)
            if all(r == everyone[0] for r in everyone):
                self.order = recorded
            else:
                warnings.warn(
                    "ZeroOptimizer(overlap_param_gather=True): the ranks' forward passes used "
                    "the parameter buckets in different orders; prefetching in the layout's "
                    "order instead (correct, with less overlap)", RuntimeWarning, stacklevel=4)
        elif self.recorded and recorded != self.order and not self._warned:
            self._warned = True
            warnings.warn(
                "ZeroOptimizer(overlap_param_gather=True): the forward pass used the parameter "
                "buckets in another order than at the first step; prefetching keeps the first "
                "order (correct, with less overlap)", RuntimeWarning, stacklevel=4)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _load_pre_hook(module: nn.Module, hook):
    """``register_load_state_dict_pre_hook`` (public since torch 2.5; the
    private form before, which takes the module with ``with_module``)."""
    public = getattr(module, "register_load_state_dict_pre_hook", None)
    if public is not None:
        return public(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


def make(overlap: bool, model: Optional[nn.Module], buffers: list[FlatBuffer], params: list,
         process_group, gather_group, label) -> Optional[ParamPrefetch]:
    """The prefetcher for ``overlap_param_gather``, or None without it."""
    if not overlap:
        if model is not None:
            raise ValueError("ZeroOptimizer: model= is only used with overlap_param_gather=True "
                             "(to hook its forward); drop it or set overlap_param_gather=True")
        return None
    if not isinstance(model, nn.Module):
        raise ValueError(
            "ZeroOptimizer(overlap_param_gather=True) needs model=<the nn.Module whose forward "
            "uses the parameters>, to wait for each bucket's all-gather before the module "
            f"runs; got model={type(model).__name__}: pass ZeroOptimizer(model.parameters(), "
            "..., overlap_param_gather=True, model=model)")
    return ParamPrefetch(buffers, model, params, process_group, gather_group, label)
