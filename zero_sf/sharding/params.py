"""The model's weights inside the sharded optimizer (docs/design.md §3: "the model
owns its weights").

Bookkeeping only, no update math and no gradients.  Per (param group, dtype)
the parameters become views of one *flat buffer*; this rank's chunk of every
bucket is what the update writes, and for bf16/fp16 models a fp32 *master*
copy of that chunk holds ``y`` (or ``x`` in eval mode) exactly.

Anything a user does to the model between steps must reach the master:

* a write through the parameter (``model.load_state_dict``, ``nn.init.*``,
  ``p.copy_``) bumps the parameter's own version counter (``p._version``;
  after ``p.data = view`` it is not shared with the flat buffer, so our own
  all-gathers do not bump it).  :meth:`FlatParams.adopt_user_writes` compares
  the counters with those recorded after our last write and copies the
  changed elements into the master;
* ``p.data = other`` (what ``model.float()`` / ``model.bfloat16()`` do)
  detaches the parameter from its buffer: the same shape and dtype is bound
  again (values copied in, as a plain torch optimizer keeps training such a
  parameter), another dtype or device raises.

Not seen: writes through ``p.data`` (a tensor with its own version counter).
Call :meth:`FlatParams.adopt_user_writes` with ``force=True``
(``ZeroOptimizer.sync_from_model()``) after such writes.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import Tensor

from ..layout import FlatBuffer, Slot
from ..storage import state_dtype_for
from . import comm


class FlatParams:
    """Flat parameter buffers, this rank's chunks of them, and fp32 masters."""

    def __init__(self, params: list[Tensor], buffers: list[FlatBuffer], rank: int,
                 process_group, device: torch.device, *, offload: bool = False,
                 master: bool = True) -> None:
        """``offload``: every buffer gets a fp32 master in host memory (fp32
        models too), which the CPU update reads and writes.  ``master=False``
        (``master_weights="remainder"``): no fp32 copy; the optimizer updates
        the bf16 chunks with their remainders."""
        self.params = params
        self.buffers = buffers
        self.rank = rank
        self.flat: list[Tensor] = []
        self.master: list[Optional[Tensor]] = []
        # Per buffer, this rank's chunk of every bucket: the tensors the inner
        # optimizer updates (master chunks, or the flat buffer's own chunks).
        self.y_chunks: list[list[Tensor]] = []
        # param index -> (buffer, bucket, offset, numel)
        self.slot_of: dict[int, tuple[int, int, int, int]] = {}
        with torch.no_grad():
            for bi, buf in enumerate(buffers):
                flat = torch.zeros(buf.numel, dtype=buf.dtype, device=device)
                for bk, bucket in enumerate(buf.buckets):
                    for slot in bucket.slots:
                        p = params[slot.index]
                        view = flat[slot.offset:slot.offset + slot.numel]
                        view.copy_(p.detach().reshape(-1))
                        p.data = view.view_as(p)
                        self.slot_of[slot.index] = (bi, bk, slot.offset, slot.numel)
                comm.broadcast_from_first(flat, process_group)  # as DDP does at start
                self.flat.append(flat)
                if (master and state_dtype_for(flat) != flat.dtype) or offload:
                    y32 = torch.cat([c.float() for c in self.param_chunks(bi)])
                    if offload:
                        from .offload import host_empty
                        y32 = host_empty(y32).copy_(y32)
                    self.master.append(y32)
                    self.y_chunks.append(self.split_shard(bi, y32))
                else:
                    self.master.append(None)
                    self.y_chunks.append(self.param_chunks(bi))
        self._ptrs = {i: self._view(i).data_ptr() for i in self.slot_of}
        self.mark_synced()
        self._group = None
        self._queue: list[tuple[int, int]] = []  # buckets whose all-gather is not launched
        self._inflight: dict[tuple[int, int], Any] = {}  # launched, not waited for (a Work)
        self.timeline: list[tuple[str, tuple[int, int], float]] = []  # (verb, bucket, time)

    # ------------------------------------------------------------ geometry
    def param_chunks(self, bi: int) -> list[Tensor]:
        """This rank's chunk of every bucket, as views of the flat param buffer."""
        return [self.flat[bi][slice(*b.chunk_range(self.rank))] for b in self.buffers[bi].buckets]

    def split_shard(self, bi: int, shard: Tensor) -> list[Tensor]:
        """A rank-contiguous shard of buffer ``bi`` cut into its bucket chunks."""
        buf = self.buffers[bi]
        return [shard[o:o + b.chunk] for o, b in zip(buf.shard_offsets(), buf.buckets)]

    def _view(self, index: int) -> Tensor:
        bi, _, offset, numel = self.slot_of[index]
        return self.flat[bi][offset:offset + numel]

    def owned(self, index: int):
        """(bucket chunk index, lo, hi) of param ``index``'s elements this rank
        owns, as offsets into that bucket chunk; None when it owns none."""
        bi, bk, offset, numel = self.slot_of[index]
        own = self.buffers[bi].buckets[bk].owned(Slot(index, offset, numel), self.rank)
        return None if own is None else (bk, own.chunk_start, own.chunk_start + own.numel)

    # ------------------------------------------------------- user changes
    def mark_synced(self) -> None:
        """Record the parameters' version counters after our own writes."""
        self._versions = {i: self.params[i]._version for i in self.slot_of}

    def _rebind(self, index: int) -> None:
        """``p.data`` was replaced: bind the parameter to its view again."""
        p = self.params[index]
        view = self._view(index)
        if p.dtype != view.dtype or p.device != view.device or p.numel() != view.numel():
            raise RuntimeError(
                f"ZeroOptimizer: parameter #{index} was replaced by a tensor of dtype {p.dtype} "
                f"on {p.device} with shape {tuple(p.shape)}, but it was sharded as dtype "
                f"{view.dtype} on {view.device} with {view.numel()} elements (e.g. model.to("
                f"{p.dtype}) after building the optimizer). Convert the model before building "
                "the optimizer, or convert it back (model.to(dtype)) before the next step")
        with torch.no_grad():
            view.copy_(p.detach().reshape(-1))
        p.data = view.view_as(p)

    @torch.no_grad()
    def adopt_user_writes(self, force: bool = False) -> list[int]:
        """Bring every parameter the user changed since :meth:`mark_synced`
        back into the flat buffer and the master.  Returns their indices.

        Cost per call: one pointer and one version read per parameter
        (host only); a pass over the changed parameters' owned elements."""
        changed = []
        for i, ptr in self._ptrs.items():
            p = self.params[i]
            if p.data_ptr() != ptr or p.dtype != self.flat[self.slot_of[i][0]].dtype:
                self._rebind(i)
                changed.append(i)
            elif force or p._version != self._versions[i]:
                changed.append(i)
        for i in changed:
            bi = self.slot_of[i][0]
            own = self.owned(i)
            if self.master[bi] is None or own is None:
                continue  # fp32 models: the flat buffer *is* y
            bk, lo, hi = own
            master = self.y_chunks[bi][bk][lo:hi]
            model = self.param_chunks(bi)[bk][lo:hi].to(master.device)  # offload: to the host
            # Elements the user did not touch still round to the model's
            # value: keep their fp32 bits; take the model's value elsewhere.
            touched = model != master.to(model.dtype)
            master.copy_(torch.where(touched, model.float(), master))
        if changed:
            self.mark_synced()
        return changed

    @torch.no_grad()
    def master_to_model(self) -> None:
        """This rank's chunks of the model := its master chunks, rounded to
        the model's dtype (after a checkpoint wrote the masters)."""
        for bi, master in enumerate(self.master):
            if master is not None:
                for y, p in zip(self.y_chunks[bi], self.param_chunks(bi)):
                    p.copy_(y)

    # -------------------------------------------------------------- gather
    @torch.no_grad()
    def gather(self, process_group) -> None:
        """Every rank's chunks into every rank's flat buffers (the model)."""
        self.finish_gather()
        for bi, buf in enumerate(self.buffers):
            for b, chunk in zip(buf.buckets, self.param_chunks(bi)):
                comm.all_gather(self.flat[bi][b.start:b.start + b.numel], chunk, process_group)
        self.mark_synced()

    # The same, asynchronous, bucket by bucket (overlap_param_gather): paired
    # verbs start_gather / finish_gather, with launch and wait in between.
    # Launches always follow ``order`` (the same list on every rank), so the
    # ranks issue the same collectives in the same sequence whatever order
    # they wait in.
    def start_gather(self, order: list[tuple[int, int]], process_group) -> None:
        """Queue every bucket's all-gather, to be launched in ``order``."""
        self.finish_gather()
        self._group = process_group
        self._queue = list(order)
        self._inflight = {}
        self.timeline = []
        self.mark_synced()  # our gathers do not bump the parameters' versions

    @property
    def gathering(self) -> bool:
        """Whether some bucket's all-gather is queued or in flight."""
        return bool(self._queue or self._inflight)

    @torch.no_grad()
    def launch(self, count: int = 1) -> None:
        """Launch the next ``count`` queued all-gathers (``async_op``)."""
        for _ in range(min(count, len(self._queue))):
            key = self._queue.pop(0)
            bi, bk = key
            b = self.buffers[bi].buckets[bk]
            chunk = self.flat[bi][slice(*b.chunk_range(self.rank))]
            self._inflight[key] = comm.all_gather(self.flat[bi][b.start:b.start + b.numel],
                                                  chunk, self._group, async_op=True)
            self.timeline.append(("launch", key, time.perf_counter()))

    def wait(self, key: tuple[int, int]) -> bool:
        """Make bucket ``key`` whole (launching the queue up to it first).
        Returns whether it was still pending.  Raises where the user wrote
        one of its parameters while its all-gather was in flight (that write
        was overwritten: it would be lost without a word)."""
        if key in self._queue:
            self.launch(self._queue.index(key) + 1)
        if key not in self._inflight:
            return False
        work = self._inflight.pop(key)
        if work is not None:
            work.wait()
        self.timeline.append(("wait", key, time.perf_counter()))
        bi, bk = key
        for slot in self.buffers[bi].buckets[bk].slots:
            if self.params[slot.index]._version != self._versions[slot.index]:
                raise RuntimeError(
                    f"ZeroOptimizer(overlap_param_gather=True): parameter #{slot.index} was "
                    "written after step() while its all-gather was still in flight, so the "
                    "gather overwrote the write; call optimizer.finish_param_gather() before "
                    "writing parameters between step() and the next forward")
        return True

    def finish_gather(self) -> None:
        """Launch and wait for every pending all-gather, in order."""
        if not self.gathering:
            return
        self.launch(len(self._queue))
        for key in list(self._inflight):
            self.wait(key)
