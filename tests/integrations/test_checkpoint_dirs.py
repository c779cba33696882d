"""Trainer's checkpoint folders after a crash mid-save: resuming picks the newest complete one, a damaged or
mismatched one stops before Trainer loads it, and rotation (save_total_limit) never deletes the newest complete
one. One process here; tests/distributed/test_faults.py crashes real ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from toy import model
from transformers.trainer_utils import rotate_checkpoints as transformers_rotate

from hf_localsgd import LocalSGDOptions, RoundEngine, save_rank_state
from hf_localsgd.core.checkpoint import CheckpointError
from hf_localsgd.integrations.checkpoint_dirs import checkpoint_dirs, resolve_resume, rotate_checkpoints


def checkpoint(run_dir: Path, step: int, ranks=(0,), trainer_state=True, outer_optimizer="nesterov") -> Path:
    """A checkpoint folder as LocalSGDTrainer leaves it: rank state files (real ones, of a toy engine) and
    Trainer's trainer_state.json, written last."""
    directory = run_dir / f"checkpoint-{step}"
    engine = RoundEngine(model(), sync_every=4, outer_optimizer=outer_optimizer)
    for rank in sorted(ranks, reverse=True):  # (each save writes rank 0's file, then renamed)
        path = save_rank_state(str(directory), engine)
        if rank != 0:
            os.replace(path, directory / f"local_sgd_rank{rank}.pt")
    if trainer_state:
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return directory


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


OPTIONS = LocalSGDOptions(sync_every=4, outer_optimizer="nesterov")


def test_resume_true_skips_checkpoints_a_crash_left_incomplete(tmp_path):
    complete = checkpoint(tmp_path, 3)
    crashed = checkpoint(tmp_path, 6, trainer_state=False)  # killed before Trainer's save finished
    (crashed / "local_sgd_rank0.pt.tmp").write_bytes(b"PK\x03\x04")
    truncated = checkpoint(tmp_path, 9)
    truncate(truncated / "local_sgd_rank0.pt")
    left_half_done = checkpoint(tmp_path, 12)  # a later save of the same step, killed in the middle
    (left_half_done / "local_sgd_rank0.pt.tmp").write_bytes(b"PK\x03\x04")
    plain = tmp_path / "checkpoint-2"
    plain.mkdir()
    (plain / "trainer_state.json").write_text("{}")  # a plain Trainer checkpoint: resumable, with a warning
    assert checkpoint_dirs(str(tmp_path))[-1] == str(plain)
    assert resolve_resume(True, str(tmp_path), OPTIONS) == str(complete)
    for path in (complete, plain):
        assert resolve_resume(str(path), str(tmp_path), OPTIONS) == str(path)
    assert resolve_resume(True, str(tmp_path / "empty"), OPTIONS) is True  # Trainer's own error follows
    assert resolve_resume(None, str(tmp_path), OPTIONS) is None


@pytest.mark.parametrize("damage,says", [
    ("truncate", "local_sgd_rank0.pt (the state of rank 0) is truncated or corrupted"),
    ("tmp", "local_sgd_rank0.pt.tmp is left by a save that did not finish"),
    ("no_trainer_state", "trainer_state.json is missing (Trainer's save did not finish)"),
    ("outer_optimizer", "Checkpoint was trained with outer_optimizer='average', this run uses 'nesterov'"),
    ("missing", "the folder does not exist"),
])
def test_a_checkpoint_given_by_path_is_checked_before_trainer_loads_it(tmp_path, damage, says):
    complete = checkpoint(tmp_path, 3)
    bad = checkpoint(tmp_path, 6, outer_optimizer="average" if damage == "outer_optimizer" else "nesterov")
    if damage == "truncate":
        truncate(bad / "local_sgd_rank0.pt")
    elif damage == "tmp":
        (bad / "local_sgd_rank0.pt.tmp").write_bytes(b"PK")
    elif damage == "no_trainer_state":
        (bad / "trainer_state.json").unlink()
    elif damage == "missing":
        bad = tmp_path / "checkpoint-60"
    with pytest.raises(CheckpointError) as error:
        resolve_resume(str(bad), str(tmp_path), OPTIONS)
    message = str(error.value)
    assert message.startswith(f"resume_from_checkpoint: {bad} cannot be resumed from: ")
    assert says in message
    newest = tmp_path / "checkpoint-6" if damage == "missing" else complete
    assert message.endswith(f"The newest complete checkpoint is {newest}: pass it as resume_from_checkpoint.")


def test_resume_true_with_nothing_complete_says_so(tmp_path):
    crashed = checkpoint(tmp_path, 3, trainer_state=False)
    with pytest.raises(CheckpointError, match=rf"^resume_from_checkpoint: no checkpoint in {tmp_path} is complete "
                                              rf"for every rank \(the newest, {crashed}: trainer_state.json is missing"):
        resolve_resume(True, str(tmp_path), OPTIONS)


def test_a_checkpoint_of_another_model_is_refused_by_its_parameter_count(tmp_path):
    other = checkpoint(tmp_path, 3)
    with pytest.raises(CheckpointError, match="the checkpoint holds 66 global parameters, the model has 60"):
        resolve_resume(str(other), str(tmp_path), OPTIONS, num_params=60)
    assert resolve_resume(str(other), str(tmp_path), OPTIONS, num_params=66) == str(other)


def test_rotation_never_deletes_the_newest_complete_checkpoint(tmp_path):
    """A crashed earlier run left checkpoint-9 without rank 1's file; this run (2 ranks) resumed from
    checkpoint-3 and has just saved checkpoint-6. With save_total_limit=1 Trainer's rotation keeps only the most
    recent folder, checkpoint-9 (saved within a second: ordered by step), and would delete checkpoint-6."""
    def folders():
        for step, ranks in ((3, (0, 1)), (6, (0, 1)), (9, (0,))):
            checkpoint(tmp_path, step, ranks=ranks)

    folders()
    transformers_rotate(str(tmp_path), save_total_limit=1, use_mtime=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-9"]  # what this test guards against
    for name in os.listdir(tmp_path):
        for f in (tmp_path / name).iterdir():
            f.unlink()
        (tmp_path / name).rmdir()

    folders()
    rotate_checkpoints(str(tmp_path), 1, None, world_size=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-9"]
    rotate_checkpoints(str(tmp_path), None, None, world_size=2)  # no limit: nothing deleted
    checkpoint(tmp_path, 12, ranks=(0, 1))
    rotate_checkpoints(str(tmp_path), 1, str(tmp_path / "checkpoint-6"), world_size=2)  # the best, protected
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-12", "checkpoint-6"]
    assert torch.load(tmp_path / "checkpoint-12" / "local_sgd_rank1.pt", weights_only=True)["engine"]
