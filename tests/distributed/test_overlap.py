"""Two real processes: delayed and eager outer steps and streaming fragments against float64 references of both
replicas (tests/scenarios/overlap.py), their collectives, an evaluation mid-round, and exact resume with a sum in
flight; engines that release their process groups and threads (tests/scenarios/release.py)."""

from __future__ import annotations

import pytest
from conftest import run_scenarios


VARIANTS = ["delayed", "eager", "streaming:0", "streaming:0.5"]
SPECS = {"delayed": "overlap:delayed", "eager": "overlap:eager", "streaming:0": "overlap:streaming,0",
         "streaming:0.5": "overlap:streaming,0.5"}
STEPS, H = 14, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # (trainer_early_stop counts the threads left: before release:leak, which leaves some on purpose)
    specs = ["trainer_early_stop", "release:eager_int8", "release:streaming", "release:in_flight", "release:leak",
             *SPECS.values(), "overlap:delayed,0,resume", "overlap:eager,0,resume", "overlap:streaming,0.5,resume"]
    return run_scenarios(tmp_path_factory.mktemp("overlap"), specs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_matches_its_reference(runs, variant):
    """Every rank's weights after every step and the global model after every round, against the reference."""
    for r in runs[SPECS[variant]]:
        assert len(r["weight_errors"]) == STEPS and max(r["weight_errors"]) < 2e-5, r["weight_errors"]
        assert len(r["global_errors"]) == STEPS // H and max(r["global_errors"]) < 2e-5, r["global_errors"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_sum_starts_where_the_variant_says_and_nothing_else_communicates(runs, variant):
    """One all-reduce when a sum is sent (the round's end; streaming: steps 1 and 3 of each round of 4), none
    at the other steps: the sum in flight is waited for later, without a collective of its own."""
    counts = runs[SPECS[variant]][0]["collectives"]
    made = [now - before for before, now in zip([0] + counts, counts)]
    sends = {1, 3} if variant.startswith("streaming") else {0}
    assert made == [int(step % H in sends) for step in range(1, STEPS + 1)], made


@pytest.mark.parametrize("variant", VARIANTS)
def test_evaluation_mid_round_sees_the_global_model_and_training_ends_with_it(runs, variant):
    r0, r1 = runs[SPECS[variant]]
    assert r0["evaluated"] == r1["evaluated"] and r0["evaluated_is_global"] and r1["evaluated_is_global"]
    # at a round's end too (streaming: the fragments synced earlier in the round have trained on since)
    assert r0["boundary_is_global"] and r1["boundary_is_global"]
    # (and training went on unchanged: the weights after step 6 matched the reference above)
    assert r0["final_model"] == r1["final_model"] and r0["final_is_global"]


@pytest.mark.parametrize("spec", ["overlap:delayed,0,resume", "overlap:eager,0,resume", "overlap:streaming,0.5,resume"])
def test_resume_with_a_sum_in_flight_is_exact(runs, spec):
    for r in runs[spec]:
        assert r["in_flight_when_saved"] and r["resumed"] == r["full"]
        assert r["resumed_metrics"] == r["full_metrics"]  # the round the resume lands in too (timings aside)


def test_streaming_sends_a_fragment_at_a_time(runs):
    """The bytes of one round are those of the whole model, sent in fragments: each sync moves about 1/P."""
    r = runs["overlap:streaming,0"][0]
    assert r["bytes_sent"] == (r["model_numel"] + 2) * 4  # a ring over 2 ranks sends its payload once; 2 norms


@pytest.mark.parametrize("variant", ["eager_int8", "streaming", "in_flight"])
def test_close_releases_the_process_groups_and_threads_of_the_sums(runs, variant):
    """Three engines one after the other, each closed after finish() (``in_flight``: with a sum in flight, which
    close() waits for and drops): the process is left with the open files and threads it had before the first
    (without close() each engine leaves a group's sockets, int8 a thread); a closed engine refuses to sync,
    naming close()."""
    for r in runs["release:leak"]:  # what is counted does see what an engine leaves
        (files, threads), grown = r["before"], r["after"]
        assert files < grown[0][0] < grown[1][0] < grown[2][0] and threads < grown[2][1], r
    for r in runs[f"release:{variant}"]:
        assert r["after"] == [r["before"]] * 3, r
        assert "RoundEngine.close" in r["error"] and r["dropped"] == [True] * 3


def test_trainer_stopped_early_loads_the_best_model_and_drops_the_sum_in_flight(runs):
    """load_best_model_at_end after an early stop (tests/scenarios/trainer_early_stop.py): training stops at step
    6 with round 1's eager int8 sum in flight; Trainer loads the best checkpoint's global model, and the engine's
    close() waits for the sum and drops it before its groups and the int8 thread go (the processes end cleanly)."""
    for r in runs["trainer_early_stop"]:
        assert r["global_step"] == 6 and r["in_flight_at_stop"] and not r["in_flight_after"] and r["closed"]
        assert "int8-allreduce" not in r["threads"] and r["model_is_best"]
