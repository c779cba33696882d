"""Two real processes: resuming from a mid-round checkpoint continues bit-exactly (LocalSGDTrainer and a plain
Accelerate loop), and a checkpoint that not every rank can resume from stops every rank."""

from __future__ import annotations

import pytest
from conftest import run_scenario, run_scenarios


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The module's default scenarios, in one launch of two ranks."""
    return run_scenarios(tmp_path_factory.mktemp("resume"), ["resume:schedule_free,0.1", "resume_without_every_rank",
                                                             "loop_example:plain", "loop_example:resume",
                                                             *OVERLAPPED])


# LocalSGDTrainer with outer_overlap="eager" and with streaming fragments (schedule-free outer steps)
OVERLAPPED = ["resume:nesterov,0,none,constant,iid,1,eager", "resume:schedule_free,0,none,constant,iid,1,none,2"]


def test_resume_mid_round_is_bit_exact(runs):
    """Schedule-free outer optimizer, PALSGD draws (p = 0.1: after the checkpoint each rank takes pseudo-syncs and
    gradient steps), dropout on; resumed from step 9 of rounds of 4."""
    r0, r1 = runs["resume:schedule_free,0.1"]
    for r in (r0, r1):
        assert r["resumed"] == r["full"]
        # Each rank restored its own inner-optimizer state (rank 1's is not in Trainer's optimizer.pt) and used
        # it: every rank took gradient steps after the checkpoint.
        assert r["inner_optimizer"]["equals_own_file"] and r["gradient_steps_after_resume"] > 0
    assert not r1["inner_optimizer"]["equals_optimizer_pt"]
    assert r0["full"][0] == r1["full"][0]  # training ended synchronized
    assert r0["checkpoints"] == ["checkpoint-12", "checkpoint-9"]  # save_total_limit=2 rotated checkpoints 3 and 6
    assert {"local_sgd_rank0.pt", "local_sgd_rank1.pt"} <= set(r0["checkpoint_files"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [("nesterov", "0", "local_adascale"), ("average", "0", "adascale"),
     ("nesterov", "0", "none", "linear", "by_label"), ("average", "0", "none", "inverse_lr", "iid")],
    ids=["local_adascale", "adascale", "linear-schedule-by-label", "inverse-lr-schedule"],
)
def test_resume_is_bit_exact_with_other_options(tmp_path, options):
    """The gradients cached at a round's start, the gain-ratio state, a communication schedule's current H and
    the by_label sampler's position all survive a checkpoint (`pytest -m slow`)."""
    r0, r1 = run_scenario("resume", tmp_path, *options)
    for r in (r0, r1):
        assert r["resumed"] == r["full"]


def test_resuming_from_a_checkpoint_without_every_rank_state_stops_every_rank(runs):
    r0, r1 = runs["resume_without_every_rank"]
    # Checked by LocalSGDTrainer.train on every rank, before Trainer loads the checkpoint (the ranks agree).
    assert r0["error"] == r1["error"] and r0["error"].startswith("resume_from_checkpoint: ")
    assert "local_sgd_rank1.pt (the state of rank 1) is missing (seen from rank 1)" in r0["error"]


def test_engine_in_a_plain_accelerate_loop(runs):
    """examples/accelerate_loop.py (README, section 3): 10 steps with H = 4, then the final partial round."""
    r0, r1 = runs["loop_example:plain"]
    assert r0["num_syncs"] == 3 and r0["engine_all_reduce"] == 3 and r0["ddp_hook_calls"] == 0
    assert r0["hash"] == r1["hash"]
    assert r0["losses"] != r1["losses"]  # each rank trained on its own shard


def test_a_plain_accelerate_loop_resumes_bit_exactly_with_the_checkpoint_helpers(runs):
    """save_rank_state after step 6 (mid-round, H = 4), fresh model, optimizer and engine, resume_rank_state."""
    r0, r1 = runs["loop_example:resume"]
    for rank, r in enumerate((r0, r1)):
        assert r["resumed_from"].endswith(f"checkpoint-6/local_sgd_rank{rank}.pt")
        assert r["position"] == [6, 2, 1]
        assert r["resumed"] == r["full"]
    assert r0["full"] == r1["full"]


@pytest.mark.parametrize("spec", OVERLAPPED, ids=["eager", "streaming"])
def test_trainer_resumes_bit_exactly_with_a_sum_in_flight(runs, spec):
    """Checkpoint-9 is one step into a round: the previous round's sum (eager), or fragment 0's (streaming, sent
    at the round's first step), is in flight; the checkpoint waits for it and the resumed run applies it at the
    same step. Training ends with the global model on every rank (the last sum applied)."""
    r0, r1 = runs[spec]
    for r in (r0, r1):
        assert r["resumed"] == r["full"]
    assert r0["full"][0] == r1["full"][0]  # the final model: the same global model on both ranks
