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
    assert [(b.start, b.end, len(b.pieces)) for b in flat.buckets] == [(0, 35, 1), (35, 63, 2), (63, 66, 1)]
    assert flat.numel == 66 and flat.bytes == 66 * 4
    x = torch.arange(66, dtype=torch.float32)
    views = flat.views(x)
    assert [v.shape for v in views] == [p.shape for p in params] and views[1].flatten().tolist() == list(range(35, 42))
    assert [v.shape for v in flat.buckets[1].views(x[35:63])] == [params[1].shape, params[2].shape]
    flat.copy_to_model(x)
    assert torch.equal(params[3].detach().flatten(), torch.arange(63, 66, dtype=torch.float32))
    out = flat.empty()
    flat.copy_from_model(out)
    assert torch.equal(out, x)


def test_parts_cut_parameters_and_cover_the_layout_once():
    """The spans an island's ranks keep: equal lengths (the last shorter), parameters cut where a span ends, and
    copies through the parts change exactly their elements."""
    m = model()
    params = list(m.parameters())  # 35, 7, 21, 3 elements
    full = FlatParams(params, bucket_numel=20)
    parts = [full.part(i, 3) for i in range(3)]
    assert [p.spans for p in parts] == [[(0, 22)], [(22, 44)], [(44, 66)]] and full.chunk(3) == 22
    assert [(q.lo, q.hi, q.start) for q in parts[1].pieces] == [(22, 35, 0), (0, 7, 13), (0, 2, 20)]
    assert [(b.start, b.end) for b in parts[1].buckets] == [(0, 20), (20, 22)]  # whole pieces per bucket
    assert parts[1].bytes == 22 * 4 and full.part(4, 5).numel == 66 - 4 * 14
    x = torch.arange(66, dtype=torch.float32)
    for part in parts:
        part.copy_to_model(part.select(x))
    out = full.empty()
    full.copy_from_model(out)
    assert torch.equal(out, x)
    mine = parts[1].empty()
    parts[1].copy_from_model(mine)
    assert torch.equal(mine, x[22:44])
    parts[1].lerp_model_toward(torch.zeros(22), 0.5)
    full.copy_from_model(out)
    assert torch.equal(out[22:44], x[22:44] / 2) and torch.equal(out[:22], x[:22]) and torch.equal(out[44:], x[44:])
    params[0].grad = torch.ones_like(params[0])
    grads = torch.full((22,), 7.0)
    parts[1].copy_grads(grads)
    assert grads.tolist() == [1.0] * 13 + [0.0] * 9


def test_a_layout_of_several_spans_and_its_parts():
    """A fragment of the model: spans of the vector in order, its positions counted over them; its parts cut
    those positions."""
    m = model()
    full = FlatParams(list(m.parameters()), bucket_numel=1e9)  # 35, 7, 21, 3 elements
    fragment = FlatParams(list(m.parameters()), 1e9, spans=[(30, 40), (60, 66)])
    assert fragment.numel == 16 and [(q.lo, q.hi, q.start) for q in fragment.pieces] == \
        [(30, 35, 0), (0, 5, 5), (18, 21, 10), (0, 3, 13)]
    x = torch.arange(66, dtype=torch.float32)
    assert fragment.select(x).tolist() == list(range(30, 40)) + list(range(60, 66))
    assert fragment.part(1, 2).spans == [(38, 40), (60, 66)] and fragment.part(0, 2).spans == [(30, 38)]
    full.copy_to_model(torch.zeros(66))
    fragment.copy_to_model(fragment.select(x))
    out = full.empty()
    full.copy_from_model(out)
    assert out.tolist() == [0.0] * 30 + list(range(30, 40)) + [0.0] * 20 + list(range(60, 66))


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
