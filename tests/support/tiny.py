"""Tiny models and data for the single-process tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import GPTNeoConfig, GPTNeoForCausalLM, set_seed


def tiny_model() -> GPTNeoForCausalLM:
    set_seed(0)
    return GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=16,
        attention_types=[[["global", "local"], 1]], window_size=8, bos_token_id=0, eos_token_id=0,
    ))


def data(n: int = 64) -> Dataset:
    ids = ((torch.randint(0, 64, (n, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(16)) % 64)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
