"""Four real processes, two islands of two ranks: DDP or FSDP2 inside an island, the round across islands."""

from __future__ import annotations

import pytest
from conftest import run_scenarios
from gain_checks import check_logged_statistics


STEPS, WARMUP, H = 11, 2, 3
KINDS = ["ddp", "fsdp2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    specs = [f"islands:{kind}" for kind in KINDS] + [f"islands:{kind},resume" for kind in KINDS] + \
        [f"islands:{kind},combo" for kind in KINDS] + ["islands_nan"]
    return run_scenarios(tmp_path_factory.mktemp("islands"), specs, num_processes=4)


def test_an_eager_replica_in_an_island_drops_its_whole_eager_part_when_one_span_is_not_finite(runs):
    """Island 1's replica turns NaN in the span of its second rank only (tests/scenarios/islands_nan.py): at the
    end of that round both of its ranks drop the eager part (their weights are the consensus), island 0 keeps
    its own; the round's sum is skipped a round later, when every replica restarts from the consensus."""
    r0, r1, r2, r3 = runs["islands_nan"]
    for r in (r0, r1, r2, r3):
        assert r["skipped"] == [0, 0, 1, 1] and all(r["finite"])
        assert r["equals_consensus"][2] and r["eager_part_zero"][2]  # the skip
        assert not r["equals_consensus"][0] and not r["equals_consensus"][3]  # eager parts in the other rounds
    for r in (r0, r1):
        assert not r["equals_consensus"][1] and not r["eager_part_zero"][1]
    for r in (r2, r3):
        assert r["equals_consensus"][1] and r["eager_part_zero"][1]


@pytest.mark.parametrize("kind", KINDS)
def test_islands_match_a_reference_of_two_workers(runs, kind):
    """Each island is one worker of the round whose batch is its ranks' combined batch: the global model after
    every sync (this rank's part of it) equals a single-process float64 reference of 2 such workers."""
    results = runs[f"islands:{kind}"]
    assert all(r["num_syncs"] == (STEPS - WARMUP) // H for r in results)
    for r in results:
        assert len(r["reference_errors"]) == 3 and max(r["reference_errors"]) < 1e-5, r["reference_errors"]


@pytest.mark.parametrize("kind", KINDS)
def test_islands_are_identical_after_syncs_and_differ_between(runs, kind):
    """Rank m of one island holds what rank m of the other holds (its replica, or the same shard of it) right
    after each sync and in the warm-up, and not in between; with DDP the ranks of an island hold the same."""
    hashes = [r["hashes"] for r in runs[f"islands:{kind}"]]
    synced = runs[f"islands:{kind}"][0]["synced"]
    for step in range(STEPS):
        local = step >= WARMUP and not synced[step]
        for m in (0, 1):
            assert (hashes[m][step] != hashes[2 + m][step]) == local, (step, m)
        if kind == "ddp":
            assert hashes[0][step] == hashes[1][step] and hashes[2][step] == hashes[3][step], step


def collectives_made(r):
    """Per step, the collectives made during it, by kind and group."""
    before = {}
    for now in r["collectives"]:
        yield {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
        before = now


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_crosses_islands_between_syncs(runs, kind):
    """Counted per process group on every rank. The warm-up averages gradients over all ranks (DDP over the
    world; FSDP2's all-reduce hook across islands, once per FSDP module); its last step also broadcasts the first
    island's weights across islands, the start of every round. A local step communicates only inside the island.
    A sync sends one all-reduce across islands; the island then sums two statistics and, with DDP, all-gathers
    the spans of the global model its ranks keep."""
    for r in runs[f"islands:{kind}"]:
        island = "0,1" if r["rank"] < 2 else "2,3"
        across = "0,2" if r["rank"] % 2 == 0 else "1,3"
        for step, (made, synced) in enumerate(zip(collectives_made(r), r["synced"])):
            inside = {k: v for k, v in made.items() if k.endswith(f"@{island}")}
            outside = {k: v for k, v in made.items() if k not in inside}
            if step < WARMUP:
                expected = {"all_reduce@world": 1} if kind == "ddp" else {f"all_reduce@{across}": 3}
                if step == WARMUP - 1:
                    expected[f"broadcast@{across}"] = 1
                assert outside == expected, (step, made)
            elif synced:
                assert outside == {f"all_reduce@{across}": 1}, (step, made)
            else:
                assert outside == {} and inside, (step, made)
            if kind == "ddp" and step >= WARMUP:  # DDP's gradient all-reduce; at a sync the statistics and spans
                assert inside == {f"all_reduce@{island}": 1 + synced, **({f"all_gather_single@{island}": 1}
                                                                          if synced else {})}, (step, made)
            if kind == "fsdp2":  # FSDP2 gathers the shards and reduce-scatters the gradients inside the island
                assert inside[f"reduce_scatter_single@{island}"] == 3, (step, made)


def test_each_rank_of_a_ddp_island_keeps_and_sends_half_of_the_model(runs):
    """The outer state is sharded inside the island: the global copy and the momentum of a rank cover its half,
    and a sync sends that half (plus one float of statistics) across islands: one model per island."""
    r0, r1 = runs["islands:ddp"][:2]
    n = r0["model_numel"]
    assert r0["global_numel"] + r1["global_numel"] == n and r0["global_numel"] == (n + 1) // 2
    for r in (r0, r1):
        assert r["outer_state_numel"] == r["global_numel"]  # Nesterov's momentum buffer
        # a ring all-reduce over K = 2 islands sends 2 (K - 1) / K = 1 times its payload
        assert r["bytes_sent"] == (r["global_numel"] + 1) * 4


def test_each_rank_of_an_fsdp2_island_keeps_its_shards(runs):
    r0, r1 = runs["islands:fsdp2"][:2]
    assert r0["global_numel"] == r0["model_numel"] and r0["global_numel"] + r1["global_numel"] == runs[
        "islands:ddp"][0]["model_numel"]


@pytest.mark.parametrize("kind", KINDS)
def test_metrics_are_the_islands_not_the_ranks(runs, kind):
    """The drift and norm are of the 2 islands' replicas, the same on all 4 ranks (each rank adds its part's
    share inside the island)."""
    metrics = [r["metrics"] for r in runs[f"islands:{kind}"]]
    for sync in range(3):
        values = [m[sync]["outer_grad_norm"] for m in metrics]
        assert max(values) - min(values) <= 1e-6 * max(values) and values[0] > 0
    ddp = runs["islands:ddp"][0]["metrics"]
    fsdp2 = runs["islands:fsdp2"][0]["metrics"]
    assert abs(ddp[0]["outer_grad_norm"] - fsdp2[0]["outer_grad_norm"]) <= 1e-5 * ddp[0]["outer_grad_norm"]


@pytest.mark.parametrize("kind", KINDS)
def test_islands_compose_with_overlapped_and_compressed_syncs(runs, kind):
    """DDP islands with eager outer steps and int8 outer gradients with error feedback; FSDP2 islands with 3
    streaming fragments and bfloat16 outer gradients: each island's ranks stay together (DDP: the same replica),
    and training ends with one finite global model (FSDP2: the same shard on rank m of each island)."""
    results = runs[f"islands:{kind},combo"]
    assert all(r["num_syncs"] == 3 and r["finite"] for r in results)
    if kind == "ddp":
        assert len({r["final"] for r in results}) == 1
        for step in range(STEPS):
            assert results[0]["hashes"][step] == results[1]["hashes"][step], step
    else:
        assert results[0]["final"] == results[2]["final"] and results[1]["final"] == results[3]["final"]


@pytest.mark.parametrize("kind", KINDS)
def test_islands_resume_bit_exactly_mid_round(runs, kind):
    for r in runs[f"islands:{kind},resume"]:
        assert r["position"] == [6, 1, 1]  # step 6: warm-up 2, one round of 3, one step into the next
        assert r["resumed"] == r["full"]


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    return run_scenarios(tmp_path_factory.mktemp("trainer_islands"),
                         ["trainer_islands", "resume:nesterov,0.1,none,constant,iid,2", "adascale:2"], num_processes=4)


@pytest.fixture(scope="module")
def fsdp2_trainer_run(tmp_path_factory):
    """In a launch of its own: the scenario patches Accelerate for the rest of its processes' life."""
    return run_scenarios(tmp_path_factory.mktemp("trainer_fsdp2"), ["trainer_fsdp2"], num_processes=4)["trainer_fsdp2"]


def test_trainer_islands(trainer_runs):
    """LocalSGDTrainer, islands of 2: Trainer's DDP wrapper all-reduces inside the island between syncs and over
    all ranks in the warm-up; evaluation (mid-round) and saving see the global model."""
    results = trainer_runs["trainer_islands"]
    hashes = [r["hashes"] for r in results]
    synced = results[0]["synced"]
    assert synced == [False, False, False, False, True, False, False, True, True]  # warm-up 2, H = 3, last partial
    for step in range(9):
        assert hashes[0][step] == hashes[1][step] and hashes[2][step] == hashes[3][step], step
        assert (hashes[0][step] != hashes[2][step]) == (step >= 2 and not synced[step]), step
    for r in results:
        island = "0,1" if r["rank"] < 2 else "2,3"
        made = list(collectives_made(r))
        for step in (2, 3, 5, 6):  # local steps: only DDP's all-reduce inside the island
            # (before step 4's evaluation, the island puts the global model together from its ranks' spans)
            evaluation = {f"all_gather_single@{island}": 1} if step == 3 else {}
            assert made[step] == {f"all_reduce@{island}": 1, **evaluation}, (step, made[step])
        assert r["saved_is_global"] and r["workers"] == 2
    # the evaluation at step 4, mid-round: the global model of step 2, the same on every rank, not a replica
    evaluated = [r["evaluated"][0] for r in results]
    assert len(set(evaluated)) == 1 and evaluated[0] == hashes[0][1] and evaluated[0] not in (hashes[0][3], hashes[2][3])


def test_a_second_train_call_trains_the_same_ddp_wrapper_with_islands_again(trainer_runs):
    """train() twice on one trainer: the second reuses Trainer's DDP wrapper, which takes one comm hook for its
    life; its new engine's islands run the same schedule, each island's ranks together, the islands equal after
    each sync. (In its warm-up they may differ: Trainer keeps each replica's AdamW state from the first run.)"""
    results = trainer_runs["trainer_islands"]
    for r in results:
        assert r["again_synced"] == r["synced"] and r["again_num_syncs"] == r["num_syncs"] == 3
    for step in range(9):
        h = [r["again_hashes"][step] for r in results]
        assert h[0] == h[1] and h[2] == h[3], step
        if results[0]["synced"][step]:
            assert h[0] == h[2], step
        elif step >= 2:
            assert h[0] != h[2], step
    assert results[0]["again_hashes"] != results[0]["hashes"]  # it trained on from the first run's model


def test_trainer_islands_resume_bit_exactly_with_palsgd(trainer_runs):
    """From a mid-round checkpoint, with PALSGD's draws (one stream per island) and dropout on."""
    for r in trainer_runs["resume:nesterov,0.1,none,constant,iid,2"]:
        assert r["resumed"] == r["full"]
        assert r["inner_optimizer"]["equals_own_file"]


def test_trainer_fsdp2_islands(fsdp2_trainer_run):
    """LocalSGDTrainer with FSDP2 inside islands (Accelerate's FSDP forced on CPU, see the scenario): the model is
    sharded over each island; the warm-up averages across islands through FSDP2's all-reduce hook, local steps
    communicate only inside the island, a sync once across; Trainer saves the global model."""
    results = fsdp2_trainer_run
    syncs = results[0]["syncs"]
    assert syncs == [0, 0, 0, 0, 1, 1, 1, 2, 3]
    for r in results:
        assert r["sharded"].startswith("FSDP") and r["saved_is_global"] and r["workers"] == 2
        island = "0,1" if r["rank"] < 2 else "2,3"
        across = "0,2" if r["rank"] % 2 == 0 else "1,3"
        for step, made in enumerate(collectives_made(r)):
            outside = {k: v for k, v in made.items() if not k.endswith(f"@{island}")}
            if step <= 1:  # the engine makes the global model the same everywhere: at the start, and at the end
                outside.pop(f"broadcast@{across}")  # of the warm-up (its 2 steps) from the first island's weights
            synced = step > 0 and syncs[step] > syncs[step - 1]
            expected = {f"all_reduce@{across}": 3} if step < 2 else {f"all_reduce@{across}": 1} if synced else {}
            assert outside == expected, (step, made)
    for m in (0, 1):  # rank m of each island holds the same shard right after syncs only
        for step in range(9):
            synced = step > 0 and syncs[step] > syncs[step - 1]
            assert (results[m]["hashes"][step] == results[2 + m]["hashes"][step]) == (step < 2 or synced), step


def test_accelerate_keeps_fsdp_off_on_cpu(fsdp2_trainer_run):
    """The limit that makes the test above force FSDP: on CPU, Accelerate 1.16 refuses hybrid sharding and
    trains TrainingArguments(fsdp=...) with plain DDP."""
    r = fsdp2_trainer_run[0]
    assert "ParallelismConfig is only compatible" in r["hybrid_sharding_refused"] and not r["fsdp_used"]


def test_lr_scaling_counts_islands_as_workers(trainer_runs):
    """LocalAdaScale with islands of 2 on 4 ranks: K = 2 workers, the statistics of Eq. 15 from the islands'
    gradients (each rank of an island sends its span of the round's first gradient): the same as computed
    from one rank per island, and the same ρ on every rank."""
    results = trainer_runs["adascale:2"]
    ratios = [[log["local_sgd/gain_ratio"] for log in r["round_logs"]] for r in results]
    assert all(r == ratios[0] for r in ratios)
    check_logged_statistics(results[0]["round_logs"], results[0]["stats"], K=2, H=3)
