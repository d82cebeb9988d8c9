"""zero_sf optimizers under DeepSpeed ZeRO-3 (docs/design.md §6).

What stage 3 does to a client optimizer (DeepSpeed 0.19's
``DeepSpeedZeroOptimizer_Stage3``): every param group is split into
sub-groups of ~``sub_group_size`` elements, each with one flat fp32
partition (this rank's slice of each of its parameters, one after the
other: parameter j contributes ``ceil(numel_j / N)`` elements, the last
rank's zero-padded).  The client's ``param_groups[i]["params"]`` are emptied;
``step()`` is called once per sub-group with that group's params set to
the sub-group's partition.  Between steps nothing is in the groups, and the
model's weights live in the low-precision partitions ``p.ds_tensor``
(views of one flat buffer per sub-group), gathered by hooks at each
module's forward -- except *persistent* parameters (below
``stage3_param_persistence_threshold``), which stay gathered.

So: the step's group scalars advance once per engine step
(:mod:`zero_sf.optim.split_step`, with :func:`is_partition` as its rule);
a train()/eval() switch binds every sub-group partition to its group
(:meth:`Stage3.bound`), moves y <-> x there, and refreshes the model as the
end of DeepSpeed's own step does (:meth:`Stage3.refresh_model`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import Tensor

from ..export import GATHER_FOR_STATE_DICT
from ..layout import element_numbering
from ..optim._base import ElementwiseOptimizer
from ..optim.split_step import SPLIT_STEP_PARTS
from ..storage import state_dtype_for

__all__ = ["is_partition", "is_stage3_optimizer", "Stage3"]


def is_partition(t: Tensor) -> bool:
    """A ZeRO-3 sub-group's fp32 partition: DeepSpeed names it by the ids of
    its first and last parameter (``ds_id = "3_7"``, a string; the model's
    partitioned parameters have integer ``ds_id``)."""
    return isinstance(getattr(t, "ds_id", None), str)


if is_partition not in SPLIT_STEP_PARTS:
    SPLIT_STEP_PARTS.append(is_partition)


def gathered(module: torch.nn.Module):
    """For :func:`zero_sf.export`: a module with ZeRO-3 partitioned
    parameters (empty tensors outside a forward) gathered whole on every
    rank for the state dict (transient: the whole model per rank); None for
    other modules."""
    params = [p for p in module.parameters() if hasattr(p, "ds_status")]
    if not params:
        return None
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


if gathered not in GATHER_FOR_STATE_DICT:
    GATHER_FOR_STATE_DICT.append(gathered)

# What the adapter uses of DeepSpeedZeroOptimizer_Stage3 (checked at attach,
# so another DeepSpeed version fails clearly instead of half-switching).
_NEEDED = ("fp16_groups", "fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat",
           "sub_group_to_group_id", "persistent_parameters", "_set_fp32_optimizer_param_groups",
           "_clear_fp32_optimizer_param_groups", "_reassign_or_swap_out_partitioned_parameters",
           "_partition_all_parameters")


def is_stage3_optimizer(obj: Any) -> bool:
    return type(obj).__name__ == "DeepSpeedZeroOptimizer_Stage3"


class Stage3:
    """zero_sf's view of one ``DeepSpeedZeroOptimizer_Stage3``."""

    def __init__(self, zopt: Any) -> None:
        missing = [a for a in _NEEDED if not hasattr(zopt, a)]
        if missing:
            raise RuntimeError(
                f"this DeepSpeed's ZeRO-3 optimizer lacks {missing}, which zero_sf's "
                "ZeRO-3 support uses (tested with DeepSpeed 0.19); use ZeRO stage 1 or 2")
        self.zopt = zopt
        basic = zopt.optimizer
        if not isinstance(basic, ElementwiseOptimizer):
            raise TypeError(f"the ZeRO-3 optimizer wraps {type(basic).__name__}, "
                            "not a zero_sf optimizer")
        self.basic: ElementwiseOptimizer = basic

    @classmethod
    def of(cls, zopt: Any) -> "Stage3":
        """The adapter of ``zopt`` (one per ZeRO-3 optimizer), attached: the
        basic optimizer's train()/eval() reach the partitions and the model
        from then on, whoever calls them."""
        adapter = zopt.__dict__.get("_zero_sf_stage3")
        if adapter is None:
            adapter = cls(zopt)
            zopt.__dict__["_zero_sf_stage3"] = adapter
            adapter.basic.add_switch_binding(adapter.bound)
            adapter.basic.add_switch_hook(adapter.refresh_model)
            adapter.bind_numbering()
        return adapter

    def bind_numbering(self) -> None:
        """Number each partition's slices as the single-process optimizer
        numbers the model's elements (param groups in order, parameters in
        order: :func:`~zero_sf.layout.element_numbering`), so stochastic
        rounding of bf16 state draws the same bits at every world size.  A
        partition holds ``ceil(numel / N)`` elements of each of its
        parameters, from element ``rank * ceil(numel / N)`` on: one run each."""
        rank = self.rank
        per_group: list[list[tuple[int, int, None]]] = [[] for _ in self.basic.param_groups]
        for i in range(len(self.zopt.fp16_groups)):
            per_group[self.group_of(i)] += [(id(p), int(p.ds_numel), None)
                                            for p in self.params_of(i)]
        first = element_numbering(per_group)
        for i, part in enumerate(self.partitions):
            runs, offset = [], 0
            for p in self.params_of(i):
                size, start = p.partition_numel(), rank * p.partition_numel()
                runs.append((offset, max(0, min(size, int(p.ds_numel) - start)),
                             first[id(p)] + start))
                offset += size
            self.basic.bind(part, index_segments=runs)

    # -- the partitions --------------------------------------------------
    @property
    def rank(self) -> int:
        """This rank's index among the ranks the parameters are partitioned over."""
        import torch.distributed as dist

        return dist.get_rank(group=getattr(self.zopt, "dp_process_group", None))

    @property
    def partitions(self) -> list[Tensor]:
        """The fp32 partition of each sub-group, in sub-group order."""
        return list(self.zopt.fp32_partitioned_groups_flat)

    def group_of(self, sub_group: int) -> int:
        return int(self.zopt.sub_group_to_group_id[sub_group])

    def params_of(self, sub_group: int) -> list[Any]:
        """The model parameters whose slices make up the sub-group's partition."""
        return list(self.zopt.fp16_groups[sub_group])

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """Every sub-group's partition in its param group (DeepSpeed does the
        same around its state_dict/load_state_dict); emptied again after."""
        if any(g["params"] for g in self.basic.param_groups):  # inside a step or a save
            yield
            return
        self.zopt._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            self.zopt._clear_fp32_optimizer_param_groups()

    @torch.no_grad()
    def refresh_model(self) -> None:
        """The fp32 partitions into the model, as the end of DeepSpeed's own
        ``step()`` does: release gathered parameters, copy each sub-group's
        partition into its low-precision partition (``p.ds_tensor``),
        re-gather the persistent parameters, drop hpZ secondary copies.  The
        next forward gathers the new values."""
        z = self.zopt
        z._partition_all_parameters()
        for i in range(len(z.fp16_groups)):
            z._reassign_or_swap_out_partitioned_parameters(i)
        if len(z.persistent_parameters) > 0:
            # (the release above already makes the next forward gather them;
            # gathered now, as DeepSpeed's step leaves them, they are whole
            # outside a forward too, which DeepSpeed's own code expects)
            z.persistent_parameters[0].all_gather(z.persistent_parameters)
        if callable(getattr(z, "invalidate_secondary_tensor", None)):
            z.invalidate_secondary_tensor()

    # -- checkpoints at any world size ----------------------------------
    def param_order(self) -> list[Any]:
        """The model parameters in partition order (sub-group after
        sub-group): each rank's partitions hold their slices in this order."""
        return [p for i in range(len(self.zopt.fp16_groups)) for p in self.params_of(i)]

    @torch.no_grad()
    def load_partitions(self, saved: list[dict[str, Any]], shapes: list[torch.Size]) -> None:
        """Load every saved rank's ZeRO-3 optimizer state (``saved[r]`` is rank
        r's ``optimizer_state_dict``: ``fp32_flat_groups`` and the client's
        state dict) into this rank's partitions, at any world size: each
        parameter is put together from the saved ranks' slices and cut for
        this one.  ``shapes``: the saved parameters' shapes in partition
        order.  Checks everything before changing anything."""
        order = self.param_order()
        counts = _check_saved(saved, shapes, [p.ds_shape for p in order])
        n_sub = len(saved[0]["fp32_flat_groups"])
        states = [sd["optimizer_state_dict"]["state"] for sd in saved]
        keys = sorted({k for st in states for s in st.values() for k, v in s.items()
                       if torch.is_tensor(v) and v.dim() > 0})
        # per key (None: the fp32 weights), every parameter's whole tensor
        full = {None: _whole([torch.cat([f.reshape(-1).float() for f in sd["fp32_flat_groups"]])
                              for sd in saved], counts)}
        for key in keys:
            full[key] = _whole([torch.cat([st[s][key].reshape(-1) for s in range(n_sub)])
                                for st in states], counts)
        rank = self.rank
        index = {id(p): j for j, p in enumerate(order)}
        scalars = next((dict(s) for s in states[0].values()), {})
        for i, part in enumerate(self.partitions):
            group = self.basic.param_groups[self.group_of(i)]
            slots = [(index[id(p)], p.partition_numel()) for p in self.params_of(i)]
            part.copy_(_cut(full[None], slots, rank, part.numel()))
            state = self.basic.state[part]
            state.clear()  # the checkpoint's state, not a merge with this run's
            for key, value in scalars.items():
                if not (torch.is_tensor(value) and value.dim() > 0):
                    # e.g. RMSProp's step count, equal in every sub-group: a
                    # copy each (the step adds to it in place)
                    state[key] = value.clone() if torch.is_tensor(value) else value
            for key in keys:
                state[key] = _cut(full[key], slots, rank, part.numel()).to(
                    part.device, state_dtype_for(part, group))
            self.basic.import_param_state(state)


