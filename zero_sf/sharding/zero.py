"""ZeRO stage 1/2 sharding of any zero_sf single-device optimizer: the step.

This module orchestrates; it knows no update formula and moves no bytes by
itself.  :mod:`.params` owns the model's flat parameter buffers and the fp32
master chunks, :mod:`.grads` the gradients' way from autograd to this rank's
summed chunks, :mod:`.comm` the collectives, and the wrapped *inner*
optimizer the state (``z``, ``exp_avg_sq`` for Schedule-Free AdamW) and the
fused update.  A step is:

1. adopt what the user did to the model since our last write (loaded
   weights reach the master; a detached parameter is bound again);
2. gradients -> this rank's summed chunks (stage 1: one reduce-scatter per
   bucket at ``step()``; stage 2: from hooks during backward);
3. one ``all_reduce`` of a few scalars: the squared gradient norm (clipping,
   non-finite skip) and hashes of the hyperparameters and of the parameters
   the user changed, so ranks that disagree raise before anything changes;
4. the inner optimizer's fused update on the chunks, with 1/N and clipping
   folded into one ``grad_scale``, writing the bf16 copy of ``y`` straight
   into the flat parameter buffer;
5. ``all_gather`` of every bucket into the flat buffers the model views.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..dispatch import is_dtensor
from ..layout import build_layout, default_bucket_numel, element_numbering
from ..optim import ScheduleFreeAdamW
from . import agreement, comm, prefetch, topology
from .grads import FullGrads, ShardedGrads, ddp_wrapping
from .groups import HyperSync, hyper
from .params import FlatParams
from .state_view import ShardedState

__all__ = ["ZeroOptimizer", "ZeroScheduleFreeAdamW"]

class ZeroOptimizer(torch.optim.Optimizer):
    r"""Shards ``optimizer_class``'s state (and fp32 master weights) across the
    data-parallel ranks of ``process_group``.

    Args:
        params: parameters or param groups, the same on every rank (checked
            with one collective at construction, hyperparameters included).
        optimizer_class: a zero_sf single-device optimizer
            (:class:`ScheduleFreeAdamW` by default, or :class:`RMSProp`).
        stage: 1 (full gradients kept, reduce-scattered at ``step()``) or 2
            (reduce-scattered bucket by bucket during backward).
        process_group: data-parallel group (default: the world).
        bucket_numel: elements per bucket (stage 2's unit of overlap); by
            default 2**24, or 2**14 per data-parallel rank where that is more
            (``zero_sf.layout.default_bucket_numel``: padding < 0.8 %, and
            fewer latency-bound collectives at thousands of ranks).
        align: each rank's chunk of a bucket is a multiple of this many elements.
        max_norm: if set, gradients are clipped to this global 2-norm in every
            step (or call :meth:`clip_grad_norm_` yourself before ``step()``).
        master_weights: ``"fp32"`` (default: a fp32 master copy of this rank's
            shard of every bf16/fp16 buffer, 4 B/param/N) or ``"remainder"``
            (bf16 models: the 16 low bits of the fp32 y that the bf16
            parameter lacks, 2 B/param/N, the same fp32 y bit for bit; the
            model's bf16 weights are y rounded to nearest with ties away
            from zero).  With ``state_dtype=torch.bfloat16`` a bf16 model
            holds (2 + 2 + 2)/N bytes per parameter instead of 12/N
            (docs/design.md §11).
        offload: ``"cpu"`` keeps this rank's fp32 master, ``z`` and
            ``exp_avg_sq`` in (pinned) host memory and runs the update on the
            CPU with the fused CPU backend (ZeRO-Offload); the gradient shard
            goes to the host before the update and ``y`` back before the
            all-gather.  Same numbers as without offload.
        reduce_dtype: ``None`` (default) sums gradients over micro-batches and
            ranks in each parameter's dtype; ``torch.float32`` sums bf16/fp16
            gradients in fp32 (Megatron's fp32 ``main_grad`` and
            ``grad_reduce_in_fp32``): each backward's gradient is added into
            fp32 buffers, reduce-scattered in fp32, and the update reads the
            fp32 sum.  Memory: stage 2's gradient shard is 4 B/param/N
            instead of 2 (and its ~2 staging buckets twice as large); stage
            1's full gradient 4 B/param instead of 2, and ``p.grad`` then
            holds a placeholder as in stage 2 (clip with ``max_norm``).
        overlap_param_gather: ``step()`` only *starts* the all-gather of the
            updated weights, bucket by bucket; forward pre-hooks on ``model``'s
            modules wait for each module's buckets and launch the next, so
            the gather overlaps the next forward (Megatron's
            ``--overlap-param-gather``).  Same numbers as without it.  Reading
            a parameter between ``step()`` and the next forward outside
            ``model`` (a weight norm for logging) needs
            :meth:`finish_param_gather` first; ``model.state_dict()``, the
            optimizer's ``eval``/``train`` and checkpoints wait by themselves
            (:mod:`zero_sf.sharding.prefetch`).
        shard_group, replicate_group: hierarchical sharding (HSDP; ZeRO++'s
            hpZ for the optimizer state): the state and master shards live
            within ``shard_group`` (e.g. one node's GPUs); gradients are
            reduce-scattered within it, then all-reduced over
            ``replicate_group`` (only the shard: 1/S of the bytes cross
            nodes); parameters are all-gathered within it.  Both or neither;
            ``zero_sf.hierarchical_groups(shard_size)`` builds them.
            ``process_group`` stays the whole data-parallel group.
        model: the ``nn.Module`` whose forward uses the parameters (with
            ``overlap_param_gather=True`` only; every trainable parameter must
            be one of its modules' own).
        **defaults: the inner optimizer's hyperparameters.

    Gradients are consumed by ``step()``: accumulate over any number of
    backward passes, then step; ``model.zero_grad()`` or this optimizer's
    ``zero_grad()`` discard what came before, as in torch.  Parameters are
    broadcast from rank 0 at construction, as DDP does; weights the user
    writes later (``model.load_state_dict``) are what the next step updates.
    The step reads one small vector back to the host (the global gradient
    norm and the ranks' agreement checks).
    """

    def __init__(self, params, optimizer_class: type = ScheduleFreeAdamW, *,
                 stage: int = 2, process_group=None, bucket_numel: Optional[int] = None,
                 align: int = 128, max_norm: Optional[float] = None,
                 offload: Optional[str] = None, master_weights: str = "fp32",
                 reduce_dtype: Optional[torch.dtype] = None, overlap_param_gather: bool = False,
                 model: Optional[torch.nn.Module] = None, shard_group=None,
                 replicate_group=None, **defaults) -> None:
        _check_options(stage, offload, max_norm, master_weights, defaults)
        if reduce_dtype not in (None, torch.float32):
            raise ValueError(f"Invalid reduce_dtype value: {reduce_dtype!r} (expected None, "
                             "to sum gradients in the parameters' dtype, or torch.float32)")
        remainder = master_weights == "remainder"
        if remainder:
            defaults["master_weights"] = "remainder"
        _check_process_group(process_group)
        topology.check_hierarchy(process_group, shard_group, replicate_group)
        # The inner class validates the hyperparameters and supplies its defaults.
        dummy = torch.zeros(1, dtype=torch.bfloat16 if remainder else torch.float32)
        full_defaults = optimizer_class([dummy], **defaults).defaults
        self._constructed = False
        super().__init__(params, full_defaults)
        self._constructed = True
        self.optimizer_class = optimizer_class
        self.stage = stage
        # The data-parallel group (every rank: agreement, the norm, checkpoints),
        # and the group the state is sharded over (the layout, reduce-scatter,
        # all-gather): the same unless hierarchical (docs/design.md §3).
        self.process_group = process_group
        self.shard_group = shard_group if shard_group is not None else process_group
        self.replicate_group = replicate_group
        self.max_norm = max_norm
        self.dp_size, self.dp_rank = comm.world(process_group)
        self.world_size, self.rank = comm.world(self.shard_group)
        # One replica's ranks contribute the squared norm of the (replicated) shards.
        self._replica_rank = comm.world(replicate_group)[1] if replicate_group is not None else 0
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._clip_coef: Optional[float] = None
        self._grad_norm: Optional[float] = None
        self._user_changed: set[int] = set()  # params the user wrote since the last step

        self._params = [p for g in self.param_groups for p in g["params"]]
        self._check_params()
        self._refuse_ddp()
        # Frozen now: left out of the flat buffers (no shard, never updated).
        self._frozen = [i for i, p in enumerate(self._params) if not p.requires_grad]
        self.master_weights = master_weights
        if remainder:
            self._check_bf16()
        self.buffers = build_layout(
            self._trainable_by_group(), world_size=self.world_size,
            bucket_numel=(default_bucket_numel(self.dp_size) if bucket_numel is None
                          else bucket_numel),
            align=align)
        self.prefetch = prefetch.make(overlap_param_gather, model, self.buffers, self._params,
                                      process_group, self.shard_group, self._param_label)
        self._released = False
        self._take_over()
        self.offload = offload == "cpu"
        self.weights = FlatParams(self._params, self.buffers, self.rank, process_group, self.device,
                                  offload=self.offload, master=not remainder)
        self.reduce_dtype = reduce_dtype
        grads_args = (self._params, self.buffers, self.rank, self.shard_group, self.device,
                      self._missing_grad_error)
        self.grads: FullGrads | ShardedGrads
        if stage == 2:
            self.grads = ShardedGrads(*grads_args, reduce_dtype=reduce_dtype,
                                      replicate_group=replicate_group)
        elif reduce_dtype is not None and any(b.dtype != reduce_dtype for b in self.buffers):
            # Stage 1 summing bf16 gradients in fp32: hooks add each backward's
            # gradient into fp32 buffers (p.grad cannot view them).
            self.grads = ShardedGrads(*grads_args, reduce_dtype=reduce_dtype, eager=False,
                                      replicate_group=replicate_group)
        else:
            self.grads = FullGrads(*grads_args, replicate_group=replicate_group)
        self.staging = None
        if self.offload:
            from .offload import HostStaging
            self.staging = HostStaging(self.grads.chunks, [self.weights.param_chunks(bi)
                                                           for bi in range(len(self.buffers))])
        self.inner = self._build_inner(optimizer_class, defaults)
        self.hyper = HyperSync(self.param_groups, self.inner.param_groups)
        self.sharded_state = ShardedState(
            params=self._params, buffers=self.buffers, weights=self.weights, inner=self.inner,
            hyper=self.hyper, rank=self.rank, process_group=self.shard_group, device=self.device,
            master_weights=master_weights, adopt_model_writes=self.adopt_model_writes)
        self._bind_chunks()
        if self.prefetch is not None:
            self.prefetch.attach(self.weights)

    def _take_over(self) -> None:
        """A newer ZeroOptimizer on these parameters replaces the older one
        (after unfreezing, or to change the layout): the older one's hooks
        would otherwise keep consuming the gradients (stage 2: crashing in
        backward on its own placeholders) and its step would update buffers
        the model no longer views.  The older one raises from then on."""
        for p in self._params:
            owner = getattr(p, "_zero_sf_optimizer", None)
            previous = owner() if owner is not None else None
            if previous is not None and previous is not self:
                previous._release()
            p._zero_sf_optimizer = weakref.ref(self)

    def _release(self) -> None:
        if self._released:
            return
        self.weights.finish_gather()  # the model whole before the new one copies it
        self.grads.clear()
        self.grads.remove_hooks()
        if self.prefetch is not None:
            self.prefetch.remove()
        self._released = True

    def _check_not_released(self) -> None:
        if self._released:
            raise RuntimeError(
                "ZeroOptimizer: these parameters were taken over by a newer ZeroOptimizer built "
                "on them, so this one no longer sees their gradients nor writes the model; use "
                "the newer optimizer (or save with this one before building the next)")

    def _build_inner(self, optimizer_class: type, defaults: dict[str, Any]):
        """The inner optimizer: one param group per outer group, holding
        this rank's y chunks of that group's buffers."""
        inner_groups = []
        for gi, group in enumerate(self.param_groups):
            chunks = [c for bi, buf in enumerate(self.buffers) if buf.group == gi
                      for c in self.weights.y_chunks[bi]]
            inner_groups.append({"params": chunks, **hyper(group)})
        return optimizer_class(inner_groups, **defaults)

    def _bind_chunks(self) -> None:
        """Each y chunk reads its gradient chunk, writes its rounded copy into
        the model's flat buffer (low-precision buffers), and numbers its
        elements from the chunk's global position."""
        bases = self._chunk_bases()
        for bi in range(len(self.buffers)):
            low = self.weights.master[bi] is not None  # bf16 copy written by the kernel
            grads, outs = self.grads.chunks[bi], self.weights.param_chunks(bi)
            if self.staging is not None:  # the CPU update reads and writes host buffers
                grads, outs = self.staging.grads[bi], self.staging.outs[bi]
            for y, g, out, base in zip(self.weights.y_chunks[bi], grads, outs, bases[bi]):
                self.inner.bind(y, grad=g, out=out if low else None, index_base=base)

    def _check_bf16(self) -> None:
        for i, p in enumerate(self._params):
            if p.requires_grad and p.dtype != torch.bfloat16:
                raise ValueError(
                    f"master_weights='remainder' needs bfloat16 parameters, but parameter "
                    f"{self._param_label(i)} is {p.dtype}; convert the model with "
                    "model.bfloat16() before building the optimizer, or use "
                    "master_weights='fp32'")

    def _chunk_bases(self) -> list[list[int]]:
        """Global index of this rank's first element of every bucket chunk,
        for stochastic rounding: elements numbered in flat-buffer order
        without the padding, which is how the single-device optimizer
        numbers them (``ElementwiseOptimizer._index_bases``): the same random
        bits at every world size.  (Padding elements reuse the next bucket's
        numbers; their values are never read.)"""
        first = element_numbering(self._trainable_by_group())
        return [[first[b.slots[0].index] + self.rank * b.chunk for b in buf.buckets]
                for buf in self.buffers]

    def _trainable_by_group(self) -> list[list[tuple[int, int, torch.dtype]]]:
        """(param index, numel, dtype) per group: what the layout lays out."""
        return [[(self._index[id(p)], p.numel(), p.dtype) for p in g["params"] if p.requires_grad]
                for g in self.param_groups]

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
            raise ValueError("ZeroOptimizer needs all parameters on one device, got "
                             f"{sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        for i, p in enumerate(self._params):
            if is_dtensor(p):
                raise TypeError(
                    f"ZeroOptimizer got parameter #{i} as a DTensor{tuple(p.placements)}: the "
                    "model is already sharded (FSDP2's fully_shard, or tensor parallelism), and "
                    "ZeRO would shard it again; use zero_sf.ScheduleFreeAdamW / zero_sf.RMSProp "
                    "directly, which update each rank's local shards with the fused kernel")
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"parameter #{i} has dtype {p.dtype}: real floating point only")
        signature = {"stage": self.stage, "optimizer": self.optimizer_class.__name__,
                     "number of parameters": len(self._params)}
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                i = self._index[id(p)]
                signature[f"parameter #{i}"] = (f"group {gi}, shape {tuple(p.shape)}, {p.dtype}, "
                                                f"requires_grad={p.requires_grad}")
            signature.update((f"param group {gi}: {k}", repr(v))
                             for k, v in sorted(hyper(g).items()))
        agreement.check_same(
            signature, self.process_group,
            "every rank must build the same model and pass the same param groups and "
            "hyperparameters (parameter values may differ: rank 0's are broadcast, as DDP does)",
            "at construction")

    def _refuse_ddp(self) -> None:
        """DDP all-reduces the gradients this optimizer reduce-scatters: under
        stage 2 its reducer then fails inside backward ("more than one
        element of the written-to tensor refers to a single memory
        location"), under stage 1 every gradient crosses the network twice."""
        wrapper = ddp_wrapping([p for p in self._params if p.requires_grad])
        if wrapper is not None:
            raise ValueError(
                f"ZeroOptimizer got the parameters of a model wrapped in {wrapper}: ZeroOptimizer "
                "reduces the gradients itself (reduce-scatter, then an all-gather of the updated "
                "weights), which replaces DDP; build it on the bare model (ZeroOptimizer("
                "model.parameters(), ...) without DistributedDataParallel(model)), and give "
                "every rank its own data as with DDP")

    def _check_frozen(self) -> None:
        """A parameter frozen at construction has no shard: a gradient on it
        (unfrozen later) would be ignored without a word.  Cost per step:
        one attribute read per frozen parameter."""
        for i in self._frozen:
            if self._params[i].grad is not None:
                state = ("requires_grad=True now" if self._params[i].requires_grad
                         else "a .grad set")
                raise RuntimeError(
                    f"ZeroOptimizer: parameter {self._param_label(i)} has a gradient, but it had "
                    f"requires_grad=False when the optimizer was built ({state}), so it has no "
                    "shard and would never be updated; ZeroOptimizer lays out its flat buffers "
                    "once: unfreeze parameters before building it (or build a new one after "
                    "unfreezing), or set their .grad to None")

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
        frozen = [self._param_label(i) for i in sorted(indices)
                  if not self._params[i].requires_grad]
        if frozen:
            return RuntimeError(
                f"ZeroOptimizer: parameter {', '.join(frozen[:5])} was trainable when the "
                "optimizer was built and has requires_grad=False now, so it received no gradient; "
                "ZeroOptimizer lays out its flat buffers once (a frozen parameter in a flat "
                "buffer would still be updated by weight decay and Schedule-Free's averaging): "
                "build a new optimizer after freezing, or leave frozen parameters out of it")
        return RuntimeError(
            f"ZeroOptimizer: parameter {labels} requires grad but received no gradient "
            "before step(); every rank must produce a gradient for every parameter "
            "(set requires_grad=False on unused ones, or leave them out of the optimizer). "
            "Gradients of a backward pass run before the optimizer was built are not "
            "seen: run backward after building it")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard every gradient accumulated since the last step (the last
        step's :attr:`grad_norm` stays readable, for logging)."""
        self.grads.clear()
        self._clip_coef = None

    def adopt_model_writes(self) -> None:
        """Bring weights the user wrote since our last write into the master
        (called by step, eval/train and checkpoints)."""
        self._check_not_released()
        self.weights.finish_gather()
        self._forget_remainders(self.weights.adopt_user_writes())

    def finish_param_gather(self) -> None:
        """With ``overlap_param_gather=True``: wait for every bucket's
        all-gather that ``step()`` started (the model's forward does this
        module by module); call it before reading or writing parameters
        between ``step()`` and the next forward.  A no-op otherwise."""
        self.weights.finish_gather()

    def _forget_remainders(self, changed: list[int]) -> None:
        """Parameters the user wrote restart from the written bf16 values:
        with ``master_weights="remainder"`` their remainders are zeroed (the
        fp32 master keeps untouched elements' low bits instead)."""
        self._user_changed.update(changed)
        if self.master_weights != "remainder":
            return
        for i in changed:
            own = self.weights.owned(i)
            if own is None:
                continue
            bk, lo, hi = own
            rem = self.inner.state.get(self.weights.y_chunks[self.weights.slot_of[i][0]][bk], {}
                                       ).get("remainder")
            if rem is not None:
                rem[lo:hi].zero_()

    def sync_from_model(self) -> None:
        """Take the model's current values as the weights (into the fp32
        master), for writes the optimizer cannot see: ``p.data.copy_(...)``.
        Writes through the parameter (``load_state_dict``, ``nn.init``,
        ``p.copy_``) and ``p.data = ...`` are picked up automatically."""
        self.weights.finish_gather()
        self._forget_remainders(self.weights.adopt_user_writes(force=True))

    def _agreement(self) -> dict[str, str]:
        """What every rank must agree on at every step: the hyperparameters
        (a scheduler stepped on one rank only) and the parameters written
        by the user (weights loaded on one rank only)."""
        out = {f"param group {gi}: {k}": repr(v) for gi, g in enumerate(self.param_groups)
               for k, v in sorted(hyper(g).items())}
        out["parameters written since the last step"] = repr(
            [self._param_label(i) for i in sorted(self._user_changed)])
        return out

    @torch.no_grad()
    def _global_norm(self) -> float:
        """2-norm of the *averaged* gradient, and the ranks' agreement check:
        one all-reduce of 7 scalars, one host sync.

        Agreement (:mod:`.agreement`): hashes of :meth:`_agreement` ride in
        the same all-reduce."""
        self.grads.reduce()
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        if self._replica_rank == 0:  # the other replicas hold the same shards
            for chunks in self.grads.chunks:
                for g in chunks:
                    sq += g.float().pow(2).sum()
        mine = self._agreement()
        vec = torch.tensor([0.0] + agreement.terms(mine), dtype=torch.float64, device=self.device)
        vec[0] = sq
        comm.all_reduce_sum(vec, self.process_group)
        sums = vec.tolist()
        if agreement.ranks_differ(sums[1:], self.dp_size):
            agreement.check_same(
                mine, self.process_group,
                "set learning rates, step schedulers and load weights on every rank alike",
                "at step()")
        return math.sqrt(sums[0]) / self.dp_size

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the global gradient 2-norm to ``max_norm`` in the next step;
        returns the norm before clipping (call after backward, before step)."""
        if norm_type != 2.0:
            raise ValueError(f"Invalid norm_type value: {norm_type} (only 2.0 is supported)")
        if not max_norm > 0:
            raise ValueError(f"Invalid max_norm value: {max_norm}")
        self.adopt_model_writes()
        self._grad_norm = self._global_norm()
        self._clip_coef = min(1.0, max_norm / (self._grad_norm + 1e-6))
        return torch.tensor(self._grad_norm)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None  # type: ignore[override]
             ) -> Optional[float]:  # (torch's overloads; one signature here)
        self._check_not_released()
        self._check_frozen()
        self.hyper.push()
        self.inner.check_step_allowed(type(self).__name__)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adopt_model_writes()
        if self._clip_coef is None:
            self._grad_norm = self._global_norm()
            if self.max_norm is not None:
                self._clip_coef = min(1.0, self.max_norm / (self._grad_norm + 1e-6))
        assert self._grad_norm is not None  # clip_grad_norm_ or the line above set it
        self.last_step_skipped = not math.isfinite(self._grad_norm)
        if self.last_step_skipped:  # every rank sees the same all-reduced norm
            self.skipped_steps += 1
        else:
            grad_scale = (self._clip_coef or 1.0) / self.dp_size
            if self.staging is not None:
                self.staging.grads_to_host()
            self.inner.step(grad_scale=grad_scale)
            if self.staging is not None:
                self.staging.outs_to_device()
            if self.prefetch is not None:  # the model's forward waits, bucket by bucket
                self.prefetch.start()
            else:
                self.weights.gather(self.shard_group)
            self.hyper.pull()
        self._user_changed.clear()
        self.zero_grad()
        return loss

    @property
    def grad_norm(self) -> Optional[float]:
        """Global gradient norm of the last step (or of clip_grad_norm_)."""
        return self._grad_norm

    # -------------------------------------------------------- train / eval
    def in_train_mode(self) -> bool:
        """The inner optimizer's mode (y in the model, or x), after what the
        user wrote into ``param_groups``."""
        self.hyper.push()
        return self.inner.in_train_mode()

    def _switch(self, mode: str) -> None:
        self._check_not_released()
        fn = getattr(self.inner, mode, None)
        if fn is None:  # optimizers without y/x modes (RMSProp)
            return
        self.adopt_model_writes()
        self.hyper.push()
        fn()
        if self.staging is not None:
            # The host y is the truth: the staging copies of y hold what the
            # last *step* wrote (nothing before the first step), and a switch
            # writes no staging copy where it changes nothing (no z yet, the
            # mode it already had), so they may be stale or uninitialized.
            self.weights.master_to_model()
        self.weights.gather(self.shard_group)
        self.hyper.pull()

    def eval(self) -> None:
        """y -> x on the master shard, then all-gather: the model holds x."""
        self._switch("eval")

    def train(self) -> None:
        """x -> y on the master shard, then all-gather: the model holds y."""
        self._switch("train")

    # -------------------------------------------------------- checkpoints
    @torch.no_grad()
    def consolidated_state_dict(self) -> dict[str, Any]:
        """The unsharded state dict of ``optimizer_class`` for these params,
        on every rank (collective).  ``zero_sf.ScheduleFreeAdamW`` (and
        ``schedulefree.AdamWScheduleFree``) load it directly."""
        self.weights.finish_gather()
        return self.sharded_state.consolidated_state_dict()

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
        def nbytes(ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        inner_state = [v for s in self.inner.state.values() for k, v in s.items()
                       if torch.is_tensor(v) and k != "remainder"]
        remainders = [s["remainder"] for s in self.inner.state.values() if "remainder" in s]
        return {
            "params": nbytes(self.weights.flat),
            "grads": nbytes(self.grads.held()),
            # fp32 master chunks, or the int16 remainders that stand for them
            "master": nbytes(self.weights.master) + nbytes(remainders),
            "optimizer_state": nbytes(inner_state),
            # offload: host copies of the gradient shard and of y in the model's dtype
            "host_staging": self.staging.nbytes() if self.staging is not None else 0,
        }


def _check_options(stage, offload, max_norm, master_weights, defaults: dict[str, Any]) -> None:
    if stage not in (1, 2):
        raise ValueError(f"Invalid stage: {stage!r} (expected 1 or 2)")
    if offload not in (None, "none", "cpu"):
        raise ValueError(f"Invalid offload value: {offload!r} (expected None or 'cpu')")
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"Invalid max_norm value: {max_norm!r} (expected a positive float)")
    if master_weights not in ("fp32", "remainder"):
        raise ValueError(f"Invalid master_weights value: {master_weights!r} (expected "
                         "'fp32' or 'remainder')")
    if master_weights == "remainder" and offload == "cpu":
        raise ValueError("offload='cpu' with master_weights='remainder' is not supported: "
                         "offload keeps the fp32 master in host memory already; use one")
    if "master_weights" in defaults:  # the inner optimizer's own (single-device) option
        raise ValueError("pass master_weights='fp32' or 'remainder' to ZeroOptimizer (it "
                         "owns the master weights)")


def _check_process_group(process_group) -> None:
    """torchrun sets WORLD_SIZE; without a process group every rank would
    silently train its own model and overwrite the others' checkpoints."""
    if process_group is not None or comm.world(None)[0] > 1:
        return
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise RuntimeError(
            f"ZeroOptimizer: WORLD_SIZE={world} is set (a torchrun or DeepSpeed launch), but "
            "torch.distributed is not initialized, so every rank would train its own model; "
            "call torch.distributed.init_process_group() before building the optimizer "
            "(or unset WORLD_SIZE for a single-process run)")


class ZeroScheduleFreeAdamW(ZeroOptimizer):
    """``ZeroOptimizer(params, ScheduleFreeAdamW, ...)`` (a class since issue
    #22, so ``isinstance`` and error messages name what the user built)."""

    def __init__(self, params, *, stage: int = 2, process_group=None, **kwargs) -> None:
        super().__init__(params, ScheduleFreeAdamW, stage=stage, process_group=process_group,
                         **kwargs)
