"""Two real processes (gloo on CPU): what rounds communicate, and the outer steps against
float64 references (LocalSGDTrainer, and the engine alone)."""

from __future__ import annotations

import pytest
from conftest import run_scenarios

from hf_localsgd.core.metrics import METRICS, PREFIX


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The module's scenarios, in one launch of two ranks."""
    return run_scenarios(tmp_path_factory.mktemp("rounds"), ["rounds", "ddp_equivalence", "outer_reference"])


@pytest.fixture(scope="module")
def mislaunched(tmp_path_factory):
    return run_scenarios(tmp_path_factory.mktemp("mislaunch"), ["mislaunch:trainer", "mislaunch:loop"],
                         ACCELERATE_USE_CPU="false")


def test_rounds_communicate_only_at_syncs(runs):
    """H = 4 after 2 warm-up steps, 14 steps, 2 micro-batches per step, Nesterov outer optimizer."""
    r0, r1 = runs["rounds"]
    steps = range(1, 15)
    sync_steps = {6, 10, 14}

    # DDP all-reduced gradients during the 2 warm-up steps (last micro-batch only), never afterwards.
    assert r0["grad_allreduces"] == [1] + [2] * 13
    # The engine: one outer all-reduce per round (one bucket), one broadcast at the start and one at the end of
    # the warm-up (the first replica's weights start every round), nothing else.
    assert r0["num_syncs"] == 3 and r0["engine_all_reduce"] == 3 and r0["engine_broadcast"] == 2

    # totals[s]: collectives up to the end of step s (counted before Trainer logs step s). From there to the
    # end of step s + 1 nothing is communicated, unless step s logged (Trainer gathers the loss then) or
    # step s + 1 ends a round: not even a gather of token counts or a buffer broadcast.
    totals = dict(zip(steps, r0["total_collectives"]))
    quiet = [s for s in steps if s > 2 and (s - 1) % 2 and s not in sync_steps]
    assert quiet == [4, 8, 12]
    for step in quiet:
        assert totals[step] == totals[step - 1], f"collective during inner step {step}"
    assert totals[6] > totals[5] and totals[3] > totals[2]  # the counter sees the outer sync and logging

    for step, h0, h1 in zip(steps, r0["hashes"], r1["hashes"]):
        if step <= 2 or step in sync_steps:  # DDP warm-up, or right after an outer step
            assert h0 == h1, f"ranks differ after step {step}"
        else:
            assert h0 != h1, f"ranks identical between syncs, at step {step}"
    for step, equal in zip(steps, r0["model_equals_global"]):
        assert equal == (step == 2 or step in sync_steps), step

    # Each outer step matches a float64 Nesterov reference computed from all ranks' weights.
    assert len(r0["reference_errors"]) == 3 and max(r0["reference_errors"]) < 1e-5

    # One log entry per sync with the round's metrics, checked against statistics computed from all weights.
    logs, stats = r0["round_logs"], r0["reference_stats"]
    assert [log["step"] for log in logs] == sorted(sync_steps) and [log["local_sgd/round"] for log in logs] == [1, 2, 3]
    n = stats[0]["numel"]
    for i, (log, ref) in enumerate(zip(logs, stats)):
        assert log["local_sgd/drift"] == pytest.approx(ref["drift"], rel=1e-3)
        assert log["local_sgd/outer_grad_norm"] == pytest.approx(ref["outer_grad_norm"], rel=1e-4)
        # Two replicas: the estimate is <Δ_0, Δ_1> / mean_k ‖Δ_k‖² (exact cosine when the norms are equal).
        assert log["local_sgd/cosine_similarity"] == pytest.approx(ref["inner_product"] / ref["mean_sq_norm"], rel=1e-3)
        assert log["local_sgd/bytes_sent"] == (n + 1) * 4  # ring all-reduce of 2 ranks: the payload once
        assert log["local_sgd/bytes_total"] == 2 * n * 4 + (i + 1) * (n + 1) * 4  # 2 DDP warm-up steps + syncs
        assert log["local_sgd/ddp_bytes_total"] == log["step"] * n * 4
        assert log["local_sgd/outer_lr"] == 0.7 and log["local_sgd/sync_every"] == 4
    assert logs[-1]["local_sgd/bytes_vs_ddp"] < 0.4
    assert {key for log in logs for key in log if key.startswith(PREFIX)} <= {PREFIX + name for name in METRICS}

    # Forward passes broadcast no buffers: rank 1 keeps its own.
    assert r0["rank_marker"] == [0.0] * 4 and r1["rank_marker"] == [1.0] * 4
    assert r0["last_losses"][-1] < 0.9 * r0["first_losses"][0]  # loss logged at steps 2 and 14


def test_h1_average_equals_ddp(runs):
    """H = 1, outer `average`, inner plain SGD (no momentum, no clipping) is data-parallel SGD."""
    r0, _ = runs["ddp_equivalence"]
    assert r0["max_abs_change"] > 1e-2  # training moved the weights...
    assert r0["max_abs_diff"] < 1e-5  # ...identically, to float tolerance


def test_engine_outer_steps_match_float64_references(runs):
    """The all-reduce sums the outer gradients (float32, or written once in bfloat16) and the outer step
    divides by K: every optimizer must follow its float64 reference on the mean outer gradient."""
    r0, r1 = runs["outer_reference"]
    assert len(r0["errors"]) == 12 and {k.split(" buckets=")[1] for k in r0["errors"]} == {"1", "4"}
    for result in (r0, r1):
        for case, worst in result["errors"].items():
            # relative to the largest |Δ|: float32 rounding, or bfloat16's 2^-8 times lr and momentum
            tolerance = 1e-4 if "float32" in case else 0.05
            assert worst["x"] < tolerance, (case, worst)
            assert worst["drift"] < tolerance and worst["outer_grad_norm"] < tolerance, (case, worst)
    assert r0["buffer_warnings"] == 12 and r1["buffer_warnings"] == 0  # BatchNorm statistics, rank 0 only


@pytest.mark.parametrize("path", ["trainer", "loop"])
def test_a_cpu_run_launched_without_use_cpu_stops_with_the_way_out(mislaunched, path):
    """accelerate's multi-GPU launcher does not pass the config's use_cpu: Accelerate then sees one process
    where torch.distributed has two, and every rank would train the same data as rank 0."""
    r0, r1 = mislaunched[f"mislaunch:{path}"]
    for r in (r0, r1):
        assert "torch.distributed joined 2 processes, but Accelerate sees 1" in r["error"]
        assert "use_cpu=True" in r["error"] and "ACCELERATE_USE_CPU=true" in r["error"]
