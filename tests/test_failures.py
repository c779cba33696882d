"""README's "Failures" table, walked: every row's message is what the code says, for the input the row describes.

Each row's first code span in "what you are told" is the start of the message (`…` for the values of a run).
A row is either triggered here (in one process, cheaply: nothing trains) and its message matched against that
start, or names the test that triggers it (`ELSEWHERE`, for what needs real ranks or a training run). A row
added to the table without either, or a message changed without the table, fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import data, tiny_model
from toy import model as toy_model
from transformers import Trainer, TrainingArguments

from hf_localsgd import (LocalSGDArguments, LocalSGDCallback, LocalSGDConfig, LocalSGDOptions, LocalSGDTrainer,
                         RoundEngine, resume_rank_state, save_rank_state)
from hf_localsgd.core.collectives import check_launch
from hf_localsgd.integrations import checkpoint_dirs
from hf_localsgd.integrations.checkpoint_dirs import resolve_resume
from hf_localsgd.integrations.parallel import check_supported
from hf_localsgd.recipes import train as recipe


ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def table_rows() -> list[tuple[str, str]]:
    """(what you did, the message's start) for each row of README's Failures table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Failures\n"):]
    section = section[: section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().split("|")[1:-1]]
        if len(cells) != 3 or cells[0] in ("what you did", "---"):
            continue
        span = re.search(r"``\s?(.+?)\s?``|`([^`]+)`", cells[1])
        rows.append((cells[0], span.group(1) or span.group(2)))
    return rows


def pattern(start: str) -> re.Pattern:
    return re.compile(".*?".join(re.escape(part) for part in start.split("…")), re.DOTALL)


def error_of(call) -> str:
    """`Type: message` of what ``call`` raises, or what a parser printed before exiting."""
    with pytest.raises((Exception, SystemExit)) as raised:
        call()
    if raised.type is SystemExit:
        return str(raised.value.code)
    return f"{raised.type.__name__}: {raised.value}"


def options(**kwargs):
    return lambda: LocalSGDOptions(**kwargs)


def config(tmp_path, **kwargs):
    return lambda: LocalSGDConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


def recipe_error(capsys, argv, recipe_text=None, tmp_path=None):
    """What `hf_localsgd.train` prints for ``argv`` (a recipe written from ``recipe_text`` first) and exits 2."""
    def call():
        args = list(argv)
        if recipe_text is not None:
            path = tmp_path / "recipe.yaml"
            path.write_text(recipe_text)
            args.insert(0, str(path))
        with pytest.raises(SystemExit) as exit_:
            recipe.parse_args(args)
        assert exit_.value.code == 2
        raise RuntimeError(capsys.readouterr().err)
    return call


def checkpoint(run_dir: Path, step: int, outer_optimizer: str = "nesterov") -> Path:
    directory = run_dir / f"checkpoint-{step}"
    save_rank_state(str(directory), RoundEngine(toy_model(), sync_every=4, outer_optimizer=outer_optimizer))
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return directory


def cut(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:200])
    return path


NESTEROV = LocalSGDOptions(sync_every=4)


def ds_config_file(tmp_path: Path, ds_config: dict) -> Path:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ds_config))
    return path


def deepspeed_trainer(stage: int):
    """A trainer whose accelerate config enables DeepSpeed at ``stage`` (as much of one as `attach` reads)."""
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    return SimpleNamespace(is_deepspeed_enabled=True, add_callback=None, args=SimpleNamespace(n_gpu=1, deepspeed=None),
                           accelerator=SimpleNamespace(distributed_type="DistributedType.DEEPSPEED",
                                                       state=SimpleNamespace(deepspeed_plugin=plugin)))

# Rows whose trigger needs real ranks or a training run: the test that runs it.
ELSEWHERE = {
    "local_sgd_warmup_steps (…) must be shorter than the run (…)":
        "integrations/test_trainer.py::test_a_warmup_as_long_as_an_epoch_based_run_is_an_error",
    "RuntimeError: local_sgd_warmup_steps=… runs synchronous data-parallel steps, but Trainer did not wrap the model":
        "integrations/test_callback.py::test_a_warmup_without_ddp_in_a_multi_process_run_is_an_error",
    "error: …": "recipes/test_data.py::test_offline_hub_dataset_and_tokenizer_fail_fast_with_the_way_out",
    "… of … ranks found their local_sgd_rank*.pt file in the checkpoint":
        "distributed/test_faults.py::test_a_truncated_state_file_stops_every_rank_with_an_error_naming_it_and_its_rank",
}


