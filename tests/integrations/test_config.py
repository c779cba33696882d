"""The options as TrainingArguments fields: the checks against the trainer's own fields, the mixin, the parser."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_localsgd import LocalSGDArguments, LocalSGDConfig


@pytest.mark.parametrize(
    "field,value",
    [("sync_every", 0), ("outer_optimizer", "adam"), ("local_sgd_warmup_steps", 100),
     ("deepspeed", {"zero_optimization": {"stage": 3}}), ("fsdp", "full_shard")],
)
def test_invalid_options_name_the_field(field, value, tmp_path):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        LocalSGDConfig(output_dir=str(tmp_path), max_steps=100, report_to=[], **{field: value})


def test_palsgd_with_fp16_is_refused(tmp_path):
    # (checked before TrainingArguments' own checks, which would refuse fp16 on a machine without a GPU)
    with pytest.raises(ValueError, match="^pseudo_sync_prob: .*use bf16"):
        LocalSGDConfig(output_dir=str(tmp_path), report_to=[], fp16=True, pseudo_sync_prob=0.1)


def test_local_sgd_config_defaults_that_communicate_nothing(tmp_path):
    config = LocalSGDConfig(output_dir=str(tmp_path), outer_optimizer="schedule_free", report_to=[])
    assert (config.resolved_outer_lr, config.resolved_outer_momentum) == (2.0, 0.2)
    assert config.average_tokens_across_devices is False


def test_mixin_next_to_another_trainer_config(tmp_path):
    """The way to put the options next to e.g. TRL's SFTConfig: a dataclass mixing both."""

    @dataclass
    class OtherConfig(TrainingArguments):  # stands in for SFTConfig
        max_length: int = 1024

    @dataclass
    class OtherLocalSGDConfig(LocalSGDArguments, OtherConfig):
        pass

    config = OtherLocalSGDConfig(output_dir=str(tmp_path), sync_every=8, max_length=64, report_to=[])
    assert (config.sync_every, config.max_length) == (8, 64)
    assert config.ddp_broadcast_buffers is None  # the user's config is not changed behind their back
    with pytest.raises(ValueError, match="^sync_every"):
        OtherLocalSGDConfig(output_dir=str(tmp_path), sync_every=0, report_to=[])
    # The parser shows the field metadata: one source of truth for help and choices.
    (parsed,) = HfArgumentParser(OtherLocalSGDConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--outer_optimizer", "schedule_free", "--report_to", "none"]
    )
    assert parsed.outer_optimizer == "schedule_free"
    with pytest.raises(SystemExit):
        HfArgumentParser(OtherLocalSGDConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--outer_optimizer", "adam"]
        )
