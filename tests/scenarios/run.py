"""Run a scenario on an engine and on the single-process reference, side by
side in every rank, and compare after every operation.

The reference is the single-device zero_sf optimizer of the same rule,
options and backend, on a fp32 copy of the weights where the engine keeps a
fp32 master (ZeroOptimizer and DeepSpeed on bf16 parameters), or on the
model's own dtype where the engine does not (FSDP2's shards, a single
device, ``master_weights="remainder"``).  It computes every rank's
gradient itself, on a copy of the model holding its own weights, and is fed
the sum the engine is documented to compute:

* ZeroOptimizer stage 1: each rank's backward passes summed in the model's
  dtype, then summed over ranks (``reduce_scatter``), then the update's
  ``grad_scale`` = clip coefficient / N;
* stage 2: each backward pass summed over ranks, the passes added;
* FSDP2: each backward pass averaged over ranks, the passes added;
* a single device: the passes summed.

When every rank sees the same data, a sum of N equal terms rounds the same
in any order, so the comparison is bit for bit (the README's promise);
with data that differs per rank the order of the sum is the collective's,
and the comparison has a tolerance (``TOLERANCE``).  Clipping under
ZeroOptimizer takes the engine's own norm for the coefficient (its sum runs
in another order) and checks that norm against the reference's separately.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import traceback
from typing import Any, Optional

import torch
import torch.distributed as dist

import zero_sf

from . import models as M
from .generate import Scenario

LR, WD = 3e-3, 0.05
#: max |engine - reference| / max |reference| where sums run in another order
#: (data that differs per rank, DeepSpeed's own reduction, clipping by a norm
#: summed elsewhere): measured at most 4e-6 (fp32) and 2 bf16 ulps (bf16) on
#: these scenarios; a rank's gradient dropped, doubled or swapped with
#: another's moves the weights by 1e-2 or more.
TOLERANCE = {"fp32": 2e-4, "bf16": 2 ** -5, "bf16+fp32norms": 2 ** -5}


def _rule(sc: Scenario):
    # Where the comparison is not bit for bit (Scenario.exact: a clipping
    # norm summed in the engine's order, ZeRO-3's gradients) and the exact
    # gradient is 0 (BERT's and GPT-2's attention key bias: softmax ignores
    # it), eps=1e-8 would turn last-bit noise into full +-lr steps that
    # differ between the two (deepspeed seeds 5113 at stage 3, 7182 at 1)
    eps = {} if sc.exact() else {"eps": 1e-4}
    if sc.rule == "sf":
        return zero_sf.ScheduleFreeAdamW, dict(betas=(0.9, 0.99), warmup_steps=2, **eps)
    return zero_sf.RMSProp, dict(alpha=0.99, bias_correction=True, **eps)


def _storage(sc: Scenario) -> dict:
    kw: dict[str, Any] = dict(backend=sc.backend)
    if sc.state_dtype:
        kw["state_dtype"] = getattr(torch, sc.state_dtype)
    return kw


def _optimizer(sc: Scenario, groups: list):
    """The single-device optimizer of the scenario (and its LR scheduler):
    the reference's, and what the single and FSDP2 engines train with."""
    cls, kw = _rule(sc)
    extra = dict(master_weights="remainder") if sc.master_weights == "remainder" else {}
    opt = cls(groups, **kw, **_storage(sc), **extra)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _schedule) if sc.scheduler else None


def _schedule(step: int) -> float:
    return 1.0 / (1.0 + 0.3 * step)


def _build_model(sc: Scenario, init_seed: int):
    model = M.to_dtype(M.build(sc.model, init_seed), sc.dtype)
    if sc.freeze_first:
        next(model.parameters()).requires_grad_(False)
    return model


# ----------------------------------------------------------------- reference
def _stale(opt, p) -> bool:
    """Whether ``p`` was written since ``opt``'s last write: its remainder no
    longer applies (ElementwiseOptimizer._written_since_our_step)."""
    return (not opt._writes_tracked_outside
            and opt._versions.get(id(p), p._version) != p._version)