def triggers(tmp_path, capsys, monkeypatch) -> dict:
    """Each row's message start: what triggers it here."""
    plain_trainer = lambda: Trainer(model=tiny_model(), train_dataset=data(), args=TrainingArguments(  # noqa: E731
        output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True))

    def by_label_without_its_column():
        args = LocalSGDConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                              data_partition="by_label", data_partition_column="start")
        LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data())._get_train_sampler()

    def launched_two_joined_none():
        with monkeypatch.context() as patch:
            patch.setenv("WORLD_SIZE", "2")
            check_launch()

    def resume_other_overlap():
        engine = RoundEngine(toy_model(), sync_every=2)
        engine.load_state_dict({**engine.state_dict(), "outer_overlap": "eager"})

    def resume_other_islands():
        engine = RoundEngine(toy_model(), sync_every=2)
        engine.load_state_dict({**engine.state_dict(), "island_size": 2})

    def resume(path, run_dir=tmp_path, opts=NESTEROV, **kwargs):
        return lambda: resolve_resume(str(path), str(run_dir), opts, **kwargs)

    def left_half_done():
        directory = checkpoint(tmp_path / "tmp", 3)
        (directory / "local_sgd_rank1.pt.tmp").write_bytes(b"PK")
        resolve_resume(str(directory), str(tmp_path / "tmp"), NESTEROV)

    def truncated():
        directory = checkpoint(tmp_path / "cut", 3)
        torch.save({}, directory / "local_sgd_rank1.pt")
        cut(directory / "local_sgd_rank1.pt")
        resolve_resume(str(directory), str(tmp_path / "cut"), NESTEROV)

    def other_world_size():
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint_dirs, "_rank_and_world", lambda: (0, 2))
            resolve_resume(str(checkpoint(tmp_path / "world", 3)), str(tmp_path / "world"), NESTEROV)

    def nothing_complete():
        cut(checkpoint(tmp_path / "none", 3) / "local_sgd_rank0.pt")
        resolve_resume(True, str(tmp_path / "none"), NESTEROV)

    def loop_resumes_damaged_file():
        complete, damaged = checkpoint(tmp_path / "loop", 3), checkpoint(tmp_path / "loop", 6)
        cut(damaged / "local_sgd_rank0.pt")
        resume_rank_state([str(damaged)], RoundEngine(toy_model(), sync_every=4), fallbacks=[str(damaged), str(complete)])

    return {
        "ValueError: sync_every: must be an integer >= 1, got 0": options(sync_every=0),
        "outer_optimizer: must be one of (…), got …": options(outer_optimizer="adam"),
        "outer_lr: must be a number, got '…'": options(outer_lr="0.7"),
        "outer_lr: outer_optimizer='average' is plain averaging and needs outer_lr=1.0":
            options(outer_optimizer="average", outer_lr=0.5),
        "outer_momentum: schedule_free needs a momentum (b1) in (0, 1)":
            options(outer_optimizer="schedule_free", outer_momentum=0.0),
        "sync_every_min: must be at most sync_every=…": options(sync_every=4, sync_every_min=8, sync_every_schedule="linear"),
        "outer_lr_scheduler: a decaying outer lr needs the number of rounds in advance":
            options(sync_every_schedule="inverse_lr", outer_lr_scheduler="cosine"),
        "pseudo_sync_prob: must be in [0, 1), got …": options(pseudo_sync_prob=1.0),
        "pseudo_sync_rate: pseudo_sync_rate_schedule='theorem_2' sets η_t = p / (2 H lr_t) itself":
            options(pseudo_sync_prob=0.1, pseudo_sync_rate=2.0, pseudo_sync_rate_schedule="theorem_2"),
        "lr_scaling: is not combined with PALSGD": options(lr_scaling="adascale", pseudo_sync_prob=0.1),
        "data_partition_column: data_partition='by_label' needs a column name":
            options(data_partition="by_label", data_partition_column=""),
        "local_sgd_warmup_steps: (…) must be shorter than max_steps (…)":
            config(tmp_path, max_steps=10, local_sgd_warmup_steps=10),
        "pseudo_sync_prob: PALSGD skips the gradients of pseudo-synchronization steps":
            config(tmp_path, fp16=True, pseudo_sync_prob=0.1),
        "deepspeed: zero_optimization.stage=3: ZeRO stage 3 partitions the parameters themselves":
            config(tmp_path, deepspeed=str(ds_config_file(tmp_path, {"zero_optimization": {"stage": 3}}))),
        "deepspeed: data_parallel_size=…: builds DeepSpeed's own data-/sequence-parallel mesh over all ranks":
            config(tmp_path, deepspeed={"data_parallel_size": 2, "sequence_parallel_size": 1}),
        "deepspeed: tensor_parallel.autotp_size=…: AutoTP brings a model-parallel unit of its own":
            config(tmp_path, deepspeed={"tensor_parallel": {"autotp_size": 2}}),
        "pseudo_sync_prob: PALSGD skips whole inner steps":
            config(tmp_path, deepspeed={"zero_optimization": {"stage": 2}}, pseudo_sync_prob=0.1),
        "deepspeed_config: zero_optimization.stage=3: …": lambda: LocalSGDCallback.attach(deepspeed_trainer(3), LocalSGDArguments()),
        "fsdp: FSDP would shard the model over all ranks, while local SGD keeps one replica per worker: set island_size":
            config(tmp_path, fsdp="full_shard"),
        "fsdp_config: islands shard with FSDP2; got version 1":
            config(tmp_path, fsdp="full_shard", fsdp_config={"version": 1}, island_size=2),
        "ddp_find_unused_parameters: DDP's search for unused parameters all-reduces a map of them over all ranks in "
        "every backward": config(tmp_path, island_size=2, ddp_find_unused_parameters=True),
        "RuntimeError: Local SGD does not support distributed_type=…": lambda: check_supported(
            SimpleNamespace(accelerator=SimpleNamespace(distributed_type="DistributedType.XLA")), SimpleNamespace(n_gpu=1)),
        "RuntimeError: island_size: FSDP (distributed_type=FSDP in your accelerate config) would shard the model over "
        "all ranks": lambda: check_supported(
            SimpleNamespace(accelerator=SimpleNamespace(distributed_type="DistributedType.FSDP")), SimpleNamespace(n_gpu=1)),
        "ValueError: island_size: the … processes cannot be cut into islands of … ranks":
            lambda: RoundEngine(toy_model(), island_size=3),
        "island_size: the checkpoint was written with islands of … ranks, this run has …": resume_other_islands,
        "outer_overlap: the checkpoint was written with outer_overlap='…', this run has '…'": resume_other_overlap,
        "RuntimeError: Local SGD does not support torch.nn.DataParallel over … GPUs in one process":
            lambda: check_supported(None, SimpleNamespace(n_gpu=2)),
        "data_partition: 'worst_case' leaves all but one rank without data": config(tmp_path, data_partition="worst_case"),
        "data_partition: 'by_label' replaces the trainer's train sampler":
            lambda: LocalSGDCallback.attach(plain_trainer(), LocalSGDArguments(data_partition="by_label")),
        "lr_scaling: trains for the base run's budget of scale-invariant steps":
            lambda: LocalSGDCallback.attach(plain_trainer(), LocalSGDArguments(lr_scaling="adascale")),
        "data_partition_column: data_partition='by_label' sorts by column '…'": by_label_without_its_column,
        "TypeError: LocalSGDTrainer needs a LocalSGDConfig": lambda: LocalSGDTrainer(
            model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)),
        "TypeError: LocalSGDCallback needs the local-SGD options":
            lambda: LocalSGDCallback().on_init_end(SimpleNamespace(world_size=1), None, None),
        "RuntimeError: LocalSGDCallback cannot switch off DDP's gradient all-reduce from a `callbacks=[...]` list":
            lambda: LocalSGDCallback(LocalSGDArguments()).on_init_end(SimpleNamespace(world_size=2), None, None),
        "RuntimeError: The launcher started … processes (WORLD_SIZE), but torch.distributed is not initialized":
            launched_two_joined_none,
        "TypeError: warmup_steps is now local_sgd_warmup_steps": lambda: RoundEngine(toy_model(), warmup_steps=3),
        "TypeError: unknown option(s) […]": lambda: RoundEngine(toy_model(), unknown=1),
        "data_partition: RoundEngine does not load data": lambda: RoundEngine(toy_model(), data_partition="by_label"),
        "hf_localsgd.train: error: …: unknown key '…' (did you mean '…'?)":
            recipe_error(capsys, [], "sync_evry: 4\n", tmp_path),
        "hf_localsgd.train: error: unrecognized arguments: --… (did you mean --…?)":
            recipe_error(capsys, ["--sync_evry", "4"]),
        "hf_localsgd.train: error: argument --…: invalid … value: '…'": recipe_error(capsys, ["--learning_rate", "fast"]),
        "hf_localsgd.train: error: …: … cannot be null; remove the line to keep its default":
            recipe_error(capsys, [], "sync_every: null\n", tmp_path),
        "hf_localsgd.train: error: …: … takes one value, got a list":
            recipe_error(capsys, [], "sync_every: [1, 2]\n", tmp_path),
        "hf_localsgd.train: error: cannot read recipe …": recipe_error(capsys, [str(tmp_path / "missing.yaml")]),
        "hf_localsgd.train: error: ": recipe_error(capsys, ["--sync_every", "0"]),
        "error: block_size (…) exceeds …'s max_position_embeddings (…)":
            lambda: recipe.main(["--block_size", "100000", "--output_dir", str(tmp_path), "--use_cpu", "true"]),
        "max_eval_samples: required with streaming": recipe_error(capsys, ["--streaming", "true"]),
        "CheckpointError: resume_from_checkpoint: … cannot be resumed from: the folder does not exist":
            resume(tmp_path / "checkpoint-99"),
        "resume_from_checkpoint: … cannot be resumed from: local_sgd_rank1.pt.tmp is left by a save that did not finish":
            left_half_done,
        "resume_from_checkpoint: … cannot be resumed from: local_sgd_rank1.pt (the state of rank 1) is truncated or "
        "corrupted": truncated,
        "resume_from_checkpoint: … cannot be resumed from: Checkpoint was written by … replicas, this run has …":
            other_world_size,
        "…: Checkpoint was trained with outer_optimizer='…', this run uses '…'":
            resume(checkpoint(tmp_path / "avg", 3, outer_optimizer="average"), tmp_path / "avg"),
        "…: the checkpoint holds … global parameters, the model has …":
            resume(checkpoint(tmp_path / "other", 3), tmp_path / "other", num_params=7),
        "resume_from_checkpoint: no checkpoint in … is complete for every rank": nothing_complete,
        "…/local_sgd_rank….pt: the state file of rank … is truncated or corrupted (…). No rank resumes from …. The "
        "newest complete checkpoint is …: resume from it.": loop_resumes_damaged_file,
    }


def test_every_row_of_the_table_is_said_as_written(tmp_path, capsys, monkeypatch):
    rows = table_rows()
    assert len(rows) >= 40
    cases = triggers(tmp_path, capsys, monkeypatch)
    untested = [start for _, start in rows if start not in cases and start not in ELSEWHERE]
    assert not untested, f"rows with neither a trigger here nor a test elsewhere: {untested}"
    stale = sorted(set(cases) - {start for _, start in rows})
    assert not stale, f"triggers whose row is gone from README: {stale}"
    for did, start in rows:
        if start in ELSEWHERE:
            path, name = ELSEWHERE[start].split("::")
            assert f"def {name}(" in (TESTS / path).read_text(), ELSEWHERE[start]
            continue
        said = error_of(cases[start])
        # The start of the message: of the whole text, of a line (the parser's usage line comes first), or after
        # the exception's type or a prefix ("Type: ", "hf_localsgd.train: error: ").
        found = pattern(start).search(said)
        assert found and (found.start() == 0 or said[: found.start()].endswith((": ", "\n"))), \
            f"{did!r}: expected a message starting {start!r}, got {said!r}"
