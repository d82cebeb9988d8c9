"""What checkpoints read and write of a :class:`~zero_sf.ZeroOptimizer`:
this rank's share of every parameter's optimizer tensors, the group
scalars, and the step that makes the model show the loaded weights.

The public interface ``zero_sf.save``/``load`` (and tests) use, so that no
module outside ``sharding/`` reaches into the optimizer's parts.
Bookkeeping only: the views are of the optimizer's own tensors; the one
collective (:meth:`ShardedState.consolidated_state_dict`'s all-gather) is
:mod:`.comm`'s.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from ..layout import FlatBuffer
from ..optim._base import ElementwiseOptimizer
from ..optim.validation import host_float
from ..storage import KEEP_ON_LOAD, join_master, split_master, state_dtype_for
from . import comm
from .groups import HyperSync, hyper
from .params import FlatParams


class ShardedState:
    """The checkpoint view of one ZeroOptimizer (``optimizer.sharded_state``)."""

    def __init__(self, *, params: list[Tensor], buffers: list[FlatBuffer], weights: FlatParams,
                 inner: ElementwiseOptimizer, hyper: HyperSync, rank: int, process_group,
                 device: torch.device, master_weights: str,
                 adopt_model_writes: Callable[[], None]) -> None:
        self.params = params  # the optimizer's parameters, flattened in group order
        self.buffers = buffers
        self.weights = weights
        self.inner = inner
        self.hyper = hyper
        self.rank = rank
        self.process_group = process_group
        self.device = device
        self.master_weights = master_weights
        # weights the user wrote since the last step are y: a save takes them
        self.adopt_model_writes = adopt_model_writes

    def publish(self) -> None:
        """After a load wrote the master shards: write them into this rank's
        model chunks and all-gather (collective), so the model holds them."""
        self.weights.master_to_model()
        self.weights.gather(self.process_group)

    def shard_pieces(self, *, y: bool = False, joined: Optional[dict] = None
                     ) -> Iterator[tuple[int, int, int, dict[str, Tensor]]]:
        """This rank's share of every parameter's optimizer tensors.

        Yields ``(param_index, start, length, tensors)``: ``tensors`` maps ``master``
        (fp32 ``y``, low-precision models only; with ``y=True`` also for fp32
        models, where it is a view of the model's own flat buffer) and each
        elementwise state key of the inner optimizer (``z``, ``exp_avg_sq`` ...)
        to 1-D views of elements ``[start, start + len)`` of the flattened
        parameter.  Bookkeeping only: the caller reads or writes the views.

        With ``master_weights="remainder"`` the ``master`` is the exact fp32 y
        joined from the bf16 chunk and its remainder into a new tensor (the
        checkpoint format is the same either way); a caller that writes it
        passes a dict as ``joined`` and then :meth:`store_master` (joined).
        """
        for bi, buf in enumerate(self.buffers):
            for bk, (b, y_chunk) in enumerate(zip(buf.buckets, self.weights.y_chunks[bi])):
                state = self.inner.state.get(y_chunk, {})
                master = y_chunk if (y or self.weights.master[bi] is not None) else None
                if self.master_weights == "remainder":
                    rem = state.get("remainder")
                    master = (join_master(y_chunk, rem) if rem is not None
                              else y_chunk.float())
                    if joined is not None:
                        joined[(bi, bk)] = master
                for slot in b.slots:
                    own = b.owned(slot, self.rank)
                    if own is None:
                        continue
                    tensors = {k: v[own.in_chunk] for k, v in state.items()
                               if torch.is_tensor(v) and v.shape == y_chunk.shape
                               and k != "remainder"}
                    if master is not None:
                        tensors["master"] = master[own.in_chunk]
                    yield slot.index, own.param_start, own.numel, tensors

    @torch.no_grad()
    def store_master(self, joined: dict) -> None:
        """Split the fp32 y that :meth:`shard_pieces` joined (and a checkpoint
        load wrote) back into the bf16 chunks and their remainders."""
        for (bi, bk), y32 in joined.items():
            chunk = self.weights.y_chunks[bi][bk]
            hi, lo = split_master(y32)
            chunk.copy_(hi)
            self.inner.remainder_of(chunk).copy_(lo)

    def reset_state(self, keys) -> None:
        """Make the inner optimizer's state exactly the elementwise ``keys``
        (zeros, for a checkpoint to fill), as in a fresh optimizer: what it
        held before is dropped, so loading a checkpoint saved before the
        first step into an optimizer that has stepped since does not keep
        the later z, exp_avg_sq or RMSProp step count.  Remainders are
        kept: the load writes them with the master (:meth:`store_master`)."""
        group_of = {id(y): g for g in self.inner.param_groups for y in g["params"]}
        for chunks in self.weights.y_chunks:
            for y in chunks:
                st = self.inner.state[y]
                for k in [k for k in st if k != "remainder"]:
                    del st[k]
                for k in keys:
                    st[k] = torch.zeros_like(y, dtype=state_dtype_for(y, group_of[id(y)]))

    def scalar_state(self) -> list[dict[str, Any]]:
        """Per group: hyperparameters and step scalars, plus the inner
        optimizer's non-tensor per-parameter state (RMSProp's ``step``),
        which every chunk of a group shares."""
        self.hyper.push()  # what param_groups hold now (a scheduler's lr), not the last step's
        out = []
        for group in self.inner.param_groups:
            per_param = {}
            for y in group["params"]:
                # host scalars: not elementwise (RMSProp's 0-dim CPU step), as numbers
                per_param = {k: v.item() if torch.is_tensor(v) else v
                             for k, v in self.inner.state.get(y, {}).items()
                             if not (torch.is_tensor(v) and v.dim() > 0)}
                if per_param:
                    break
            out.append({"group": {k: host_float(v) for k, v in hyper(group).items()},
                        "per_param": per_param})
        return out

    def load_scalar_state(self, scalars: list[dict[str, Any]]) -> None:
        for group, saved in zip(self.inner.param_groups, scalars):
            for k, v in saved["group"].items():  # JSON turned tuples (betas) into lists
                if k in KEEP_ON_LOAD:  # this optimizer's storage format, not the saved one
                    continue
                as_tuple = isinstance(v, list) and isinstance(group.get(k), tuple)
                group[k] = tuple(v) if as_tuple else v
            for y in group["params"]:
                self.inner.state[y].update(saved["per_param"])
                self.inner.import_param_state(self.inner.state[y])
        self.hyper.pull()

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict[str, Any]:
        """The unsharded state dict of ``optimizer_class`` for these params,
        on every rank (collective).  ``zero_sf.ScheduleFreeAdamW`` (and
        ``schedulefree.AdamWScheduleFree``) load it directly."""
        self.adopt_model_writes()  # weights written since the last step are y
        full: dict[int, dict[str, Any]] = {}
        scalars = self.scalar_state()
        for bi, buf in enumerate(self.buffers):
            keys = sorted({k for y in self.weights.y_chunks[bi]
                           for k, v in self.inner.state.get(y, {}).items()
                           if torch.is_tensor(v) and v.shape == y.shape})
            for b, y in zip(buf.buckets, self.weights.y_chunks[bi]):
                for key in keys:
                    chunk = self.inner.state[y][key]
                    # (offloaded state is on the host: gathered through the comm device)
                    whole = torch.empty(b.numel, dtype=chunk.dtype, device=self.device)
                    comm.all_gather(whole, chunk.contiguous().to(self.device), self.process_group)
                    for slot in b.slots:
                        p = self.params[slot.index]
                        part = whole[slot.offset - b.start:slot.offset - b.start + slot.numel]
                        full.setdefault(slot.index, {})[key] = part.view_as(p).clone()
            for slot in buf.slots:
                if slot.index in full:  # host scalars (RMSProp's step), in the inner format
                    full[slot.index] = self.inner.export_param_state(self.inner.import_param_state(
                        {**full[slot.index], **scalars[buf.group]["per_param"]}))
        groups, start = [], 0
        for group, s in zip(self.hyper.outer, scalars):
            n = len(group["params"])
            groups.append({**s["group"], "params": list(range(start, start + n))})
            start += n
        return {"state": full, "param_groups": groups}
