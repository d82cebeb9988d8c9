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
import zlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..functional import is_dtensor
from ..optim import ScheduleFreeAdamW
from ..optim._base import KEEP_ON_LOAD, host_float, state_dtype_for
from . import comm
from .grads import FullGrads, ShardedGrads, ddp_wrapping
from .layout import build_layout
from .params import FlatParams

__all__ = ["ZeroOptimizer", "ZeroScheduleFreeAdamW"]

_HYPER_SKIP = ("params", "param_names")


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in _HYPER_SKIP}


def _hash_parts(text: str) -> list[int]:
    """Three 12-bit hashes of ``text``: small enough that sums of squares
    over 4096 ranks are exact in float64 (see :meth:`ZeroOptimizer._agree`)."""
    h = zlib.crc32(text.encode()) | (zlib.adler32(text.encode()) << 32)
    return [(h >> (12 * j)) & 0xFFF for j in range(3)]


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
        bucket_numel: elements per bucket (stage 2's unit of overlap).
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
                 stage: int = 2, process_group=None, bucket_numel: int = 1 << 24,
                 align: int = 128, max_norm: Optional[float] = None,
                 offload: Optional[str] = None, master_weights: str = "fp32",
                 **defaults) -> None:
        if stage not in (1, 2):
            raise ValueError(f"Invalid stage: {stage!r} (expected 1 or 2)")
        if offload not in (None, "none", "cpu"):
            raise ValueError(f"Invalid offload value: {offload!r} (expected None or 'cpu')")
        if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"Invalid max_norm value: {max_norm!r} (expected a positive float)")
        if master_weights not in ("fp32", "remainder"):
            raise ValueError(f"Invalid master_weights value: {master_weights!r} (expected "
                             "'fp32' or 'remainder')")
        remainder = master_weights == "remainder"
        if remainder and offload == "cpu":
            raise ValueError("offload='cpu' with master_weights='remainder' is not supported: "
                             "offload keeps the fp32 master in host memory already; use one")
        if "master_weights" in defaults:  # the inner optimizer's own (single-device) option
            raise ValueError("pass master_weights='fp32' or 'remainder' to ZeroOptimizer (it "
                             "owns the master weights)")
        if remainder:
            defaults["master_weights"] = "remainder"
        _check_process_group(process_group)
        # The inner class validates the hyperparameters and supplies its defaults.
        dummy = torch.zeros(1, dtype=torch.bfloat16 if remainder else torch.float32)
        full_defaults = optimizer_class([dummy], **defaults).defaults
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
        self._user_changed: set[int] = set()  # params the user wrote since the last step

        self._params = [p for g in self.param_groups for p in g["params"]]
        self._check_params()
        self._refuse_ddp()
        # Frozen now: left out of the flat buffers (no shard, never updated).
        self._frozen = [i for i, p in enumerate(self._params) if not p.requires_grad]
        self.master_weights = master_weights
        if remainder:
            for i, p in enumerate(self._params):
                if p.requires_grad and p.dtype != torch.bfloat16:
                    raise ValueError(
                        f"master_weights='remainder' needs bfloat16 parameters, but parameter "
                        f"{self._param_label(i)} is {p.dtype}; convert the model with "
                        "model.bfloat16() before building the optimizer, or use "
                        "master_weights='fp32'")
        self.buffers = build_layout(
            [[(self._index[id(p)], p.numel(), p.dtype) for p in g["params"] if p.requires_grad]
             for g in self.param_groups],
            world_size=self.world_size, bucket_numel=bucket_numel, align=align)
        self.offload = offload == "cpu"
        self.weights = FlatParams(self._params, self.buffers, self.rank, process_group, self.device,
                                  offload=self.offload, master=not remainder)
        grads_cls = ShardedGrads if stage == 2 else FullGrads
        self.grads = grads_cls(self._params, self.buffers, self.rank, process_group, self.device,
                               self._missing_grad_error)
        self.staging = None
        if self.offload:
            from .offload import HostStaging
            self.staging = HostStaging(self.grads.chunks, [self.weights.param_chunks(bi)
                                                           for bi in range(len(self.buffers))])
        inner_groups = []
        for gi, group in enumerate(self.param_groups):
            chunks = [c for bi, buf in enumerate(self.buffers) if buf.group == gi
                      for c in self.weights.y_chunks[bi]]
            inner_groups.append({"params": chunks, **_hyper(group)})
        self.inner = optimizer_class(inner_groups, **defaults)
        bases = self._chunk_bases()
        for bi in range(len(self.buffers)):
            low = self.weights.master[bi] is not None  # bf16 copy written by the kernel
            grads, outs = self.grads.chunks[bi], self.weights.param_chunks(bi)
            if self.staging is not None:  # the CPU update reads and writes host buffers
                grads, outs = self.staging.grads[bi], self.staging.outs[bi]
            for y, g, out, base in zip(self.weights.y_chunks[bi], grads, outs, bases[bi]):
                self.inner.bind(y, grad=g, out=out if low else None, index_base=base)

    def _chunk_bases(self) -> list[list[int]]:
        """Global index of this rank's first element of every bucket chunk,
        for stochastic rounding: elements numbered in flat-buffer order
        without the padding, which is how the single-device optimizer
        numbers them (``ZeroSFOptimizer._index_bases``): the same random
        bits at every world size.  (Padding elements reuse the next bucket's
        numbers; their values are never read.)"""
        out, acc = [], 0
        for buf in self.buffers:
            row = []
            for b in buf.buckets:
                row.append(acc + self.rank * b.chunk)
                acc += sum(slot.numel for slot in b.slots)
            out.append(row)
        return out

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
            if is_dtensor(p):
                raise TypeError(
                    f"ZeroOptimizer got parameter #{i} as a DTensor{tuple(p.placements)}: the model "
                    "is already sharded (FSDP2's fully_shard, or tensor parallelism), and ZeRO "
                    "would shard it again; use zero_sf.ScheduleFreeAdamW / zero_sf.RMSProp "
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
            signature.update((f"param group {gi}: {k}", repr(v)) for k, v in sorted(_hyper(g).items()))
        _raise_if_ranks_differ(
            comm.all_gather_objects(signature, self.process_group),
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
        frozen = [self._param_label(i) for i in sorted(indices) if not self._params[i].requires_grad]
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
        self._forget_remainders(self.weights.adopt_user_writes())

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
        self._forget_remainders(self.weights.adopt_user_writes(force=True))

    def _agreement(self) -> dict[str, str]:
        """What every rank must agree on at every step: the hyperparameters
        (a scheduler stepped on one rank only) and the parameters written
        by the user (weights loaded on one rank only)."""
        out = {f"param group {gi}: {k}": repr(v) for gi, g in enumerate(self.param_groups)
               for k, v in sorted(_hyper(g).items())}
        out["parameters written since the last step"] = repr(
            [self._param_label(i) for i in sorted(self._user_changed)])
        return out

    @torch.no_grad()
    def _global_norm(self) -> float:
        """2-norm of the *averaged* gradient, and the ranks' agreement check:
        one all-reduce of 7 scalars, one host sync.

        Agreement: each rank adds (h, h*h) for three 12-bit hashes h of
        :meth:`_agreement`; all h are equal iff N * sum(h*h) == sum(h)**2
        (zero variance), exact in float64 for up to 4096 ranks."""
        self.grads.reduce()
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for chunks in self.grads.chunks:
            for g in chunks:
                sq += g.float().pow(2).sum()
        agreement = self._agreement()
        hashes = _hash_parts(repr(sorted(agreement.items())))
        vec = torch.tensor([0.0] + [x for h in hashes for x in (h, h * h)],
                           dtype=torch.float64, device=self.device)
        vec[0] = sq
        comm.all_reduce_sum(vec, self.process_group)
        sums = vec.tolist()
        n = self.world_size
        if any(n * sums[2 + 2 * j] != sums[1 + 2 * j] ** 2 for j in range(3)):
            _raise_if_ranks_differ(
                comm.all_gather_objects(agreement, self.process_group),
                "set learning rates, step schedulers and load weights on every rank alike",
                "at step()")
        return math.sqrt(sums[0]) / self.world_size

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
    def _sync_hyper_in(self) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update(_hyper(outer))

    def _sync_hyper_out(self) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            outer.update(_hyper(inner))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        self._check_frozen()
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
        self.adopt_model_writes()
        if self._clip_coef is None:
            self._grad_norm = self._global_norm()
            if self.max_norm is not None:
                self._clip_coef = min(1.0, self.max_norm / (self._grad_norm + 1e-6))
        self.last_step_skipped = not math.isfinite(self._grad_norm)
        if self.last_step_skipped:  # every rank sees the same all-reduced norm
            self.skipped_steps += 1
        else:
            grad_scale = (self._clip_coef or 1.0) / self.world_size
            if self.staging is not None:
                self.staging.grads_to_host()
            self.inner.step(grad_scale=grad_scale)
            if self.staging is not None:
                self.staging.outs_to_device()
            self.weights.gather(self.process_group)
            self._sync_hyper_out()
        self._user_changed.clear()
        self.zero_grad()
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
        self.adopt_model_writes()
        self._sync_hyper_in()
        fn()
        if self.staging is not None:
            # The host y is the truth: the staging copies of y hold what the
            # last *step* wrote (nothing before the first step), and a switch
            # writes no staging copy where it changes nothing (no z yet, the
            # mode it already had), so they may be stale or uninitialized.
            self.weights.master_to_model()
        self.weights.gather(self.process_group)
        self._sync_hyper_out()

    def eval(self) -> None:
        """y -> x on the master shard, then all-gather: the model holds x."""
        self._switch("eval")

    def train(self) -> None:
        """x -> y on the master shard, then all-gather: the model holds y."""
        self._switch("train")

    # -------------------------------------------------------- checkpoints
    def shard_pieces(self, *, y: bool = False, joined: Optional[dict] = None):
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
        from ..spec import join_master

        for bi, buf in enumerate(self.buffers):
            for bk, (b, y_chunk) in enumerate(zip(buf.buckets, self.weights.y_chunks[bi])):
                a0, a1 = b.chunk_range(self.rank)
                state = self.inner.state.get(y_chunk, {})
                master = y_chunk if (y or self.weights.master[bi] is not None) else None
                if self.master_weights == "remainder":
                    rem = state.get("remainder")
                    master = (join_master(y_chunk, rem) if rem is not None
                              else y_chunk.float())
                    if joined is not None:
                        joined[(bi, bk)] = master
                for slot in b.slots:
                    lo, hi = max(a0, slot.offset), min(a1, slot.offset + slot.numel)
                    if lo >= hi:
                        continue
                    cut = slice(lo - a0, hi - a0)
                    tensors = {k: v[cut] for k, v in state.items()
                               if torch.is_tensor(v) and v.shape == y_chunk.shape
                               and k != "remainder"}
                    if master is not None:
                        tensors["master"] = master[cut]
                    yield slot.index, lo - slot.offset, hi - lo, tensors

    @torch.no_grad()
    def store_master(self, joined: dict) -> None:
        """Split the fp32 y that :meth:`shard_pieces` joined (and a checkpoint
        load wrote) back into the bf16 chunks and their remainders."""
        from ..spec import split_master

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
        self._sync_hyper_in()  # what param_groups hold now (a scheduler's lr), not the last step's
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
            out.append({"group": {k: host_float(v) for k, v in group.items() if k not in _HYPER_SKIP},
                        "per_param": per_param})
        return out

    def load_scalar_state(self, scalars: list[dict[str, Any]]) -> None:
        for group, saved in zip(self.inner.param_groups, scalars):
            for k, v in saved["group"].items():  # JSON turned tuples (betas) into lists
                if k in KEEP_ON_LOAD:  # this optimizer's storage format, not the saved one
                    continue
                group[k] = tuple(v) if isinstance(v, list) and isinstance(group.get(k), tuple) else v
            for y in group["params"]:
                self.inner.state[y].update(saved["per_param"])
                self.inner.import_param_state(self.inner.state[y])
        self._sync_hyper_out()

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict[str, Any]:
        """The unsharded state dict of ``optimizer_class`` for these params,
        on every rank (collective).  ``zero_sf.ScheduleFreeAdamW`` (and
        ``schedulefree.AdamWScheduleFree``) load it directly."""
        self.adopt_model_writes()  # weights written since the last step are y
        full: dict[int, dict[str, Any]] = {}
        scalars = self.scalar_state()
        for bi, buf in enumerate(self.buffers):
            keys = sorted({k for y in self.weights.y_chunks[bi] for k, v in self.inner.state.get(y, {}).items()
                           if torch.is_tensor(v) and v.shape == y.shape})
            for b, y in zip(buf.buckets, self.weights.y_chunks[bi]):
                for key in keys:
                    chunk = self.inner.state[y][key]
                    # (offloaded state is on the host: gathered through the comm device)
                    whole = torch.empty(b.numel, dtype=chunk.dtype, device=self.device)
                    comm.all_gather(whole, chunk.contiguous().to(self.device), self.process_group)
                    for slot in b.slots:
                        p = self._params[slot.index]
                        part = whole[slot.offset - b.start:slot.offset - b.start + slot.numel]
                        full.setdefault(slot.index, {})[key] = part.view_as(p).clone()
            for slot in buf.slots:
                if slot.index in full:  # host scalars (RMSProp's step), in the inner format
                    full[slot.index] = self.inner.export_param_state(self.inner.import_param_state(
                        {**full[slot.index], **scalars[buf.group]["per_param"]}))
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


def _raise_if_ranks_differ(everyone: list[dict[str, Any]], fix: str, when: str) -> None:
    """ValueError naming the first entry on which a rank differs from rank
    0, with both values (``param group 0: lr: 0.002 on rank 1, 0.001 on rank
    0``): the same message on every rank, since all see ``everyone``."""
    first = everyone[0]
    for r, theirs in enumerate(everyone):
        if theirs == first:
            continue
        key = next(k for k in list(first) + list(theirs)
                   if first.get(k, "<missing>") != theirs.get(k, "<missing>"))
        raise ValueError(
            f"ZeroOptimizer: ranks differ {when}: {key}: {theirs.get(key, '<missing>')} on "
            f"rank {r}, {first.get(key, '<missing>')} on rank 0; {fix}")


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


def ZeroScheduleFreeAdamW(params, *, stage: int = 2, process_group=None, **kwargs) -> ZeroOptimizer:
    """``ZeroOptimizer(params, ScheduleFreeAdamW, ...)``."""
    return ZeroOptimizer(params, ScheduleFreeAdamW, stage=stage, process_group=process_group, **kwargs)
