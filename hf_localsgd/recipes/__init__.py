"""A training application on top of the library: recipes (YAML) for `python -m hf_localsgd.train`, the named
model configurations of the papers, the text pipeline, the built-in offline corpus and held-out perplexity.

- `train`: the recipe entry point (`parse_args`, `main`)
- `models`: named model configurations (GPT-Neo 8M, Chinchilla-style 150M / 400M / 1B, the demo)
- `data`, `offline`: load, tokenize and pack text; fail fast without the Hub
- `demo_data`: the built-in story corpus and the tokenizer trained on it
- `perplexity`: held-out perplexity as an eval metric

Needs the `recipes` extra: `pip install "hf_localsgd[recipes]"`.
"""
