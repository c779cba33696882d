"""Held-out perplexity as a `Trainer` metric, computed from the evaluation logits, with no download.

`evaluate.load("perplexity")` fetches its script from the Hub and scores text with a *separately loaded*
model, so it neither works offline nor measures the model being trained. `TokenPerplexity` is an `evaluate`
metric defined here instead (exp of the mean negative log-likelihood per predicted token), fed by the two
functions below inside `Trainer.evaluate`, so `eval_perplexity` sits next to `eval_loss` in the logs, in
`eval_results.json` and in the model card:

    Trainer(..., preprocess_logits_for_metrics=token_nll, compute_metrics=perplexity)
"""

from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np
import torch
from torch.nn import functional as F
from transformers import EvalPrediction


def token_nll(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, `[sum of token negative log-likelihoods, number of predicted tokens]`.

    Reduces each batch's `(batch, seq, vocab)` logits to `(batch, 2)` before `Trainer` gathers them across
    processes, which keeps evaluation memory independent of the vocabulary. Labels are unshifted, as the
    model receives them; positions labelled -100 are skipped.
    """
    if isinstance(logits, tuple):  # (logits, past_key_values, ...) from models that return more
        logits = logits[0]
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return torch.stack([nll.sum(dim=1), (labels != -100).sum(dim=1).float()], dim=1)


class TokenPerplexity(evaluate.Metric):
    """Perplexity from per-sequence sums of token negative log-likelihoods and counts of predicted tokens."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="exp(total negative log-likelihood / total predicted tokens) of the evaluated model",
            citation="",
            inputs_description="nll: per-sequence sums of token NLLs; tokens: per-sequence predicted tokens",
            features=datasets.Features({"nll": datasets.Value("float64"), "tokens": datasets.Value("float64")}),
        )

    def _compute(self, nll, tokens) -> dict[str, float]:
        mean_nll = float(np.sum(nll)) / max(float(np.sum(tokens)), 1.0)
        return {"perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf}


def perplexity(eval_prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for `token_nll`'s output. Every process gets all processes' predictions, so each
    computes in memory on its own (no files shared between processes)."""
    sums = np.asarray(eval_prediction.predictions, dtype=np.float64).reshape(-1, 2)
    return TokenPerplexity(keep_in_memory=True).compute(nll=sums[:, 0], tokens=sums[:, 1])
