"""One optimizer step taken in several ``step()`` calls.

DeepSpeed ZeRO-3 splits every param group into sub-groups of about
``sub_group_size`` elements (10^9 by default; a 70B model on 64 ranks has
dozens per group when users lower it to bound the step's temporaries) and
calls the client optimizer's ``step()`` once per sub-group, with that
group's ``params`` set to the sub-group's flat fp32 partition and every
other group's emptied.  Per-tensor state (``z``, ``exp_avg_sq``, RMSProp's
``step``) advances once per engine step that way; per-*group* scalars
(Schedule-Free's ``k``, ``weight_sum``, ``lr_max``) would advance once per
call -- the bug class DeepSpeed fixed for its own Adam (PR #1823, #7819).

:class:`SplitStep` makes the calls one step: a call whose tensors are all
*parts* (an integration's rule says so) and none of which was stepped since
the step began, made while the scalars are still where that step's last call
left them, continues the step -- it starts from the scalars the step started
with.  Anything else (a tensor stepped again, a loaded state dict, a
scheduler that changed the scalars) begins a new step.  Every call of a
split step therefore computes the same scalars, and after its last call
every group has advanced exactly once (a group without tensors in the last
call advanced from the same start).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor

# ``rule(tensor) -> bool``: True for a tensor that is one part of a step
# split over several step() calls.  zero_sf.integrations.deepspeed
# registers ZeRO-3's sub-group partitions (the core never imports an
# integration).
SPLIT_STEP_PARTS: list[Callable[[Tensor], bool]] = []


def is_part(t: Tensor) -> bool:
    return any(rule(t) for rule in SPLIT_STEP_PARTS)


class SplitStep:
    """Bookkeeping of one split step for an optimizer whose steps advance
    the group entries ``keys`` (none: nothing to do)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.start: Optional[list[dict[str, Any]]] = None  # the scalars the step began with
        self.after: Optional[list[dict[str, Any]]] = None  # ... and where its last call left them
        self.seen: set[int] = set()  # id() of the tensors stepped in it

    def _scalars(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: g[k] for k in self.keys if k in g} for g in groups]

    def begin(self, groups: list[dict[str, Any]], tensors: list[Tensor]) -> bool:
        """Before a step() call on ``tensors``: rewind the groups' scalars if
        the call continues a split step.  Returns whether it does."""
        if not self.keys or not tensors or not all(is_part(t) for t in tensors):
            self.start = self.after = None
            return False
        ids = {id(t) for t in tensors}
        if (self.start is not None and not ids & self.seen
                and self._scalars(groups) == self.after):
            for g, s in zip(groups, self.start):
                g.update(s)
            self.seen |= ids
            return True
        self.start, self.seen = self._scalars(groups), ids
        return False

    def end(self, groups: list[dict[str, Any]]) -> None:
        """After the call: where it left the scalars."""
        if self.start is not None:
            self.after = self._scalars(groups)
