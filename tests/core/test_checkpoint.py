"""Per-rank state files: written atomically, read back exactly, hf_localsgd 0.1's files still resume, and a damaged
file stops with an error naming it rather than a pickle traceback."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from toy import flat, model

from hf_localsgd import RoundEngine, resume_rank_state, save_rank_state
from hf_localsgd.core.checkpoint import (CheckpointError, checkpoint_problem, newest_complete_checkpoint, state_file,
                                         state_file_problem)


V0_1 = Path(__file__).with_name("data") / "engine_v0_1.pt"


def step(m, engine, g):
    """One stand-in inner step: a pseudo-synchronization (PALSGD's draw) moves nothing itself, else a local move."""
    engine.begin_step()
    if not engine.skips_gradient_step:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    engine.step()


def palsgd_engine(m):
    return RoundEngine(m, sync_every=4, outer_optimizer="nesterov", local_sgd_warmup_steps=2, pseudo_sync_prob=0.3,
                       optimizer=torch.optim.SGD(m.parameters(), lr=0.1))


def test_a_checkpoint_of_hf_localsgd_0_1_resumes_exactly():
    """tests/core/data/engine_v0_1.pt was written by hf_localsgd 0.1 mid-round, with PALSGD on; with its
    generator, 7 more steps must reach the weights 0.1 reached."""
    saved = torch.load(V0_1, weights_only=True)
    assert "round_hooks" not in saved["engine"]  # (the old layout: every variant's state at the top level)
    m = model(seed=5)
    engine = palsgd_engine(m)
    engine.load_state_dict(saved["engine"])
    engine.load_params(saved["local_params"])
    g = torch.Generator()
    g.set_state(saved["generator"])
    for _ in range(7):
        step(m, engine, g)
    assert torch.equal(flat(m).float(), saved["expected"])
    assert torch.equal(engine.global_params, saved["expected_global"])


def test_state_files_round_trip_and_are_written_atomically(tmp_path, monkeypatch):
    m, g = model(), torch.Generator().manual_seed(1)
    engine = palsgd_engine(m)
    for _ in range(7):
        step(m, engine, g)
    path = save_rank_state(str(tmp_path), engine, engine.optimizer)
    assert path == state_file(str(tmp_path), 0) and os.listdir(tmp_path) == ["local_sgd_rank0.pt"]
    before = Path(path).read_bytes()

    def interrupted(obj, f, *args, **kwargs):  # a save that dies half-way through the file
        f.write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    for _ in range(2):
        step(m, engine, g)
    with pytest.raises(KeyboardInterrupt):
        save_rank_state(str(tmp_path), engine, engine.optimizer)
    assert Path(path).read_bytes() == before and os.listdir(tmp_path) == ["local_sgd_rank0.pt"]  # untouched
    monkeypatch.undo()

    m2 = model(seed=9)
    resumed = palsgd_engine(m2)
    assert resume_rank_state([None, str(tmp_path / "elsewhere"), str(tmp_path)], resumed, resumed.optimizer) == path
    assert (resumed.num_steps, resumed.inner_step, resumed.num_syncs) == (7, 1, 1)
    assert torch.equal(resumed.global_params, torch.load(path, weights_only=True)["engine"]["global_params"])
    assert resume_rank_state([str(tmp_path / "elsewhere")], palsgd_engine(model()), None) is None


def saved_engine(directory) -> str:
    m, g = model(), torch.Generator().manual_seed(1)
    engine = palsgd_engine(m)
    for _ in range(5):
        step(m, engine, g)
    return save_rank_state(str(directory), engine, engine.optimizer)


def test_the_rename_is_flushed_to_disk_with_its_directory(tmp_path, monkeypatch):
    """After os.replace the new name lives in the directory's entries, which need an fsync of their own."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    saved_engine(tmp_path)
    assert synced == [False, True]  # the file's contents, then the directory holding its new name


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_state_file_stops_with_an_error_naming_it_its_rank_and_the_newest_complete_checkpoint(tmp_path, damage):
    older, newer = tmp_path / "checkpoint-3", tmp_path / "checkpoint-6"
    saved_engine(older)
    path = Path(saved_engine(newer))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x80not a zip" * 100, "empty": b""}[damage])
    assert state_file_problem(str(path)) is not None and state_file_problem(state_file(str(older), 0)) is None
    fresh = palsgd_engine(model(seed=9))
    with pytest.raises(CheckpointError) as error:
        resume_rank_state([str(newer)], fresh, fresh.optimizer, fallbacks=[str(newer), str(older)])
    message = str(error.value)
    assert message.startswith(f"{path}: the state file of rank 0 ")
    assert f"The newest complete checkpoint is {older}: resume from it." in message
    assert "Traceback" not in message and fresh.num_steps == 0  # nothing of it was applied
    with pytest.raises(CheckpointError, match="No complete checkpoint was found"):
        resume_rank_state([str(newer)], fresh, fresh.optimizer, fallbacks=[str(newer)])


def test_a_checkpoint_with_a_save_left_half_done_is_not_complete(tmp_path):
    directory = tmp_path / "checkpoint-6"
    saved_engine(directory)
    assert checkpoint_problem(str(directory), 1) is None
    assert checkpoint_problem(str(directory), 2) == "local_sgd_rank1.pt (rank 1) is missing"
    (directory / "local_sgd_rank1.pt.tmp").write_bytes(b"PK\x03\x04 half of it")
    assert checkpoint_problem(str(directory), 2).startswith("local_sgd_rank1.pt.tmp is left by a save of rank 1")
    assert newest_complete_checkpoint([str(directory), None, str(tmp_path / "gone")], 1) == str(directory)
    assert newest_complete_checkpoint([str(directory)], 2) is None