class Reference:
    """The single-process run the engine must reproduce."""

    def __init__(self, sc: Scenario, init_seed: int):
        self.sc = sc
        self.model = _build_model(sc, init_seed)
        if sc.engine != "single":
            # The sharded engines' parameters are views of contiguous flat
            # buffers (a channels_last conv weight among them), and the
            # layout changes the bits of every gradient downstream.
            for p in self.model.parameters():
                p.data = p.data.contiguous()
        self.named = list(self.model.named_parameters())
        keeps_master = sc.engine == "deepspeed" or (sc.engine == "zero" and sc.master_weights == "fp32")
        self.opt_param = {}
        for n, p in self.named:
            if keeps_master and p.dtype != torch.float32:
                self.opt_param[n] = p.detach().float().clone().requires_grad_(p.requires_grad)
            else:
                self.opt_param[n] = p
        groups = M.param_groups(self.model, sc.grouping, lr=LR, weight_decay=WD)
        for g in groups:
            # ZeroOptimizer's flat-buffer order (within a group by dtype, first
            # appearance first), which numbers the stochastic rounding's elements
            order = list(dict.fromkeys(p.dtype for p in g["params"] if p.requires_grad))
            pairs = sorted(zip(g["params"], g["param_names"]),
                           key=lambda pn: order.index(pn[0].dtype) if pn[0].dtype in order else 0)
            g["params"] = [self.opt_param[n] for _, n in pairs]
            g["param_names"] = [n for _, n in pairs]
        self.opt, self.sched = _optimizer(sc, groups)

    # what the model holds: the optimizer's values in the model's dtype
    @torch.no_grad()
    def sync_model(self) -> None:
        for n, p in self.named:
            q = self.opt_param[n]
            if q is not p:
                p.copy_(q)

    def values(self) -> list[torch.Tensor]:
        self.sync_model()
        return [p.detach() for _, p in self.named]

    def _grads(self, step: int, passes: int, world: int) -> list[list[list[Optional[torch.Tensor]]]]:
        """[pass][rank][param] gradients, in the model's dtype."""
        self.sync_model()
        ranks = [-1] if self.sc.data == "same" else list(range(world))
        out = []
        for micro in range(passes):
            row = []
            for r in ranks:
                self.model.zero_grad(set_to_none=True)
                M.loss(self.sc.model, self.model, M.batch(self.sc.model, self.sc.seed, step, micro, r)).backward()
                row.append([None if p.grad is None else p.grad.detach().clone() for _, p in self.named])
            out.append(row * (world if self.sc.data == "same" else 1))
        self.model.zero_grad(set_to_none=True)
        return out

    def feed(self, step: int, passes: int, zero_between: bool, world: int) -> float:
        """Set the optimizer's gradients to what the engine reduces; returns
        the 2-norm of the averaged gradient."""
        grads = self._grads(step, passes, world)
        if zero_between:
            grads = grads[1:]
        engine, stage = self.sc.engine, self.sc.stage

        def ranks(terms):  # a sum over ranks: N equal terms round once, in any order
            if self.sc.data == "same" and len(terms) > 1:
                return (terms[0].float() * len(terms)).to(terms[0].dtype)
            return passes_(terms)

        def passes_(terms):  # accumulated one after the other, in the model's dtype
            acc = terms[0].clone()
            for t in terms[1:]:
                acc += t
            return acc

        sq = 0.0
        for i, (n, _) in enumerate(self.named):
            if grads[0][0][i] is None:
                continue
            each = range(len(grads))
            if engine == "zero" and stage == 1:
                g = ranks([passes_([grads[k][r][i] for k in each]) for r in range(world)])
            elif engine == "zero":
                g = passes_([ranks([grads[k][r][i] for r in range(world)]) for k in each])
            elif engine in ("fsdp2", "deepspeed"):  # averaged by the engine (exact: N = 2)
                g = passes_([ranks([grads[k][r][i] for r in range(world)]) / world for k in each])
            else:
                g = passes_([grads[k][0][i] for k in each])
            q = self.opt_param[n]
            q.grad = g.to(q.dtype) if q.dtype == torch.float32 else g
            scale = world if engine == "zero" else 1
            sq += (g.double() / scale).square().sum().item()
        return math.sqrt(sq)

    def step(self, grad_scale: float) -> None:
        self.opt.step(grad_scale=grad_scale)
        self.opt.zero_grad(set_to_none=True)
        self.after_step()

    def after_step(self) -> None:
        if self.sched is not None:
            self.sched.step()
        self.sync_model()

    def switch(self, mode: str) -> None:
        getattr(self.opt, mode)()
        self.sync_model()

    @torch.no_grad()
    def load_weights(self, sd: dict) -> None:
        """``model.load_state_dict`` as the engine's optimizer takes it: the
        loaded values become y; with a fp32 master, elements whose fp32 y
        still rounds to the loaded value keep their low bits."""
        self.sync_model()
        self.model.load_state_dict(sd)
        for n, p in self.named:
            q = self.opt_param[n]
            if q is not p:
                touched = p != q.to(p.dtype)
                q.copy_(torch.where(touched, p.float(), q))

    def snapshot(self):
        # which remainders were stale (weights written since the optimizer's
        # last write): a deep copy's tensors have other ids and versions
        stale = [_stale(self.opt, self.opt_param[n]) for n, _ in self.named]
        return copy.deepcopy((self.model, self.named, self.opt_param, self.opt, self.sched)), stale

    def restore(self, snap) -> None:
        snap, stale = snap
        self.model, self.named, self.opt_param, self.opt, self.sched = copy.deepcopy(snap)
        self.opt._versions = {id(q): q._version - (1 if s else 0)
                              for (n, _), s in zip(self.named, stale) for q in [self.opt_param[n]]}

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """The optimizer tensors of one parameter, flat: y (fp32) and its state."""
        q = self.opt_param[name]
        st = {k: v.reshape(-1) for k, v in self.opt.state.get(q, {}).items()
              if torch.is_tensor(v) and v.dim() > 0 and k != "remainder"}
        rem = self.opt.state.get(q, {}).get("remainder")
        if rem is not None and _stale(self.opt, q):
            rem = None  # weights written since the last step are y (the next step zeroes it)
        y = zero_sf.storage.join_master(q.detach(), rem) if rem is not None else q.detach().float()
        st["master"] = y.reshape(-1)
        return st


