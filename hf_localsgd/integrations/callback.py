"""`LocalSGDCallback`: `transformers.Trainer`'s events, handed to the round engine.

The Trainer keeps running its usual loop; this callback
- builds a `RoundEngine` at the start of training and calls it at each step's points (begin, before and after
  the optimizer step, end), so rounds, outer syncs and the variants (PALSGD, lr scaling) run inside Trainer;
- switches DDP's gradient all-reduce off after the warm-up (`parallel.py`), so inner steps communicate nothing
  (under DeepSpeed, whose data-parallel group it makes the island before Trainer prepares it, `deepspeed.py`:
  nothing crosses islands, and the round works on DeepSpeed's float32 master weights);
- puts the *global* model into the model whenever the Trainer evaluates or saves (between syncs, the global
  model as of the last sync; for schedule-free, its averaged iterate x), this replica's own weights back before
  the next inner step;
- writes, next to every checkpoint, each rank's state file (`hf_localsgd.core.checkpoint`), and resumes from it.

A callback is never handed the DDP wrapper, so in a multi-process run it must be attached to its trainer:
`LocalSGDCallback.attach(trainer, config)` (what `LocalSGDTrainer` does). Added through `callbacks=[...]`
alone, it stops at the start of training with an error that says so rather than silently let DDP average
gradients under the outer optimizer.
"""

from __future__ import annotations

import logging
import os
import time

import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.checkpoint import STATE_FILE, resume_rank_state, save_rank_state
from ..core.collectives import check_launch
from ..core.data_parallel import gradient_sync
from ..core.engine import RoundEngine
from ..core.metrics import PREFIX
from . import console
from .checkpoint_dirs import checkpoint_dirs, trainer_state_problem
from .config import LocalSGDArguments
from .deepspeed import DeepSpeedIslands, check_deepspeed_config
from .local_metrics import LocalGathers
from .parallel import UNATTACHED, check_supported, find_wrapper


logger = logging.getLogger(__name__)

MODEL_TAG = "hf_localsgd"


def check_options(config, args) -> None:
    if not isinstance(config, LocalSGDArguments):
        raise TypeError(
            "LocalSGDCallback needs the local-SGD options: pass LocalSGDCallback(LocalSGDArguments(...)) "
            f"or train with a LocalSGDConfig; got args of type {type(args).__name__}"
        )


