"""The overlapped sync units in one process (the 2-process references are in tests/distributed/test_overlap.py):
eager with one replica is the blocking sync (its own fresh outer gradient is all there is), the last sum is
applied with a nonzero lr under a decaying schedule, the streaming combinations that are refused, and
streaming's global model in the model's flat order."""

from __future__ import annotations

import pytest
import torch
from toy import flat, local_steps, model

from hf_localsgd import RoundEngine


def run(steps: int, **options) -> tuple[list[torch.Tensor], RoundEngine, torch.Tensor]:
    m, g = model(), torch.Generator().manual_seed(3)
    engine = RoundEngine(m, sync_every=4, outer_optimizer="nesterov", **options)
    weights = []
    for _ in range(steps):
        local_steps(m, 1, g)
        engine.step()
        weights.append(flat(m))
    before_finish = engine.global_params.clone()
    engine.finish()
    return weights, engine, before_finish


def test_eager_with_one_replica_trains_as_the_blocking_sync():
    """K = 1: g^(r) = Δ^(r), so consensus + eager part follow the blocking run step for step, and the flush
    ends on its final model (the consensus's zero first step leaves a momentum optimizer where it was)."""
    blocking, blocking_engine, _ = run(14)
    eager, eager_engine, _ = run(14, outer_overlap="eager")
    for step, (a, b) in enumerate(zip(blocking, eager)):
        assert (a - b).abs().max() < 1e-6, step
    assert (blocking_engine.global_params - eager_engine.global_params).abs().max() < 1e-6


@pytest.mark.parametrize("overlap", ["eager", "delayed"])
def test_the_last_sum_is_applied_with_a_nonzero_lr_under_a_decaying_schedule(overlap):
    """A cosine outer lr reaches 0 at the last round; the sum still in flight at the end is applied with the
    lr of the last round's step, not lost."""
    _, engine, before = run(12, outer_overlap=overlap, outer_lr_scheduler="cosine", total_steps=12)
    assert (engine.global_params - before).abs().max() > 1e-4


def test_streaming_refuses_a_schedule_of_its_own_and_a_resume_with_another_delay():
    with pytest.raises(ValueError, match="^num_fragments: streaming fragments sync at fixed steps"):
        RoundEngine(model(), sync_every=4, num_fragments=2, schedule=lambda step: 4)
    engine = RoundEngine(model(), sync_every=4, num_fragments=2, fragment_sync_delay=0)
    state = engine.state_dict()
    other = RoundEngine(model(), sync_every=4, num_fragments=2, fragment_sync_delay=1)
    with pytest.raises(ValueError, match="^fragment_sync_delay: the checkpoint was written with"):
        other.load_state_dict(state)


def test_streaming_evaluates_the_global_model_at_a_rounds_end():
    """With α = 0, right after a round the last fragment is the global one but the first has trained on since
    its own outer step: the global model must still be put in."""
    m, g = model(), torch.Generator().manual_seed(3)
    engine = RoundEngine(m, sync_every=4, num_fragments=2, fragment_sync_delay=1)
    for _ in range(4):
        local_steps(m, 1, g)
        engine.step()
    assert not engine.model_is_global
    with engine.global_model():
        assert torch.equal(flat(m).float(), engine.global_model_params())


class Blocks(torch.nn.Module):
    """Four blocks in a ModuleList: with 2 fragments, fragment 0 holds blocks 0 and 2, fragment 1 blocks 1 and 3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(4))


def test_streaming_global_params_are_in_the_models_flat_order():
    m, g = Blocks(), torch.Generator().manual_seed(3)
    engine = RoundEngine(m, sync_every=4, outer_optimizer="nesterov", num_fragments=2, fragment_sync_delay=1)
    for _ in range(4):
        local_steps(m, 1, g)
        engine.step()
    fragments_one_after_the_other = torch.cat([f.global_params for f in engine.outer.fragments])
    assert not torch.equal(fragments_one_after_the_other, engine.global_params)  # (strided: the order matters)
    with engine.global_model():
        assert torch.equal(flat(m).float(), engine.global_params)
