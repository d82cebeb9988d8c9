"""DeepSpeed integration (docs/design.md §6): zero_sf optimizers from a DeepSpeed
config or as client optimizers, under ZeRO stage 1, 2 and 3 (stage 3's own
bookkeeping is :mod:`.deepspeed_zero3`'s).

Under ZeRO-1/2 DeepSpeed partitions the model itself and hands the optimizer
one flat fp32 partition per param group, calling ``step()`` once per group
with ``param_groups`` swapped.  zero_sf's single-device optimizers keep their
Schedule-Free scalars inside each group dict, so that swap is harmless, and
their fused kernel runs once per partition.

    import zero_sf.deepspeed as zsd
    zsd.register()                                    # "type": "ScheduleFreeAdamW" in the config
    engine, opt, _, _ = zsd.initialize(model=model, model_parameters=model.parameters(),
                                       config="ds_config.json")
    zsd.train(engine)     # y: before training
    zsd.eval(engine)      # x: before evaluation (re-gathers the bf16 params)
    engine.save_checkpoint(dir); zsd.load_checkpoint(engine, dir)   # any world size
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import re
from typing import Any, Optional

import torch

from ..layout import element_numbering
from ..modes import register_engine_resolver, resolve
from ..optim import RMSProp, ScheduleFreeAdamW
from ..optim._base import ElementwiseOptimizer
from ..storage import KEEP_ON_LOAD, state_dtype_for
from .deepspeed_zero3 import Stage3, is_stage3_optimizer

__all__ = ["OPTIMIZERS", "register", "check_config", "initialize", "eval", "train",
           "load_checkpoint"]

#: Names usable as ``"optimizer": {"type": NAME}`` after :func:`register`.
#: ``ZeroSFRMSProp`` cannot collide with DeepSpeed's names or torch.optim.RMSprop.
OPTIMIZERS = {"ScheduleFreeAdamW": ScheduleFreeAdamW, "ZeroSFRMSProp": RMSProp}


def register() -> None:
    """Make the config names of :data:`OPTIMIZERS` resolvable by DeepSpeed.

    DeepSpeed 0.19 has no optimizer registry: a config ``type`` it does not
    know is looked up as ``getattr(torch.optim, NAME)``, so this adds the
    names there.  Idempotent; call it on every rank before
    ``deepspeed.initialize``."""
    for name, cls in OPTIMIZERS.items():
        existing = getattr(torch.optim, name, None)
        if existing is None:
            setattr(torch.optim, name, cls)
        elif existing is not cls:
            raise RuntimeError(f"torch.optim.{name} already exists ({existing!r}); "
                               "zero_sf cannot register its optimizer under that name")


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    return copy.deepcopy(dict(config))


def _is_ours(config: dict[str, Any], optimizer: Any) -> bool:
    if isinstance(optimizer, ElementwiseOptimizer):
        return True
    if isinstance(optimizer, type) and issubclass(optimizer, ElementwiseOptimizer):
        return True
    func = getattr(optimizer, "func", None)  # functools.partial(ScheduleFreeAdamW, ...)
    if isinstance(func, type) and issubclass(func, ElementwiseOptimizer):
        return True
    return optimizer is None and (config.get("optimizer") or {}).get("type") in OPTIMIZERS


def _asks_for_remainders(cfg: dict[str, Any], optimizer: Any) -> bool:
    params = (cfg.get("optimizer") or {}).get("params") or {}
    if optimizer is None and params.get("master_weights") not in (None, "fp32"):
        return True
    if isinstance(optimizer, ElementwiseOptimizer):
        return any(g.get("master_weights") == "remainder" for g in optimizer.param_groups)
    keywords = getattr(optimizer, "keywords", None) or {}  # functools.partial
    return keywords.get("master_weights") == "remainder"


def check_config(config: Any, optimizer: Any = None) -> dict[str, Any]:
    """Validate a DeepSpeed config for use with a zero_sf optimizer and return
    a copy with ``zero_allow_untested_optimizer`` set.

    Raises ValueError for configurations that would corrupt Schedule-Free state:
    ZeRO stage 0 with bf16/fp16 (DeepSpeed's ``FP16_UnfusedOptimizer`` calls
    ``step()`` once with zero gradients at construction, advancing the step
    counter), an explicit ``zero_allow_untested_optimizer: false``, layouts
    our resharding loader does not handle (``round_robin_gradients``), and
    what ZeRO-3 cannot do exactly here (NVMe, ZeRO++'s quantized weights and
    gradients and its hpZ secondary partitions)."""
    cfg = _as_dict(config)
    if not _is_ours(cfg, optimizer):
        return cfg
    zero = cfg.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    low = any((cfg.get(k) or {}).get("enabled", False) for k in ("bf16", "fp16", "bfloat16"))
    if stage == 3:
        _check_stage3(zero)
    if stage == 0 and low:
        raise ValueError(
            "zero_sf optimizers cannot run under DeepSpeed ZeRO stage 0 with bf16/fp16: "
            "DeepSpeed wraps them in FP16_UnfusedOptimizer, which calls step() once with zero "
            "gradients at construction and would advance the Schedule-Free step counter; "
            "use zero_optimization.stage 1 or 2 (the same memory or less)")
    if _asks_for_remainders(cfg, optimizer):
        raise ValueError(
            "master_weights='remainder' cannot be used under DeepSpeed: DeepSpeed keeps its own "
            "fp32 master partitions and hands the optimizer those, not the bf16 weights; drop "
            "master_weights (state_dtype='bfloat16' with stochastic rounding works here), or "
            "use zero_sf.ZeroOptimizer(..., master_weights='remainder')")
    if zero.get("round_robin_gradients"):
        raise ValueError("zero_optimization.round_robin_gradients=true is not supported with "
                         "zero_sf optimizers (its layout depends on the world size)")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none", "cpu"):
        raise ValueError(f"zero_optimization.offload_optimizer.device={offload!r} is not "
                         "supported with zero_sf optimizers; use 'cpu' or 'none'")
    if offload == "cpu":
        # DeepSpeed refuses client optimizers under ZeRO-Offload unless told
        # otherwise, because plain torch optimizers are slow on the CPU; ours
        # run the fused CPU backend there (benchmarks/step_throughput.py).
        if cfg.get("zero_force_ds_cpu_optimizer") is True:
            raise ValueError(
                "zero_force_ds_cpu_optimizer is true, which makes DeepSpeed replace or refuse "
                "any optimizer but its own CPU Adam under offload_optimizer; remove the entry "
                "(zero_sf sets it to false for its optimizers)")
        cfg["zero_force_ds_cpu_optimizer"] = False
    if stage >= 1:
        if cfg.get("zero_allow_untested_optimizer") is False:
            raise ValueError(
                "zero_allow_untested_optimizer is false, but DeepSpeed requires it for any "
                "optimizer outside its own list; zero_sf's optimizers are tested under ZeRO-1/2 "
                "(tests/test_deepspeed.py): remove the entry or set it to true")
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


def _check_stage3(zero: dict[str, Any]) -> None:
    """What zero_sf cannot make exact under ZeRO-3, refused before anything
    is built (docs/design.md §6)."""
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device == "nvme":
            raise ValueError(
                f"zero_optimization.{key}.device='nvme' is not supported with zero_sf "
                "optimizers: DeepSpeed's NVMe swapper moves the optimizer state and "
                "partitions in and out behind the optimizer, which zero_sf's train()/eval() "
                "and checkpoint loader do not follow; use 'cpu' or 'none'")
    for key, what in (("zero_quantized_weights", "quantizes the gathered weights (qwZ)"),
                      ("zero_quantized_nontrainable_weights", "quantizes frozen weights"),
                      ("zero_quantized_gradients", "quantizes the gradient reduction (qgZ)")):
        if zero.get(key):
            raise ValueError(
                f"zero_optimization.{key}=true is not supported with zero_sf optimizers: "
                f"ZeRO++ {what}, so training would not match unsharded training; remove it")
    hpz = int(zero.get("zero_hpz_partition_size", 1) or 1)
    if hpz > 1:
        raise ValueError(
            f"zero_optimization.zero_hpz_partition_size={hpz} is not supported with zero_sf "
            "optimizers yet (ZeRO++ hpZ keeps secondary weight partitions that zero_sf's "
            "train()/eval() switch does not refresh exactly); remove it or set it to 1")


class _DropOurUntestedWarning(logging.Filter):
    """DeepSpeed warns "ZeRO with an untested optimizer" for any optimizer
    outside its list; check_config set zero_allow_untested_optimizer for
    ours on purpose (its ZeRO-1/2 equivalence is tested here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def _check_contiguous(model: torch.nn.Module) -> None:
    """DeepSpeed's engine broadcasts every parameter as bytes
    (``p.data.view(torch.uint8)``), which fails deep inside it for a
    channels_last conv weight; say so before anything starts."""
    for name, p in model.named_parameters():
        if not p.is_contiguous():
            raise ValueError(
                f"parameter {name!r} (shape {tuple(p.shape)}, stride {p.stride()}) is not "
                "contiguous, e.g. a channels_last conv weight; DeepSpeed's engine needs "
                "contiguous parameters: call model.to(memory_format=torch.contiguous_format) "
                "before zero_sf.deepspeed.initialize")


def initialize(*args, config: Any = None, optimizer: Any = None, **kwargs):
    """``deepspeed.initialize`` with :func:`register` and :func:`check_config`
    applied first.  Same signature and return value."""
    import deepspeed

    register()
    if config is None and "config_params" in kwargs:
        config = kwargs.pop("config_params")
    cfg = check_config(config, optimizer)
    model = kwargs.get("model", args[1] if len(args) > 1 else None)
    if isinstance(model, torch.nn.Module):
        _check_contiguous(model)
    from deepspeed.utils import logger

    quiet = _DropOurUntestedWarning()
    logger.addFilter(quiet)
    try:
        out = deepspeed.initialize(*args, config=cfg, optimizer=optimizer, **kwargs)
    finally:
        logger.removeFilter(quiet)
    resolve(out[0])  # basic.eval()/train() now regather the model, whoever calls them
    _bind_partition_bases(out[0])
    return out


def _bind_partition_bases(engine) -> None:
    """Number this rank's fp32 partition elements as the single-process
    optimizer numbers the model's (group after group, parameters in order):
    stochastic rounding of bf16 state then draws the same bits at every world
    size.  DeepSpeed's partition r of a group's flat buffer starts at
    r * partition size; its padding is at the end."""
    zero = getattr(engine, "optimizer", None)
    parts = getattr(zero, "single_partition_of_fp32_groups", None)
    groups = getattr(zero, "bit16_groups", None)
    if parts is None or groups is None or getattr(zero, "round_robin_gradients", False):
        return
    basic = _basic_optimizer(engine)
    import torch.distributed as dist

    rank = dist.get_rank(group=getattr(zero, "dp_process_group", None))
    first = element_numbering([[((gi, j), p.numel(), None) for j, p in enumerate(params)]
                               for gi, params in enumerate(groups)])
    for gi, (part, params) in enumerate(zip(parts, groups)):
        if params:
            basic.bind(part, index_base=first[(gi, 0)] + rank * part.numel())


def _basic_optimizer(engine) -> ElementwiseOptimizer:
    opt = engine.optimizer
    if is_stage3_optimizer(opt):  # its train()/eval() now reach the partitions
        return Stage3.of(opt).basic
    inner = getattr(opt, "optimizer", None)
    for candidate in (inner, opt):
        if isinstance(candidate, ElementwiseOptimizer):
            return candidate
    raise TypeError(f"engine's optimizer {type(opt).__name__} does not wrap a zero_sf optimizer")


def _resolve_engine(obj) -> Optional[ElementwiseOptimizer]:
    """:func:`zero_sf.modes.resolve`'s view of a DeepSpeed engine or ZeRO-3
    optimizer: refuses engines without a zero_sf optimizer; at stage 0
    (fp32) the basic optimizer updates the model's own parameters, so
    switching it is enough; at stage 3 it learns to bind the sub-group
    partitions and refresh the model around every switch.  At stages 1/2
    resolve() goes on to the ZeRO optimizer, whose update_lp_params becomes
    a switch hook."""
    if is_stage3_optimizer(obj) and isinstance(getattr(obj, "optimizer", None),
                                               ElementwiseOptimizer):
        return Stage3.of(obj).basic  # e.g. under Accelerate's DeepSpeedOptimizerWrapper
    if not (callable(getattr(obj, "zero_optimization_stage", None)) and hasattr(obj, "optimizer")):
        return None
    basic = _basic_optimizer(obj)
    return basic if obj.optimizer is basic or is_stage3_optimizer(obj.optimizer) else None


register_engine_resolver(_resolve_engine)


def eval(engine) -> None:  # noqa: A001 - mirrors optimizer.eval()
    """Optimizer y -> x on this rank's fp32 partitions, re-gather the model's
    parameters (DeepSpeed's ``update_lp_params``), and put the module in eval
    mode.  Without the re-gather the model keeps computing with y (accelerate
    issue #4159); :func:`zero_sf.modes.resolve` makes the basic optimizer do
    it after every switch, also one that Accelerate makes."""
    resolve(engine).eval()
    engine.eval()


def train(engine) -> None:
    """Optimizer x -> y, re-gather, module in train mode."""
    resolve(engine).train()
    engine.train()


def _zero_files(folder: str) -> list[str]:
    files = glob.glob(os.path.join(folder, "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    def rank_of(f: str) -> int:
        m = re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f))
        assert m is not None  # the glob matched it
        return int(m.group(1))

    return sorted(files, key=rank_of)


@torch.no_grad()
def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None) -> str:
    """Load ``engine.save_checkpoint(load_dir)`` output at **any** data-parallel
    world size, keeping z, exp_avg_sq, the fp32 masters and the group scalars.

    DeepSpeed refuses optimizer states saved at another DP size, and its
    universal-checkpoint converter hard-codes ``exp_avg``/``exp_avg_sq``.
    Under ZeRO-1/2 a group's flat fp32 buffer has the same unpadded layout at
    every world size (padding only at its end), so this concatenates the saved
    partitions, drops each one's padding, and cuts this rank's partition.
    Checks everything before changing anything.  Returns the tag loaded."""
    import torch.distributed as dist

    basic = _basic_optimizer(engine)
    if tag is None:
        with open(os.path.join(load_dir, "latest")) as f:
            tag = f.read().strip()
    folder = os.path.join(load_dir, str(tag))
    zopt = engine.optimizer
    if zopt is basic:  # ZeRO stage 0: DeepSpeed's own loader is exact
        engine.load_checkpoint(load_dir, tag)
        return tag
    if is_stage3_optimizer(zopt):
        _load_zero3(engine, folder, Stage3.of(zopt))
        return tag
    sds, flats = _read_partitions(folder, zopt, basic)
    # Module weights (DeepSpeed's own loader; the optimizer part is ours).
    engine.load_checkpoint(load_dir, tag, load_module_only=True)
    # What DeepSpeed's own ZeRO loader restores besides the partitions: the
    # fp16 loss scaler (else the scale restarts at its initial value and the
    # first steps after every resume overflow and are skipped), the overflow
    # flag and the clip value.  The same on every rank: take rank 0's.
    zopt._load_global_state(sds[0])
    rank = dist.get_rank(group=zopt.dp_process_group)
    saved_groups = sds[0]["base_optimizer_state"]["param_groups"]
    for i, part in enumerate(zopt.single_partition_of_fp32_groups):
        size = part.numel()

        def cut(pieces: list[torch.Tensor], size: int = size) -> torch.Tensor:
            return _cut(pieces, rank, size)

        part.copy_(cut(flats[i], size))
        lengths = [t.numel() for t in flats[i]]
        state_i = [sd["base_optimizer_state"]["state"].get(i, {}) for sd in sds]
        state = basic.state[part]
        state.clear()  # the checkpoint's state, not a merge with what this run stepped to
        group = basic.param_groups[i]
        for key, value in state_i[0].items():
            if torch.is_tensor(value) and value.dim() > 0:
                pieces = [s[key].reshape(-1)[:n] for s, n in zip(state_i, lengths)]
                # in this optimizer's state dtype (a bf16-state save loads into fp32
                # state exactly, and fp32 into bf16 to nearest even)
                state[key] = cut(pieces).to(part.device, state_dtype_for(part, group))
            else:
                state[key] = value  # e.g. RMSProp's step count, equal on every rank
        basic.import_param_state(state)
        # how state is stored stays this optimizer's choice, not the checkpoint's
        group.update({k: v for k, v in saved_groups[i].items()
                      if k != "params" and k not in KEEP_ON_LOAD})
    if engine.optimizer is not basic:  # the fp32 partitions into the model's params
        engine.optimizer.update_lp_params()
    _restore_engine_counters(engine, _model_states(folder))
    return tag


