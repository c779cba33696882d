"""Named model configurations of the papers, as `transformers` configs for training from scratch.

Every recipe names its model here (`model_config: gpt-neo-8m`), so the shapes live in one place and
`tests/test_models.py` checks that each lands near the parameter count in its name.

- `gpt-neo-8m`: GPT-Neo as in PALSGD App. C (hidden 128, 8 layers, 8 heads, 300 positions, GPT-Neo's
  50,257-token vocabulary).
- `chinchilla-150m` / `-400m` / `-1b`: the Chinchilla-style decoders (32,000 vocabulary) of Table 2 of
  "Understanding Outer Optimizers in Local SGD" (arXiv:2509.10439), built as Llama blocks; see
  `recipes/chinchilla-c4/README.md` for why.
- `demo`: a GPT-Neo small enough to train on two CPU processes in a minute (the `demo` recipe).

    python -c "from hf_localsgd.recipes.models import build_model_config as b; print(b('chinchilla-150m'))"
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, GPTNeoConfig, LlamaConfig, PretrainedConfig, PreTrainedModel


def _gpt_neo_8m(vocab_size: int, **overrides) -> GPTNeoConfig:
    return GPTNeoConfig(**{
        "vocab_size": vocab_size,
        "max_position_embeddings": 300,
        "hidden_size": 128,
        "num_layers": 8,
        "num_heads": 8,
        # GPT-Neo's usual alternation of global and local (windowed) attention, one pair per two layers.
        "attention_types": [[["global", "local"], 4]],
        "window_size": 256,
        **overrides,
    })


def _demo(vocab_size: int, **overrides) -> GPTNeoConfig:
    # Same family as gpt-neo-8m, shrunk until ~150 steps on 2 CPU processes take about a minute.
    return GPTNeoConfig(**{
        "vocab_size": vocab_size,
        "max_position_embeddings": 128,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "attention_types": [[["global", "local"], 1]],
        "window_size": 64,
        # The demo tokenizer's only special token, <|endoftext|>, is id 0.
        "bos_token_id": 0,
        "eos_token_id": 0,
        **overrides,
    })


def _chinchilla(layers: int, hidden: int, heads: int, kv_size: int) -> Callable[..., LlamaConfig]:
    def build(vocab_size: int, **overrides) -> LlamaConfig:
        # SwiGLU has three projection matrices where Chinchilla's MLP had two of width 4 * hidden: an
        # intermediate width of 8/3 * hidden (rounded up to a multiple of 128 for tensor cores) keeps the
        # MLP's parameter count, and so the total, at the size the table names.
        intermediate = -(-8 * hidden // 3 // 128) * 128
        return LlamaConfig(**{
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            # Multi-head attention as in Chinchilla: one K/V head per query head. `head_dim` is the table's
            # "K/V size", which for 150M (16 x 64 = 1024) differs from hidden / heads (896 / 16 = 56).
            "num_key_value_heads": heads,
            "head_dim": kv_size,
            "max_position_embeddings": 2048,
            # Chinchilla's parameter counts include the embedding matrix once: input and output share it.
            "tie_word_embeddings": True,
            **overrides,
        })

    return build


MODEL_CONFIGS: dict[str, tuple[Callable[..., PretrainedConfig], int]] = {
    # name: (builder, vocabulary size of the paper's tokenizer)
    "gpt-neo-8m": (_gpt_neo_8m, 50257),
    "chinchilla-150m": (_chinchilla(layers=12, hidden=896, heads=16, kv_size=64), 32000),
    "chinchilla-400m": (_chinchilla(layers=12, hidden=1536, heads=12, kv_size=128), 32000),
    "chinchilla-1b": (_chinchilla(layers=24, hidden=2048, heads=16, kv_size=128), 32000),
    "demo": (_demo, 1024),
}


def build_model_config(name: str, vocab_size: int | None = None, **overrides) -> PretrainedConfig:
    """The `transformers` config registered as `name`.

    Args:
        name: one of `MODEL_CONFIGS`.
        vocab_size: embedding rows; `None` keeps the paper's. The training script passes `len(tokenizer)`,
            so a recipe that swaps the tokenizer still gets a model whose embeddings match it.
        overrides: other config arguments, e.g. the tokenizer's `bos_token_id` / `eos_token_id`. They go to
            the config's constructor, which validates them together with the rest: e.g. a `num_layers`
            override of a GPT-Neo config needs a matching `attention_types`.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model_config: unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
    build, default_vocab_size = MODEL_CONFIGS[name]
    # Overrides go into the constructor, which checks them together (e.g. special token ids against a
    # smaller vocabulary), rather than being set on a config validated without them.
    return build(vocab_size or default_vocab_size, **overrides)


def build_model(config: PretrainedConfig) -> PreTrainedModel:
    """A freshly initialized causal LM for `config` (nothing is downloaded)."""
    return AutoModelForCausalLM.from_config(config)


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of the model `config` describes (tied weights counted once), without allocating memory."""
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())
