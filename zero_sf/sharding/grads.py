"""Gradient arrival (docs/design.md §3): from autograd to this rank's summed
gradient chunks, with torch's semantics as the reference:

* gradients from any number of backward passes before ``step()`` sum
  (micro-batches, an auxiliary loss before or after the main one, a weight
  tied across a reentrant activation checkpoint, whose hook fires twice);
* ``model.zero_grad()`` (either ``set_to_none``) discards what came before;
* every parameter that requires grad must receive one before ``step()``, on
  every rank (as DDP without ``find_unused_parameters``).

Two strategies with one interface -- ``reduce()`` makes ``chunks[bi][bk]``
hold the sum over ranks of everything accumulated since the last ``clear()``:

* :class:`FullGrads` (stage 1): ``p.grad`` views a full flat gradient buffer;
  ``reduce()`` reduce-scatters it in place at ``step()``.
* :class:`ShardedGrads` (stage 2): each gradient is added into its bucket's
  staging buffer by a ``post_accumulate_grad`` hook and freed; a bucket is
  reduce-scattered as soon as all its parameters arrived (in one fixed bucket
  order on every rank: collectives must match), and whatever arrives later
  (a second backward pass) is reduce-scattered at ``step()``, added to the
  shard.  No full gradient is kept.  To see ``model.zero_grad()``, the
  parameter's ``.grad`` holds a :class:`ReducedGrad` placeholder (zero
  bytes per element: a 0-d zero, expanded) between its arrival and
  ``step()``; ``zero_grad`` sets it to None or zeroes it in place (bumping
  its version), and the next arrival or ``step()`` notices.

No math here beyond the sums, no master weights, no optimizer.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch._C import DisableTorchFunctionSubclass

from ..layout import FlatBuffer, Slot
from . import comm


class ReducedGrad(Tensor):
    """What ``p.grad`` holds under stage 2 once the gradient went into the
    optimizer's shard: zeros that refuse arithmetic, so that reading them
    (``clip_grad_norm_(model.parameters())``, a norm for logging) raises
    instead of silently seeing 0, while ``zero_grad`` still works on them."""

    _ALLOWED = frozenset({"__get__", "__set__", "zero_", "_foreach_zero_", "requires_grad_",
                          "detach", "detach_", "size", "dim", "numel", "stride",
                          "is_contiguous", "data_ptr", "untyped_storage", "_is_view",
                          "_group_tensors_by_device_and_dtype"})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in cls._ALLOWED:
            with DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise RuntimeError(
            f"ZeroOptimizer: {name}() on a parameter's .grad, but that gradient was already "
            "reduce-scattered into the optimizer's shard and freed (stage 2 keeps no full "
            "gradients; stage 1 with reduce_dtype=torch.float32 sums them in fp32 buffers, "
            "which a bf16 .grad cannot view). "
            "Clip with ZeroOptimizer(max_norm=...) or optimizer.clip_grad_norm_(); read the "
            "norm from optimizer.grad_norm; or use stage=1 without reduce_dtype")


def _accumulator_held_elsewhere(p: Tensor) -> bool:
    """Whether something keeps ``p``'s AccumulateGrad node alive (autograd
    frees it with the last reference): DistributedDataParallel's reducer
    does, to all-reduce from its hooks.  A mark in the node's metadata
    survives only then.  Cost: two 0-element-view autograd nodes."""
    if not p.requires_grad:
        return False
    with torch.enable_grad():  # step() runs under no_grad
        # (each node is a temporary: holding one would keep the accumulator alive)
        _accumulator(p).metadata["zero_sf_probe"] = True
        return bool(_accumulator(p).metadata.pop("zero_sf_probe", False))


def _accumulator(p: Tensor):
    """``p``'s AccumulateGrad node, reached through a fresh 0-cost view."""
    view = p.view_as(p).grad_fn
    assert view is not None  # p requires grad
    return view.next_functions[0][0]


