"""LocalSGDTrainer under DeepSpeed ZeRO 0, 1 and 2 on real CPU processes (gloo), with DeepSpeed's data-parallel
group set to the island: against the same runs through Trainer's DDP, collectives counted per process group,
resumed from a mid-round checkpoint. (`scenarios/deepspeed_trainer.py`; README "DeepSpeed" has the table.)"""

from __future__ import annotations

from importlib.util import find_spec

import pytest
from conftest import run_scenarios


pytestmark = pytest.mark.skipif(
    find_spec("deepspeed") is None,
    reason="deepspeed is not installed (.ci/run installs it: pip install --no-build-isolation deepspeed)",
)

WARMUP = 2
SYNCED = [False, False, False, False, True, False, False, True, True]  # 9 steps: warm-up 2, H = 3, the last partial
# 2 processes, every rank its own island; zero2_plugin through Accelerate's DeepSpeed plugin (accelerate config)
PAIRS = ["zero0", "zero0_bf16", "zero1", "zero2_offload", "zero2_bf16", "zero2_plugin"]
ISLANDS = ["zero0_islands", "zero1_islands", "zero2_islands"]  # 4 processes, 2 islands of 2
BF16 = {"zero0_bf16", "zero2_bf16"}
NUM_PARAMS = 30  # the tiny GPT-Neo's parameters: the warm-up averages each gradient across islands
# The first DeepSpeed launch on a machine compiles DeepSpeed's shared-memory op (about a minute; cached after).
TIMEOUT = 600


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    specs = ["deepspeed_trainer:" + ",".join(PAIRS), "deepspeed_trainer:resume,zero0,zero2_offload"]
    runs = run_scenarios(tmp_path_factory.mktemp("deepspeed"), specs, timeout=TIMEOUT)
    return {"runs": runs[specs[0]], "resumed": runs[specs[1]]}


@pytest.fixture(scope="module")
def islands(tmp_path_factory):
    specs = ["deepspeed_trainer:" + ",".join(ISLANDS)]
    return run_scenarios(tmp_path_factory.mktemp("deepspeed_islands"), specs, num_processes=4, timeout=TIMEOUT)[specs[0]]


def results(pairs, islands, name):
    return pairs["runs"] if name in PAIRS else islands