# ------------------------------------------------------------------- engines
class Engine:
    """One way users train: build, backward, step, switch, save, load."""

    def __init__(self, sc: Scenario, ctx, world: int, init_seed: int, model=None):
        self.sc, self.ctx, self.world = sc, ctx, world
        self.group = ctx.groups[world]
        self.model = model if model is not None else _build_model(sc, init_seed)
        self.named = list(self.model.named_parameters())

    def backward(self, step: int, passes: int, zero_between: bool, inf: bool = False) -> None:
        rank = self.ctx.rank if self.sc.data == "distinct" else -1
        for micro in range(passes):
            loss = M.loss(self.sc.model, self.model, M.batch(self.sc.model, self.sc.seed, step, micro, rank))
            if inf:  # a non-finite gradient on this rank
                first = next(p for _, p in self.named if p.requires_grad)
                loss = loss + float("inf") * first.float().sum()
            self._backward(loss)
            if zero_between and micro == 0:
                self.zero_grad()

    def _backward(self, loss) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def values(self) -> list[torch.Tensor]:
        return [p.detach() for _, p in self.named]

    def switch(self, mode: str) -> None:
        getattr(self.opt, mode)()

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr


class Single(Engine):
    def __init__(self, sc, ctx, world, init_seed, model=None):
        super().__init__(sc, ctx, world, init_seed, model)
        self.opt, self.sched = _optimizer(
            sc, M.param_groups(self.model, sc.grouping, lr=LR, weight_decay=WD))

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad()
        if self.sched is not None:
            self.sched.step()

    def save(self, path: str) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict() if self.sched else None},
                   os.path.join(path, "ckpt.pt"))

    def load(self, path: str, sched_state=None) -> None:
        ck = torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)
        self.model.load_state_dict(ck["model"])  # the model first, as the Trainer does
        self.opt.load_state_dict(ck["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(ck["scheduler"])

    def state(self, name: str) -> dict[str, torch.Tensor]:
        p = dict(self.named)[name]
        st = {k: v.reshape(-1) for k, v in self.opt.state.get(p, {}).items()
              if torch.is_tensor(v) and v.dim() > 0 and k != "remainder"}
        rem = self.opt.state.get(p, {}).get("remainder")
        if rem is not None and _stale(self.opt, p):
            rem = None  # as the Reference's
        st["master"] = (zero_sf.storage.join_master(p.detach(), rem) if rem is not None
                        else p.detach().float()).reshape(-1)
        return st


class Zero(Engine):
    def __init__(self, sc, ctx, world, init_seed, model=None):
        super().__init__(sc, ctx, world, init_seed, model)
        cls, kw = _rule(sc)
        groups = M.param_groups(self.model, sc.grouping, lr=LR, weight_decay=WD)
        self.index_name = [n for g in groups for n in g["param_names"]]
        self.opt = zero_sf.ZeroOptimizer(
            groups, cls, stage=sc.stage, process_group=self.group, bucket_numel=sc.bucket_numel,
            align=sc.align, max_norm=sc.max_norm, offload="cpu" if sc.offload else None,
            master_weights=sc.master_weights, **kw, **_storage(sc),
            **(dict(overlap_param_gather=True, model=self.model) if sc.overlap else {}))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule) if sc.scheduler else None

    def values(self) -> list[torch.Tensor]:
        # Reads outside a forward wait first, as users must (README); the
        # next op then finds the gathers done (tests/sharding/test_prefetch.py
        # covers reads and writes while they are pending).
        self.opt.finish_param_gather()
        return super().values()

    def step(self) -> None:
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def save(self, path: str) -> None:
        zero_sf.save(path, self.model, self.opt)
        self.saved_sched = self.sched.state_dict() if self.sched else None

    def load(self, path: str, sched_state=None) -> None:
        zero_sf.load(path, self.model, self.opt)
        if self.sched is not None:
            self.sched.load_state_dict(sched_state)

    def pieces(self):
        """(name, start, length, tensors) of this rank's shard."""
        self.opt.sharded_state.adopt_model_writes()  # weights loaded since the last step are y
        for index, start, length, tensors in self.opt.sharded_state.shard_pieces(y=True):
            yield self.index_name[index], start, length, tensors


class FSDP2(Engine):
    def __init__(self, sc, ctx, world, init_seed, model=None):
        super().__init__(sc, ctx, world, init_seed, model)
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(self.group, "cpu")
        for p in self.model.parameters():  # FSDP2 refuses non-contiguous (channels_last) ones
            p.data = p.data.contiguous()
        for unit in _blocks(self.model):
            fully_shard(unit, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.named = list(self.model.named_parameters())  # the sharded DTensors
        self.opt, self.sched = _optimizer(
            sc, M.param_groups(self.model, sc.grouping, lr=LR, weight_decay=WD))

    def step(self) -> None:
        if self.sc.max_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named], self.sc.max_norm)
        self.opt.step()
        self.opt.zero_grad()
        if self.sched is not None:
            self.sched.step()

    def values(self) -> list[torch.Tensor]:
        return [p.full_tensor() for _, p in self.named]  # collective: every rank, same order

    def _state_dicts(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        return {"model": msd, "optim": osd}

    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state_dicts(), checkpoint_id=path, process_group=self.group)
        self.saved_sched = self.sched.state_dict() if self.sched else None

    def load(self, path: str, sched_state=None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sd = self._state_dicts()
        dcp.load(sd, checkpoint_id=path, process_group=self.group)
        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        if self.sched is not None:
            self.sched.load_state_dict(sched_state)

    def load_weights(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict)

        set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True))

    def pieces(self):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        for name, p in self.named:
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            row = math.prod(p.shape[1:]) if p.dim() > 0 else 1
            local = p.to_local().reshape(-1)
            if local.numel() == 0:
                continue
            st = self.opt.state.get(p, {})
            tensors = {k: v.to_local().reshape(-1) for k, v in st.items()
                       if k != "remainder" and hasattr(v, "to_local") and v.dim() > 0}
            rem = st.get("remainder")
            tensors["master"] = (zero_sf.storage.join_master(local, rem.to_local().reshape(-1))
                                 if rem is not None else local.float())
            yield name, offset[0] * row, local.numel(), tensors


