"""Held-out perplexity as a `Trainer` metric, computed from the evaluation logits, with no download.

`evaluate.load("perplexity")` fetches its script from the Hub and scores text with a *separately loaded*
model, so it neither works offline nor measures the model being trained. The two functions below do the
same arithmetic (exp of the mean negative log-likelihood per predicted token) inside `Trainer.evaluate`, so
`eval_perplexity` sits next to `eval_loss` in the logs, in `eval_results.json` and in the model card:

    Trainer(..., preprocess_logits_for_metrics=token_nll, compute_metrics=perplexity)
"""

from __future__ import annotations

import math

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


def perplexity(eval_prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for `token_nll`'s output: exp(total NLL / total predicted tokens)."""
    sums = np.asarray(eval_prediction.predictions, dtype=np.float64).reshape(-1, 2).sum(axis=0)
    mean_nll = sums[0] / max(sums[1], 1.0)
    return {"perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf}
