"""Configuration: the local-SGD options as a mixin dataclass, and `LocalSGDConfig` for `LocalSGDTrainer`.

`LocalSGDArguments` holds only the local-SGD fields, so the same options can sit next to any other trainer's
config. For TRL's `SFTTrainer`, for example:

    @dataclass
    class SFTLocalSGDConfig(LocalSGDArguments, SFTConfig):
        pass

Every field's help text and choices live in its metadata (what `HfArgumentParser` shows), and `__post_init__`
validates them before any model or data is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .adascale import LR_SCALINGS
from .engine import COMM_DTYPES
from .outer import OUTER_DEFAULTS, OUTER_LR_SCHEDULERS, OUTER_OPTIMIZERS
from .partition import DATA_PARTITIONS
from .schedules import SYNC_EVERY_SCHEDULES


@dataclass
class LocalSGDArguments:
    """The options of low-communication training; see `LocalSGDConfig` for the Trainer version."""

    sync_every: int = field(
        default=16,
        metadata={"help": "H: inner optimizer steps per round, between two outer synchronizations."},
    )
    sync_every_schedule: str = field(
        default="constant",
        metadata={
            "help": "How H changes over training (communicate often early, rarely later; seed 002 §4.1): "
            "'constant' (sync_every), 'linear' or 'stepwise' ramps from sync_every_min to sync_every over the "
            "local steps, or 'inverse_lr': H = sync_every_min · peak lr / lr, clipped to "
            "[sync_every_min, sync_every], which grows H as the inner learning rate decays (seed 000 A.1.5).",
            "choices": list(SYNC_EVERY_SCHEDULES),
        },
    )
    sync_every_min: int = field(
        default=1,
        metadata={"help": "The smallest H of a sync_every_schedule (its start for 'linear' and 'stepwise')."},
    )
    sync_every_stages: int = field(
        default=4,
        metadata={"help": "For sync_every_schedule='stepwise': the number of equal spans of steps, each "
                          "with one H, from sync_every_min to sync_every."},
    )
    outer_optimizer: str = field(
        default="nesterov",
        metadata={
            "help": "Outer optimizer applied to the averaged outer gradient: 'average' (Local SGD / FedAvg), "
            "'nesterov' (DiLoCo) or 'schedule_free' (schedule-free SGD; evaluation and saving use its "
            "averaged iterate).",
            "choices": list(OUTER_OPTIMIZERS),
        },
    )
    outer_lr: float | None = field(
        default=None,
        metadata={
            "help": "Outer learning rate. Default per outer optimizer: average 1.0 (required), nesterov 0.7, "
            "schedule_free 2.0."
        },
    )
    outer_momentum: float | None = field(
        default=None,
        metadata={
            "help": "Outer momentum. Default per outer optimizer: average 0.0 (required), nesterov 0.9, "
            "schedule_free 0.2 (its b1, in (0, 1))."
        },
    )
    outer_lr_scheduler: str = field(
        default="constant",
        metadata={
            "help": "Schedule of the outer learning rate over the rounds. There is no outer warm-up: seed 000 "
            "found it always harmful.",
            "choices": list(OUTER_LR_SCHEDULERS),
        },
    )
    outer_lr_plateau_fraction: float = field(
        default=0.1,
        metadata={
            "help": "For outer_lr_scheduler='linear_after_plateau': fraction of the rounds at constant outer lr "
            "before the linear decay to 0 (seed 000 used 0.1 and 0.25)."
        },
    )
    local_sgd_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Ordinary synchronous data-parallel steps (gradients all-reduced) before local rounds begin "
            "(post-local SGD; PALSGD used 1024 on TinyStories)."
        },
    )
    pseudo_sync_prob: float = field(
        default=0.0,
        metadata={
            "help": "PALSGD's p: probability that a step is a pseudo-synchronization (pull toward this rank's "
            "copy of the global model: no data, no gradient, no communication) instead of a gradient step, "
            "whose inner lr is then scaled by 1 / (1 - p). 0 disables PALSGD; the paper used 0.1 on TinyStories."
        },
    )
    pseudo_sync_rate: float = field(
        default=1.0,
        metadata={"help": "PALSGD's mixing rate η: a pseudo-synchronization moves x_k by (lr · η / p)(x - x_k)."},
    )
    pseudo_sync_rate_schedule: str = field(
        default="constant",
        metadata={
            "help": "How η follows training: 'constant', or 'inverse_lr': η_t = η · learning_rate / lr_t, so a "
            "pseudo-synchronization pulls as hard (learning_rate · η / p) while the inner lr decays, as seed 001's "
            "Theorem 2 does with η = p / (2Hα).",
            "choices": ["constant", "inverse_lr"],
        },
    )
    lr_scaling: str = field(
        default="none",
        metadata={
            "help": "Scale the inner lr by the gain ratio ρ of seed 004: 'adascale' (Eq. 49 with c = 0) or "
            "'local_adascale' (c = 1, Eq. 14), from the gradient noise of each round's first gradients, "
            "all-reduced with the next outer step (doubling its bytes, not its latency). The lr schedule is "
            "read at the scale-invariant step s (s += ρ per step), and training ends when s reaches max_steps.",
            "choices": list(LR_SCALINGS),
        },
    )
    lr_scaling_c: float | None = field(
        default=None,
        metadata={"help": "The interpolation constant c of seed 004 Eq. 49, in [0, 1]: 0 is AdaScale, 1 is "
                          "LocalAdaScale. Default: per lr_scaling."},
    )
    lr_scaling_ema: float = field(
        default=0.9,
        metadata={"help": "Exponential moving average factor smoothing the σ² and G estimates (0: none)."},
    )
    data_partition: str = field(
        default="iid",
        metadata={
            "help": "How the training data is split across workers (LocalSGDTrainer): 'iid' (the usual "
            "distributed sampler) or 'by_label': sorted by data_partition_column and cut into one contiguous "
            "shard per worker, the pathological partition of seed 002 §4.2.",
            "choices": list(DATA_PARTITIONS),
        },
    )
    data_partition_column: str = field(
        default="label",
        metadata={"help": "The column data_partition='by_label' sorts by."},
    )
    outer_state_device: str = field(
        default="model",
        metadata={
            "help": "Where the float32 global copy and the outer-optimizer state live: 'model' (the model's "
            "device; fastest) or 'cpu' (saves accelerator memory, costs host-device copies at each sync).",
            "choices": ["model", "cpu"],
        },
    )
    outer_comm_dtype: str = field(
        default="float32",
        metadata={
            "help": "Data type the outer gradients are all-reduced in; 'bfloat16' halves the bytes sent.",
            "choices": list(COMM_DTYPES),
        },
    )

    def __post_init__(self):
        self._validate_local_sgd()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def _validate_local_sgd(self) -> None:
        def fail(name, message):
            raise ValueError(f"{name}: {message}")

        if not isinstance(self.sync_every, int) or self.sync_every < 1:
            fail("sync_every", f"must be an integer >= 1, got {self.sync_every!r}")
        if self.sync_every_schedule not in SYNC_EVERY_SCHEDULES:
            fail("sync_every_schedule", f"must be one of {SYNC_EVERY_SCHEDULES}, got {self.sync_every_schedule!r}")
        if self.sync_every_schedule != "constant":
            if not isinstance(self.sync_every_min, int) or not 1 <= self.sync_every_min <= self.sync_every:
                fail("sync_every_min", f"must be an integer in [1, sync_every={self.sync_every}], "
                     f"got {self.sync_every_min!r}")
            if not isinstance(self.sync_every_stages, int) or self.sync_every_stages < 1:
                fail("sync_every_stages", f"must be an integer >= 1, got {self.sync_every_stages!r}")
            if self.sync_every_schedule == "inverse_lr" and self.outer_lr_scheduler != "constant":
                fail("outer_lr_scheduler", "a decaying outer lr needs the number of rounds in advance, which "
                     "sync_every_schedule='inverse_lr' does not know (it follows the inner lr): use 'constant'")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            fail("outer_optimizer", f"must be one of {OUTER_OPTIMIZERS}, got {self.outer_optimizer!r}")
        if self.outer_lr is not None and not (math.isfinite(self.outer_lr) and self.outer_lr >= 0):
            fail("outer_lr", f"must be a finite number >= 0, got {self.outer_lr}")
        if self.outer_momentum is not None and not 0 <= self.outer_momentum < 1:
            fail("outer_momentum", f"must be in [0, 1), got {self.outer_momentum}")
        if self.outer_optimizer == "average":
            for name, value, required in (("outer_lr", self.resolved_outer_lr, 1.0),
                                          ("outer_momentum", self.resolved_outer_momentum, 0.0)):
                if value != required:
                    fail(name, f"outer_optimizer='average' is plain averaging and needs {name}={required}, got "
                         f"{value}; use outer_optimizer='nesterov' for another outer lr or momentum")
        if self.outer_optimizer == "schedule_free" and self.resolved_outer_momentum == 0:
            fail("outer_momentum", "schedule_free needs a momentum (b1) in (0, 1)")
        if self.outer_lr_scheduler not in OUTER_LR_SCHEDULERS:
            fail("outer_lr_scheduler", f"must be one of {OUTER_LR_SCHEDULERS}, got {self.outer_lr_scheduler!r}")
        if not 0 <= self.outer_lr_plateau_fraction < 1:
            fail("outer_lr_plateau_fraction", f"must be in [0, 1), got {self.outer_lr_plateau_fraction}")
        if not isinstance(self.local_sgd_warmup_steps, int) or self.local_sgd_warmup_steps < 0:
            fail("local_sgd_warmup_steps", f"must be an integer >= 0, got {self.local_sgd_warmup_steps!r}")
        max_steps = getattr(self, "max_steps", -1)
        if max_steps is not None and max_steps > 0 and self.local_sgd_warmup_steps >= max_steps:
            fail(
                "local_sgd_warmup_steps",
                f"({self.local_sgd_warmup_steps}) must be shorter than max_steps ({max_steps}), "
                "or no local round would ever run",
            )
        if not 0 <= self.pseudo_sync_prob < 1:
            fail("pseudo_sync_prob", f"must be in [0, 1), got {self.pseudo_sync_prob}")
        if not (math.isfinite(self.pseudo_sync_rate) and self.pseudo_sync_rate > 0):
            fail("pseudo_sync_rate", f"must be a finite number > 0, got {self.pseudo_sync_rate}")
        if self.pseudo_sync_rate_schedule not in ("constant", "inverse_lr"):
            fail("pseudo_sync_rate_schedule", f"must be 'constant' or 'inverse_lr', got {self.pseudo_sync_rate_schedule!r}")
        if self.pseudo_sync_prob > 0 and getattr(self, "fp16", False):
            fail("pseudo_sync_prob", "PALSGD skips the gradients of pseudo-synchronization steps, which fp16's "
                 "gradient scaler cannot step without; use bf16")
        if self.lr_scaling not in LR_SCALINGS:
            fail("lr_scaling", f"must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
        if self.lr_scaling_c is not None and not 0 <= self.lr_scaling_c <= 1:
            fail("lr_scaling_c", f"must be in [0, 1], got {self.lr_scaling_c}")
        if not 0 <= self.lr_scaling_ema < 1:
            fail("lr_scaling_ema", f"must be in [0, 1), got {self.lr_scaling_ema}")
        if self.lr_scaling != "none" and self.pseudo_sync_prob > 0:
            fail("lr_scaling", "is not combined with PALSGD (pseudo_sync_prob > 0): both set the inner lr")
        if self.data_partition not in DATA_PARTITIONS:
            fail("data_partition", f"must be one of {DATA_PARTITIONS}, got {self.data_partition!r}")
        if self.outer_state_device not in ("model", "cpu"):
            fail("outer_state_device", f"must be 'model' or 'cpu', got {self.outer_state_device!r}")
        if self.outer_comm_dtype not in COMM_DTYPES:
            fail("outer_comm_dtype", f"must be one of {tuple(COMM_DTYPES)}, got {self.outer_comm_dtype!r}")
        # Sharded or engine-managed data parallelism synchronizes (or shards) what local SGD keeps local.
        if getattr(self, "deepspeed", None):
            fail("deepspeed", "DeepSpeed manages gradient reduction itself; local SGD needs plain DDP (unset it)")
        if getattr(self, "fsdp", None):
            fail("fsdp", "FSDP shards parameters over all ranks; local SGD needs a full replica per rank (unset it)")
        # DDP would broadcast module buffers on every forward pass: a collective local steps must not make.
        if hasattr(self, "ddp_broadcast_buffers") and self.ddp_broadcast_buffers is None:
            self.ddp_broadcast_buffers = False

    @property
    def resolved_outer_lr(self) -> float:
        return OUTER_DEFAULTS[self.outer_optimizer][0] if self.outer_lr is None else self.outer_lr

    @property
    def resolved_outer_momentum(self) -> float:
        return OUTER_DEFAULTS[self.outer_optimizer][1] if self.outer_momentum is None else self.outer_momentum

    def engine_kwargs(self) -> dict:
        """Keyword arguments of `RoundEngine` taken from these options (a constant H: the callback builds
        the schedule, which needs the run's length and learning rate)."""
        return dict(
            sync_every=self.sync_every,
            outer_optimizer=self.outer_optimizer,
            outer_lr=self.outer_lr,
            outer_momentum=self.outer_momentum,
            outer_lr_scheduler=self.outer_lr_scheduler,
            outer_lr_plateau_fraction=self.outer_lr_plateau_fraction,
            warmup_steps=self.local_sgd_warmup_steps,
            pseudo_sync_prob=self.pseudo_sync_prob,
            pseudo_sync_rate=self.pseudo_sync_rate,
            lr_scaling=self.lr_scaling,
            lr_scaling_c=self.lr_scaling_c,
            lr_scaling_ema=self.lr_scaling_ema,
            state_device=self.outer_state_device,
            comm_dtype=self.outer_comm_dtype,
        )


@dataclass
class LocalSGDConfig(LocalSGDArguments, TrainingArguments):
    """`transformers.TrainingArguments` plus the local-SGD options of `LocalSGDArguments`, for `LocalSGDTrainer`.

    Defaults differ from `TrainingArguments` where the Trainer would communicate on every inner step:
    `ddp_broadcast_buffers` is `False` unless set (DDP would broadcast buffers on every forward pass), and
    `average_tokens_across_devices` is `False` (it all-gathers token counts on every step).
    """

    average_tokens_across_devices: bool = field(
        default=False,
        metadata={
            "help": "Normalize the loss by the token count of all replicas. Off for local SGD: it costs an "
            "all-gather on every inner step, and each replica's update is its own until the outer step."
        },
    )