def _blocks(model) -> list:
    """The units FSDP2 users wrap: transformer blocks (or the synthetic
    model's linear layers)."""
    for path in ("transformer.h", "model.layers", "bert.encoder.layer"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    return [model.inp, model.head]


class DeepSpeed(Engine):
    def __init__(self, sc, ctx, world, init_seed, model=None):
        super().__init__(sc, ctx, world, init_seed, model)
        import zero_sf.deepspeed as zsd

        # DeepSpeed's bf16 casts the parameters, not the buffers (a float32
        # buffer then makes the forward fp32): cast it all, as users do
        self.model = M.to_dtype(M.build(sc.model, init_seed), sc.dtype)
        for p in self.model.parameters():  # zsd.initialize refuses channels_last ones
            p.data = p.data.contiguous()
        if sc.freeze_first:
            next(self.model.parameters()).requires_grad_(False)
        cls, kw = _rule(sc)
        name = "ScheduleFreeAdamW" if sc.rule == "sf" else "ZeroSFRMSProp"
        params = dict(kw, lr=LR, weight_decay=WD, backend=sc.backend)
        if sc.state_dtype:
            params["state_dtype"] = sc.state_dtype
        zero: dict[str, Any] = {"stage": sc.stage}
        if sc.stage == 3:
            zero.update(sub_group_size=sc.sub_group_size,
                        stage3_param_persistence_threshold=sc.persistence)
        if sc.offload:
            zero["offload_optimizer"] = {"device": "cpu"}
        cfg = {"train_micro_batch_size_per_gpu": M.BATCH, "gradient_accumulation_steps": 1,
               "zero_optimization": zero, "gradient_clipping": sc.max_norm or 0.0,
               "bf16": {"enabled": sc.dtype == "bf16"}, "steps_per_print": 10 ** 9,
               "optimizer": {"type": name, "params": params}}
        groups = M.param_groups(self.model, sc.grouping, lr=LR, weight_decay=WD)
        for g in groups:
            g.pop("param_names")
        sched = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _schedule)) if sc.scheduler else None
        self.engine, *_ = zsd.initialize(model=self.model, model_parameters=groups, config=cfg,
                                         lr_scheduler=sched)
        self.named = list(self.engine.module.named_parameters())
        self.zsd = zsd

    def _backward(self, loss) -> None:
        self.engine.backward(loss)

    def values(self) -> list[torch.Tensor]:
        if self.sc.stage != 3:
            return super().values()
        import deepspeed  # ZeRO-3: the partitioned parameters gathered (collective)

        params = [p for _, p in self.named]
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]

    def backward(self, step, passes, zero_between, inf=False):
        rank = self.ctx.rank if self.sc.data == "distinct" else -1
        for micro in range(passes):
            data = M.batch(self.sc.model, self.sc.seed, step, micro, rank)
            self.engine.backward(M.loss(self.sc.model, self.engine.module, data))

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def step(self) -> None:
        self.engine.step()

    def switch(self, mode: str) -> None:
        getattr(self.zsd, mode)(self.engine)

    def save(self, path: str) -> None:
        self.engine.save_checkpoint(path)

    def load(self, path: str, sched_state=None) -> None:
        self.zsd.load_checkpoint(self.engine, path)


