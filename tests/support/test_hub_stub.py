"""Tests of tests/support/hub_stub.py: huggingface_hub and transformers.Trainer pushes land in the stub.

The pushes run in a subprocess (tests/support/hub_push_script.py) because huggingface_hub reads HF_ENDPOINT
at import time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_stub import HubStub


PUSH_SCRIPT = Path(__file__).with_name("hub_push_script.py")
README = """---
license: apache-2.0
tags:
- hf-localsgd-test
---

# tiny

A test repo.
"""


@pytest.fixture
def stub():
    with HubStub() as hub:
        yield hub


def run_push_script(stub: HubStub, tmp_path: Path, *args: str, **extra_env: str) -> dict:
    """Run hub_push_script.py against the stub; return the JSON it prints after "RESULT "."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=stub.endpoint,
        HF_TOKEN="hf_dummy_token_for_hub_stub",
        HF_HOME=str(tmp_path / "hf_home"),  # no cached/stored token or config from the machine
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        **extra_env,
    )
    proc = subprocess.run(
        [sys.executable, str(PUSH_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=240
    )
    report = (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}\n"
        f"--- requests\n" + "\n".join(stub.requests) + "\n--- unhandled\n" + "\n".join(stub.unhandled)
    )
    assert proc.returncode == 0, report
    assert stub.unhandled == [], report
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result_lines, report
    return json.loads(result_lines[-1][len("RESULT ") :])


# "0": default path when hf_xet is installed (pipelined upload_folder); "1": legacy create_commit path.
@pytest.mark.parametrize("disable_xet", ["0", "1"], ids=["xet-pipeline", "legacy-commit"])
def test_upload_folder(stub, tmp_path, disable_xet):
    from safetensors.numpy import save_file
    import numpy as np

    folder = tmp_path / "folder"
    folder.mkdir()
    weights = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)  # 4 KiB of tensor data
    save_file({"weight": weights}, str(folder / "model.safetensors"))
    (folder / "README.md").write_text(README, encoding="utf-8")
    (folder / "_private.txt").write_text("ignored by ignore_patterns in the sub/ upload")
    local = {path.name: path.read_bytes() for path in folder.iterdir()}

    result = run_push_script(stub, tmp_path, "upload-folder", str(folder), HF_HUB_DISABLE_XET=disable_xet)

    files = stub.files("user/tiny")
    assert files["model.safetensors"] == local["model.safetensors"]
    assert files["README.md"] == local["README.md"]
    assert files["_private.txt"] == local["_private.txt"]  # no ignore_patterns on the first upload
    assert files["sub/model.safetensors"] == local["model.safetensors"]
    assert set(files) == {"model.safetensors", "README.md", "_private.txt", "sub/model.safetensors"}
    # The third, unchanged upload made no commit.
    assert stub.commits("user/tiny") == ["initial commit", "Upload tiny folder", "Upload to sub/"]
    assert result["oids"][1] == result["oids"][2]
    assert result["whoami"] == "user"
    assert stub.repo_ids() == ["user/tiny"]


def test_trainer_push_to_hub(stub, tmp_path):
    output_dir = tmp_path / "out"

    result = run_push_script(stub, tmp_path, "trainer", str(output_dir))

    assert result["hub_model_id"] == "user/tiny-trainer"
    files = stub.files("user/tiny-trainer")
    assert files["model.safetensors"] == (output_dir / "model.safetensors").read_bytes()
    assert files["config.json"] == (output_dir / "config.json").read_bytes()
    assert files["README.md"] == (output_dir / "README.md").read_bytes()
    assert b"generated_from_trainer" in files["README.md"]
    assert stub.commits("user/tiny-trainer") == ["initial commit", "End of training"]
