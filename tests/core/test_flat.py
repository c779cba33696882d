"""The flat layout: buckets of whole parameters, views, copies to and from the model, the pull, the gradients;
and the per-sync statistics against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from toy import model

from hf_localsgd.core.flat import FlatParams
from hf_localsgd.core.metrics import METRICS, format_bytes, logged, outer_gradient_metrics


def test_buckets_views_and_copies():
    m = model()
    params = list(m.parameters())  # 35, 7, 21, 3 elements
    flat = FlatParams(params, bucket_numel=30)
    assert [(b.start, b.end, len(b.params)) for b in flat.buckets] == [(0, 35, 1), (35, 63, 2), (63, 66, 1)]
    assert flat.numel == 66 and flat.bytes == 66 * 4
    x = torch.arange(66, dtype=torch.float32)
    views = flat.views(x)
    assert [v.shape for v in views] == [p.shape for p in params] and views[1].flatten().tolist() == list(range(35, 42))
    assert [v.shape for v in flat.views(x[35:63], 35, 63)] == [params[1].shape, params[2].shape]
    flat.copy_to_model(x)
    assert torch.equal(params[3].detach().flatten(), torch.arange(63, 66, dtype=torch.float32))
    out = flat.empty()
    flat.copy_from_model(out)
    assert torch.equal(out, x)


def test_pull_and_gradients():
    m = model()
    flat = FlatParams(list(m.parameters()), bucket_numel=1e9)
    start = flat.empty()
    flat.copy_from_model(start)
    target = torch.zeros(flat.numel)
    flat.lerp_model_toward(target, 0.25)
    now = flat.empty()
    flat.copy_from_model(now)
    torch.testing.assert_close(now, 0.75 * start)
    m[0].weight.grad = torch.ones_like(m[0].weight)  # the others have none: zeros
    grads = torch.full((flat.numel,), 7.0)
    flat.copy_grads(grads)
    assert grads[:35].tolist() == [1.0] * 35 and grads[35:].abs().sum() == 0


def test_flat_params_refuse_what_they_cannot_hold():
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParams([torch.nn.Parameter(torch.zeros(0))], bucket_numel=10)


def test_outer_gradient_metrics_from_the_two_sums():
    torch.manual_seed(0)
    deltas = torch.randn(3, 50, dtype=torch.float64)
    mean = deltas.mean(0)
    metrics = outer_gradient_metrics(deltas.pow(2).sum(1).mean().item(), mean.pow(2).sum().item(), 3)
    assert metrics["outer_grad_norm"] == pytest.approx(mean.norm().item())
    assert metrics["drift"] == pytest.approx((deltas - mean).pow(2).sum(1).mean().item())
    pairs = [deltas[i] @ deltas[j] for i in range(3) for j in range(3) if i != j]
    assert metrics["cosine_similarity"] == pytest.approx(
        (sum(pairs) / 6 / deltas.pow(2).sum(1).mean()).item())
    assert "cosine_similarity" not in outer_gradient_metrics(1.0, 1.0, 1)
    assert math.isclose(outer_gradient_metrics(1.0, 1.0 + 1e-12, 2)["drift"], 0.0)  # never negative


def test_metric_names_and_units():
    assert logged("drift") == "local_sgd/drift" and set(METRICS) >= {"round", "bytes_total", "gain_ratio"}
    with pytest.raises(KeyError, match="unknown metric"):
        logged("dirft")
    assert [format_bytes(n) for n in (0, 999, 1000, 65_600, 2.38e6, 3.2e10)] == \
        ["0 B", "999 B", "1 kB", "65.6 kB", "2.38 MB", "32 GB"]
