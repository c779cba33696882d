"""The options for `transformers`: `LocalSGDArguments` to mix into any trainer's config, `LocalSGDConfig`
for `LocalSGDTrainer`.

The fields, their help texts, choices and validation are `LocalSGDOptions`' (`hf_localsgd.core.options`);
this module adds only what concerns the trainer's own fields. For TRL's `SFTTrainer`, for example:

    @dataclass
    class SFTLocalSGDConfig(LocalSGDArguments, SFTConfig):
        pass
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..core.options import LocalSGDOptions
from .deepspeed import check_deepspeed_config, load_config


@dataclass
class LocalSGDArguments(LocalSGDOptions):
    """`LocalSGDOptions` as a mixin for a `TrainingArguments` subclass: its `__post_init__` also checks the
    options against the trainer's fields (a warm-up longer than `max_steps`, sharding without islands, fp16 with
    PALSGD, a DeepSpeed config local SGD cannot run under) and what no Trainer can run (the `worst_case`
    partition)."""

    def __post_init__(self):
        # Islands: DDP's search for unused parameters all-reduces a map of them over all ranks in every backward,
        # across islands; Trainer turns it on for most models unless told.
        if self.island_size > 1 and hasattr(self, "ddp_find_unused_parameters") and self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        super().__post_init__()

    def validate_options(self) -> None:
        super().validate_options()

        def fail(name, message):
            raise ValueError(f"{name}: {message}")

        max_steps = getattr(self, "max_steps", -1)
        if max_steps is not None and max_steps > 0 and self.local_sgd_warmup_steps >= max_steps:
            fail("local_sgd_warmup_steps", f"({self.local_sgd_warmup_steps}) must be shorter than max_steps "
                 f"({max_steps}), or no local round would ever run")
        if self.data_partition == "worst_case":
            fail("data_partition", "'worst_case' leaves all but one rank without data, and every rank of a Trainer "
                 "takes the same steps; run it in a plain loop over RoundEngine with "
                 "hf_localsgd.core.partition.worst_case_shards (an empty rank calls engine.step() only)")
        if self.pseudo_sync_prob > 0 and getattr(self, "fp16", False):
            fail("pseudo_sync_prob", "PALSGD skips the gradients of pseudo-synchronization steps, which fp16's "
                 "gradient scaler cannot step without; use bf16")
        # DeepSpeed: ZeRO 0-2 with its data-parallel group the island (integrations/deepspeed.py); not the rest.
        if getattr(self, "deepspeed", None):
            check_deepspeed_config(load_config(self.deepspeed), self, "deepspeed")
        if self.island_size > 1 and getattr(self, "ddp_find_unused_parameters", None):
            fail("ddp_find_unused_parameters", "DDP's search for unused parameters all-reduces a map of them over all "
                 "ranks in every backward, across islands: set it to False with island_size > 1 (every parameter "
                 "must then take part in each step's loss)")
        if getattr(self, "fsdp", None):
            if self.island_size == 1:
                fail("fsdp", "FSDP would shard the model over all ranks, while local SGD keeps one replica per "
                     "worker: set island_size to the ranks per node (FSDP2 inside each island, the round across "
                     "islands), or unset fsdp")
            fsdp_config = getattr(self, "fsdp_config", None)  # (a path is read by TrainingArguments, later)
            version = int(fsdp_config.get("version", 2)) if isinstance(fsdp_config, dict) else 2
            if version != 2:
                fail("fsdp_config", f"islands shard with FSDP2; got version {version}: set fsdp_config's version to 2")


@dataclass
class LocalSGDConfig(LocalSGDArguments, TrainingArguments):
    """`transformers.TrainingArguments` plus the local-SGD options, for `LocalSGDTrainer`.

    One default differs from `TrainingArguments`, where the Trainer would communicate on every inner step:
    `average_tokens_across_devices` is `False` (it all-gathers token counts on every step). (DDP's buffer
    broadcast on forward passes is switched off on the DDP wrapper itself, `integrations/parallel.py`.)
    """

    average_tokens_across_devices: bool = field(
        default=False,
        metadata={
            "help": "Normalize the loss by the token count of all replicas. Off for local SGD: it costs an "
            "all-gather on every inner step, and each replica's update is its own until the outer step."
        },
    )
