"""The named model configs: sizes near their names, the papers' shapes, nothing downloaded."""

from __future__ import annotations

import pytest

from hf_localsgd.recipes.models import MODEL_CONFIGS, build_model_config, count_parameters


# name -> (nominal parameters, relative tolerance). The papers' shapes give 150M: 151M, 400M: 389M and 1B: 1.28B
# (24 layers of width 2048 with a 4x MLP are 1.2B before embeddings: "1B" is the paper's rounded label).
NOMINAL = {
    "gpt-neo-8m": (8e6, 0.05),
    "chinchilla-150m": (150e6, 0.05),
    "chinchilla-400m": (400e6, 0.05),
    "chinchilla-1b": (1e9, 0.30),
}


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_parameter_count_near_name(name):
    nominal, tolerance = NOMINAL[name]
    assert abs(count_parameters(build_model_config(name)) / nominal - 1) < tolerance


def test_every_named_config_is_checked_or_is_the_demo():
    assert set(MODEL_CONFIGS) == set(NOMINAL) | {"demo"}


@pytest.mark.parametrize(
    "name, layers, hidden, heads, kv_size",
    [("chinchilla-150m", 12, 896, 16, 64), ("chinchilla-400m", 12, 1536, 12, 128),
     ("chinchilla-1b", 24, 2048, 16, 128)],
)
def test_chinchilla_shapes_match_spec_table(name, layers, hidden, heads, kv_size):
    config = build_model_config(name)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (layers, hidden, heads)
    assert config.head_dim == kv_size and config.num_key_value_heads == heads
    assert config.vocab_size == 32000


def test_gpt_neo_8m_matches_palsgd_appendix():
    config = build_model_config("gpt-neo-8m")
    assert (config.hidden_size, config.num_layers, config.num_heads) == (128, 8, 8)
    assert config.max_position_embeddings == 300 and config.vocab_size == 50257
    assert len(config.attention_layers) == 8


def test_vocab_and_overrides_follow_the_tokenizer():
    config = build_model_config("gpt-neo-8m", vocab_size=1000, eos_token_id=7)
    assert config.vocab_size == 1000 and config.eos_token_id == 7


def test_special_tokens_are_checked_with_the_tokenizer_vocabulary(monkeypatch):
    """The tokenizer's ids reach the config constructor with its vocabulary size: no transformers warning
    about GPT-Neo's default ids (50256) lying outside a 643-token vocabulary."""
    import transformers.configuration_utils

    warned = []
    monkeypatch.setattr(transformers.configuration_utils.logger, "warning_once", lambda msg, *a, **k: warned.append(msg))
    config = build_model_config("gpt-neo-8m", vocab_size=643, bos_token_id=0, eos_token_id=0)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (643, 0, 0) and warned == []
    build_model_config("gpt-neo-8m", vocab_size=643)  # GPT-Neo's own ids do not fit: the check does fire
    assert any("bos_token_id" in message for message in warned)


def test_unknown_name_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="model_config"):
        build_model_config("gpt-neo-9m")
