"""data_partition='by_label': the pathological partition of "Faster Convergence of Local SGD for Over-Parameterized
Models" §4.2."""

from __future__ import annotations

import pytest

from hf_localsgd.core.partition import LabelShardSampler


def deal(indices: list[int], batch_size: int, num_replicas: int) -> list[list[int]]:
    """What Accelerate's batch sharding hands each rank: batches r, r + K, r + 2K, ..."""
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return [[i for b in batches[r::num_replicas] for i in b] for r in range(num_replicas)]


def test_each_rank_gets_one_contiguous_band_of_labels():
    labels = [7, 1, 3, 3, 9, 0, 5, 2, 8, 6, 4, 1, 2, 9, 0, 5, 7]
    sampler = LabelShardSampler(labels, num_replicas=3, batch_size=2, seed=0)
    per_rank = deal(list(sampler), batch_size=2, num_replicas=3)
    ordered = sorted(range(len(labels)), key=lambda i: (labels[i], i))
    for rank, indices in enumerate(per_rank):
        assert sorted(indices) == sorted(ordered[rank * 4 : rank * 4 + 4])  # 17 // 3 = 5 -> 4 (whole batches)
    assert max(labels[i] for i in per_rank[0]) <= min(labels[i] for i in per_rank[1])
    sampler.set_epoch(1)
    assert list(sampler) != list(LabelShardSampler(labels, 3, 2, seed=0))  # reshuffled within shards
    with pytest.raises(ValueError, match="cannot fill one batch"):
        LabelShardSampler([0, 1, 2], num_replicas=2, batch_size=2)


def test_by_label_on_two_processes(core_runs):
    r0, r1 = core_runs["partition"]
    assert r0["steps"] == r1["steps"] > 0
    # 64 examples over 4 classes: rank 0 sees the lower half of the sorted labels, rank 1 the upper half.
    assert max(r0["classes_seen"]) <= min(r1["classes_seen"])
    assert set(r0["classes_seen"]) | set(r1["classes_seen"]) == {0, 1, 2, 3}