def _load_zero3(engine, folder: str, adapter: Stage3) -> None:
    """ZeRO-3: every parameter put together from the saved ranks' slices and
    cut for this rank (deepspeed_zero3.Stage3.load_partitions), then the
    group scalars, the loss scaler, the module's buffers, the model's
    partitions and the engine's counters."""
    zopt, basic = adapter.zopt, adapter.basic
    sds = _read_zero_files(folder)
    stage = int(sds[0].get("zero_stage", 0))
    if stage != 3:
        raise ValueError(f"checkpoint was saved at ZeRO stage {stage}, the engine runs stage 3; "
                         "resume at the stage it was saved with")
    saved_groups = sds[0]["optimizer_state_dict"]["param_groups"]
    _check_saved_groups(saved_groups, len(basic.param_groups), basic)
    meta = _model_states(folder)
    if meta is None:
        raise FileNotFoundError(f"no DeepSpeed model states file in {folder!r}")
    shapes = [shape for sub_group in meta["param_shapes"] for shape in sub_group.values()]
    adapter.load_partitions(sds, shapes)
    for group, saved in zip(basic.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params" and k not in KEEP_ON_LOAD})
    # what DeepSpeed's own ZeRO-3 loader restores besides the partitions
    zopt.loss_scaler = sds[0]["loss_scaler"]
    zopt.dynamic_loss_scale = sds[0]["dynamic_loss_scale"]
    zopt.overflow = sds[0]["overflow"]
    saved_module = meta.get("module") or {}
    with torch.no_grad():
        for name, buf in engine.module.named_buffers():
            if name in saved_module and torch.is_tensor(saved_module[name]):
                buf.copy_(saved_module[name])
    adapter.refresh_model()
    _restore_engine_counters(engine, meta)


def _read_zero_files(folder: str) -> list[dict[str, Any]]:
    """Every saved rank's ZeRO optimizer state dict, in rank order."""
    files = _zero_files(folder)
    if not files:
        raise FileNotFoundError(f"no ZeRO optimizer files in {folder!r}")
    return [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
            for f in files]


def _model_states(folder: str) -> Optional[dict[str, Any]]:
    """The saved model states (counters, LR scheduler; at ZeRO-3 also the
    parameter shapes and buffers), or None when the folder has none.
    ZeRO-1/2 write mp_rank_00_model_states.pt; ZeRO-3 one file per rank,
    with the same counters: rank 0's."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.exists(os.path.join(folder, name)):
            return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)
    return None


def _check_saved_groups(saved_groups: list[dict[str, Any]], n_groups: int,
                        basic: ElementwiseOptimizer) -> None:
    if len(saved_groups) != n_groups:
        raise ValueError(f"checkpoint has {len(saved_groups)} param groups, the engine "
                         f"{n_groups}; is it a checkpoint of another model?")
    missing = set(basic.defaults) - set(saved_groups[0]) - {"backend", "foreach"}
    if missing:
        raise ValueError(f"checkpoint's optimizer groups lack {sorted(missing)}: it was "
                         f"not saved with {type(basic).__name__}")


def _read_partitions(folder: str, zopt, basic: ElementwiseOptimizer):
    """Every rank's saved ZeRO state dict, and per param group the saved fp32
    partitions; raises (before anything is loaded) for a checkpoint of
    another model, optimizer or alignment."""
    sds = _read_zero_files(folder)
    n_groups = len(zopt.single_partition_of_fp32_groups)
    _check_saved_groups(sds[0]["base_optimizer_state"]["param_groups"], n_groups, basic)
    for sd in sds:
        if any(any(p) for p in sd.get("param_alignment_paddings", []) or []):
            raise ValueError("checkpoint uses zero_optimization.parameter_alignment; "
                             "resharding it is not supported")
    flats = []
    for i in range(n_groups):
        saved = [sd["single_partition_of_fp32_groups"][i] for sd in sds]
        numel = sum(p.numel() for p in zopt.bit16_groups[i])
        if sum(t.numel() for t in saved) != numel:
            raise ValueError(f"checkpoint param group {i} holds {sum(t.numel() for t in saved)} "
                             f"elements, the engine {numel}; is it a checkpoint of another model?")
        flats.append(saved)
    return sds, flats


def _cut(pieces: list[torch.Tensor], rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s partition of ``size`` elements of the concatenated
    (unpadded) pieces, zero-padded at the end as DeepSpeed pads."""
    flat = torch.cat([p.reshape(-1).float() for p in pieces])
    out = torch.zeros(size, dtype=torch.float32)
    seg = flat[rank * size:(rank + 1) * size]
    out[:seg.numel()] = seg
    return out


def _restore_engine_counters(engine, meta: Optional[dict[str, Any]]) -> None:
    """The engine's step and sample counters and its LR scheduler, from the
    saved model states (:func:`_model_states`)."""
    if meta is None:
        return
    engine.global_steps = meta.get("global_steps", engine.global_steps)
    engine.global_samples = meta.get("global_samples", engine.global_samples)
    engine.skipped_steps = meta.get("skipped_steps", engine.skipped_steps)
    if engine.lr_scheduler is not None and meta.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
