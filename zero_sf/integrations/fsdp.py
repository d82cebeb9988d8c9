"""FSDP2 (``torch.distributed.fsdp.fully_shard``) glue.

The optimizers update FSDP2's DTensor parameters through their local shards
(:mod:`zero_sf.dispatch`); this module only keeps FSDP2's *unsharded*
copies from going stale when Schedule-Free's ``train()`` / ``eval()`` move
the parameters between y and x.

Why it is needed: FSDP2 keeps a root module's parameters unsharded after a
forward (they are expected in the backward that follows, pytorch PR
#155319), and ``reshard_after_forward=False`` does so for every module.
After an evaluation forward under ``torch.no_grad()`` nothing reshards them,
so when ``optimizer.train()`` moves the shards back from x to y, the next
forward would skip its all-gather and train on the stale x.  FSDP2's answer
is ``module.reshard()``; the optimizer cannot see the modules, so this
module finds the FSDP2 states that hold its parameters through torch's
registry of composable-API states and reshards them.
"""

from __future__ import annotations

import warnings
from typing import Iterable

from torch import Tensor

from ..optim._base import DTENSOR_SWITCH_HOOKS


def _fsdp_states():
    """(module, FSDP state) for every live FSDP2 module, or None when this
    torch has no such registry."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - torch < 2.6 layouts
        return None
    out = []
    for module, ref in list(_module_state_mapping.items()):
        state = ref() if callable(ref) else ref
        if isinstance(state, FSDPState):
            out.append((module, state))
    return out


def _param_groups(state):
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.8: one group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return groups


_warned = False


def reshard_modules_holding(params: Iterable[Tensor]) -> int:
    """Reshard every FSDP2 module that manages one of ``params`` (frees its
    unsharded copies; the next forward all-gathers the shards afresh).
    Returns how many modules were resharded."""
    global _warned
    ids = {id(p) for p in params}
    states = _fsdp_states()
    if states is None:
        if not _warned:
            warnings.warn("zero_sf could not find FSDP2's module states in this torch version; "
                          "after optimizer.train()/eval() call module.reshard() on every "
                          "fully_shard'ed module, or the next forward may use stale weights",
                          stacklevel=3)
            _warned = True
        return 0
    count = 0
    for module, state in states:
        for group in _param_groups(state):
            if any(id(fp.sharded_param) in ids for fp in group.fsdp_params):
                module.reshard()
                count += 1
                break
    return count


DTENSOR_SWITCH_HOOKS.append(reshard_modules_holding)