ENGINES = {"single": Single, "zero": Zero, "fsdp2": FSDP2, "deepspeed": DeepSpeed}


# ---------------------------------------------------------------- comparison
def _differ(got: torch.Tensor, want: torch.Tensor, exact: bool, dtype: str) -> Optional[str]:
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    if exact:
        if torch.equal(got, want):
            return None
        bad = (got.float() != want.float()).sum().item()
        err = (got.double() - want.double()).abs().max().item()
        return f"{bad} of {got.numel()} elements differ (max {err:.3g})"
    if not torch.isfinite(got).all():
        return "non-finite values"
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-3)
    if err > TOLERANCE[dtype] * scale:
        return f"max |diff| {err:.3g} > {TOLERANCE[dtype]:.3g} x {scale:.3g}"
    return None


class Failures(list):
    """The first few mismatches.  A rank goes on through every operation
    after a mismatch (the others wait for it in collectives)."""

    LIMIT = 4

    def append(self, what: str) -> None:
        if len(self) < self.LIMIT:
            super().append(what)

    def check(self, what: str, got, want, exact: bool, dtype: str) -> None:
        if len(self) < self.LIMIT:
            problem = _differ(got, want, exact, dtype)
            if problem:
                self.append(f"{what}: {problem}")


def _compare_values(fail: Failures, engine: Engine, ref: Reference, sc: Scenario, where: str) -> None:
    for (name, _), got, want in zip(engine.named, engine.values(), ref.values()):
        fail.check(f"{where}: parameter {name}", got, want, sc.exact(), sc.dtype)