class LocalSGDCallback(TrainerCallback):
    """Runs Local SGD / DiLoCo / schedule-free outer steps inside any `Trainer`.

    Args:
        config: the local-SGD options; `None` reads them from the trainer's `args`, which must then be a
            `LocalSGDArguments` (e.g. `LocalSGDConfig`).
        process_group: the group whose replicas are averaged (`None`: all ranks).

    For the trainer it is attached to: `training` (between the start and the end of training), `engine`,
    `load_global_model()`, `write_state()` and `resume_from_checkpoint` (the checkpoint `train()` was given).
    A trainer class can declare what it does that the callback cannot: `local_sgd_partitions_data` (it builds
    the `data_partition` sampler) and `local_sgd_writes_state_before_push` (`LocalSGDTrainerMixin` has both).
    """

    def __init__(self, config: LocalSGDArguments | None = None, process_group: dist.ProcessGroup | None = None):
        self.config = config
        self.process_group = process_group
        self.engine: RoundEngine | None = None
        self.trainer = None
        self.resume_from_checkpoint: str | None = None
        self.training = False
        self._gradient_sync = None
        self.deepspeed: DeepSpeedIslands | None = None  # DeepSpeed's data-parallel group made the island
        self._local_gathers: LocalGathers | None = None
        self._progress: ProgressCallback | None = None
        self._state_written_at: int | None = None
        self._step_seconds: float | None = None  # moving average, for the progress bar's time to the next sync
        self._step_started = self._train_started = 0.0

    @classmethod
    def attach(cls, trainer, config: LocalSGDArguments | None = None, process_group=None) -> LocalSGDCallback:
        """Create the callback, bind it to `trainer` (so it can reach the DDP wrapper) and add it."""
        callback = cls(config, process_group)
        callback.trainer = trainer
        check_supported(trainer, trainer.args)  # now, rather than after Trainer has prepared the model
        check_launch()
        options = config if config is not None else trainer.args
        check_options(options, trainer.args)
        if getattr(options, "data_partition", "iid") != "iid" and not getattr(trainer, "local_sgd_partitions_data", False):
            raise ValueError(
                f"data_partition: {options.data_partition!r} replaces the trainer's train sampler, which a callback "
                f"cannot do: train with LocalSGDTrainer, or give {type(trainer).__name__} the local-SGD overrides "
                f"(class MyTrainer(LocalSGDTrainerMixin, {type(trainer).__name__})), or use data_partition='iid'"
            )
        if getattr(trainer, "is_fsdp_enabled", False) and not getattr(trainer, "local_sgd_shards_islands", False):
            raise ValueError(
                f"island_size: FSDP2 inside islands shards the model before Trainer prepares it, which a callback "
                f"cannot do: train with LocalSGDTrainer, or give {type(trainer).__name__} the local-SGD overrides "
                f"(class MyTrainer(LocalSGDTrainerMixin, {type(trainer).__name__}))"
            )
        if getattr(trainer, "is_deepspeed_enabled", False):
            # Before Trainer prepares DeepSpeed: its data-parallel group becomes the island (integrations/deepspeed.py).
            source = "deepspeed" if getattr(trainer.args, "deepspeed", None) else "deepspeed_config"
            check_deepspeed_config(trainer.accelerator.state.deepspeed_plugin.deepspeed_config, options, source)
            callback.deepspeed = DeepSpeedIslands(trainer, options)
        if getattr(options, "lr_scaling", "none") != "none" and not getattr(trainer, "local_sgd_stretches_schedule", False):
            raise ValueError(
                f"lr_scaling: trains for the base run's budget of scale-invariant steps, which may take more steps "
                f"than Trainer's max_steps, and a callback cannot raise that bound: train with LocalSGDTrainer, or "
                f"give {type(trainer).__name__} the local-SGD overrides (class MyTrainer(LocalSGDTrainerMixin, "
                f"{type(trainer).__name__})), or use lr_scaling='none'"
            )
        trainer.add_callback(callback)
        return callback

    @property
    def _world_size(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_initialized() else 1

    # ------------------------------------------------------------------ setup
    def on_init_end(self, args, state, control, **kwargs):
        """Called by the constructor of a Trainer given this callback in ``callbacks=[...]`` (not after `attach`):
        what would stop training is said now, before any model is prepared or any collective runs."""
        check_options(self.config if self.config is not None else args, args)
        if self.trainer is None and (getattr(args, "world_size", 1) > 1 or getattr(args, "deepspeed", None)):
            raise RuntimeError(UNATTACHED)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        config = self.config if self.config is not None else args
        check_options(config, args)
        if config.local_sgd_warmup_steps >= state.max_steps:  # epoch-based runs learn max_steps only now
            raise ValueError(
                f"local_sgd_warmup_steps ({config.local_sgd_warmup_steps}) must be shorter than the run "
                f"({state.max_steps} steps), or no local round would ever run"
            )
        check_supported(self.trainer, args)
        self._warn_if_pushed_checkpoints_lack_state(args)
        wrapper = find_wrapper(self.trainer, model, self._world_size)
        self._check_per_step_communication(args, config, wrapper)
        # lr scaling: the base run's steps, which the lr schedule is built for (state.max_steps is the loop bound).
        total_steps = getattr(self.trainer, "local_sgd_budget", None) or state.max_steps
        ds = self.deepspeed
        self.engine = RoundEngine(
            model, config, process_group=self.process_group, optimizer=optimizer,
            lr_scheduler=getattr(lr_scheduler, "scheduler", lr_scheduler),  # (Accelerate's wrapper, if any)
            total_steps=total_steps, lr_warmup_steps=args.get_warmup_steps(total_steps), seed=args.seed,
            track_metrics=args.logging_strategy != "no", default_sync_timeout=getattr(args, "ddp_timeout", None),
            topology=ds.topology if ds else getattr(self.trainer, "local_sgd_topology", None),
            masters=ds.master_weights() if ds else None,  # DeepSpeed's float32 master weights, where it keeps them
        )
        if ds is not None:
            self._gradient_sync = ds.gradient_sync
        else:
            self._gradient_sync = None if wrapper is None else gradient_sync(wrapper, self.engine.topology)
        if (self._gradient_sync is not None or ds is not None) and hasattr(self.trainer, "accelerator"):
            self._local_gathers = LocalGathers(self.trainer.accelerator, self._world_size)
        self._train_started = time.perf_counter()
        self._state_written_at = None  # (a second train() call writes its checkpoints' state again)
        self.training = True
        handler = getattr(self.trainer, "callback_handler", None)
        self._progress = next((cb for cb in handler.callbacks if isinstance(cb, ProgressCallback)), None) if handler else None
        if state.global_step > 0:
            self._resume(args, state, optimizer)
        self._set_gradient_sync()
        if hasattr(model, "add_model_tags"):
            model.add_model_tags([MODEL_TAG])
        logger.info("Local SGD: %d replicas (islands of %d ranks), outer optimizer %s (lr %s), H=%d (%s), %d warm-up "
                    "steps", self.engine.world_size, config.island_size, config.outer_optimizer, self.engine.outer_lr, config.sync_every,
                    config.sync_every_schedule, config.local_sgd_warmup_steps)

    def _check_per_step_communication(self, args, config, wrapper) -> None:
        """Trainer options that would communicate in every inner step: turned off, or warned about."""
        if wrapper is None and config.island_size > 1:
            raise RuntimeError(
                f"island_size={config.island_size}: the ranks of an island all-reduce their gradients through "
                "DistributedDataParallel, but Trainer did not wrap the model in it; launch the processes with "
                "`accelerate launch --multi_gpu` (or use island_size=1)"
            )
        if wrapper is None and self._world_size > 1 and config.local_sgd_warmup_steps > 0:
            raise RuntimeError(
                f"local_sgd_warmup_steps={config.local_sgd_warmup_steps} runs synchronous data-parallel steps, but "
                "Trainer did not wrap the model in DistributedDataParallel, so nothing would all-reduce their "
                "gradients and the replicas would drift apart: set local_sgd_warmup_steps=0"
            )
        if wrapper is None:
            return
        if config.island_size > 1 and getattr(wrapper, "find_unused_parameters", False):
            raise RuntimeError(
                "ddp_find_unused_parameters: DDP searches for unused parameters, which all-reduces a map of them over "
                "all ranks in every backward, across islands: set ddp_find_unused_parameters=False"
            )
        if getattr(args, "average_tokens_across_devices", False):
            logger.warning("Local SGD: setting average_tokens_across_devices=False (an all-gather on every step)")
            args.average_tokens_across_devices = False
        if getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False):
            logger.warning(
                "Local SGD: include_num_input_tokens_seen=%r all-gathers a token count on every micro-batch, a "
                "small collective in every inner step; set it to 'no' for no communication between syncs",
                args.include_num_input_tokens_seen,
            )

    def _warn_if_pushed_checkpoints_lack_state(self, args) -> None:
        """Trainer pushes a checkpoint (hub_strategy) from inside its save: with another trainer this callback
        has no say in when that happens relative to the per-rank files (LocalSGDTrainer writes them first)."""
        # (transformers' strategy enums are str enums: they compare equal to their values)
        pushes_checkpoints = getattr(args, "push_to_hub", False) and args.hub_strategy in ("checkpoint", "all_checkpoints")
        if not pushes_checkpoints or getattr(self.trainer, "local_sgd_writes_state_before_push", False):
            return
        if args.save_strategy == "best":
            missing = "lack them (save_strategy='best' decides to save after this callback's last chance)"
        elif self._world_size > 1:
            missing = "may lack other ranks' files (no barrier between their writes and rank 0's push)"
        else:
            return
        logger.warning(
            "Local SGD: checkpoints pushed by hub_strategy=%r %s; the local checkpoints have every %s file. "
            "LocalSGDTrainer writes them before the push.", getattr(args.hub_strategy, "value", args.hub_strategy),
            missing, STATE_FILE,
        )

    def _set_gradient_sync(self) -> None:
        if self._gradient_sync is not None:
            self._gradient_sync.set(self.engine.syncs_gradients)

    # ------------------------------------------------------------------ the step
    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()
        self.engine.begin_step()
        if self._local_gathers is not None and not self.engine.syncs_gradients:
            self._local_gathers.activate()  # until the step ends: Trainer's logging and evaluation gather for real

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.engine.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.engine.after_optimizer_step()  # before Trainer's scheduler step, which reads the lrs

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self._local_gathers is not None:
            self._local_gathers.deactivate()
        synced = self.engine.step()
        if self.engine.should_stop:  # lr scaling: the base-case budget, in scale-invariant steps, is spent
            control.should_training_stop = True
        if state.global_step >= state.max_steps or control.should_training_stop:
            # Training ends with the global model: synchronize the partial round now, and apply what is still in
            # flight (outer_overlap), before Trainer's last evaluation and save.
            synced = self.engine.sync() or synced
            self.engine.flush()
        if synced:
            self._log_round()
        self._set_gradient_sync()
        self._show_progress(state)
        self._before_trainer_io(args, state, control, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self._before_trainer_io(args, state, control, optimizer)

    def _show_progress(self, state) -> None:
        seconds = time.perf_counter() - self._step_started
        self._step_seconds = seconds if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * seconds
        bar = getattr(self._progress, "training_bar", None)
        if bar is not None and state.is_world_process_zero:
            finished = state.global_step >= state.max_steps or self.engine.should_stop
            bar.set_postfix_str(console.progress_postfix(self.engine, self._step_seconds, finished), refresh=False)

    def _log_round(self) -> None:
        """One log entry per outer sync, through Trainer.log, so every `report_to` integration gets it."""
        if self.engine.last_metrics and self.trainer is not None:
            # Trainer.log's on_log clears control.should_log, which would drop this step's training loss.
            should_log = self.trainer.control.should_log
            # Trainer's own log, not a subclass's: TRL's adds (and resets) its per-step metrics to whatever entry
            # is logged, which would move them from Trainer's logging steps to the syncs.
            Trainer.log(self.trainer, {PREFIX + key: value for key, value in self.engine.last_metrics.items()})
            self.trainer.control.should_log = should_log

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        # save_strategy="best" decides to save only after evaluating. LocalSGDTrainer has written the state
        # before Trainer saved (and pushed); with another trainer, this is the first moment it can.
        self.write_state(args, state, optimizer)
        self.engine.restore_local()

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        if self._local_gathers is not None:
            self._local_gathers.deactivate()
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            # Trainer has loaded the best checkpoint's global model over whatever the model held.
            self.engine.keep_current_weights()
            logger.info("Local SGD: keeping the best checkpoint's global model loaded by Trainer")
        elif self.engine.finish():  # a callback stopped training early, mid-round
            self._log_round()
        # What is saved, evaluated and pushed after training is the global model (schedule-free: x).
        if self._gradient_sync is not None:
            self._gradient_sync.set(True)
        self.engine.close()  # (a second train() builds a new engine)
        if state.is_world_process_zero:
            print(console.summary(self.engine, state.log_history, time.perf_counter() - self._train_started))

    # ------------------------------------------------------------------ evaluation and checkpoints
    def _before_trainer_io(self, args, state, control, optimizer) -> None:
        """Runs right before Trainer evaluates and/or saves (both come after on_step_end / on_epoch_end)."""
        if control.should_save:
            self.write_state(args, state, optimizer)
        if control.should_save or control.should_evaluate:
            self.load_global_model()

    def load_global_model(self) -> None:
        """Put the global model (schedule-free: x) into the model until the next inner step. Idempotent;
        LocalSGDTrainer also calls it from `evaluate` and its checkpoint save, for the evaluations and saves that
        callbacks running after this one ask for."""
        if self.training:
            self.engine.swap_in_global()

    def write_state(self, args, state, optimizer) -> None:
        """Write this rank's state file into this step's checkpoint directory, once per step."""
        if self._state_written_at != state.global_step:
            save_rank_state(self._checkpoint_dir(args, state), self.engine, self._own_optimizer(optimizer))
            self._state_written_at = state.global_step

    def _own_optimizer(self, optimizer):
        """The inner optimizer whose state goes into this rank's file: none under DeepSpeed, whose checkpoint (one
        per island, `hf_localsgd.integrations.deepspeed`) holds it with its master weights."""
        return None if self.deepspeed is not None else optimizer

    def _checkpoint_dir(self, args, state) -> str:
        """This step's checkpoint folder, where Trainer puts it (a hyperparameter-search trial's run folder
        included)."""
        run_dir = args.output_dir
        if hasattr(self.trainer, "_get_output_dir"):
            run_dir = self.trainer._get_output_dir(getattr(self.trainer, "_trial", None))
        return os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _resume(self, args, state, optimizer) -> None:
        candidates = [self.resume_from_checkpoint,
                      args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
                      self._checkpoint_dir(args, state)]
        # Should a state file be damaged, the error names the newest checkpoint that is complete (Trainer's own
        # save finished there), to resume from instead.
        run_dir = os.path.dirname(self._checkpoint_dir(args, state))
        fallbacks = [d for d in checkpoint_dirs(run_dir) if trainer_state_problem(d) is None]
        path = resume_rank_state(candidates, self.engine, self._own_optimizer(optimizer), fallbacks=fallbacks)
        if path is None:
            logger.warning(
                "Local SGD: resuming at step %d from a checkpoint without %s files; starting new rounds from the "
                "loaded model (inner-optimizer state is rank 0's, outer-optimizer state is reset).",
                state.global_step, STATE_FILE.format(rank="*"),
            )
            self.engine.fast_forward(state.global_step)
        else:
            logger.info("Local SGD: resumed from %s", path)
