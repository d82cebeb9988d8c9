"""ZeRO stage 1/2 sharding of any zero_sf single-device optimizer.

This module moves bytes; it knows no update formula.  Per rank it holds, for
its chunk of every bucket (see :mod:`.layout`): the gradient shard, the fp32
master copy of ``y`` (bf16/fp16 models only; fp32 models update their chunk
of the flat parameter buffer in place) and, inside the wrapped *inner*
optimizer, that optimizer's state (``z``, ``exp_avg_sq`` for Schedule-Free
AdamW).  A step is:

1. gradients -> ``reduce_scatter`` (sum) into the rank's gradient shard
   (stage 1: at ``step()`` from full flat gradient buffers; stage 2: bucket by
   bucket from gradient hooks during backward, full gradients freed);
2. one scalar ``all_reduce`` of the squared norm: non-finite -> the step is
   skipped on every rank; clipping and the 1/N average fold into one
   ``grad_scale`` the fused kernel applies;
3. the inner optimizer's fused update on the chunks, writing the bf16 copy
   of ``y`` straight into the flat parameter buffer;
4. ``all_gather`` of every bucket into the flat parameter buffer, which the
   model's parameters view.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..optim import ScheduleFreeAdamW
from ..optim._base import state_dtype_for
from . import comm
from .layout import build_layout

__all__ = ["ZeroOptimizer", "ZeroScheduleFreeAdamW"]

_HYPER_SKIP = ("params", "param_names")


class ZeroOptimizer(torch.optim.Optimizer):
    r"""Shards ``optimizer_class``'s state (and fp32 master weights) across the
    data-parallel ranks of ``process_group``.

    Args:
        params: parameters or param groups, the same on every rank (checked
            with one collective at construction).
        optimizer_class: a zero_sf single-device optimizer
            (:class:`ScheduleFreeAdamW` by default, or :class:`RMSProp`).
        stage: 1 (full gradients kept, reduce-scattered at ``step()``) or 2
            (reduce-scattered bucket by bucket during backward).
        process_group: data-parallel group (default: the world).
        bucket_numel: elements per bucket (stage 2's unit of overlap).
        align: each rank's chunk of a bucket is a multiple of this many elements.
        max_norm: if set, gradients are clipped to this global 2-norm in every
            step (or call :meth:`clip_grad_norm_` yourself before ``step()``).
        **defaults: the inner optimizer's hyperparameters.

    Gradients are consumed by ``step()``: accumulate over micro-batches, then
    step.  Parameters are broadcast from rank 0 at construction, as DDP does.
    The step reads one scalar back to the host (the global gradient norm) to
    decide on skipping a non-finite step.
    """

    def __init__(self, params, optimizer_class: type = ScheduleFreeAdamW, *,
                 stage: int = 2, process_group=None, bucket_numel: int = 1 << 24,
                 align: int = 128, max_norm: Optional[float] = None, **defaults) -> None:
        if stage not in (1, 2):
            raise ValueError(f"Invalid stage: {stage!r} (expected 1 or 2)")
        if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"Invalid max_norm value: {max_norm!r} (expected a positive float)")
        # The inner class validates the hyperparameters and supplies its defaults.
        full_defaults = optimizer_class([torch.zeros(1)], **defaults).defaults
        self._constructed = False
        super().__init__(params, full_defaults)
        self._constructed = True
        self.optimizer_class = optimizer_class
        self.stage = stage
        self.process_group = process_group
        self.max_norm = max_norm
        self.world_size, self.rank = comm.world(process_group)
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._clip_coef: Optional[float] = None
        self._grad_norm: Optional[float] = None
        self._grads_reduced = False

        self._params = [p for g in self.param_groups for p in g["params"]]
        self._check_params()
        self.buffers = build_layout(
            [[(self._index[id(p)], p.numel(), p.dtype) for p in g["params"] if p.requires_grad]
             for g in self.param_groups],
            world_size=self.world_size, bucket_numel=bucket_numel, align=align)
        self._build_storage()
        inner_groups = []
        for gi, group in enumerate(self.param_groups):
            hyper = {k: v for k, v in group.items() if k not in _HYPER_SKIP}
            chunks = [c for bi, buf in enumerate(self.buffers) if buf.group == gi
                      for c in self._y_chunks[bi]]
            inner_groups.append({"params": chunks, **hyper})
        self.inner = optimizer_class(inner_groups, **defaults)
        for bi in range(len(self.buffers)):
            low = self._master[bi] is not None  # bf16 copy written by the kernel
            for y, g, out in zip(self._y_chunks[bi], self._grad_chunks[bi],
                                 self._param_chunks(bi)):
                self.inner.bind(y, grad=g, out=out if low else None)
        if stage == 2:
            self._install_hooks()
        else:  # stage 1: only note which params received a gradient
            self._got_grad: set[int] = set()
            self._hooks = [p.register_post_accumulate_grad_hook(
                lambda p: self._got_grad.add(self._index[id(p)]))
                for p in self._params if p.requires_grad]

    # ------------------------------------------------------------------ setup
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_constructed", False):
            raise NotImplementedError(
                "ZeroOptimizer cannot add param groups after construction (the flat "
                "buffers are laid out once); pass every group to the constructor")
        super().add_param_group(param_group)

    def _check_params(self) -> None:
        self._index = {id(p): i for i, p in enumerate(self._params)}
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(f"ZeroOptimizer needs all parameters on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        for i, p in enumerate(self._params):
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"parameter #{i} has dtype {p.dtype}: real floating point only")
        signature = [(gi, tuple(p.shape), str(p.dtype), p.requires_grad)
                     for gi, g in enumerate(self.param_groups) for p in g["params"]]
        signature.append((self.stage, self.optimizer_class.__name__))
        everyone = comm.all_gather_objects(signature, self.process_group)
        for r, theirs in enumerate(everyone):
            if theirs != signature:
                diff = next((i for i, (a, b) in enumerate(zip(signature, theirs)) if a != b),
                            min(len(signature), len(theirs)))
                mine = signature[diff] if diff < len(signature) else None
                other = theirs[diff] if diff < len(theirs) else None
                raise ValueError(
                    f"ZeroOptimizer: parameters differ between rank {self.rank} and rank {r} "
                    f"at entry #{diff}: (group, shape, dtype, requires_grad) {mine} vs {other} "
                    f"({len(signature) - 1} vs {len(theirs) - 1} parameters); every rank must "
                    "build the same model and pass the same param groups")

    def _build_storage(self) -> None:
        """Flat buffers; params become views; rank 0's values everywhere."""
        self._flat: list[Tensor] = []
        # Stage 2: a contiguous gradient shard; stage 1 has none -- the
        # reduce-scatter lands in place in the rank's chunks of the full buffer.
        self._grad_shard: list[Optional[Tensor]] = []
        self._grad_chunks: list[list[Tensor]] = []
        self._flat_grad: list[Optional[Tensor]] = []
        self._master: list[Optional[Tensor]] = []
        self._y_chunks: list[list[Tensor]] = []
        self._slot_of: dict[int, tuple[int, int, int, int]] = {}
        with torch.no_grad():
            for bi, buf in enumerate(self.buffers):
                flat = torch.zeros(buf.numel, dtype=buf.dtype, device=self.device)
                for bk, bucket in enumerate(buf.buckets):
                    for slot in bucket.slots:
                        p = self._params[slot.index]
                        view = flat[slot.offset:slot.offset + slot.numel]
                        view.copy_(p.detach().reshape(-1))
                        p.data = view.view_as(p)
                        self._slot_of[id(p)] = (bi, bk, slot.offset, slot.numel)
                comm.broadcast_from_first(flat, self.process_group)
                self._flat.append(flat)
                if self.stage == 1:
                    fg = torch.zeros(buf.numel, dtype=buf.dtype, device=self.device)
                    for slot in buf.slots:
                        p = self._params[slot.index]
                        p.grad = fg[slot.offset:slot.offset + slot.numel].view_as(p)
                    self._flat_grad.append(fg)
                    self._grad_shard.append(None)
                    self._grad_chunks.append([fg[slice(*b.chunk_range(self.rank))] for b in buf.buckets])
                else:
                    shard = torch.zeros(buf.shard_numel, dtype=buf.dtype, device=self.device)
                    self._flat_grad.append(None)
                    self._grad_shard.append(shard)
                    self._grad_chunks.append(self._split_shard(bi, shard))
                low = state_dtype_for(flat) != flat.dtype
                if low:
                    master = torch.cat([c.float() for c in self._param_chunks(bi)])
                    self._master.append(master)
                    chunks = self._split_shard(bi, master)
                else:
                    self._master.append(None)
                    chunks = self._param_chunks(bi)
                self._y_chunks.append(chunks)

    def _param_chunks(self, bi: int) -> list[Tensor]:
        """This rank's chunk of every bucket, as views of the flat param buffer."""
        return [self._flat[bi][slice(*b.chunk_range(self.rank))] for b in self.buffers[bi].buckets]

    def _split_shard(self, bi: int, shard: Tensor) -> list[Tensor]:
        buf = self.buffers[bi]
        return [shard[o:o + b.chunk] for o, b in zip(buf.shard_offsets(), buf.buckets)]

    # ------------------------------------------------------- stage 2: hooks
    def _install_hooks(self) -> None:
        self._bucket_order = [(bi, bk) for bi in reversed(range(len(self.buffers)))
                              for bk in reversed(range(len(self.buffers[bi].buckets)))]
        self._staging: dict[tuple[int, int], Tensor] = {}
        self._seen: dict[tuple[int, int], set[int]] = {k: set() for k in self._bucket_order}
        self._need = {(bi, bk): {s.index for s in b.slots}
                      for bi, buf in enumerate(self.buffers) for bk, b in enumerate(buf.buckets)}
        self._next = 0
        self._inflight: list[tuple] = []
        self._reduced: set[tuple[int, int]] = set()  # buckets with grads in the shard
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for p in self._params if p.requires_grad]

    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        bi, bk, offset, numel = self._slot_of[id(p)]
        bucket = self.buffers[bi].buckets[bk]
        staging = self._staging.get((bi, bk))
        if staging is None:
            staging = self._staging[(bi, bk)] = torch.zeros(bucket.numel, dtype=p.dtype, device=self.device)
        start = offset - bucket.start
        staging[start:start + numel].add_(p.grad.reshape(-1))
        p.grad = None  # stage 2 keeps no full gradient
        self._seen[(bi, bk)].add(self._index[id(p)])
        # Launch in one fixed order on every rank (collectives must match).
        while (self._next < len(self._bucket_order)
               and self._seen[self._bucket_order[self._next]] >= self._need[self._bucket_order[self._next]]):
            self._launch(*self._bucket_order[self._next])
            self._next += 1
        if self._next == len(self._bucket_order):  # a full backward: next round
            self._next = 0
            for s in self._seen.values():
                s.clear()

    def _launch(self, bi: int, bk: int) -> None:
        chunk = self._grad_chunks[bi][bk]
        # First micro-batch: reduce straight into the shard; later ones add.
        out = chunk if (bi, bk) not in self._reduced else torch.empty_like(chunk)
        staging = self._staging.pop((bi, bk))
        work = comm.reduce_scatter_sum(out, staging, self.process_group, async_op=True)
        self._reduced.add((bi, bk))
        # Keep the staging buffer alive until the collective has read it.
        self._inflight.append((work, out, chunk, staging))
        if len(self._inflight) > 2:  # bound staging memory: ~2 buckets in flight
            self._finish(1)

    def _finish(self, n: Optional[int] = None) -> None:
        n = len(self._inflight) if n is None else n
        for work, out, chunk, _staging in self._inflight[:n]:
            if work is not None:
                work.wait()
            if out is not chunk:
                chunk.add_(out)
        del self._inflight[:n]

    # ------------------------------------------------------------ gradients
    def _param_label(self, index: int) -> str:
        p = self._params[index]
        for g in self.param_groups:
            names = g.get("param_names")
            if names is not None:
                for q, name in zip(g["params"], names):
                    if q is p:
                        return f"{name!r} (shape {tuple(p.shape)})"
        return f"#{index} (shape {tuple(p.shape)})"

    def _missing_grad_error(self, indices) -> RuntimeError:
        labels = ", ".join(self._param_label(i) for i in sorted(indices)[:5])
        return RuntimeError(
            f"ZeroOptimizer: parameter {labels} requires grad but received no gradient "
            "before step(); every rank must produce a gradient for every parameter "
            "(set requires_grad=False on unused ones, or leave them out of the optimizer)")

    @torch.no_grad()
    def _reduce_grads(self) -> None:
        """Make every rank's gradient chunks hold the sum over ranks (once per step)."""
        if self._grads_reduced:
            return
        if self.stage == 2:
            # Params whose gradient has not arrived in the current backward
            # round, or no backward since the last step at all.
            missing = set().union(*(self._need[k] - self._seen[k] for k in self._bucket_order))
            if not any(self._seen.values()) and len(self._reduced) == len(self._bucket_order):
                missing = set()
            if missing:
                raise self._missing_grad_error(missing)
            self._finish()
            self._grads_reduced = True
            return
        missing = [s.index for buf in self.buffers for s in buf.slots
                   if s.index not in self._got_grad or self._params[s.index].grad is None]
        if missing:
            raise self._missing_grad_error(missing)
        works = []
        for bi, buf in enumerate(self.buffers):
            fg = self._flat_grad[bi]
            for slot in buf.slots:  # a grad replaced by the user (e.g. set_to_none)
                p = self._params[slot.index]
                view = fg[slot.offset:slot.offset + slot.numel]
                if p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad.reshape(-1))
                    p.grad = view.view_as(p)
            for b, chunk in zip(buf.buckets, self._grad_chunks[bi]):  # in place
                works.append(comm.reduce_scatter_sum(chunk, fg[b.start:b.start + b.numel],
                                                     self.process_group, async_op=True))
        for w in works:
            if w is not None:
                w.wait()
        self._grads_reduced = True

    def _zero_grads(self) -> None:
        for t in self._grad_shard + self._flat_grad:
            if t is not None:
                t.zero_()
        if self.stage == 2:
            self._reduced.clear()
        else:
            self._got_grad.clear()
        self._clip_coef = self._grad_norm = None
        self._grads_reduced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are consumed by step(); this clears any accumulated since."""
        if self.stage == 2:
            self._finish()
            self._staging.clear()
            self._next = 0
            for s in self._seen.values():
                s.clear()
        self._zero_grads()

    @torch.no_grad()
    def _global_norm(self) -> float:
        """2-norm of the *averaged* gradient; one scalar all-reduce, one sync."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for chunks in self._grad_chunks:
            for g in chunks:
                sq += g.float().pow(2).sum()
        comm.all_reduce_sum(sq, self.process_group)
        return math.sqrt(sq.item()) / self.world_size

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the global gradient 2-norm to ``max_norm`` in the next step;
        returns the norm before clipping (call after backward, before step)."""
        if norm_type != 2.0:
            raise ValueError(f"Invalid norm_type value: {norm_type} (only 2.0 is supported)")
        if not max_norm > 0:
            raise ValueError(f"Invalid max_norm value: {max_norm}")
        self._reduce_grads()
        self._grad_norm = self._global_norm()
        self._clip_coef = min(1.0, max_norm / (self._grad_norm + 1e-6))
        return torch.tensor(self._grad_norm)

    # ----------------------------------------------------------------- step
    def _sync_hyper_in(self) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in outer.items() if k not in _HYPER_SKIP})

    def _sync_hyper_out(self) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            outer.update({k: v for k, v in inner.items() if k not in _HYPER_SKIP})

    @torch.no_grad()
    def _gather_params(self) -> None:
        for bi, buf in enumerate(self.buffers):
            for b, chunk in zip(buf.buckets, self._param_chunks(bi)):
                comm.all_gather(self._flat[bi][b.start:b.start + b.numel], chunk, self.process_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        self._sync_hyper_in()
        if not all(g.get("train_mode", True) for g in self.inner.param_groups):
            from ..optim.schedule_free import eval_mode_error
            raise eval_mode_error(type(self).__name__)
        for g in self.inner.param_groups:
            self.inner._validate_group(g)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._clip_coef is None:
            self._reduce_grads()
            self._grad_norm = self._global_norm()
            if self.max_norm is not None:
                self._clip_coef = min(1.0, self.max_norm / (self._grad_norm + 1e-6))
        self.last_step_skipped = not math.isfinite(self._grad_norm)
        if self.last_step_skipped:  # every rank sees the same all-reduced norm
            self.skipped_steps += 1
        else:
            grad_scale = (self._clip_coef or 1.0) / self.world_size
            self.inner.step(grad_scale=grad_scale)
            self._gather_params()
            self._sync_hyper_out()
        self._zero_grads()
        return loss

    @property
    def grad_norm(self) -> Optional[float]:
        """Global gradient norm of the last step (or of clip_grad_norm_)."""
        return self._grad_norm

    # -------------------------------------------------------- train / eval
    def _switch(self, mode: str) -> None:
        fn = getattr(self.inner, mode, None)
        if fn is None:  # optimizers without y/x modes (RMSProp)
            return
        self._sync_hyper_in()
        fn()
        self._gather_params()
        self._sync_hyper_out()

    def eval(self) -> None:
        """y -> x on the master shard, then all-gather: the model holds x."""
        self._switch("eval")

    def train(self) -> None:
        """x -> y on the master shard, then all-gather: the model holds y."""
        self._switch("train")

    # -------------------------------------------------------- checkpoints
    def shard_pieces(self):
        """This rank's share of every parameter's optimizer tensors.

        Yields ``(param_index, start, length, tensors)``: ``tensors`` maps ``master``
        (fp32 ``y``, low-precision models only) and each elementwise state key
        of the inner optimizer (``z``, ``exp_avg_sq`` ...) to 1-D views of
        elements ``[start, start + len)`` of the flattened parameter.  Bookkeeping
        only: the caller reads or writes the views.
        """
        for bi, buf in enumerate(self.buffers):
            for b, y in zip(buf.buckets, self._y_chunks[bi]):
                a0, a1 = b.chunk_range(self.rank)
                state = self.inner.state.get(y, {})
                for slot in b.slots:
                    lo, hi = max(a0, slot.offset), min(a1, slot.offset + slot.numel)
                    if lo >= hi:
                        continue
                    cut = slice(lo - a0, hi - a0)
                    tensors = {k: v[cut] for k, v in state.items()
                               if torch.is_tensor(v) and v.shape == y.shape}
                    if self._master[bi] is not None:
                        tensors["master"] = y[cut]
                    yield slot.index, lo - slot.offset, hi - lo, tensors

    def ensure_state(self, keys) -> None:
        """Create the inner optimizer's elementwise state ``keys`` (zeros) where
        missing, so a checkpoint can be loaded before the first step."""
        for chunks in self._y_chunks:
            for y in chunks:
                st = self.inner.state[y]
                for k in keys:
                    if k not in st:
                        st[k] = torch.zeros_like(y, dtype=state_dtype_for(y))

    def scalar_state(self) -> list[dict[str, Any]]:
        """Per group: hyperparameters and step scalars, plus the inner
        optimizer's non-tensor per-parameter state (RMSProp's ``step``),
        which every chunk of a group shares."""
        out = []
        for group in self.inner.param_groups:
            per_param = {}
            for y in group["params"]:
                per_param = {k: v for k, v in self.inner.state.get(y, {}).items()
                             if not torch.is_tensor(v)}
                if per_param:
                    break
            out.append({"group": {k: v for k, v in group.items() if k not in _HYPER_SKIP},
                        "per_param": per_param})
        return out

    def load_scalar_state(self, scalars: list[dict[str, Any]]) -> None:
        for group, saved in zip(self.inner.param_groups, scalars):
            for k, v in saved["group"].items():  # JSON turned tuples (betas) into lists
                group[k] = tuple(v) if isinstance(v, list) and isinstance(group.get(k), tuple) else v
            for y in group["params"]:
                self.inner.state[y].update(saved["per_param"])
        self._sync_hyper_out()

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict[str, Any]:
        """The unsharded state dict of ``optimizer_class`` for these params,
        on every rank (collective).  ``zero_sf.ScheduleFreeAdamW`` (and
        ``schedulefree.AdamWScheduleFree``) load it directly."""
        full: dict[int, dict[str, Any]] = {}
        scalars = self.scalar_state()
        for bi, buf in enumerate(self.buffers):
            keys = sorted({k for y in self._y_chunks[bi] for k, v in self.inner.state.get(y, {}).items()
                           if torch.is_tensor(v) and v.shape == y.shape})
            for b, y in zip(buf.buckets, self._y_chunks[bi]):
                for key in keys:
                    chunk = self.inner.state[y][key]
                    whole = torch.empty(b.numel, dtype=chunk.dtype, device=chunk.device)
                    comm.all_gather(whole, chunk.contiguous(), self.process_group)
                    for slot in b.slots:
                        p = self._params[slot.index]
                        part = whole[slot.offset - b.start:slot.offset - b.start + slot.numel]
                        full.setdefault(slot.index, {})[key] = part.view_as(p).clone()
            for slot in buf.slots:
                if slot.index in full:  # host scalars (RMSProp's step), in the inner format
                    full[slot.index] = self.inner.export_param_state(
                        {**full[slot.index], **scalars[buf.group]["per_param"]})
        groups, start = [], 0
        for group, s in zip(self.param_groups, scalars):
            n = len(group["params"])
            groups.append({**s["group"], "params": list(range(start, start + n))})
            start += n
        return {"state": full, "param_groups": groups}

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError(
            "ZeroOptimizer holds only this rank's shard; use zero_sf.save(path, model, "
            "optimizer) for a sharded checkpoint that loads at any world size, or "
            "optimizer.consolidated_state_dict() (collective) for the unsharded one")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise RuntimeError("use zero_sf.load(path, model, optimizer)")

    # ------------------------------------------------------------- memory
    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank actually holds, by role (measured from the tensors)."""
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)
        inner_state = [v for s in self.inner.state.values() for v in s.values() if torch.is_tensor(v)]
        return {
            "params": nbytes(self._flat),
            "grads": nbytes(self._grad_shard) + nbytes(self._flat_grad)
            + (nbytes(list(self._staging.values()) + [f[3] for f in self._inflight])
               if self.stage == 2 else 0),
            "master": nbytes(self._master),
            "optimizer_state": nbytes(inner_state),
        }


def ZeroScheduleFreeAdamW(params, *, stage: int = 2, process_group=None, **kwargs) -> ZeroOptimizer:
    """``ZeroOptimizer(params, ScheduleFreeAdamW, ...)``."""
    return ZeroOptimizer(params, ScheduleFreeAdamW, stage=stage, process_group=process_group, **kwargs)
