"""Param-group bookkeeping of the sharded optimizer: which keys are
hyperparameters, and keeping the outer groups (what users and schedulers
write) and the inner optimizer's (what its step reads) equal."""

from __future__ import annotations

from typing import Any

_HYPER_SKIP = ("params", "param_names")


def hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's hyperparameters and step scalars (not its params)."""
    return {k: v for k, v in group.items() if k not in _HYPER_SKIP}


class HyperSync:
    """Paired verbs: :meth:`push` before the inner optimizer reads its groups
    (a scheduler wrote ``lr`` into the outer ones), :meth:`pull` after it
    wrote them (Schedule-Free's ``k``, ``lr_max``, ``weight_sum``)."""

    def __init__(self, outer: list[dict[str, Any]], inner: list[dict[str, Any]]) -> None:
        self.outer = outer
        self.inner = inner

    def push(self) -> None:
        for o, i in zip(self.outer, self.inner):
            i.update(hyper(o))

    def pull(self) -> None:
        for o, i in zip(self.outer, self.inner):
            o.update(hyper(i))