def ddp_wrapping(params: list[Tensor]) -> Optional[str]:
    """The class name of a DistributedDataParallel that holds any of
    ``params``, else None.  The common case (no other holder of the
    gradient accumulators) costs a probe per parameter; only a held one
    is confirmed with a scan of the garbage collector's objects."""
    held = [p for p in params if _accumulator_held_elsewhere(p)]
    if not held:
        return None
    import gc

    from torch.nn.parallel import DistributedDataParallel

    ids = {id(p) for p in held}
    # type(), not isinstance(): some module-level objects warn when their
    # __class__ is read (torch.distributed.reduce_op's deprecation).
    for obj in gc.get_objects():
        if issubclass(type(obj), DistributedDataParallel) and any(
                id(q) in ids for q in obj.module.parameters()):
            return type(obj).__name__
    return None


def _placeholder(p: Tensor) -> Tensor:
    return torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape).as_subclass(ReducedGrad)


class _Base:
    hooks: list  # autograd hook handles, removed by remove_hooks()
    def __init__(self, params: list[Tensor], buffers: list[FlatBuffer], rank: int,
                 process_group, device: torch.device,
                 missing_error: Callable[[list[int]], Exception], *,
                 reduce_dtype: Optional[torch.dtype] = None, replicate_group=None) -> None:
        self.params = params
        # Hierarchical sharding: each reduce-scattered chunk is then summed
        # over the replicas of this shard (None: no replicas).
        self.replicate_group = replicate_group
        # The dtype gradients are summed in (micro-batches and ranks): a
        # buffer's own dtype by default, fp32 with reduce_dtype=torch.float32.
        self.reduce_dtype = reduce_dtype
        self.buffers = buffers
        self.rank = rank
        self.process_group = process_group
        self.device = device
        self.missing_error = missing_error
        self.index = {id(params[s.index]): s.index for buf in buffers for s in buf.slots}
        self.slot_of = {s.index: (bi, bk, s.offset, s.numel) for bi, buf in enumerate(buffers)
                        for bk, b in enumerate(buf.buckets) for s in b.slots}
        self.arrived: set[int] = set()  # params with a gradient since clear()
        self.reduced = False

    def sum_replicas(self, chunk: Tensor) -> None:
        """The reduce-scattered ``chunk`` summed over the other shard groups."""
        if self.replicate_group is not None:
            comm.all_reduce_sum(chunk, self.replicate_group)

    def sum_dtype(self, bi: int) -> torch.dtype:
        return self.reduce_dtype or self.buffers[bi].dtype

    def _raise_missing(self) -> None:
        missing = [i for i in self.slot_of if i not in self.arrived]
        if missing:
            raise self.missing_error(missing)

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()


