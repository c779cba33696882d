"""Two real processes: push_to_hub pushes the global model (schedule-free's averaged x) and the method's card."""

from __future__ import annotations

import torch
from conftest import run_scenario
from hub_stub import HubStub
from safetensors.torch import load, load_file


def test_push_to_hub_pushes_global_model(tmp_path):
    with HubStub() as hub:
        out = tmp_path / "run"
        r0, _ = run_scenario(
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