def _compare_state(fail: Failures, engine: Engine, ref: Reference, sc: Scenario) -> None:
    if hasattr(engine, "pieces"):
        pieces = engine.pieces()
    elif hasattr(engine, "state"):
        pieces = ((n, 0, p.numel(), engine.state(n)) for n, p in engine.named if p.requires_grad)
    else:
        pieces = ()
    for name, start, length, tensors in pieces:
        want = ref.state(name)
        for key, t in tensors.items():
            if key not in want:
                fail.append(f"end: state {key!r} of {name} is not in the reference's")
                continue
            fail.check(f"end: {key} of {name}[{start}:{start + length}]", t.reshape(-1),
                       want[key][start:start + length], sc.exact(), sc.dtype)
    if sc.rule == "sf":
        groups = (engine.zsd._basic_optimizer(engine.engine).param_groups
                  if isinstance(engine, DeepSpeed) else engine.opt.param_groups)
        ks = {g["k"] for g in groups}
        if ks != {g["k"] for g in ref.opt.param_groups}:
            fail.append(f"end: k {ks} vs the reference's {ref.opt.param_groups[0]['k']}")


# ------------------------------------------------------------------- running
class Ctx:
    """What a rank of the pool knows: its rank, a process group per world
    size (ranks 0..w-1), and a directory every rank can reach."""

    def __init__(self, rank: int, groups: dict, root: str):
        self.rank, self.groups, self.root = rank, groups, root


def _barrier(ctx: Ctx, world: int) -> None:
    if world > 1:
        dist.barrier(group=ctx.groups[world])


def _snapshot_engine(engine: Engine) -> list[torch.Tensor]:
    return [v.clone() for v in engine.values()]


def _run_ops(sc: Scenario, ctx: Ctx, fail: Failures) -> None:
    world = sc.world
    rank = ctx.rank
    path = os.path.join(ctx.root, f"s{sc.seed}")
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    _barrier(ctx, sc.ranks_needed)
    ref = Reference(sc, init_seed=sc.seed)
    engine = ENGINES[sc.engine](sc, ctx, world, init_seed=sc.seed) if rank < world else None
    if engine is not None:
        _compare_values(fail, engine, ref, sc, "after construction")
    step = 0
    saved = None
    for i, op in enumerate(sc.ops):
        where = f"op {i} {op}"
        kind = op[0]
        active = engine is not None
        if kind in ("train", "eval"):
            ref.switch(kind)
            if active:
                engine.switch(kind)
        elif kind in ("step", "nonfinite"):
            passes, zero_between = (op[1], op[2]) if kind == "step" else (1, False)
            norm = ref.feed(step, passes, zero_between, world)
            if active:
                # the drawn rank of the job that runs now (a resharded job
                # may have fewer ranks than the one the op was drawn for)
                engine.backward(step, passes, zero_between,
                                inf=kind == "nonfinite" and op[1] % world == rank)
                engine.step()
            if kind == "nonfinite":
                if active and not engine.opt.last_step_skipped:
                    fail.append(f"{where}: the step with a non-finite gradient was not skipped")
                ref.opt.zero_grad(set_to_none=True)
                ref.after_step()
            else:
                scale = 1.0 / world if sc.engine == "zero" else 1.0
                if sc.engine == "zero" and sc.max_norm is not None:
                    # the engine's norm (rank 0's: ranks a resharded job adds
                    # later keep the same reference) for the coefficient
                    got = _share(ctx, sc, engine.opt.grad_norm if active else None)
                    if not math.isclose(got, norm, rel_tol=1e-5, abs_tol=1e-12):
                        fail.append(f"{where}: gradient norm {got!r}, the reference's {norm!r}")
                    scale = min(1.0, sc.max_norm / (got + 1e-6)) / world
                elif sc.engine == "deepspeed" and sc.max_norm is not None:
                    # DeepSpeed's coefficient from its own norm (summed in its
                    # order: compared with a tolerance, Scenario.exact)
                    scale = min(1.0, sc.max_norm / (norm + 1e-6))
                ref.step(grad_scale=scale)
            step += 1
        elif kind == "load_weights":
            sd = M.to_dtype(M.build(sc.model, sc.seed + 7919), sc.dtype).state_dict()
            ref.load_weights(sd)
            if active:
                (engine.load_weights(sd) if hasattr(engine, "load_weights")
                 else engine.model.load_state_dict(sd))
        elif kind == "save":
            saved = ref.snapshot()
            if active:
                engine.save(path)
            _barrier(ctx, sc.ranks_needed)
        elif kind == "load":
            ref.restore(saved)
            sched_state = getattr(engine, "saved_sched", None) if active else None
            if sc.reshard_to is not None:  # a new job at another world size resumes
                sched_state = _share(ctx, sc, sched_state)
                world = sc.reshard_to
                engine = (ENGINES[sc.engine](sc, ctx, world, init_seed=sc.seed + 1)
                          if rank < world else None)
            if engine is not None:
                engine.load(path, sched_state)
        else:
            raise ValueError(f"unknown operation {op!r}")
        if engine is not None:
            _compare_values(fail, engine, ref, sc, where)
    if engine is not None:
        _compare_state(fail, engine, ref, sc)


