"""Compressed-state bookkeeping of the elementwise optimizers (docs/design.md
§11): the global element numbering of stochastic rounding, and the int16
remainders that complete bf16 weights to the fp32 y -- which go stale when
someone else writes the weights (their version counters tell)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from ..dispatch import is_dtensor
from ..layout import element_numbering
from ..storage import Storage


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


if TYPE_CHECKING:  # what the mixin runs on: a torch optimizer
    _Host = torch.optim.Optimizer
else:
    _Host = object


class CompressedState(_Host):
    """Mixin of :class:`~zero_sf.optim._base.ElementwiseOptimizer` (which sets
    these attributes up in ``__init__`` and ``__setstate__``)."""

    _bases: dict[int, int]  # id(param) -> bound index base (a shard's)
    _segments: dict[int, list[tuple[int, int, int]]]  # id(param) -> (offset, length, base) runs
    _base_cache: tuple[Any, dict[int, int]]
    _versions: dict[int, int]  # id(param) -> version counter after our last write
    # id(p) -> the bf16 weights a loaded remainder was saved with, until
    # the next step compares them with p (see _remainders)
    _loaded_bases: dict[int, Tensor]
    _writes_tracked_outside: bool

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
            first = element_numbering(
                [[(id(p), p.numel(), p.dtype) for p in g["params"] if p.requires_grad]
                 for g in self.param_groups])
            by_id = {id(p): p for g in self.param_groups for p in g["params"]}
            self._base_cache = (key, {i: n + _local_offset(by_id[i]) for i, n in first.items()})
        bases = self._base_cache[1]
        return [bases[id(p)] if id(p) in bases else _local_offset(p) for p in params]

    def _cut_at_numbering(self, params: list[Tensor], *aligned: Optional[list[Tensor]]):
        """``params`` and the tensors ``aligned`` with them (gradients, state)
        cut into views whose elements are numbered contiguously, with each
        view's index base: a parameter bound with ``index_segments`` (a
        ZeRO-3 partition) becomes one view per run.  Returns ``(params,
        aligned..., bases)``; unchanged lists where nothing is segmented."""
        if not any(id(p) in self._segments for p in params):
            return (params, *aligned, self._index_bases(params))
        if getattr(self, "_outputs", None):
            raise NotImplementedError("index_segments together with bound outputs")
        out_p: list[Tensor] = []
        out_a: list[Optional[list[Tensor]]] = [None if a is None else [] for a in aligned]
        bases: list[int] = []
        for i, p in enumerate(params):
            runs = self._segments.get(id(p))
            if runs is None:
                runs = [(0, p.numel(), self._index_bases([p])[0])]
            for offset, length, base in runs:
                if length == 0:
                    continue
                out_p.append(p.view(-1).narrow(0, offset, length))
                for a, o in zip(aligned, out_a):
                    if a is not None and o is not None:
                        o.append(a[i].view(-1).narrow(0, offset, length))
                bases.append(base)
        return (out_p, *out_a, bases)

    def _remainders(self, params: list[Tensor], group: dict[str, Any]) -> Optional[list[Tensor]]:
        """The int16 remainders of ``params`` (``master_weights="remainder"``),
        created as zeros (y = the bf16 parameter).  A parameter the user wrote
        since our last write (``model.load_state_dict``, ``p.copy_``: its
        version counter moved) restarts from its new value: its remainder is
        zeroed, so y is exactly what was written."""
        if not Storage.of(group).keeps_remainder:
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
