"""zero_sf in Hugging Face ``transformers.Trainer`` (and Accelerate).

The Trainer calls ``optimizer.train()`` in every ``training_step`` and
``optimizer.eval()`` in every evaluation, but saves checkpoints in whatever
mode the last of those left behind: a checkpoint after an evaluation holds
``x``, one without holds ``y`` (schedulefree issues #15, #22, #48, #69).
Under DeepSpeed, Accelerate's ``eval()`` reached the fp32 partitions but not
the model (accelerate #4159).  :class:`ScheduleFreeCallback` fixes both::

    from zero_sf.integrations.transformers import ScheduleFreeCallback

    trainer = Trainer(
        model, args,                                    # lr_scheduler_type="constant"
        optimizer_cls_and_kwargs=(zero_sf.ScheduleFreeAdamW, {"lr": 1e-3, "warmup_steps": 100}),
        callbacks=[ScheduleFreeCallback()], ...)
    trainer.train()             # every checkpoint's model.safetensors holds x
    trainer.save_model(out)     # after train(): x as well

What it guarantees, with ``zero_sf.ScheduleFreeAdamW`` / ``RMSProp`` in a
single process, under the Trainer's DDP, or through its DeepSpeed ZeRO-1/2/3
route (``zero_sf.deepspeed`` config names or a client optimizer; at ZeRO-3
with ``stage3_gather_16bit_weights_on_model_save: true``, without which the
Trainer writes no model weights at all):

* every checkpoint's model weights are ``x``; training continues from ``y``
  (the Trainer's next ``training_step`` switches back);
* ``resume_from_checkpoint`` continues exactly as the uninterrupted run
  (the saved optimizer state is in eval mode with the saved ``x``; the
  first training step restores the same ``y``);
* after ``train()`` returns, the model holds ``x`` (``save_model``,
  ``evaluate``, ``push_to_hub`` see it), except with
  ``load_best_model_at_end``, where the Trainer has loaded the best
  checkpoint's ``x``;
* ``optimizer.eval()``/``train()`` made by Accelerate's wrapper reach a
  DeepSpeed model (the basic optimizer regathers after every switch).

Not supported inside the Trainer: :class:`zero_sf.ZeroOptimizer` (the
Trainer wraps the model in DDP, which would reduce the gradients a second
time, and saves ``optimizer.state_dict()`` from rank 0 only); the callback
refuses it before the first step.  Use the DeepSpeed route (ZeRO-1/2 shards
the same state) or zero_sf's own launcher.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from transformers import TrainerCallback

from ..modes import Switchable, resolve

__all__ = ["ScheduleFreeCallback"]

logger = logging.getLogger(__name__)

_CONSTANT = ("constant", "constant_with_warmup")


class ScheduleFreeCallback(TrainerCallback):
    """Saved weights are ``x``, training runs at ``y``; see the module docstring."""

    def __init__(self) -> None:
        self._target: Optional[tuple[Any, Switchable]] = None

    def _resolve(self, optimizer: Any):
        if self._target is None or self._target[0] is not optimizer:
            from ..sharding import ZeroOptimizer

            target = resolve(optimizer)
            if isinstance(target.optimizer, ZeroOptimizer):
                raise TypeError(
                    "ScheduleFreeCallback: zero_sf.ZeroOptimizer cannot run inside "
                    "transformers.Trainer (the Trainer wraps the model in DDP, reducing every "
                    "gradient twice, and saves optimizer.state_dict() from rank 0 only); use "
                    "zero_sf.ScheduleFreeAdamW with the Trainer's DeepSpeed ZeRO-1/2 route to "
                    "shard its state, or zero_sf's launcher (launch/train.py) for ZeroOptimizer")
            self._target = (optimizer, target)
        return self._target[1]

    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:  # Trainer(optimizers=(opt, sched)): refuse early
            self._resolve(optimizer)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        target = self._resolve(optimizer)  # also hooks a DeepSpeed model to the switches
        if target.has_modes and getattr(args, "lr_scheduler_type", "constant") not in _CONSTANT:
            logger.warning(
                "ScheduleFreeCallback: lr_scheduler_type=%r; Schedule-Free needs no schedule "
                "(its warmup_steps does the warmup): pass lr_scheduler_type='constant'",
                str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)))

    def _x_for_the_save(self, control, optimizer) -> None:
        # The Trainer saves right after this event when should_save is set:
        # switch to x now; its next training_step calls optimizer.train().
        if control.should_save and optimizer is not None:
            self._resolve(optimizer).eval()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._x_for_the_save(control, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self._x_for_the_save(control, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        target = self._resolve(optimizer)
        if getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint:
            # The Trainer has just loaded the best checkpoint's weights, which
            # are its x: only the flags follow (interpolating would mix them with z).
            for group in target.optimizer.param_groups:
                if "train_mode" in group:
                    group["train_mode"] = False
            return
        target.eval()
