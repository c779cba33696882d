"""`LocalSGDTrainer`: `transformers.Trainer` with Local SGD / DiLoCo / schedule-free outer optimization.

A thin subclass: the work is done by `LocalSGDCallback`, attached at construction. `LocalSGDTrainerMixin`
holds the overrides, so that any `Trainer` subclass can have them (`class SFTLocalSGDTrainer(
LocalSGDTrainerMixin, SFTTrainer)`): `train` (to resume from the newest checkpoint complete on every rank,
check the one it is given before Trainer loads it, and tell the callback which one it resumes from),
`_save_checkpoint` (to write each rank's state before Trainer pushes the checkpoint, and to rotate checkpoints
without ever deleting the newest complete one) and `evaluate` (both also put the global model in, whichever
callback asked for them), `create_model_card` (to record the method), for
PALSGD and `data_partition="by_label"`, `training_step` and `_get_train_sampler`, and for `lr_scaling`,
`set_initial_training_values` and `create_scheduler` (the budget of the base run, below).

With `lr_scaling` on, the run's length is the base run's (one worker, H = 1, the same per-device batch), in
its steps S: `max_steps`, or with `num_train_epochs` the epochs times one worker's steps per epoch (K times a
rank's). The lr schedule is built for S steps and read at the scale-invariant step s (s += ρ per step), and
training ends when s reaches S: after about S / ρ̄ steps, more than S when ρ̄ < 1. Trainer's loop bound (and
its progress bar's total) is raised to the most steps that can take, ceil(S / lowest ρ) for H = sync_every.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml my_script.py   # any Trainer script:
    # args = LocalSGDConfig(output_dir="out", sync_every=16, outer_optimizer="nesterov", ...)
    # trainer = LocalSGDTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer

from ..core.adascale import most_steps
from ..core.partition import LabelShardSampler
from .callback import MODEL_TAG, LocalSGDCallback
from .checkpoint_dirs import resolve_resume, rotate_checkpoints
from .card import method_card_section
from .config import LocalSGDArguments, LocalSGDConfig
from .parallel import shard_inside_islands


class LocalSGDTrainerMixin:
    """The local-SGD overrides of `LocalSGDTrainer`, for any `transformers.Trainer` subclass: put it first,
    `class MyTrainer(LocalSGDTrainerMixin, SomeTrainer)`. `args` must mix in `LocalSGDArguments`."""

    # What LocalSGDCallback cannot do from outside a trainer and this class does (read by the callback).
    local_sgd_partitions_data = True  # _get_train_sampler
    local_sgd_writes_state_before_push = True  # _save_checkpoint
    local_sgd_stretches_schedule = True  # set_initial_training_values, create_scheduler
    local_sgd_shards_islands = True  # __init__: FSDP2 inside islands
    local_sgd_budget: int | None = None  # lr scaling: the base run's steps S, which the lr schedule is built for

    def __init__(self, model=None, args=None, *posargs, **kwargs):
        if args is None:
            args = LocalSGDConfig(output_dir="trainer_output")
        if not isinstance(args, LocalSGDArguments):
            raise TypeError(
                f"{type(self).__name__} needs a LocalSGDConfig (or a config that mixes in LocalSGDArguments), got "
                f"{type(args).__name__}"
            )
        super().__init__(model, args, *posargs, **kwargs)
        self.local_sgd = LocalSGDCallback.attach(self)
        # FSDP2 inside islands: sharded over the island before Accelerate prepares the model (which then keeps it).
        self.local_sgd_topology = shard_inside_islands(self, args.island_size) if self.is_fsdp_enabled else None
        self._last_loss = torch.zeros((), device=self.args.device)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.data_partition == "iid":
            return super()._get_train_sampler(train_dataset)
        column = self.args.data_partition_column
        # self.train_dataset still has the column: Trainer drops the ones the model does not take before
        # building the sampler, but keeps the rows, so indices are the same.
        if not hasattr(self.train_dataset, "column_names") or column not in self.train_dataset.column_names:
            raise ValueError(
                f"data_partition_column: data_partition='by_label' sorts by column {column!r}, which the train "
                f"dataset does not have (columns: {getattr(self.train_dataset, 'column_names', None)})"
            )
        return LabelShardSampler(
            self.train_dataset[column], self.args.world_size, self.args.per_device_train_batch_size,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def set_initial_training_values(self, args, dataloader):
        values = list(super().set_initial_training_values(args, dataloader))
        if args.lr_scaling == "none":
            return values
        num_train_epochs, steps_per_epoch, max_steps = values[0], values[1], values[-1]
        workers = args.world_size // args.island_size  # K: each island is one worker of the round
        self.local_sgd_budget = base_budget(args, steps_per_epoch, workers)
        bound = most_steps(self.local_sgd_budget, workers, args.sync_every, args.resolved_lr_scaling_c)
        if num_train_epochs != sys.maxsize:  # (a dataset without a length: Trainer loops until max_steps)
            values[0] = math.ceil(bound / steps_per_epoch)
        values[-1] = max(bound, max_steps)
        return values

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # lr scaling reads the schedule at the scale-invariant step, up to the base run's S steps.
        return super().create_scheduler(self.local_sgd_budget or num_training_steps, optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.local_sgd.engine.skips_gradient_step:
            # PALSGD: this step's batch is drawn (all ranks stay in step with the data order) but not used.
            # The loss logged for it is this rank's last one.
            return self._last_loss
        self._last_loss = super().training_step(model, inputs, num_items_in_batch)
        return self._last_loss

    def _save_checkpoint(self, model, trial):
        # Each rank's local-SGD state goes into the checkpoint before Trainer pushes it (hub_strategy): with
        # save_strategy="best" the decision to save comes after the callback's last chance to write it, and
        # rank 0 must not push before the other ranks have written theirs. What is saved is the global model,
        # also when a callback after LocalSGDCallback asked for the save.
        if self.local_sgd.training:
            self.local_sgd.write_state(self.args, self.state, self.optimizer)
            self.local_sgd.load_global_model()
            self.accelerator.wait_for_everyone()
        # Trainer's rotation keeps the most recent checkpoint, which after a crash mid-save (left over from an
        # earlier run) may be one no run can resume from: rotate here instead, also keeping the newest complete.
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            rotate_checkpoints(self._get_output_dir(trial=trial), limit, self.state.best_model_checkpoint,
                               self.args.world_size)
        if self.local_sgd.training:
            # Trainer's own save (model, optimizer, state, rotation) runs on rank 0 alone: the other ranks would
            # reach the next outer sync that much earlier, and wait there against sync_timeout_seconds.
            self.accelerator.wait_for_everyone()

    def evaluate(self, *posargs, **kwargs):
        # During training, the global model is evaluated (schedule-free: x), also when a callback after
        # LocalSGDCallback asked for the evaluation; this replica's weights come back before the next step.
        if self.local_sgd.training:
            self.local_sgd.load_global_model()
        return super().evaluate(*posargs, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *posargs, **kwargs):
        # True: the newest checkpoint complete for every rank (left True when there is none at all, so that
        # Trainer raises its error); a path: checked, on every rank, before Trainer loads anything from it.
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir, self.args, trainable)
        self.local_sgd.resume_from_checkpoint = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        return super().train(resume_from_checkpoint, *posargs, **kwargs)

    def create_model_card(self, *posargs, tags=None, **kwargs):
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        if MODEL_TAG not in tags:
            tags.append(MODEL_TAG)
        super().create_model_card(*posargs, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as card:
            card.write(method_card_section(self.args, world_size // self.args.island_size))


def base_budget(args, steps_per_epoch: int, workers: int) -> int:
    """The base run's steps S (one worker, H = 1): ``max_steps``, or ``num_train_epochs`` over the data on one
    worker (an island), whose epoch is ``workers`` times a rank's ``steps_per_epoch``."""
    if args.max_steps > 0:
        return args.max_steps
    return math.ceil(args.num_train_epochs * steps_per_epoch * workers)


class LocalSGDTrainer(LocalSGDTrainerMixin, Trainer):
    """Drop-in replacement for `transformers.Trainer`; `args` must be a `LocalSGDConfig` (or any
    `TrainingArguments` subclass that mixes in `LocalSGDArguments`)."""
