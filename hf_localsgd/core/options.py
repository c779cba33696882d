"""The options of low-communication training: one dataclass, the single source of their names, choices,
defaults, help texts and validation.

`LocalSGDOptions` needs nothing but the standard library. `RoundEngine` takes it (or its fields as keyword
arguments), `hf_localsgd.LocalSGDArguments` extends it for `transformers.TrainingArguments`, and
`HfArgumentParser` turns its metadata into the command line of `hf_localsgd.train`:

    options = LocalSGDOptions(sync_every=32, outer_optimizer="nesterov", outer_lr=0.7)
    engine = RoundEngine(model, options)     # or RoundEngine(model, sync_every=32, ...)

Every invalid value raises a `ValueError` that starts with the field's name, when the options are built.
The methods and their equations are in docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


OUTER_OPTIMIZERS = ("average", "nesterov", "schedule_free")
# (outer lr, outer momentum) when left unset. average: parameter averaging (Local SGD / FedAvg), which only
# lr 1 and no momentum are; nesterov: DiLoCo's; schedule_free: what schedule-free SGD needed as the outer
# optimizer in "Understanding Outer Optimizers in Local SGD" (arXiv:2509.10439, App. A.1.4).
OUTER_DEFAULTS = {"average": (1.0, 0.0), "nesterov": (0.7, 0.9), "schedule_free": (2.0, 0.2)}
OUTER_LR_SCHEDULERS = ("constant", "cosine", "linear_after_plateau")
SYNC_EVERY_SCHEDULES = ("constant", "linear", "stepwise", "inverse_lr")
PSEUDO_SYNC_RATE_SCHEDULES = ("constant", "inverse_lr", "theorem_2")
LR_SCALINGS = ("none", "adascale", "local_adascale")
DATA_PARTITIONS = ("iid", "by_label", "worst_case")
STATE_DEVICES = ("model", "cpu")
COMM_DTYPES = ("float32", "bfloat16", "int8")
INT8_BLOCK_SIZE = 2048  # elements per int8 scale (hf_localsgd.core.quantize.BLOCK_SIZE)
OUTER_OVERLAPS = ("none", "delayed", "eager")
# hf_localsgd 0.1's RoundEngine keywords: the option each is now
RENAMED_KEYWORDS = {"warmup_steps": "local_sgd_warmup_steps", "state_device": "outer_state_device",
                    "comm_dtype": "outer_comm_dtype"}


def _option(default, help: str, choices=None):
    metadata = {"help": help} if choices is None else {"help": help, "choices": list(choices)}
    return field(default=default, metadata=metadata)


@dataclass
class LocalSGDOptions:
    """The options of Local SGD, DiLoCo, schedule-free outer SGD, PALSGD and (Local)AdaScale.

    The round:
        sync_every, sync_every_schedule, sync_every_min, sync_every_stages, local_sgd_warmup_steps
    Islands (data parallelism inside a group of ranks, the round across groups):
        island_size
    The outer step:
        outer_optimizer, outer_lr, outer_momentum, outer_lr_scheduler, outer_lr_plateau_fraction,
        outer_state_device, outer_comm_dtype, outer_error_feedback
    Overlapped outer steps (eager updates, streaming fragments):
        outer_overlap, num_fragments, fragment_sync_delay, fragment_update_alpha
    Faults:
        max_skipped_syncs, sync_timeout_seconds
    PALSGD (pseudo-synchronization):
        pseudo_sync_prob, pseudo_sync_rate, pseudo_sync_rate_schedule
    Learning-rate scaling (AdaScale / LocalAdaScale):
        lr_scaling, lr_scaling_c, lr_scaling_ema
    Data across workers:
        data_partition, data_partition_column
    """

    # --- the round
    sync_every: int = _option(16, "H: inner optimizer steps per round, between two outer synchronizations.")
    sync_every_schedule: str = _option(
        "constant",
        "How H changes over training (communicate often early, rarely later): 'constant' (sync_every), "
        "'linear' or 'stepwise' ramps from sync_every_min to sync_every over the local steps, or 'inverse_lr': "
        "H = sync_every_min · peak lr / lr, clipped to [sync_every_min, sync_every], which grows H as the inner "
        "learning rate decays. See docs/methods.md.",
        SYNC_EVERY_SCHEDULES,
    )
    sync_every_min: int = _option(1, "The smallest H of a sync_every_schedule (its start for 'linear' and 'stepwise').")
    sync_every_stages: int = _option(
        4, "For sync_every_schedule='stepwise': the number of equal spans of steps, each with one H, from "
           "sync_every_min to sync_every."
    )
    local_sgd_warmup_steps: int = _option(
        0, "Ordinary synchronous data-parallel steps (gradients all-reduced) before local rounds begin "
           "(post-local SGD; PALSGD used 1024 on TinyStories)."
    )
    # --- islands
    island_size: int = _option(
        1, "Ranks per island: consecutive ranks that train one replica together with synchronous data parallelism "
           "(DDP, FSDP2 sharding the model inside the island, or DeepSpeed ZeRO 0-2 with the island as its "
           "data-parallel group) on every step, while islands run the round "
           "between them (one outer all-reduce every H steps). Set it to the GPUs per node for one island per "
           "node. 1: every rank is its own replica. The number of processes must be a multiple of it."
    )
    # --- the outer step
    outer_optimizer: str = _option(
        "nesterov",
        "Outer optimizer applied to the averaged outer gradient: 'average' (Local SGD / FedAvg), 'nesterov' "
        "(DiLoCo) or 'schedule_free' (schedule-free SGD; evaluation and saving use its averaged iterate).",
        OUTER_OPTIMIZERS,
    )
    outer_lr: float | None = _option(
        None, "Outer learning rate. Default per outer optimizer: "
              + ", ".join(f"{name} {lr}" for name, (lr, _) in OUTER_DEFAULTS.items()) + " (average: required)."
    )
    outer_momentum: float | None = _option(
        None, "Outer momentum (schedule_free: its b1, in (0, 1)). Default per outer optimizer: "
              + ", ".join(f"{name} {m}" for name, (_, m) in OUTER_DEFAULTS.items()) + " (average: required)."
    )
    outer_lr_scheduler: str = _option(
        "constant", "Schedule of the outer learning rate over the rounds. There is no outer warm-up: it was always "
                    "harmful in the outer-optimizer study (arXiv:2509.10439).",
        OUTER_LR_SCHEDULERS,
    )
    outer_lr_plateau_fraction: float = _option(
        0.1, "For outer_lr_scheduler='linear_after_plateau': fraction of the rounds at constant outer lr before the "
             "linear decay to 0 (0.1 and 0.25 in the outer-optimizer study)."
    )
    outer_state_device: str = _option(
        "model", "Where the float32 global copy and the outer-optimizer state live: 'model' (the model's device; "
                 "fastest) or 'cpu' (saves accelerator memory, costs host-device copies at each sync).",
        STATE_DEVICES,
    )
    outer_comm_dtype: str = _option(
        "float32", "Data type the outer gradients travel in: 'float32'; 'bfloat16' halves the bytes sent; 'int8': "
                   f"blockwise absmax quantization (one float32 scale per block of {INT8_BLOCK_SIZE} elements), an "
                   "all-to-all of the quantized slices, a float32 sum of each slice, quantized again and "
                   f"all-gathered (never summed in int8): 0.25 + 1/{INT8_BLOCK_SIZE} of float32's bytes.",
        COMM_DTYPES,
    )
    outer_error_feedback: bool = _option(
        False, "Error feedback for a lossy outer_comm_dtype ('int8' or 'bfloat16'): each rank keeps what rounding its "
               "outer gradient for the wire lost (its residual, kept in the checkpoint) and adds it to its next "
               "outer gradient, so that nothing is lost for good, only delayed by a round."
    )
    # --- overlapped outer steps
    outer_overlap: str = _option(
        "none", "Overlap the outer all-reduce with the next round's inner steps: 'none' (blocking), 'delayed' (the "
                "sum of a round is applied at the end of the next one: one round stale) or 'eager' (each replica "
                "applies its own fresh outer gradient with the others' one-round-old ones: 'Eager Updates for "
                "Overlapped Communication and Computation in DiLoCo', arXiv:2502.12996). See docs/methods.md.",
        OUTER_OVERLAPS,
    )
    num_fragments: int = _option(
        1, "Streaming DiLoCo (arXiv:2501.18512): P fragments of the model (its transformer blocks, strided, and a "
           "1/P share of the other parameters each), fragment p synchronized once per round at its own step, so "
           "the bytes of one sync drop by P. sync_every must be a multiple of it; 1: the whole model at once."
    )
    fragment_sync_delay: int = _option(
        1, "Streaming: τ, the inner steps a fragment's all-reduce overlaps (it is started τ steps before its "
           "outer step), below sync_every / num_fragments."
    )
    fragment_update_alpha: float = _option(
        0.0, "Streaming: α, after a fragment's outer step each replica keeps α of its own fragment (which moved on "
             "for τ steps) and takes 1 - α of the new global one; 0 (the default, torchft's) makes the replicas "
             "equal, the paper used 0.5."
    )
    # --- faults
    max_skipped_syncs: int = _option(
        3, "A sync whose summed outer gradient is not finite (a replica's weights went NaN or inf) is skipped: the "
           "global model and outer state stay, every replica restarts from the global model. This many in a row "
           "stop training with an error."
    )
    sync_timeout_seconds: float | None = _option(
        None, "The longest the outer sync waits for the other replicas before every waiting rank stops with an "
              "error naming the sync; with a Trainer, None is its ddp_timeout (the process group's), in a plain "
              "loop no limit beyond the process group's."
    )
    # --- PALSGD
    pseudo_sync_prob: float = _option(
        0.0, "PALSGD's p: probability that a step is a pseudo-synchronization (pull toward this rank's copy of the "
             "global model: no data, no gradient, no communication) instead of a gradient step, whose inner lr is "
             "then scaled by 1 / (1 - p). 0 disables PALSGD; the paper used 0.1 on TinyStories."
    )
    pseudo_sync_rate: float = _option(
        1.0, "PALSGD's mixing rate η: a pseudo-synchronization moves x_k by (lr · η / p)(x - x_k)."
    )
    pseudo_sync_rate_schedule: str = _option(
        "constant", "How η follows training: 'constant'; 'inverse_lr': η_t = η · peak lr / lr_t (the peak: the lr "
                    "schedule's base lr, learning_rate under Trainer), so a pseudo-synchronization pulls as hard "
                    "(peak lr · η / p) while the inner lr decays; or 'theorem_2': η_t = p / (2 H lr_t), PALSGD's "
                    "Theorem 2 (proved for SGD inner steps, averaging outer steps, a constant lr <= p / (48 L H) and "
                    "p <= 1/2 on smooth strongly convex objectives), a pull of 1/(2H) of the way to the global model; "
                    "pseudo_sync_rate is then not used. A pull lr · η / p above 1 overshoots (warned about).",
        PSEUDO_SYNC_RATE_SCHEDULES,
    )
    # --- learning-rate scaling
    lr_scaling: str = _option(
        "none", "Scale the inner lr by the gain ratio ρ of 'On the Choice of Learning Rate for Local SGD': "
                "'adascale' (c = 0) or 'local_adascale' (c = 1), from the gradient noise of each round's first "
                "gradients, all-reduced with the next outer step (doubling its bytes, not its latency). The lr "
                "schedule is read at the scale-invariant step s (s += ρ per step), and training ends when s reaches "
                "the base run's budget (max_steps read as one worker's steps at H = 1; docs/methods.md).",
        LR_SCALINGS,
    )
    lr_scaling_c: float | None = _option(
        None, "The interpolation constant c of the gain ratio, in [0, 1]: 0 is AdaScale, 1 is LocalAdaScale. "
              "Default: per lr_scaling."
    )
    lr_scaling_ema: float = _option(0.9, "Exponential moving average factor smoothing the σ² and G estimates (0: none).")
    # --- data
    data_partition: str = _option(
        "iid", "How the training data is split across workers: 'iid' (the usual distributed sampler) or "
               "'by_label': sorted by data_partition_column and cut into one contiguous shard per worker, the "
               "pathological partition of 'Faster Convergence of Local SGD for Over-Parameterized Models'; "
               "'worst_case' (all data on one worker, none on the others, its Example 1) is for plain loops over "
               "RoundEngine (hf_localsgd.core.partition.worst_case_shards): a Trainer's ranks must all take steps.",
        DATA_PARTITIONS,
    )
    data_partition_column: str = _option("label", "The column data_partition='by_label' sorts by.")

    def __post_init__(self):
        self.validate_options()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # e.g. TrainingArguments', when mixed in
            parent()

    # ------------------------------------------------------------------ validation
    def validate_options(self) -> None:
        """Raise a `ValueError` naming the first invalid field."""
        def fail(name, message):
            raise ValueError(f"{name}: {message}")

        def choice(name, choices):
            value = getattr(self, name)
            if value not in choices:
                fail(name, f"must be one of {choices}, got {value!r}")

        def integer(name, low):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                fail(name, f"must be an integer >= {low}, got {value!r}")

        # A number given as text (a hand-written config, a JSON string) would fail below with a TypeError
        # that names nothing.
        for name in ("outer_lr", "outer_momentum", "outer_lr_plateau_fraction", "pseudo_sync_prob", "pseudo_sync_rate",
                     "lr_scaling_c", "lr_scaling_ema", "fragment_update_alpha", "sync_timeout_seconds"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                fail(name, f"must be a number, got {value!r}")
        for name, choices in (("sync_every_schedule", SYNC_EVERY_SCHEDULES), ("outer_optimizer", OUTER_OPTIMIZERS),
                              ("outer_lr_scheduler", OUTER_LR_SCHEDULERS), ("outer_state_device", STATE_DEVICES),
                              ("outer_comm_dtype", COMM_DTYPES), ("lr_scaling", LR_SCALINGS),
                              ("pseudo_sync_rate_schedule", PSEUDO_SYNC_RATE_SCHEDULES),
                              ("data_partition", DATA_PARTITIONS), ("outer_overlap", OUTER_OVERLAPS)):
            choice(name, choices)
        if not isinstance(self.outer_error_feedback, bool):
            fail("outer_error_feedback", f"must be True or False, got {self.outer_error_feedback!r}")
        if self.outer_error_feedback and self.outer_comm_dtype == "float32":
            fail("outer_error_feedback", "needs a lossy outer_comm_dtype ('int8' or 'bfloat16'): a float32 sum rounds "
                 "nothing to feed back; set outer_comm_dtype, or leave outer_error_feedback off")
        integer("sync_every", 1)
        integer("local_sgd_warmup_steps", 0)
        integer("island_size", 1)
        integer("max_skipped_syncs", 1)
        if self.sync_timeout_seconds is not None and not (math.isfinite(self.sync_timeout_seconds)
                                                          and self.sync_timeout_seconds > 0):
            fail("sync_timeout_seconds", f"must be a number of seconds > 0 (or None), got {self.sync_timeout_seconds}")
        self._validate_overlap(fail, integer)
        if self.sync_every_schedule != "constant":
            integer("sync_every_min", 1)
            if self.sync_every_min > self.sync_every:
                fail("sync_every_min", f"must be at most sync_every={self.sync_every}, got {self.sync_every_min}")
            integer("sync_every_stages", 1)
            if self.sync_every_schedule == "inverse_lr" and self.outer_lr_scheduler != "constant":
                fail("outer_lr_scheduler", "a decaying outer lr needs the number of rounds in advance, which "
                     "sync_every_schedule='inverse_lr' does not know (it follows the inner lr): use 'constant'")
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
        if not 0 <= self.outer_lr_plateau_fraction < 1:
            fail("outer_lr_plateau_fraction", f"must be in [0, 1), got {self.outer_lr_plateau_fraction}")
        if not 0 <= self.pseudo_sync_prob < 1:
            fail("pseudo_sync_prob", f"must be in [0, 1), got {self.pseudo_sync_prob}")
        if not (math.isfinite(self.pseudo_sync_rate) and self.pseudo_sync_rate > 0):
            fail("pseudo_sync_rate", f"must be a finite number > 0, got {self.pseudo_sync_rate}")
        if self.pseudo_sync_rate_schedule == "theorem_2" and self.pseudo_sync_rate != 1.0:
            fail("pseudo_sync_rate", f"pseudo_sync_rate_schedule='theorem_2' sets η_t = p / (2 H lr_t) itself: leave "
                 f"pseudo_sync_rate at 1, or use 'constant' / 'inverse_lr' for η={self.pseudo_sync_rate}")
        if self.lr_scaling_c is not None and not 0 <= self.lr_scaling_c <= 1:
            fail("lr_scaling_c", f"must be in [0, 1], got {self.lr_scaling_c}")
        if not 0 <= self.lr_scaling_ema < 1:
            fail("lr_scaling_ema", f"must be in [0, 1), got {self.lr_scaling_ema}")
        if self.data_partition == "by_label" and not (isinstance(self.data_partition_column, str)
                                                       and self.data_partition_column):
            fail("data_partition_column", f"data_partition='by_label' needs a column name, got "
                 f"{self.data_partition_column!r}")
        if self.lr_scaling != "none" and self.pseudo_sync_prob > 0:
            fail("lr_scaling", "is not combined with PALSGD (pseudo_sync_prob > 0): both set the inner lr")

    @property
    def overlapped(self) -> bool:
        """Whether outer-gradient sums stay in flight while inner steps run (outer_overlap, streaming fragments)."""
        return self.outer_overlap != "none" or self.num_fragments > 1

    def _validate_overlap(self, fail, integer) -> None:
        integer("num_fragments", 1)
        integer("fragment_sync_delay", 0)
        if not 0 <= self.fragment_update_alpha <= 1:
            fail("fragment_update_alpha", f"must be in [0, 1], got {self.fragment_update_alpha}")
        if not self.overlapped:
            return
        which = f"outer_overlap={self.outer_overlap!r}" if self.outer_overlap != "none" else "num_fragments > 1"
        if self.num_fragments > 1:
            if self.outer_overlap != "none":
                fail("outer_overlap", "streaming fragments (num_fragments > 1) overlap their own all-reduces: leave "
                     "outer_overlap at 'none', or use num_fragments=1")
            if self.sync_every_schedule != "constant":
                fail("sync_every_schedule", "streaming fragments need a constant sync_every (each fragment syncs "
                     "at its own step of every round)")
            if self.sync_every % self.num_fragments:
                fail("sync_every", f"must be a multiple of num_fragments={self.num_fragments}, got {self.sync_every}")
            window = self.sync_every // self.num_fragments
            if self.fragment_sync_delay >= window:
                fail("fragment_sync_delay", f"must be below sync_every / num_fragments = {window} (a fragment's "
                     f"all-reduce ends before the next one starts), got {self.fragment_sync_delay}")
        if self.pseudo_sync_prob > 0:
            fail("pseudo_sync_prob", f"PALSGD pulls toward the global model of the round, which {which} leaves in "
                 "flight: not combined; use outer_overlap='none' and num_fragments=1 with PALSGD")
        if self.lr_scaling != "none":
            fail("lr_scaling", f"sends its gradient statistics with the outer all-reduce, which {which} applies a "
                 "round or some steps later: not combined; use outer_overlap='none' and num_fragments=1")

    @classmethod
    def from_keywords(cls, **fields) -> LocalSGDOptions:
        """The options from keyword arguments (what `RoundEngine(model, sync_every=..., ...)` takes), with the
        names of hf_localsgd 0.1's engine keywords pointed to their fields."""
        renamed = sorted(set(fields) & set(RENAMED_KEYWORDS))
        if renamed:
            raise TypeError(", ".join(f"{old} is now {RENAMED_KEYWORDS[old]}" for old in renamed) +
                            " (the LocalSGDOptions / LocalSGDConfig field)")
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; the options are LocalSGDOptions' fields")
        return cls(**fields)

    # ------------------------------------------------------------------ derived values
    @property
    def resolved_outer_lr(self) -> float:
        return OUTER_DEFAULTS[self.outer_optimizer][0] if self.outer_lr is None else self.outer_lr

    @property
    def resolved_outer_momentum(self) -> float:
        return OUTER_DEFAULTS[self.outer_optimizer][1] if self.outer_momentum is None else self.outer_momentum

    @property
    def resolved_lr_scaling_c(self) -> float:
        if self.lr_scaling_c is not None:
            return self.lr_scaling_c
        return 1.0 if self.lr_scaling == "local_adascale" else 0.0
