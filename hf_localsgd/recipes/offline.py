"""Fail in seconds, with the way out, when a recipe needs the Hugging Face Hub and cannot reach it.

Without this, a machine with no route to the Hub spends the better part of a minute in `huggingface_hub`'s
retries before `datasets` or `transformers` raise, and the error does not say that the `demo` recipe or
local files would work. Used by `hf_localsgd.recipes.data` before anything is downloaded or tokenized.

    HF_HUB_OFFLINE=1 python -m hf_localsgd.train --dataset_name roneneldan/TinyStories   # fails at once
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import HfApi
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.utils import httpx


PROBE_TIMEOUT_S = 10
DEMO_COMMAND = (
    "accelerate launch --config_file accelerate_configs/cpu_2proc.yaml "
    "-m hf_localsgd.train recipes/gptneo-tinystories/demo.yaml"
)


class HubUnavailableError(RuntimeError):
    """A dataset or tokenizer named by its Hub id cannot be loaded: no connection and no cached copy."""


def is_local(name: str) -> bool:
    return os.path.exists(name)


def offline_message(repo_id: str, what: str, reason: str) -> str:
    message = (
        f"Cannot load the {what} '{repo_id}' from the Hugging Face Hub: {reason}.\n"
        "Options without Hub access:\n"
        f"  - the demo recipe (built-in stories and tokenizer, nothing to download):\n      {DEMO_COMMAND}\n"
        "  - your own data: --train_file / --validation_file (.txt, .jsonl, .json, .parquet, .csv), with\n"
        "    --tokenizer_name builtin:stories or a local tokenizer directory (saved with save_pretrained)"
    )
    if not is_offline_mode():
        message += f"\n  - a {what} already in your Hugging Face cache: set HF_HUB_OFFLINE=1 so nothing is requested"
    return message


def require_hub(repo_id: str, repo_type: str, what: str) -> None:
    """Raise `HubUnavailableError` now if `repo_id` would have to come from an unreachable Hub.

    One metadata request with a short timeout, instead of the loaders' retry loop. Errors other than a
    failed connection (a gated or misspelled repository) are left for the loader to report in its own words.
    In offline mode nothing is requested: the loader looks in the local cache, and
    `explain_offline_failure` rewrites its error.
    """
    if is_local(repo_id) or is_offline_mode():
        return
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=PROBE_TIMEOUT_S)
    except httpx.TransportError as err:
        raise HubUnavailableError(
            offline_message(repo_id, what, f"the Hub is unreachable ({type(err).__name__}: {err})")
        ) from err


@contextmanager
def explain_offline_failure(repo_id: str, what: str) -> Iterator[None]:
    """In offline mode, turn a loader's "not in the cache" error into a `HubUnavailableError` that says so."""
    try:
        yield
    except OSError as err:  # what `datasets` (ConnectionError) and `transformers` raise for a cache miss
        if is_offline_mode() and not is_local(repo_id):
            raise HubUnavailableError(
                offline_message(repo_id, what, "offline mode is on (HF_HUB_OFFLINE=1) and it is not cached")
            ) from err
        raise
