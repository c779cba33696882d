"""The entry point end to end: the demo recipe on 2 CPU processes under `accelerate launch`, shortened by
command-line overrides that must win over the recipe; and the `hf-localsgd` console script's dispatch."""

from __future__ import annotations

import json
import math

import pytest

from hf_localsgd.tools import cli


def test_demo_recipe_on_two_processes_with_overrides(demo_run):
    out, stdout = demo_run
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [e["step"] for e in state["log_history"] if "eval_perplexity" in e] == [3, 6]

    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-3)
    assert "eval_perplexity" in stdout
    assert "FutureWarning" not in stdout  # e.g. DDP's deprecated broadcast_buffers keyword

    card = (out / "README.md").read_text()
    assert "| sync_every (H) | 3 |" in card and "| local_sgd_warmup_steps | 2 |" in card
    assert "Perplexity" in card and "trained from scratch" in card
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_cli_dispatches_to_train(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0 and "--sync_every" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2
