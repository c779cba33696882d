"""The examples users copy, each run on 2 real processes: TRL's SFTTrainer with no collective between syncs,
PEFT LoRA averaging its adapters alone (the plain Accelerate loop is tests/distributed/test_resume.py's)."""

from __future__ import annotations

import pytest
from conftest import run_scenarios


pytest.importorskip("trl")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_scenarios(tmp_path_factory.mktemp("examples"), ["trl_example", "peft_example"])


def test_trl_sft_trainer_communicates_only_at_syncs_and_logging_steps(runs):
    """16 steps, H = 4, logging every 8th step. TRL gathers four metrics per micro-batch: during local rounds
    they are answered from each rank's own batches, so a step that neither syncs nor follows a logging step
    makes no collective at all."""
    r0, r1 = runs["trl_example"]
    totals = dict(zip(range(1, 17), r0["totals"]))  # collectives up to the end of step s (before it logs)
    quiet = [s for s in range(2, 17) if s % 4 and (s - 1) % 8]
    assert quiet == [2, 3, 5, 6, 7, 10, 11, 13, 14, 15]
    for step in quiet:
        assert totals[step] == totals[step - 1], f"a collective during inner step {step}"
    assert totals[4] > totals[3] and totals[9] > totals[8]  # the outer sync; the logging step's loss gather
    assert r0["num_syncs"] == 4 and r0["hash"] == r1["hash"]
    # TRL computed (and gathered) its metrics every step, none with a collective; they stay meaningful: this
    # rank's batches, scaled to the replicas
    assert len(r0["logs"]) == 2
    for log in r0["logs"]:
        assert 0 < log["mean_token_accuracy"] < 1 and log["entropy"] > 0
    tokens = [log["num_tokens"] for log in r0["logs"]]
    assert tokens[1] == pytest.approx(2 * tokens[0], rel=0.2)  # about as many tokens in steps 9-16 as in 1-8


def test_peft_lora_averages_only_the_adapters(runs):
    r0, r1 = runs["peft_example"]
    for r in (r0, r1):
        assert r["engine_numel"] == r["adapter_numel"] == r["trainable_numel"] > 0
        assert r["bytes_sent_per_sync"] == (r["adapter_numel"] + 1) * 4  # 2 ranks: one ring pass of the payload
        assert r["base_unchanged"] and r["adapters_moved"] and r["num_syncs"] == 3
    assert r0["adapters"] == r1["adapters"]