def made(r):
    """Per step, the collectives made during it (by group method and ranks), from the cumulative counts."""
    before = r["collectives"][0]
    for now in r["collectives"][1:]:
        yield {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
        before = now


@pytest.mark.parametrize("name", PAIRS + ISLANDS)
def test_deepspeed_runs_as_configured(pairs, islands, name):
    """ZeRO's data-parallel group is the island: one rank, or the island's two (which then split the float32
    masters: each rank's global copy covers its partition); ZeRO-Offload keeps the masters in host memory."""
    for r in results(pairs, islands, name):
        run = r[name]
        stage = int(name[4])
        island_size = 2 if name in ISLANDS else 1
        assert run["engine"] == "DeepSpeedEngine" and run["stage"] == stage and run["dp_world_size"] == island_size
        assert run["workers"] == 2 and run["offload"] == ("offload" in name or name == "zero2_islands")
        expected = {0: "FP16_UnfusedOptimizer" if name in BF16 else "AdamW"}.get(stage, "DeepSpeedZeroOptimizer")
        assert run["optimizer"] == expected and run["base_optimizer"] == "AdamW"  # Trainer's torch AdamW inside
        assert run["global_numel"] * island_size == run["model_numel"]
        assert run["from_training_arguments"] == (name != "zero2_plugin")


@pytest.mark.parametrize("name", PAIRS + ISLANDS)
def test_nothing_crosses_replicas_between_syncs(pairs, islands, name):
    """Counted at the process groups, on every rank: between syncs only the island's own group (or the rank's
    alone) sees a collective; the warm-up averages each gradient across islands; a sync is one all-reduce."""
    check_collectives(results(pairs, islands, name), name)


def check_collectives(runs, name, micro_batches=1):
    for r in runs:
        rank, island_size = r["rank"], r[name]["dp_world_size"]
        island = {str(rank - rank % island_size + m) for m in range(island_size)}
        across = "world" if island_size == 1 else f"{rank % 2},{rank % 2 + 2}"
        for step, collectives in enumerate(made(r[name])):
            outside = {k: v for k, v in collectives.items() if not set(k.split("@")[1].split(",")) <= island}
            if step < WARMUP:  # (each micro-batch's gradients; at the warm-up's end the first replica's weights)
                expected = {f"allreduce@{across}": NUM_PARAMS * micro_batches}
                if step == WARMUP - 1:
                    expected[f"broadcast@{across}"] = 1
                assert outside == expected, (step, collectives)
            elif SYNCED[step]:
                assert outside == {f"allreduce@{across}": 1}, (step, collectives)
            else:
                assert outside == {}, (step, collectives)


@pytest.mark.parametrize("name", PAIRS + ISLANDS)
def test_replicas_are_identical_after_syncs_and_differ_between(pairs, islands, name):
    runs = results(pairs, islands, name)
    assert all(r[name]["synced"] == SYNCED for r in runs)
    others = [(0, 1)] if name in PAIRS else [(0, 2), (1, 3)]  # (rank m of each island holds the same partition)
    for a, b in others:
        for step in range(len(SYNCED)):
            same = runs[a][name]["hashes"][step] == runs[b][name]["hashes"][step]
            assert same == (step < WARMUP or SYNCED[step]), (name, step, a, b)


@pytest.mark.parametrize("name", [n for n in PAIRS + ISLANDS if n not in BF16])
def test_the_rounds_are_the_reference_runs(pairs, islands, name):
    """The global model after each sync equals that of the same run through Trainer's DDP (one replica per rank,
    or DDP inside islands of 2), with the same inner optimizer, to float32 rounding."""
    for r in results(pairs, islands, name):
        assert len(r[name]["errors"]) == 3 and max(r[name]["errors"]) < 1e-5, r[name]["errors"]


@pytest.mark.parametrize("name", PAIRS + ISLANDS)
def test_the_outer_step_lands_in_the_float32_masters(pairs, islands, name):
    """After each sync the weights the next inner step starts from, DeepSpeed's float32 masters (the module's own
    parameters at stage 0 in float32), are the global model exactly; the module holds it rounded to its dtype.
    In bfloat16 the global model is not representable: the masters keep what the module cannot."""
    for r in results(pairs, islands, name):
        for sync in r[name]["masters"]:
            assert sync["masters_are_global"] and sync["module_is_global_rounded"], sync
            assert sync["module_dtype"] == ("torch.bfloat16" if name in BF16 else "torch.float32")
            assert sync["masters_not_rounded"] == (name in BF16)
        assert r[name]["saved_is_global"]


@pytest.mark.parametrize("name", sorted(BF16))
def test_bfloat16_runs_follow_the_float32_reference(pairs, name):
    for r in pairs["runs"]:
        assert max(r[name]["errors"]) < 0.05, r[name]["errors"]


def check_resumed(runs, name):
    """Checkpoint 6 (one step into a round): DeepSpeed's files, one tag per island, and each rank's local-SGD
    state; the resumed run takes the same steps, bit for bit."""
    for r in runs:
        run = r[name]
        assert run["resumed"] == run["full"] and run["resumed_hashes"] == run["full_hashes"][6:]
        assert {"local_sgd_rank0.pt", "local_sgd_rank1.pt", "global_step6_island0", "global_step6_island1"} <= set(
            run["checkpoint_files"])
        assert all("mp_rank_00_model_states.pt" in files for files in run["tags"].values())
        if name != "zero0":  # ZeRO's optimizer state, one file per rank of the island (bf16_... in bfloat16)
            assert all(any(f.endswith("zero_pp_rank_0_mp_rank_00_optim_states.pt") for f in files)
                       for files in run["tags"].values())


@pytest.mark.parametrize("name", ["zero0", "zero2_offload"])
def test_resume_from_a_mid_round_checkpoint_is_exact(pairs, name):
    check_resumed(pairs["resumed"], name)
    # Saving (every 3 steps: the global model put in for Trainer's and DeepSpeed's files, this replica's weights
    # back afterwards) changes nothing: the run that saved took the steps of the one that did not.
    for saved, unsaved in zip(pairs["resumed"], pairs["runs"]):
        assert saved[name]["full_hashes"] == unsaved[name]["hashes"]


def check(runs, name, island_size, tolerance, micro_batches=1):
    """The checks of the tests above, for one run of the slow launches below."""
    for r in runs:
        assert r[name]["dp_world_size"] == island_size and r[name]["synced"] == SYNCED
        assert max(r[name]["errors"]) < tolerance, r[name]["errors"]
        assert all(sync["masters_are_global"] and sync["module_is_global_rounded"] for sync in r[name]["masters"])
        assert r[name]["saved_is_global"]
    check_collectives(runs, name, micro_batches)
    others = [(0, 1)] if island_size == 1 else [(0, 2), (1, 3)]
    for a, b in others:
        for step in range(len(SYNCED)):
            same = runs[a][name]["hashes"][step] == runs[b][name]["hashes"][step]
            assert same == (step < WARMUP or SYNCED[step]), (name, step, a, b)


@pytest.mark.slow
def test_deepspeeds_own_optimizers_as_the_inner_optimizer(tmp_path):
    """ZeRO-Offload's DeepSpeedCPUAdam (Accelerate's choice for Trainer's AdamW under offload) and the config's
    FusedAdam, at stage 0 in bfloat16 under DeepSpeed's fused mixed-precision optimizer. (Their CPU ops are
    compiled on first use, minutes.) Against the torch-AdamW reference: the same algorithm, other kernels."""
    spec, resume = "deepspeed_trainer:zero2_cpu_adam,zero0_bf16_fused_adam", "deepspeed_trainer:resume,zero2_bf16"
    launched = run_scenarios(tmp_path, [spec, resume], timeout=TIMEOUT)
    check_resumed(launched[resume], "zero2_bf16")  # (and a bfloat16 run resumes exactly)
    runs = launched[spec]
    assert (runs[0]["zero2_cpu_adam"]["base_optimizer"], runs[0]["zero0_bf16_fused_adam"]["optimizer"],
            runs[0]["zero0_bf16_fused_adam"]["base_optimizer"]) == ("DeepSpeedCPUAdam", "FP16_Optimizer", "FusedAdam")
    check(runs, "zero2_cpu_adam", 1, 1e-5)
    check(runs, "zero0_bf16_fused_adam", 1, 0.05)
    assert all(sync["masters_not_rounded"] for sync in runs[0]["zero0_bf16_fused_adam"]["masters"])


@pytest.mark.slow
def test_islands_resume_exactly_take_deepspeeds_optimizer_and_accumulate_gradients(tmp_path):
    """Islands of 2: mid-round resumes at ZeRO-1 and ZeRO-2; FusedAdam from the config; 2 micro-batches a step
    (each one's gradients averaged across islands in the warm-up), against DDP islands that accumulate too."""
    resume = "deepspeed_trainer:resume,zero1_islands,zero2_islands"
    fused = "deepspeed_trainer:zero2_fused_adam_islands,zero2_accumulation_islands"
    runs = run_scenarios(tmp_path, [resume, fused], num_processes=4, timeout=TIMEOUT)
    for r in runs[resume]:
        for name in ("zero1_islands", "zero2_islands"):
            run = r[name]
            assert run["resumed"] == run["full"] and run["resumed_hashes"] == run["full_hashes"][6:]
            assert all({"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
                       <= set(files) for files in run["tags"].values())
    assert runs[fused][0]["zero2_fused_adam_islands"]["base_optimizer"] == "FusedAdam"
    check(runs[fused], "zero2_fused_adam_islands", 2, 1e-5)
    check(runs[fused], "zero2_accumulation_islands", 2, 1e-5, micro_batches=2)
