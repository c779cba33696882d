"""Push to a (stub) Hub from a fresh process; run by tests/support/test_hub_stub.py.

huggingface_hub reads HF_ENDPOINT once, at import time, so the pushes run in a subprocess whose
environment points at the `HubStub`. The parent test then inspects what the stub received.

Usage (HF_ENDPOINT and HF_TOKEN set in the environment):

    python tests/support/hub_push_script.py upload-folder FOLDER
        create_repo("user/tiny"), then upload FOLDER three ways: plainly; again with path_in_repo="sub",
        ignore_patterns and run_as_future=True; and once more unchanged (a no-op push).
    python tests/support/hub_push_script.py trainer OUTPUT_DIR
        train a tiny GPT-2 for 2 steps with push_to_hub=True (hub_model_id="user/tiny-trainer"),
        then Trainer.push_to_hub().

Prints one JSON line, prefixed with "RESULT ", with the commit oids it got back.
"""

import json
import os
import sys


def upload_folder(folder: str) -> dict:
    from huggingface_hub import HfApi, constants

    assert constants.ENDPOINT == os.environ["HF_ENDPOINT"], constants.ENDPOINT
    api = HfApi()
    repo_url = api.create_repo("user/tiny", exist_ok=True)
    assert repo_url.repo_id == "user/tiny", repo_url
    api.create_repo("user/tiny", exist_ok=True)  # the 409 path of exist_ok=True

    first = api.upload_folder(repo_id="user/tiny", folder_path=folder, commit_message="Upload tiny folder")
    future = api.upload_folder(
        repo_id="user/tiny",
        folder_path=folder,
        path_in_repo="sub",
        ignore_patterns=["_*", "*.md"],  # same ignore patterns style as Trainer.push_to_hub, plus README.md
        commit_message="Upload to sub/",
        run_as_future=True,
    )
    second = future.result(timeout=60)
    # Nothing changed: the client drops every file (remote oid == local oid) and makes no commit.
    noop = api.upload_folder(repo_id="user/tiny", folder_path=folder, commit_message="No-op upload")
    info = api.model_info("user/tiny")
    assert noop.oid == second.oid == info.sha, (noop.oid, second.oid, info.sha)
    return {"oids": [first.oid, second.oid, noop.oid], "whoami": api.whoami()["name"]}


def trainer(output_dir: str) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, config.vocab_size, (8, 16))
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    args = TrainingArguments(
        output_dir=output_dir,
        push_to_hub=True,
        hub_model_id="user/tiny-trainer",
        report_to=[],
        max_steps=2,
        save_strategy="no",
        per_device_train_batch_size=4,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)  # init_hf_repo() -> create_repo
    trainer.train()
    commit = trainer.push_to_hub()  # save_model, create_model_card, upload_folder
    return {"oids": [commit.oid], "hub_model_id": trainer.hub_model_id}


if __name__ == "__main__":
    command, path = sys.argv[1:]
    result = {"upload-folder": upload_folder, "trainer": trainer}[command](path)
    print("RESULT " + json.dumps(result), flush=True)