def _check_saved(saved: list[dict[str, Any]], shapes: list[torch.Size],
                 mine: list[torch.Size]) -> list[int]:
    """Raise unless the saved ranks' partitions hold these parameters;
    returns their element counts."""
    if [tuple(s) for s in shapes] != [tuple(s) for s in mine]:
        raise ValueError(f"checkpoint holds parameters of shapes {[tuple(s) for s in shapes]}, "
                         f"the engine {[tuple(s) for s in mine]} (in partition order); is it "
                         "a checkpoint of another model or param grouping?")
    counts = [math.prod(s) for s in shapes]
    n = len(saved)
    for sd in saved:
        flats, state = sd["fp32_flat_groups"], sd["optimizer_state_dict"]["state"]
        if sum(f.numel() for f in flats) != sum(-(-c // n) for c in counts):
            raise ValueError("checkpoint partitions do not match its parameters at world "
                             f"size {n}; is the checkpoint complete?")
        for s, flat in enumerate(flats):  # state index s is sub-group s (DeepSpeed binds in order)
            for key, v in state.get(s, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and v.numel() != flat.numel():
                    raise ValueError(f"checkpoint state {key!r} of sub-group {s} holds "
                                     f"{v.numel()} elements, its partition {flat.numel()}")
    return counts


def _whole(per_rank: list[Tensor], counts: list[int]) -> list[Tensor]:
    """Every parameter's whole flat tensor from the saved ranks'
    concatenated partitions: parameter j holds ceil(n_j / N) elements of each."""
    out, offset, n = [], 0, len(per_rank)
    for count in counts:
        size = -(-count // n)
        out.append(torch.cat([t[offset:offset + size] for t in per_rank])[:count])
        offset += size
    return out


def _cut(whole: list[Tensor], slots: list[tuple[int, int]], rank: int, numel: int) -> Tensor:
    """This rank's partition of ``numel`` elements: for each (parameter
    index, partition size) its slice from element ``rank * size``, zero-padded."""
    out = torch.zeros(numel, dtype=whole[0].dtype)
    offset = 0
    for j, size in slots:
        piece = whole[j][rank * size:(rank + 1) * size]
        out[offset:offset + piece.numel()] = piece
        offset += size
    return out