class FullGrads(_Base):
    """Stage 1: full flat gradient buffers that ``p.grad`` views."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flat: list[Tensor] = []
        self.chunks: list[list[Tensor]] = []
        for buf in self.buffers:
            fg = torch.zeros(buf.numel, dtype=buf.dtype, device=self.device)
            for slot in buf.slots:
                p = self.params[slot.index]
                p.grad = fg[slot.offset:slot.offset + slot.numel].view_as(p)
            self.flat.append(fg)
            self.chunks.append([fg[slice(*b.chunk_range(self.rank))] for b in buf.buckets])
        self.hooks = [self.params[i].register_post_accumulate_grad_hook(
            lambda p: self.arrived.add(self.index[id(p)])) for i in self.slot_of]

    def _is_view(self, i: int, g: Tensor) -> bool:
        bi, _, offset, _ = self.slot_of[i]
        return g.data_ptr() == self.flat[bi][offset:].data_ptr()

    @torch.no_grad()
    def reduce(self) -> None:
        if self.reduced:
            return
        # A gradient arrived by backward (hook) or was assigned by the user
        # (a tensor other than our view); model.zero_grad() after the last
        # backward leaves .grad None.
        self.arrived = {i for i, g in ((i, self.params[i].grad) for i in self.slot_of)
                        if g is not None and (i in self.arrived or not self._is_view(i, g))}
        self._raise_missing()
        works = []
        for bi, buf in enumerate(self.buffers):
            fg = self.flat[bi]
            for slot in buf.slots:
                # model.zero_grad() (set_to_none) before the last backward:
                # autograd made a fresh .grad; it holds the whole sum since.
                p = self.params[slot.index]
                view = fg[slot.offset:slot.offset + slot.numel]
                grad = p.grad
                assert grad is not None  # arrived
                if grad.data_ptr() != view.data_ptr():
                    view.copy_(grad.reshape(-1))
                    p.grad = view.view_as(p)
            for b, chunk in zip(buf.buckets, self.chunks[bi]):  # in place
                works.append(comm.reduce_scatter_sum(chunk, fg[b.start:b.start + b.numel],
                                                     self.process_group, async_op=True))
        for w in works:
            if w is not None:
                w.wait()
        for chunks in self.chunks:
            for chunk in chunks:
                self.sum_replicas(chunk)
        self.reduced = True

    def clear(self) -> None:
        for fg in self.flat:
            fg.zero_()
        self.arrived.clear()
        self.reduced = False

    def held(self) -> list[Tensor]:
        return list(self.flat)


class ShardedGrads(_Base):
    """Stage 2: bucket staging buffers, reduce-scattered from hooks.

    ``eager=False`` (stage 1 with ``reduce_dtype=torch.float32``): hooks add
    into full fp32 buffers (Megatron's fp32 ``main_grad``, which ``p.grad``
    cannot view: autograd keeps ``.grad`` in the parameter's dtype), and
    ``reduce()`` reduce-scatters every bucket in place, as :class:`FullGrads`."""

    def __init__(self, *args, eager: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eager = eager
        self.shard: list[Tensor] = []
        self.chunks: list[list[Tensor]] = []
        for bi, buf in enumerate(self.buffers):
            if eager:
                shard = torch.zeros(buf.shard_numel, dtype=self.sum_dtype(bi), device=self.device)
                self.chunks.append([shard[o:o + b.chunk]
                                    for o, b in zip(buf.shard_offsets(), buf.buckets)])
            else:  # full buffers, every bucket reduce-scattered in place (as FullGrads)
                shard = torch.zeros(buf.numel, dtype=self.sum_dtype(bi), device=self.device)
                self.chunks.append([shard[slice(*b.chunk_range(self.rank))] for b in buf.buckets])
            self.shard.append(shard)
        # One fixed launch order on every rank: the reverse of the layout
        # (backward produces the last layers' gradients first).
        self.order = [(bi, bk) for bi in reversed(range(len(self.buffers)))
                      for bk in reversed(range(len(self.buffers[bi].buckets)))]
        self.need = {(bi, bk): {s.index for s in b.slots}
                     for bi, buf in enumerate(self.buffers) for bk, b in enumerate(buf.buckets)}
        self.staging: dict[tuple[int, int], Tensor] = {}
        self.seen: dict[tuple[int, int], set[int]] = {k: set() for k in self.order}
        self.next = 0  # position in `order` of the next bucket to launch
        self.launched: set[tuple[int, int]] = set()  # buckets with a sum in the shard
        self.inflight: list[tuple] = []
        self.placeholders: dict[int, Tensor] = {}  # param index -> its ReducedGrad
        self.hooks = []
        for i in self.slot_of:
            p = self.params[i]
            self.hooks.append(p.register_hook(lambda g, i=i: self._before_accumulate(i, g)))
            self.hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    # -- zero_grad detection -------------------------------------------------
    def _zeroed_by_user(self, i: int) -> bool:
        """Param i had a gradient this step, and the user discarded it since."""
        ph = self.placeholders.get(i)
        if ph is None:
            return False
        g = self.params[i].grad
        return g is not ph or ph._version != 0

    @torch.no_grad()
    def _discard(self, i: int) -> None:
        """Drop param i's contributions so far (torch's zero_grad semantics):
        from its pending staging buffer, and from this rank's chunk of the
        sum where its bucket was reduced already.  Every rank does the same
        for its own chunk when every rank called zero_grad (as training
        loops do)."""
        bi, bk, offset, numel = self.slot_of[i]
        bucket = self.buffers[bi].buckets[bk]
        staging = self.staging.get((bi, bk))
        if staging is not None:
            staging[offset - bucket.start:offset - bucket.start + numel].zero_()
        if (bi, bk) in self.launched:
            self._finish()
            own = bucket.owned(Slot(i, offset, numel), self.rank)
            if own is not None:
                self.chunks[bi][bk][own.in_chunk].zero_()
        self.seen[(bi, bk)].discard(i)
        if self.params[i].grad is None:  # zero_grad(set_to_none=True): no gradient
            self.placeholders.pop(i)
            self.arrived.discard(i)
        else:  # zero_grad(set_to_none=False): a zero gradient, as in torch
            self.params[i].grad = self.placeholders[i] = _placeholder(self.params[i])

    def _before_accumulate(self, i: int, grad: Tensor) -> Tensor:
        # A tensor hook runs before AccumulateGrad reads p.grad: take the
        # placeholder away so autograd accumulates into a fresh tensor.
        if self._zeroed_by_user(i):
            self._discard(i)
        p = self.params[i]
        if self.placeholders.get(i) is not None and p.grad is self.placeholders[i]:
            p.grad = None
        return grad

    # -- arrival ---------------------------------------------------------------
    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        i = self.index[id(p)]
        bi, bk, offset, numel = self.slot_of[i]
        bucket = self.buffers[bi].buckets[bk]
        staging = self.staging.get((bi, bk))
        if staging is None:
            staging = self.staging[(bi, bk)] = (
                torch.zeros(bucket.numel, dtype=self.sum_dtype(bi), device=self.device)
                if self.eager else self.shard[bi][bucket.start:bucket.start + bucket.numel])
        start = offset - bucket.start
        grad = p.grad
        assert grad is not None  # a post-accumulate-grad hook: .grad is set
        staging[start:start + numel].add_(grad.reshape(-1))
        p.grad = self.placeholders[i] = _placeholder(p)
        self.arrived.add(i)
        self.seen[(bi, bk)].add(i)
        while self.eager and self.seen[self.order[self.next]] >= self.need[self.order[self.next]]:
            self._launch(*self.order[self.next])
            self.next = (self.next + 1) % len(self.order)  # a full pass: next round

    def _launch(self, bi: int, bk: int) -> None:
        chunk = self.chunks[bi][bk]
        # First sum of this bucket in the step: straight into the shard;
        # later ones (more micro-batches, another backward) are added.
        out = chunk if (bi, bk) not in self.launched else torch.empty_like(chunk)
        staging = self.staging.pop((bi, bk))
        work = comm.reduce_scatter_sum(out, staging, self.process_group, async_op=True)
        self.launched.add((bi, bk))
        self.seen[(bi, bk)].clear()
        # The staging buffer stays alive until the collective has read it.
        self.inflight.append((work, out, chunk, staging))
        if len(self.inflight) > 2:  # bound staging memory: ~2 buckets in flight
            self._finish(1)

    def _finish(self, n: Optional[int] = None) -> None:
        n = len(self.inflight) if n is None else n
        for work, out, chunk, _staging in self.inflight[:n]:
            if work is not None:
                work.wait()
            self.sum_replicas(out)
            if out is not chunk:
                chunk.add_(out)
        del self.inflight[:n]

    @torch.no_grad()
    def reduce(self) -> None:
        if self.reduced:
            return
        for i in list(self.placeholders):
            if self._zeroed_by_user(i):
                self._discard(i)
        self._raise_missing()
        # Whatever is still staged (a bucket some of whose params arrived
        # only in an earlier pass, or again after its launch): reduce it now,
        # in the fixed order.  Every rank ran the same backward passes, so
        # every rank has the same buckets left.
        for key in self.order:
            if key in self.staging:
                self._launch(*key)
        self._finish()
        self.next = 0
        self.reduced = True

    def clear(self) -> None:
        self._finish()
        for shard in self.shard:
            shard.zero_()
        self.staging.clear()
        for s in self.seen.values():
            s.clear()
        for i in self.placeholders:
            if self.params[i].grad is self.placeholders[i]:
                self.params[i].grad = None
        self.placeholders.clear()
        self.launched.clear()
        self.arrived.clear()
        self.next = 0
        self.reduced = False

    def held(self) -> list[Tensor]:
        if not self.eager:  # staging buffers are views of the full buffers
            return list(self.shard)
        return list(self.shard) + list(self.staging.values()) + [f[3] for f in self.inflight]
