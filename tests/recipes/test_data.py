"""Data: the built-in corpus and tokenizer are deterministic, packing is exact, local files load, a Hub
name fails fast offline with a message that names it, and held-out perplexity is exp(mean token NLL)."""

from __future__ import annotations

import hashlib
import json
import math
import time

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import httpx
from torch.nn import functional as F
from transformers import EvalPrediction

from hf_localsgd.recipes import offline
from hf_localsgd.recipes.data import DataArguments, build_lm_datasets, load_tokenizer, pack_into_blocks
from hf_localsgd.recipes.demo_data import demo_datasets, generate_stories, train_demo_tokenizer
from hf_localsgd.recipes.offline import HubUnavailableError
from hf_localsgd.recipes.perplexity import perplexity, token_nll


@pytest.fixture(scope="module")
def tokenizer():
    return train_demo_tokenizer()


def test_stories_are_deterministic_and_splits_differ():
    assert generate_stories(50, seed=0) == generate_stories(50, seed=0)
    assert not set(generate_stories(50, seed=1)) & set(generate_stories(200, seed=0))
    corpus = demo_datasets(num_train=20, num_validation=5)
    assert corpus["train"].num_rows == 20 and list(corpus["validation"]["text"]) == generate_stories(5, seed=1)


# The first 100 training stories. `random.Random(seed)` draws the same numbers on every platform and
# Python 3 version, so the corpus is the same on every machine; update this only with the word lists.
CORPUS_SHA256 = "f985f9bfe1c51664c5d284a5f45418f7a8f0bccd3f50e3f85ca040d3543252f5"


def test_corpus_is_the_same_on_every_machine():
    assert hashlib.sha256("\n".join(generate_stories(100)).encode()).hexdigest() == CORPUS_SHA256


def test_tokenizer_training_is_deterministic(tokenizer):
    """Every rank of a run trains its own copy, so the BPE trainer must break ties the same way each time."""
    assert train_demo_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_round_trips_any_text(tokenizer):
    text = "Once upon a time, Lily found a red ball. Ünïcode and numbers 42 still encode."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token_id == 0 and len(tokenizer) <= 1024


def test_packing_makes_full_blocks_with_eos_between_documents(tokenizer):
    corpus = demo_datasets(num_train=30, num_validation=5)["train"]
    packed = pack_into_blocks(corpus, tokenizer, block_size=32)
    docs = tokenizer(list(corpus["text"]))["input_ids"]
    stream = [t for doc in docs for t in doc + [tokenizer.eos_token_id]]
    assert packed.column_names == ["input_ids", "labels"]
    assert list(packed["input_ids"]) == [stream[i : i + 32] for i in range(0, len(stream) - 31, 32)]
    assert list(packed["labels"]) == list(packed["input_ids"])


def test_local_text_and_jsonl_files(tmp_path, tokenizer):
    stories = generate_stories(40)
    (tmp_path / "train.txt").write_text("\n".join(stories))
    (tmp_path / "valid.jsonl").write_text("\n".join(json.dumps({"story": s}) for s in stories[:5]))
    args = DataArguments(train_file=str(tmp_path / "train.txt"), validation_file=str(tmp_path / "valid.jsonl"),
                         block_size=16)
    with pytest.raises(ValueError, match="text"):  # the jsonl column is not called "text"
        build_lm_datasets(args, tokenizer)
    (tmp_path / "valid.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in stories[:5]))
    train, held_out = build_lm_datasets(args, tokenizer)
    assert len(train) > len(held_out) > 0 and len(train[0]["input_ids"]) == 16


def test_held_out_split_when_there_is_no_validation_file(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text("\n".join(generate_stories(100)))
    args = DataArguments(train_file=str(tmp_path / "train.txt"), validation_split_percentage=10, block_size=16)
    train, held_out = build_lm_datasets(args, tokenizer)
    assert 0.05 < len(held_out) / (len(train) + len(held_out)) < 0.2


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="train_file"):
        DataArguments(train_file="corpus.docx")
    with pytest.raises(ValueError, match="max_eval_samples"):
        DataArguments(dataset_name="allenai/c4", streaming=True)


def test_offline_hub_dataset_and_tokenizer_fail_fast_with_the_way_out():
    assert huggingface_hub.constants.HF_HUB_OFFLINE, "tests run with HF_HUB_OFFLINE=1 (see conftest.py)"
    start = time.monotonic()
    with pytest.raises(HubUnavailableError) as dataset_error:
        build_lm_datasets(DataArguments(dataset_name="hf-localsgd-tests/not-cached"), tokenizer=None)
    with pytest.raises(HubUnavailableError) as tokenizer_error:
        load_tokenizer("hf-localsgd-tests/not-cached-tokenizer")
    assert time.monotonic() - start < 15
    for error, name in ((dataset_error, "dataset 'hf-localsgd-tests/not-cached'"),
                        (tokenizer_error, "tokenizer 'hf-localsgd-tests/not-cached-tokenizer'")):
        message = str(error.value)
        assert name in message and "offline mode is on (HF_HUB_OFFLINE=1)" in message
        assert "recipes/gptneo-tinystories/demo.yaml" in message and "--train_file" in message


def test_unreachable_hub_fails_on_the_first_request(monkeypatch, tmp_path):
    """Online mode with no route to the Hub: one probe, not the loaders' minute of retries."""
    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(kwargs["timeout"])
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(offline, "is_offline_mode", lambda: False)
    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    with pytest.raises(HubUnavailableError, match="'roneneldan/TinyStories'.*unreachable") as error:
        offline.require_hub("roneneldan/TinyStories", "dataset", "dataset")
    assert "already in your Hugging Face cache: set HF_HUB_OFFLINE=1" in str(error.value)
    assert calls == [offline.PROBE_TIMEOUT_S]
    offline.require_hub(str(tmp_path), "dataset", "dataset")  # a local directory: no request
    assert len(calls) == 1


def test_perplexity_is_exp_of_mean_token_nll():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 9, 11), torch.randint(0, 11, (6, 9))
    labels[0, 3:] = -100  # ignored positions count neither loss nor tokens
    per_sequence = token_nll(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    result = perplexity(EvalPrediction(predictions=per_sequence.numpy(), label_ids=labels.numpy()))
    assert result["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)
