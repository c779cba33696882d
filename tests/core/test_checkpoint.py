"""Per-rank state files: written atomically, read back exactly, and hf_localsgd 0.1's files still resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from toy import flat, model

from hf_localsgd import RoundEngine, resume_rank_state, save_rank_state
from hf_localsgd.core.checkpoint import state_file


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
