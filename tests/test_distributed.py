"""Two real processes (gloo on CPU) under `accelerate launch`, each test with a timeout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, load_file

from conftest import run_worker
from hub_stub import HubStub


def test_rounds_communicate_only_at_syncs(tmp_path):
    """H = 4 after 2 warm-up steps, 14 steps, 2 micro-batches per step, Nesterov outer optimizer."""
    r0, r1 = run_worker("rounds", tmp_path)
    steps = range(1, 15)
    sync_steps = {6, 10, 14}

    # DDP all-reduced gradients during the 2 warm-up steps (last micro-batch only), never afterwards.
    assert r0["grad_allreduces"] == [1] + [2] * 13
    # The engine: one outer all-reduce per round (one bucket), one broadcast at start, nothing else.
    assert r0["num_syncs"] == 3 and r0["engine_all_reduce"] == 3 and r0["engine_broadcast"] == 1

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

    # Forward passes broadcast no buffers: rank 1 keeps its own.
    assert r0["rank_marker"] == [0.0] * 4 and r1["rank_marker"] == [1.0] * 4
    assert r0["last_losses"][-1] < 0.9 * r0["first_losses"][0]  # loss logged at steps 2 and 14


def test_h1_average_equals_ddp(tmp_path):
    """H = 1, outer `average`, inner plain SGD (no momentum, no clipping) is data-parallel SGD."""
    r0, _ = run_worker("ddp_equivalence", tmp_path)
    assert r0["max_abs_change"] > 1e-2  # training moved the weights...
    assert r0["max_abs_diff"] < 1e-5  # ...identically, to float tolerance


def test_resume_mid_round_is_bit_exact(tmp_path):
    """Schedule-free outer optimizer, PALSGD draws (p = 0.25), dropout on; resumed from step 10 of rounds of 4."""
    r0, r1 = run_worker("resume", tmp_path, "schedule_free", "0.25")
    for r in (r0, r1):
        assert r["resumed"] == r["full"]
    assert r0["full"][0] == r1["full"][0]  # training ended synchronized
    assert r0["checkpoints"] == ["checkpoint-10", "checkpoint-12"]  # save_total_limit=2 rotated checkpoint-5
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
    r0, r1 = run_worker("resume", tmp_path, *options)
    for r in (r0, r1):
        assert r["resumed"] == r["full"]


def test_push_to_hub_pushes_global_model(tmp_path):
    with HubStub() as hub:
        out = tmp_path / "run"
        r0, _ = run_worker(
            "push", out, HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_test", HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf_home"), NO_PROXY="127.0.0.1,localhost",
        )
        files = hub.files("user/tiny-localsgd")
        assert hub.unhandled == []
    assert r0["num_syncs"] == 2 and r0["inner_step"] == 0  # the partial last round was synchronized

    pushed = load(files["model.safetensors"])
    expected = load_file(out / "expected_global.safetensors")
    train_point = load_file(out / "train_point_y.safetensors")
    assert set(expected) <= set(pushed)
    for name, tensor in expected.items():
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=0, msg=name)
    # Schedule-free's averaged x was pushed, not the y sequence training continues from.
    assert any(not torch.equal(pushed[n], train_point[n]) for n in expected)

    card = files["README.md"].decode()
    assert "hf_localsgd" in card.split("---")[1]  # tag in the card's metadata
    for text in ("schedule_free", "| sync_every (H) | 4 |", "| workers | 2 |", "| outer_lr | 2.0 |"):
        assert text in card, text


def test_resuming_from_a_checkpoint_without_every_rank_state_stops_every_rank(tmp_path):
    r0, r1 = run_worker("resume_without_every_rank", tmp_path)
    assert r0["error"] == r1["error"] and r0["error"].startswith("1 of 2 ranks found their local_sgd_rank*.pt")


def test_engine_in_a_plain_accelerate_loop(tmp_path):
    """The README example: 10 steps with H = 4, then the final partial round."""
    r0, r1 = run_worker("accelerate_loop", tmp_path)
    assert r0["num_syncs"] == 3 and r0["engine_all_reduce"] == 3 and r0["ddp_hook_calls"] == 0
    assert r0["hash"] == r1["hash"]
    assert r0["losses"] != r1["losses"]  # each rank trained on its own shard


def test_engine_outer_steps_match_float64_references(tmp_path):
    """The all-reduce sums the outer gradients (float32, or written once in bfloat16) and the outer step
    divides by K: every optimizer must follow its float64 reference on the mean outer gradient."""
    r0, r1 = run_worker("outer_reference", tmp_path)
    assert len(r0["errors"]) == 12 and {k.split(" buckets=")[1] for k in r0["errors"]} == {"1", "4"}
    for result in (r0, r1):
        for case, worst in result["errors"].items():
            # relative to the largest |Δ|: float32 rounding, or bfloat16's 2^-8 times lr and momentum
            tolerance = 1e-4 if "float32" in case else 0.05
            assert worst["x"] < tolerance, (case, worst)
            assert worst["drift"] < tolerance and worst["outer_grad_norm"] < tolerance, (case, worst)
    assert r0["buffer_warnings"] == 12 and r1["buffer_warnings"] == 0  # BatchNorm statistics, rank 0 only