def _share(ctx: Ctx, sc: Scenario, obj):
    """Rank 0's object to every rank of the scenario (the scheduler state a
    resumed job reads from the checkpoint's side file)."""
    out = [obj]
    if sc.ranks_needed > 1:
        dist.broadcast_object_list(out, src=0, group=ctx.groups[sc.ranks_needed])
    return out[0]


def _run_misuse(sc: Scenario, ctx: Ctx, fail: Failures) -> None:
    """Run up to the mistake; it must raise ``sc.expect`` with nothing changed."""
    kind, text = sc.expect.split(": ", 1)
    world, rank = sc.world, ctx.rank
    if rank >= world:
        return
    raised = None
    before = None
    try:
        if not sc.ops:  # a mistake at construction
            model = _build_model(sc, sc.seed)
            before = [p.detach().clone() for p in model.parameters()]
            wrapped = (torch.nn.parallel.DistributedDataParallel(model, process_group=ctx.groups[world])
                       if "DistributedDataParallel" in text else model)
            ENGINES[sc.engine](sc, ctx, world, sc.seed, model=model)
            del wrapped
        else:
            engine = ENGINES[sc.engine](sc, ctx, world, init_seed=sc.seed)
            step = 0
            for op in sc.ops:
                if op[0] in ("train", "eval"):
                    engine.switch(op[0])
                    continue
                # values(): reads outside a forward wait for an overlapped gather
                before = ([v.clone() for v in engine.values()],
                          copy.deepcopy(engine.opt.state_dict()) if sc.engine == "single" else None)
                if op[0] == "step":
                    engine.backward(step, op[1], op[2])
                    engine.step()
                    step += 1
                elif op[0] == "unfreeze":
                    next(p for _, p in engine.named).requires_grad_(True)
                elif op[0] == "lr_one_rank":
                    if rank == world - 1:
                        engine.set_lr(LR * 2)
                elif op[0] == "load_one_rank":
                    if rank == 0:
                        engine.model.load_state_dict(
                            M.to_dtype(M.build(sc.model, sc.seed + 7919), sc.dtype).state_dict())
                        before = ([v.clone() for v in engine.values()], None)
                elif op[0] == "foreign_state":  # another run's AdamW, same model
                    copies = [p.detach().clone().requires_grad_() for _, p in engine.named
                              if p.requires_grad]
                    other = torch.optim.AdamW(copies)
                    for p in copies:
                        p.grad = torch.ones_like(p)
                    other.step()
                    engine.opt.load_state_dict(other.state_dict())
    except Exception as e:  # noqa: BLE001 - compared with the expectation below
        raised = e
    if raised is None:
        fail.append(f"expected {sc.expect!r}, nothing was raised")
        return
    if type(raised).__name__ != kind or text not in str(raised):
        fail.append(f"expected {sc.expect!r}, got {type(raised).__name__}: {str(raised)[:300]}")
        return
    if sc.ops and before is not None:
        for (name, _), v, b in zip(engine.named, engine.values(), before[0]):
            if not torch.equal(v, b):
                fail.append(f"{name} changed although {kind} was raised")
        if before[1] is not None and repr(engine.opt.state_dict()) != repr(before[1]):
            fail.append("the optimizer's state changed although the load was refused")
    elif before is not None:  # (FSDP2's fully_shard made them DTensors: compare in full)
        for p, b in zip(model.parameters(), before):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            if not torch.equal(full, b):
                fail.append("a parameter changed although construction was refused")


def run_scenario(sc: Scenario, ctx: Ctx) -> list[str]:
    """This rank's failures (empty: the scenario passed here)."""
    if ctx.rank >= sc.ranks_needed:
        return []
    fail = Failures()
    torch.manual_seed(sc.seed)
    try:
        if sc.expect:
            _run_misuse(sc, ctx, fail)
        else:
            _run_ops(sc, ctx, fail)
    except Exception:  # noqa: BLE001 - a failure of the scenario, reported with its seed
        fail.append("raised: " + traceback.format_exc(limit=8).strip().splitlines()[-1]
                    + "\n" + "".join(traceback.format_exc(limit=8)))
    return list(fail)
