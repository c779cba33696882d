"""The round engine: H local steps, then one outer step of the global model (docs/methods.md, "The round").

It knows nothing about `transformers.Trainer` or Accelerate. A plain loop, on 2 CPU processes:

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml examples/accelerate_loop.py

    engine = RoundEngine(model, sync_every=16, outer_optimizer="nesterov")
    for batch in loader:
        with accelerator.no_sync(ddp_model):     # no gradient all-reduce in inner steps
            accelerator.backward(ddp_model(**batch).loss)
        optimizer.step(); optimizer.zero_grad()
        engine.step()                            # every 16th call: one all-reduce and one outer step
    engine.finish()                              # the last, partial round; the global model stays in the model
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .build import build_hooks, build_islands, build_layout, build_reducer, build_sync
from .checkpoint import check_resumable
from .collectives import SyncTimeoutError, check_launch
from .flat import MasterWeights, keep_buffers_local, warn_about_unsynchronized_buffers
from .global_model import GlobalModelAccess
from .hooks import RoundHook, check_hooks
from .metrics import outer_gradient_metrics, ring_bytes, traffic_metrics
from .options import LocalSGDOptions
from .schedules import build_sync_schedule, peak_lr, total_rounds
from .topology import Topology


logger = logging.getLogger(__name__)


class RoundEngine(GlobalModelAccess):
    """Local SGD / DiLoCo / schedule-free outer optimization over the trainable parameters of ``model``.

    Args:
        model: the module, its `DistributedDataParallel` wrapper (whose buffer broadcast on forward passes is then
            switched off: each replica's buffers are its own), or an iterable of its parameters; parameters
            without ``requires_grad`` take no part.
        options: a `LocalSGDOptions` (or `LocalSGDConfig`); or give its fields as keyword arguments instead.
        process_group: the group whose replicas are averaged when every rank is its own island (``island_size``
            1); ``None`` is the default group (no communication when ``torch.distributed`` is not initialized).
        topology: the islands (`hf_localsgd.core.topology.Topology`), e.g. from the mesh FSDP2 shards over;
            ``None`` cuts them from the default group by the options' ``island_size``.
        optimizer, lr_scheduler: the inner optimizer and its schedule, for the options that read or set the inner
            lr (PALSGD, lr scaling, ``sync_every_schedule="inverse_lr"``).
        total_steps: the run's length in optimizer steps, for the options that need it (ramped H schedules, a
            decaying outer lr, the lr-scaling budget S: the base run's steps).
        lr_warmup_steps: the inner lr schedule's warm-up, during which ``inverse_lr`` keeps H at its minimum.
        seed: seeds PALSGD's draws (with the replica's index).
        track_metrics: measure each sync (``last_metrics``); adds one float to the outer all-reduce.
        bucket_size_mb: float32 megabytes of outer gradient per collective.
        schedule: a function of the steps taken that gives the H of the round starting there (the same on every
            rank), instead of the options' ``sync_every`` / ``sync_every_schedule``.
        hooks: round hooks of your own (`hf_localsgd.core.hooks.RoundHook`), run after the ones the options
            switch on.
        default_sync_timeout: the seconds an outer sync waits for the other replicas when the options'
            ``sync_timeout_seconds`` is None (the Trainer glue passes ``ddp_timeout``).
        masters: the float32 weights the round reads and writes when they are not the model's parameters
            (`hf_localsgd.core.flat.MasterWeights`: DeepSpeed's).

    The inner step, with the calls the options need (all but ``step()`` are no-ops without PALSGD or lr
    scaling, and may be left out then):

        engine.begin_step()                      # PALSGD's draw; sets this step's inner lrs
        if not engine.skips_gradient_step:       # PALSGD: a pseudo-synchronization takes no gradient
            loss.backward()
        engine.before_optimizer_step()           # lr scaling keeps the round's first gradients
        optimizer.step()
        engine.after_optimizer_step()            # puts the schedule's lrs back before the scheduler steps
        lr_scheduler.step(); optimizer.zero_grad()
        engine.step()                            # counts the step; the outer sync when the round is complete

    Also: ``sync()`` (outer step now), ``finish()``, ``close()``; ``syncs_gradients`` (whether the next step
    all-reduces its gradients over all ranks: the warm-up; `hf_localsgd.core.data_parallel` switches it), ``in_warmup``,
    ``should_stop``; the global model (``global_model()``, ``swap_in_global()`` / ``restore_local()``,
    ``keep_current_weights()``, ``model_is_global``, ``global_model_params()``, ``global_params``,
    ``outer_optimizer``, ``outer_lr``, ``local_params()``, ``load_params()``); ``state_dict()`` /
    ``load_state_dict()``, ``fast_forward()``; ``hooks``, ``hook(name)``, ``topology``; counters ``num_steps``,
    ``inner_step``, ``num_syncs``, ``sync_every`` (H now), ``world_size`` (K), ``last_metrics``, ``bytes_sent``.
    """

    def __init__(
        self,
        model: nn.Module | Iterable[nn.Parameter],
        options: LocalSGDOptions | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        topology: Topology | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler=None,
        total_steps: int | None = None,
        lr_warmup_steps: int = 0,
        seed: int = 0,
        track_metrics: bool = False,
        bucket_size_mb: float = 256,
        schedule: Callable[[int], int] | None = None,
        hooks: Iterable[RoundHook] = (),
        default_sync_timeout: float | None = None,
        masters: MasterWeights | None = None,
        **option_fields,
    ):
        if options is not None and option_fields:
            raise TypeError(f"RoundEngine takes options or their fields as keywords, not both: {sorted(option_fields)}")
        if options is None:
            options = LocalSGDOptions.from_keywords(**option_fields)
            if options.data_partition != "iid":  # (the Trainer glue builds the sampler; a plain loop, its own)
                raise ValueError("data_partition: RoundEngine does not load data; give your DataLoader a "
                                 "hf_localsgd.core.partition sampler or shards (LabelShardSampler, worst_case_shards)")
        self.options = options
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be > 0, got {bucket_size_mb}")
        if isinstance(model, DistributedDataParallel):
            keep_buffers_local(model)
            model = model.module
        self.flat = build_layout(model, masters, bucket_size_mb)
        self.optimizer, self.lr_scheduler, self.peak_lr = optimizer, lr_scheduler, peak_lr(optimizer, lr_scheduler)
        check_launch()
        self.topology, self.shard = build_islands(options, self.flat, process_group, topology,
                                                  sharded=masters is not None and masters.sharded)
        self.reducer = build_reducer(options, self.topology)
        self.world_size = self.topology.num_islands  # K: the replicas of the round
        self.replica_index = self.topology.replica_index
        # what data parallelism sends per step: an all-reduce of the whole replica over every rank
        self._step_bytes = ring_bytes(self.shard.replica_bytes, self.world_size * self.topology.island_size)
        self.warmup_steps = options.local_sgd_warmup_steps
        self.track_metrics = track_metrics

        if schedule is not None and options.num_fragments > 1:
            raise ValueError("num_fragments: streaming fragments sync at fixed steps of a constant H (sync_every); "
                             "a schedule= of your own is not combined with them")
        self._schedule = schedule or build_sync_schedule(options, total_steps, optimizer, self.peak_lr, lr_warmup_steps)
        self.outer = build_sync(options, self.shard, self.reducer, total_rounds(options, self._schedule, total_steps),
                                self.topology, model, default_sync_timeout)

        self.hooks = [*build_hooks(options, seed=seed, total_steps=total_steps), *hooks]
        check_hooks(self.hooks)
        for hook in self.hooks:
            hook.attach(self)
        self._scheduled_lrs: list[float] | None = None  # the schedule's lrs while a hook's are in the optimizer
        self._local_backup: torch.Tensor | None = None  # this replica's weights while the global model is in

        self.last_metrics: dict[str, float] = {}
        self.bytes_sent = 0.0  # by this rank, outer syncs and warm-up gradient all-reduces
        self.seconds_in_sync = 0.0  # host wall-clock time inside sync()
        self._num_steps = self._inner_step = self._num_syncs = 0
        self._start_round()
        self._announce(model)

    def _announce(self, model) -> None:
        self.topology.warn_if_single_island()
        if self.world_size > 1:
            self.outer.broadcast()
            if isinstance(model, nn.Module) and self.replica_index == 0:
                warn_about_unsynchronized_buffers(model)
        else:
            # A warning, so that it shows: one process is often a launch that did not start the others.
            logger.warning("RoundEngine: world size 1, the outer step applies %s to the single replica's update "
                           "and nothing is communicated.", self.options.outer_optimizer)

    # ------------------------------------------------------------------ position in training (read-only)
    num_steps = property(lambda self: self._num_steps, doc="Calls of step() so far.")
    inner_step = property(lambda self: self._inner_step, doc="Inner steps since the last sync.")
    num_syncs = property(lambda self: self._num_syncs, doc="Outer syncs so far.")
    sync_every = property(lambda self: self._sync_every, doc="H of the round in progress.")

    @property
    def in_warmup(self) -> bool:
        return self._num_steps < self.warmup_steps

    @property
    def syncs_gradients(self) -> bool:
        """Whether the *next* inner step must all-reduce its gradients over all ranks (the warm-up)."""
        return self.in_warmup

    @property
    def outer_lr(self) -> float:
        return self.outer.lr

    @property
    def global_params(self) -> torch.Tensor:
        """The flat float32 global model the replicas start each round from (y for schedule-free): the part this
        rank keeps (`hf_localsgd.core.shard`), all of it unless it is a rank of a DDP island (streaming
        fragments: the whole model, refused inside DDP islands)."""
        return self.outer.global_params

    @property
    def outer_optimizer(self) -> torch.optim.Optimizer:
        return self.outer.optimizer

    def hook(self, name: str) -> RoundHook | None:
        """The hook called ``name`` ("palsgd", "lr_scaling"), if this engine runs it."""
        return next((h for h in self.hooks if h.name == name), None)

    # ------------------------------------------------------------------ the inner step
    def begin_step(self) -> None:
        """A step starts: this replica's weights come back (after an evaluation of the global model), the hooks
        decide the step (PALSGD's draw), and the step's inner lrs are set until `after_optimizer_step`."""
        self.restore_local()
        self.after_optimizer_step()  # (a loop that skipped it: the schedule's lrs, not this step's, are read below)
        for hook in self.hooks:
            hook.begin_step()
        lrs = next((lrs for hook in self.hooks if (lrs := hook.step_lrs(self.optimizer)) is not None), None)
        if lrs is not None:
            self._scheduled_lrs = [group["lr"] for group in self.optimizer.param_groups]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr

    @property
    def skips_gradient_step(self) -> bool:
        """Whether the step in progress takes no gradient (a PALSGD pseudo-synchronization)."""
        return any(hook.skips_gradient_step for hook in self.hooks)

    def before_optimizer_step(self) -> None:
        for hook in self.hooks:
            hook.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Put the schedule's lrs back (before the lr scheduler steps, which reads them)."""
        if self._scheduled_lrs is not None:
            for group, lr in zip(self.optimizer.param_groups, self._scheduled_lrs):
                group["lr"] = lr
            self._scheduled_lrs = None

    def step(self) -> bool:
        """Count one inner optimizer step; run the outer step when the round is complete. Returns whether a
        synchronization happened."""
        for hook in self.hooks:
            hook.end_step()
        self._num_steps += 1
        if self._num_steps <= self.warmup_steps:
            self.bytes_sent += self._step_bytes  # DDP's gradient all-reduce
            if self._num_steps == self.warmup_steps:
                # Local rounds start from the warmed-up model, the first replica's: data-parallel steps keep the
                # replicas equal only if their inner optimizers are (a second train() call keeps each replica's).
                self.outer.reset_from_model()
                self.outer.broadcast()
                self._start_round()
            return False
        self._inner_step += 1
        started = time.perf_counter()
        self._in_sync(self.outer.at_step, self._inner_step, self._sync_every, self.track_metrics)  # (streaming)
        self.seconds_in_sync += time.perf_counter() - started
        if self._inner_step >= self._sync_every:
            return self.sync()
        return False

    @property
    def should_stop(self) -> bool:
        """Whether a hook has ended training (lr scaling: the scale-invariant budget is spent)."""
        return any(hook.should_stop for hook in self.hooks)

    def _start_round(self) -> None:
        """Fix the H of the round that starts now (a communication schedule is asked once per round)."""
        h = self._schedule if isinstance(self._schedule, int) else int(self._schedule(self._num_steps))
        if h < 1:
            raise ValueError(f"the sync_every schedule gave H={h} at step {self._num_steps}")
        self._sync_every = h

    # ------------------------------------------------------------------ the outer step
    @torch.no_grad()
    def sync(self) -> bool:
        """Run the outer step now (also for a final, partial round). A no-op right after a sync and during
        warm-up. Returns whether a synchronization happened."""
        self.restore_local()
        if self._inner_step == 0 or self.in_warmup:
            return False
        started, outer_lr = time.perf_counter(), self.outer.lr
        payloads = [(hook, p) for hook in self.hooks if (p := hook.sync_payload()) is not None]
        if payloads and not self.outer.carries_payloads:
            raise ValueError(f"hooks: {[h.name for h, _ in payloads]} send floats with the outer all-reduce, which "
                             "outer_overlap / num_fragments leave in flight: not combined")
        tail = torch.cat([p for _, p in payloads]) if payloads else None
        outcome = self._in_sync(self.outer, tail, measure=self.track_metrics)
        ended, self._inner_step = self._sync_every, 0
        self._num_syncs += 1
        self._start_round()  # before the hooks: the lr they set is the next round's (LocalAdaScale's ρ needs its H)
        metrics, offset = {}, 0
        for hook in self.hooks:
            payload = next((p for h, p in payloads if h is hook), None)
            part = None if payload is None or outcome.tail is None else outcome.tail[offset : offset + payload.numel()]
            offset += 0 if payload is None else payload.numel()
            metrics.update(hook.after_sync(part, self._sync_every))
        self._note_skipped(outcome)
        self.bytes_sent += outcome.bytes_sent
        if self.track_metrics:  # .tolist() waits for the device, so the timing includes the device's work
            norms = {} if outcome.norms is None else outer_gradient_metrics(*outcome.norms.tolist(), self.world_size)
            self.last_metrics = {
                "round": self._num_syncs, "sync_every": ended, "outer_lr": outer_lr, **norms,
                "sync_seconds": time.perf_counter() - started, "sync_wait_seconds": outcome.wait_seconds,
                "skipped_syncs": self.outer.skipped,
                **traffic_metrics(outcome.bytes_sent, self.bytes_sent, self.data_parallel_bytes), **metrics,
            }
        # Host wall-clock time; on an accelerator without metrics, work still queued is not in it.
        self.seconds_in_sync += time.perf_counter() - started
        return True

    def _in_sync(self, call, *args, **kwargs):
        """``call`` of the sync unit, its time-out said with the round and step it happened in."""
        try:
            return call(*args, **kwargs)
        except SyncTimeoutError as error:
            raise SyncTimeoutError(
                f"sync_timeout_seconds: the outer sync of round {self._num_syncs + 1} (step {self._num_steps}) timed "
                f"out: {error}. A replica stopped (a crash, a hung data loader, a dead link); this rank stops too"
            ) from error

    def _note_skipped(self, outcome) -> None:
        if outcome.skipped:
            logger.warning("RoundEngine: the summed outer gradient of round %d (step %d) is not finite: outer step "
                           "skipped, every replica restarts from the global model (%d in a row; max_skipped_syncs=%d)",
                           self._num_syncs, self._num_steps, self.outer.skipped_in_a_row,
                           self.options.max_skipped_syncs)

    def finish(self) -> bool:
        """End of training: synchronize the last, partial round, apply what is in flight, and leave the global
        model (schedule-free: its averaged x) in the model for good. Returns whether a synchronization happened."""
        synced = self.sync()
        self.flush()
        self.outer.write_eval()
        return synced

    def close(self) -> None:
        """Release the process groups and the thread this engine made for its sums (``outer_overlap``,
        ``num_fragments``, int8), which a process keeps to its end otherwise: on every rank, after `finish` (a sum
        still in flight, when training stopped without it, is waited for and dropped). The global model stays
        readable; the engine syncs no more."""
        self._in_sync(self.outer.drop_in_flight)
        self.reducer.close()

    def flush(self) -> bool:
        """Apply the outer-gradient sums still in flight (``outer_overlap``; nothing for a blocking sync): the
        global model then holds every round so far, and the replicas start from it. Returns whether a sum was
        applied."""
        flushed = self._in_sync(self.outer.flush)
        if flushed is not None:
            self._note_skipped(flushed)
        return flushed is not None and flushed.applied

    @property
    def data_parallel_bytes(self) -> float:
        """What this rank would have sent so far under data-parallel training: one gradient all-reduce a step."""
        return self._num_steps * self._step_bytes

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """The engine's state: position in training, global model, outer optimizer, and each hook's state
        (the replica's own weights and inner optimizer are saved beside it, `hf_localsgd.core.checkpoint`)."""
        return {
            "outer_optimizer_name": self.options.outer_optimizer,
            "sync_every": self._sync_every,  # of the round in progress
            "world_size": self.world_size,
            **self.topology.state(),
            "outer_overlap": self.options.outer_overlap,
            "num_fragments": self.options.num_fragments,
            "fragment_sync_delay": self.options.fragment_sync_delay,
            "num_steps": self._num_steps,
            "inner_step": self._inner_step,
            "num_syncs": self._num_syncs,
            "bytes_sent": self.bytes_sent,
            "seconds_in_sync": self.seconds_in_sync,
            "round_hooks": {hook.name: {"option": hook.option, "strict": hook.strict_resume} for hook in self.hooks},
            "hook_state": {hook.name: hook.state_dict() for hook in self.hooks},
            **self.outer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        hook_state = check_resumable(state, self)
        self._local_backup = None  # the state's weights replace whatever was set aside
        self.outer.load_state_dict(state)
        for hook in self.hooks:
            if hook.name in hook_state:
                hook.load_state_dict(hook_state[hook.name])
            else:
                logger.info("RoundEngine: %s starts afresh (not in the checkpoint)", hook.option)
        self._num_steps, self._inner_step, self._num_syncs = state["num_steps"], state["inner_step"], state["num_syncs"]
        # The round in progress keeps the H it started with; one that has not started asks this run's H.
        self._sync_every = state["sync_every"]
        if self._inner_step == 0:
            self._start_round()
        self.bytes_sent, self.seconds_in_sync = state["bytes_sent"], state["seconds_in_sync"]

    def fast_forward(self, num_steps: int) -> None:
        """Continue at ``num_steps`` from a model trained without this engine's state (e.g. a plain `Trainer`
        checkpoint): its weights become the global model and a new round starts there, with the H the
        schedule gives at that step. Outer-optimizer and hook state start fresh."""
        self._num_steps, self._inner_step = num_steps, 0
        if not self.in_warmup:
            self.outer.reset_from_model()
        self._start_round()
