"""DeepSpeed configs local SGD runs under or refuses, said when the config (or the trainer) is built: the
refused ones name the setting and what works instead. (The supported ones train in
tests/distributed/test_deepspeed.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_localsgd import LocalSGDArguments, LocalSGDCallback, LocalSGDConfig, LocalSGDOptions
from hf_localsgd.integrations.deepspeed import IslandMPU, check_deepspeed_config, load_config


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "deepspeed").glob("*.json"))


def config(tmp_path, deepspeed, **kwargs):
    return LocalSGDConfig(output_dir=str(tmp_path), report_to=[], deepspeed=deepspeed, **kwargs)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_example_configs_are_accepted(path):
    check_deepspeed_config(load_config(str(path)), LocalSGDOptions(island_size=2), "deepspeed")
    assert load_config(str(path)) == json.loads(path.read_text())


@pytest.mark.parametrize("deepspeed, message", [
    ({"zero_optimization": {"stage": 3}}, r"^deepspeed: zero_optimization.stage=3: ZeRO stage 3 partitions the "
                                          r"parameters themselves.*use stage 2"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, r"^deepspeed: zero_optimization.stage=3"),
    ({"zero_optimization": {"stage": 2}, "data_parallel_size": 2, "sequence_parallel_size": 1},
     r"^deepspeed: data_parallel_size=2: .*set island_size"),
    ({"tensor_parallel": {"autotp_size": 2}}, r"^deepspeed: tensor_parallel.autotp_size=2: "),
])
def test_configs_that_shard_over_all_ranks_are_refused_when_the_config_is_built(tmp_path, deepspeed, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, deepspeed)
    path = tmp_path / "ds_config.json"  # the same from a file, as --deepspeed ds_config.json gives it
    path.write_text(json.dumps(deepspeed))
    with pytest.raises(ValueError, match=message):
        config(tmp_path, str(path))


@pytest.mark.parametrize("option, value", [("pseudo_sync_prob", 0.1), ("lr_scaling", "adascale")])
def test_variants_deepspeed_cannot_run_are_refused(tmp_path, option, value):
    with pytest.raises(ValueError, match=rf"^{option}: .*with DeepSpeed"):
        config(tmp_path, {"zero_optimization": {"stage": 2}}, **{option: value})


def test_the_accelerate_plugin_is_checked_when_the_callback_is_attached():
    """DeepSpeed from an accelerate config (its deepspeed_config / deepspeed_config_file), not TrainingArguments:
    refused before Trainer prepares anything, naming it."""
    added = []
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})
    trainer = SimpleNamespace(
        is_deepspeed_enabled=True, add_callback=added.append, args=SimpleNamespace(n_gpu=1, deepspeed=None),
        accelerator=SimpleNamespace(distributed_type="DistributedType.DEEPSPEED",
                                    state=SimpleNamespace(deepspeed_plugin=plugin)),
    )
    with pytest.raises(ValueError, match=r"^deepspeed_config: zero_optimization.stage=3"):
        LocalSGDCallback.attach(trainer, LocalSGDArguments())
    assert not added


def test_an_unattached_callback_refuses_deepspeed():
    """A callback in callbacks=[...] cannot hand DeepSpeed the island as its data-parallel group."""
    with pytest.raises(RuntimeError, match=r"LocalSGDCallback.attach\(trainer"):
        LocalSGDCallback(LocalSGDArguments()).on_init_end(SimpleNamespace(world_size=1, deepspeed="ds.json"), None,
                                                          None)


def test_the_mpu_answers_what_deepspeed_asks():
    island, alone = object(), object()
    mpu = IslandMPU(island, [2, 3], 1, alone)
    assert (mpu.get_data_parallel_group(), mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank(),
            mpu.get_data_parallel_group_ranks()) == (island, 2, 1, [2, 3])
    assert (mpu.get_model_parallel_group(), mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()) == (
        alone, 1, 0)
