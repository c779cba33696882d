"""`LocalSGDCallback`: the glue between `transformers.Trainer` and the round engine.

The Trainer keeps running its usual loop; this callback
- switches DDP's gradient all-reduce and buffer broadcast off after the warm-up, so inner steps communicate
  nothing (the only collective is the engine's outer all-reduce once per round);
- counts inner steps and runs the outer step every `sync_every` steps, plus a final partial round;
- puts the *global* model into the model whenever the Trainer evaluates or saves (between syncs, the
  global model as of the last sync; for schedule-free, its averaged iterate x), and this replica's own
  weights back before the next inner step;
- writes, next to every checkpoint, one file per rank with what `Trainer` does not save per rank: the
  replica's weights, its inner-optimizer state, and the engine's state (global copy, outer optimizer,
  position in the round). Resuming from any checkpoint, mid-round included, continues exactly.

A callback is never handed the DDP wrapper, so in a multi-process run it must be attached to its trainer:
`LocalSGDCallback.attach(trainer, config)` (what `LocalSGDTrainer` does). Added through `callbacks=[...]`
alone, it stops at the start of training with an error that says so rather than silently let DDP average
gradients under the outer optimizer.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import LocalSGDArguments
from .engine import RoundEngine
from .schedules import count_rounds, sync_every_schedule


logger = logging.getLogger(__name__)

STATE_FILE = "local_sgd_rank{rank}.pt"
MODEL_TAG = "hf_localsgd"


def state_file(checkpoint_dir: str, rank: int) -> str:
    return os.path.join(checkpoint_dir, STATE_FILE.format(rank=rank))


class LocalSGDCallback(TrainerCallback):
    """Runs Local SGD / DiLoCo / schedule-free outer steps inside any `Trainer`.

    Args:
        config: the local-SGD options; `None` reads them from the trainer's `args`, which must then be a
            `LocalSGDArguments` (e.g. `LocalSGDConfig`).
        process_group: the group whose replicas are averaged (`None`: all ranks).
    """

    def __init__(self, config: LocalSGDArguments | None = None, process_group: dist.ProcessGroup | None = None):
        self.config = config
        self.process_group = process_group
        self.engine: RoundEngine | None = None
        self.trainer = None
        self.resume_from_checkpoint: str | None = None
        self._ddp: DistributedDataParallel | None = None
        self.training = False  # between on_train_begin and on_train_end
        self._local_weights: torch.Tensor | None = None  # this replica's weights while the global model is in
        self._state_written_at: int | None = None
        # PALSGD, for the step in progress: whether it is a pseudo-synchronization, the inner lr α_t, and
        # the optimizer's own lrs while its gradient step runs at α_t / (1 - p).
        self.pseudo_sync_step = False
        self._inner_lr = 0.0
        self._pull_lr = 0.0
        self._config: LocalSGDArguments | None = None
        self._unscaled_lrs: list[float] | None = None
        self._step_seconds: float | None = None  # moving average, for the progress bar's time to the next sync
        self._step_started = 0.0
        self._train_started = 0.0
        self._progress: ProgressCallback | None = None

    @classmethod
    def attach(cls, trainer, config: LocalSGDArguments | None = None, process_group=None) -> "LocalSGDCallback":
        """Create the callback, bind it to `trainer` (so it can reach the DDP wrapper) and add it."""
        callback = cls(config, process_group)
        callback.trainer = trainer
        callback._check_supported(trainer.args)  # now, rather than after Trainer has prepared the model
        trainer.add_callback(callback)
        return callback

    # ------------------------------------------------------------------ setup
    @property
    def _world_size(self) -> int:
        """The number of replicas this callback averages over."""
        return dist.get_world_size(self.process_group) if dist.is_initialized() else 1

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        config = self._config = self.config if self.config is not None else args
        if not isinstance(config, LocalSGDArguments):
            raise TypeError(
                "LocalSGDCallback needs the local-SGD options: pass LocalSGDCallback(LocalSGDArguments(...)) "
                f"or train with a LocalSGDConfig; got args of type {type(args).__name__}"
            )
        if config.local_sgd_warmup_steps >= state.max_steps:  # epoch-based runs learn max_steps only now
            raise ValueError(
                f"local_sgd_warmup_steps ({config.local_sgd_warmup_steps}) must be shorter than the run "
                f"({state.max_steps} steps), or no local round would ever run"
            )
        self._train_started = time.perf_counter()
        self._state_written_at = None  # (a second train() call writes its checkpoints' state again)
        self.training = True
        handler = getattr(self.trainer, "callback_handler", None)
        self._progress = next((cb for cb in handler.callbacks if isinstance(cb, ProgressCallback)), None) if handler else None
        self._check_supported(args)
        self._warn_if_pushed_checkpoints_lack_state(args)
        self._ddp = self._find_ddp(model)
        if self._ddp is None and self._world_size > 1 and config.local_sgd_warmup_steps > 0:
            raise RuntimeError(
                f"local_sgd_warmup_steps={config.local_sgd_warmup_steps} runs synchronous data-parallel steps, but "
                "Trainer did not wrap the model in DistributedDataParallel, so nothing would all-reduce their "
                "gradients and the replicas would drift apart: set local_sgd_warmup_steps=0"
            )
        if self._ddp is not None and getattr(args, "average_tokens_across_devices", False):
            # Trainer would all-gather token counts on every step: communication local steps must not make.
            logger.warning("Local SGD: setting average_tokens_across_devices=False (an all-gather on every step)")
            args.average_tokens_across_devices = False
        if self._ddp is not None and getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False):
            logger.warning(
                "Local SGD: include_num_input_tokens_seen=%r all-gathers a token count on every micro-batch, a "
                "small collective in every inner step; set it to 'no' for no communication between syncs",
                args.include_num_input_tokens_seen,
            )

        start, end = config.local_sgd_warmup_steps, state.max_steps
        sync_every = sync_every_schedule(
            config.sync_every_schedule, config.sync_every, config.sync_every_min, start, end,
            stages=config.sync_every_stages, current_lr=lambda: optimizer.param_groups[0]["lr"],
            peak_lr=args.learning_rate, lr_warmup_end=args.get_warmup_steps(end),
        )
        # The number of rounds (for a decaying outer lr) is known in advance unless H follows the inner lr.
        total_rounds = None if config.sync_every_schedule == "inverse_lr" else count_rounds(sync_every, start, end)
        self.engine = RoundEngine(
            model, process_group=self.process_group, seed=args.seed, total_rounds=total_rounds,
            track_metrics=args.logging_strategy != "no",
            **{**config.engine_kwargs(), "sync_every": sync_every},
        )
        self._lr_scheduler = getattr(kwargs.get("lr_scheduler"), "scheduler", kwargs.get("lr_scheduler"))
        if self.engine.gain is not None and not hasattr(self._lr_scheduler, "lr_lambdas"):
            raise RuntimeError(
                f"lr_scaling={config.lr_scaling!r} reads the lr schedule at the scale-invariant step, which needs a "
                f"LambdaLR schedule (Trainer's linear, cosine, constant, ...); got {type(self._lr_scheduler).__name__}"
            )
        if state.global_step > 0:
            self._resume(args, state, model, optimizer)
        self._set_gradient_sync()
        if hasattr(model, "add_model_tags"):
            model.add_model_tags([MODEL_TAG])
        logger.info(
            "Local SGD: %d replicas, outer optimizer %s (lr %s), H=%d (%s), %d warm-up steps, %s rounds",
            self.engine.world_size, config.outer_optimizer, self.engine.outer_lr, config.sync_every,
            config.sync_every_schedule, config.local_sgd_warmup_steps, total_rounds or "unknown",
        )

    def _check_supported(self, args) -> None:
        accelerator = getattr(self.trainer, "accelerator", None)
        distributed_type = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
        if distributed_type in ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM"):
            raise RuntimeError(
                f"Local SGD does not support distributed_type={distributed_type} (set in your accelerate config): "
                "it needs one full model replica per rank under plain DDP (MULTI_GPU / MULTI_CPU)."
            )
        if getattr(args, "n_gpu", 1) > 1:
            raise RuntimeError(
                f"Local SGD does not support torch.nn.DataParallel over {args.n_gpu} GPUs in one process: "
                "launch one process per GPU with `accelerate launch`."
            )

    def _warn_if_pushed_checkpoints_lack_state(self, args) -> None:
        """Trainer pushes a checkpoint (hub_strategy) from inside its save: with another trainer this callback
        has no say in when that happens relative to the per-rank files (LocalSGDTrainer writes them first)."""
        from .trainer import LocalSGDTrainer  # (trainer.py imports this module)

        # (transformers' strategy enums are str enums: they compare equal to their values)
        pushes_checkpoints = getattr(args, "push_to_hub", False) and args.hub_strategy in ("checkpoint", "all_checkpoints")
        if not pushes_checkpoints or isinstance(self.trainer, LocalSGDTrainer):
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

    def _find_ddp(self, model) -> DistributedDataParallel | None:
        if self._world_size == 1:
            return None
        if self.trainer is None:
            raise RuntimeError(
                "LocalSGDCallback cannot switch off DDP's gradient all-reduce from a `callbacks=[...]` list: "
                "Trainer never hands callbacks its DDP wrapper. Use LocalSGDTrainer, or attach the callback "
                "to your trainer instead: `LocalSGDCallback.attach(trainer, local_sgd_args)`."
            )
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, DistributedDataParallel):
            # Buffers stay local: DDP would otherwise broadcast them on every forward pass.
            wrapped.broadcast_buffers = False
            return wrapped
        if wrapped is model:
            return None
        raise RuntimeError(f"Local SGD supports DDP or an unwrapped model, not {type(wrapped).__name__}")

    def _set_gradient_sync(self) -> None:
        """DDP all-reduces gradients only during the warm-up. Trainer's `no_sync` for accumulation
        micro-batches restores whatever is set here, so one flag covers every micro-batch."""
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = self.engine.syncs_gradients

    # ------------------------------------------------------------------ the round
    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._step_started = time.perf_counter()
        self._restore_local_weights()
        self.pseudo_sync_step = self.engine.draw_pseudo_sync()
        self._inner_lr = optimizer.param_groups[0]["lr"]
        # The lr of a pseudo-synchronization's pull α_t η_t / p: with η_t = η · learning_rate / α_t
        # (pseudo_sync_rate_schedule="inverse_lr"), α_t η_t = learning_rate · η.
        self._pull_lr = args.learning_rate if self._config.pseudo_sync_rate_schedule == "inverse_lr" else self._inner_lr
        lrs = self._step_lrs(optimizer)
        if lrs is not None:  # for this step's optimizer step only; restored before the scheduler steps
            self._unscaled_lrs = [group["lr"] for group in optimizer.param_groups]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr

    def _step_lrs(self, optimizer) -> list[float] | None:
        """The inner lrs of this step where they differ from the Trainer's schedule, else None."""
        gain = self.engine.gain
        if gain is not None:  # (Local)AdaScale: ρ · γ(s), the schedule read at the scale-invariant step
            step = int(gain.scale_invariant_step)
            scheduler = self._lr_scheduler
            return [gain.rho * base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        if not self.pseudo_sync_step and self.engine.inner_lr_scale != 1.0:  # PALSGD: α_t / (1 - p)
            return [group["lr"] * self.engine.inner_lr_scale for group in optimizer.param_groups]
        return None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.engine.wants_gradients:
            self.engine.cache_gradients()
        if self.pseudo_sync_step:
            # No gradient step: torch optimizers skip parameters without a gradient (no moment update, no
            # weight decay). LocalSGDTrainer did not even compute them; another trainer did, and they are dropped.
            model.zero_grad(set_to_none=True)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._unscaled_lrs is not None:  # before Trainer's scheduler step, which reads them
            for group, lr in zip(optimizer.param_groups, self._unscaled_lrs):
                group["lr"] = lr
            self._unscaled_lrs = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.pseudo_sync_step:
            self.engine.pseudo_sync(self._pull_lr)
        synced = self.engine.step()
        if self.engine.gain is not None and self.engine.gain.scale_invariant_step >= state.max_steps:
            control.should_training_stop = True  # the base-case budget, in scale-invariant steps, is spent
        if state.global_step >= state.max_steps or control.should_training_stop:
            # Training ends with the global model: synchronize the partial round.
            synced = self.engine.sync() or synced
        if synced:
            self._log_round()
        self._set_gradient_sync()
        self._show_progress(state)
        self._before_trainer_io(args, state, control, optimizer)

    def _show_progress(self, state) -> None:
        """The round and the time to the next sync, on the Trainer's progress bar (main process)."""
        seconds = time.perf_counter() - self._step_started
        self._step_seconds = seconds if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * seconds
        bar = getattr(self._progress, "training_bar", None)
        if bar is None or not state.is_world_process_zero:
            return
        engine = self.engine
        if engine.in_warmup:
            bar.set_postfix_str(f"warm-up {engine.num_steps}/{engine.warmup_steps}", refresh=False)
        else:
            left = engine.sync_every - engine.inner_step
            bar.set_postfix_str(f"round {engine.num_syncs + 1}, sync in {left} steps "
                                f"({left * self._step_seconds:.1f}s)", refresh=False)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self._before_trainer_io(args, state, control, optimizer)

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        # save_strategy="best" decides to save only after evaluating. LocalSGDTrainer has written the state
        # before Trainer saved (and pushed); with another trainer, this is the first moment it can.
        self.write_state(args, state, optimizer)
        self._restore_local_weights()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.training = False
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            # Trainer has loaded the best checkpoint's global model over whatever the model held.
            self._local_weights = None
            logger.info("Local SGD: keeping the best checkpoint's global model loaded by Trainer")
        else:
            self._restore_local_weights()
            if self.engine.sync():  # a callback stopped training early, mid-round
                self._log_round()
            # What is saved, evaluated and pushed after training is the global model (schedule-free: x).
            self.engine.load_params(self.engine.global_model_params())
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = True
        if state.is_world_process_zero:
            print(self.summary(state))

    def summary(self, state) -> str:
        """A few lines on what training communicated, for the end of training."""
        engine, total = self.engine, time.perf_counter() - self._train_started
        ddp_bytes = engine.data_parallel_bytes
        lines = [
            f"Local SGD: {engine.num_syncs} outer syncs over {engine.num_steps} steps "
            f"({engine.world_size} replicas, {engine.outer_optimizer_name}, H={engine.sync_every})",
            f"  sent per rank: {engine.bytes_sent / 1e6:.1f} MB"
            + (f" ({engine.bytes_sent / ddp_bytes:.1%} of data-parallel training's)" if ddp_bytes else ""),
            f"  time in outer syncs: {engine.seconds_in_sync:.1f}s of {total:.1f}s "
            f"({engine.seconds_in_sync / max(total, 1e-9):.1%}); the rest is computation and Trainer's own work",
        ]
        evaluation = next((log for log in reversed(state.log_history) if "eval_loss" in log), None)
        if evaluation is not None:
            ppl = evaluation.get("eval_perplexity", math.exp(min(evaluation["eval_loss"], 700)))
            lines.append(f"  last evaluation (step {evaluation['step']}): loss {evaluation['eval_loss']:.4f}, "
                         f"perplexity {ppl:.2f}")
        return "\n".join(lines)

    def _log_round(self) -> None:
        """One log entry per outer sync, through Trainer.log, so every `report_to` integration gets it."""
        if self.engine.last_metrics and self.trainer is not None:
            # Trainer.log's on_log clears control.should_log, which would drop this step's training loss.
            should_log = self.trainer.control.should_log
            self.trainer.log({f"local_sgd/{key}": value for key, value in self.engine.last_metrics.items()})
            self.trainer.control.should_log = should_log

    # ------------------------------------------------------------------ evaluation and checkpoints
    def _before_trainer_io(self, args, state, control, optimizer) -> None:
        """Runs right before Trainer evaluates and/or saves (both come after on_step_end / on_epoch_end)."""
        if control.should_save:
            self.write_state(args, state, optimizer)
        if control.should_save or control.should_evaluate:
            self.load_global_model()

    def load_global_model(self) -> None:
        """Put the global model (schedule-free: x) into the model until the next inner step, keeping this
        replica's weights aside. Idempotent; LocalSGDTrainer also calls it from `evaluate` and its checkpoint
        save, for the evaluations and saves that callbacks running after this one ask for."""
        if self.training and self._local_weights is None and not self.engine.model_is_global:
            self._local_weights = self.engine.local_params()
            self.engine.load_params(self.engine.global_model_params())

    def _restore_local_weights(self) -> None:
        if self._local_weights is not None:
            self.engine.load_params(self._local_weights)
            self._local_weights = None

    def write_state(self, args, state, optimizer) -> None:
        """Write this rank's state (engine, local weights, inner optimizer) into this step's checkpoint
        directory, once per step."""
        if self._state_written_at == state.global_step:
            return
        local = self._local_weights if self._local_weights is not None else self.engine.local_params()
        checkpoint_dir = self._checkpoint_dir(args, state)
        os.makedirs(checkpoint_dir, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(
            {
                "engine": self.engine.state_dict(),
                "local_params": local,
                "inner_optimizer": optimizer.state_dict() if optimizer is not None else None,
            },
            state_file(checkpoint_dir, rank),
        )
        self._state_written_at = state.global_step

    def _checkpoint_dir(self, args, state) -> str:
        """This step's checkpoint folder, where Trainer puts it (a hyperparameter-search trial's run folder
        included)."""
        run_dir = args.output_dir
        if hasattr(self.trainer, "_get_output_dir"):
            run_dir = self.trainer._get_output_dir(getattr(self.trainer, "_trial", None))
        return os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _resume(self, args, state, model, optimizer) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        candidates = [
            self.resume_from_checkpoint,
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
            self._checkpoint_dir(args, state),
        ]
        path = next((state_file(c, rank) for c in candidates if c and os.path.isfile(state_file(c, rank))), None)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank resumes its own replica, or none does: some resuming mid-round while others start new
            # rounds would pair different steps in their outer all-reduces. (Each rank looks for its own file,
            # so checkpoints on each node's own disk work.)
            found = torch.tensor([float(path is not None)], device=self.engine.device)
            dist.all_reduce(found)
            found, world_size = int(found.item()), dist.get_world_size()
            if 0 < found < world_size:
                raise ValueError(
                    f"{found} of {world_size} ranks found their {STATE_FILE.format(rank='*')} file in the checkpoint "
                    "(written by another number of processes, or not visible to every rank): resume with as many "
                    "processes as wrote it, or delete those files to start new rounds from the checkpoint's "
                    "global model (outer-optimizer state reset)"
                )
        if path is None:
            logger.warning(
                "Local SGD: resuming at step %d from a checkpoint without %s files; starting new rounds from the "
                "loaded model (inner-optimizer state is rank 0's, outer-optimizer state is reset).",
                state.global_step, STATE_FILE.format(rank="*"),
            )
            self.engine.num_steps = state.global_step
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.engine.load_state_dict(saved["engine"])
        self.engine.load_params(saved["local_params"])
        if optimizer is not None and saved["inner_optimizer"] is not None:
            optimizer.load_state_dict(saved["inner_optimizer"])
        logger.info("Local SGD: resumed rank %d from %s", rank, path)
