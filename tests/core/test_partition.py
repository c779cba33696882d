"""The data partitions of "Faster Convergence of Local SGD for Over-Parameterized Models" §4.2: by_label (the
pathological partition for a Trainer), the hyperplane slices of its perceptron experiment, and the worst case
(one worker holds everything; an empty worker takes part in every sync)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_localsgd.core.partition import LabelShardSampler, even_shards, hyperplane_slices, worst_case_shards


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


def test_worst_case_puts_everything_on_one_worker():
    assert worst_case_shards(5, 3, owner=1) == [[], [0, 1, 2, 3, 4], []]
    with pytest.raises(ValueError, match="owner"):
        worst_case_shards(5, 3, owner=3)


def test_even_shards_deal_a_permutation():
    shards = even_shards(10, 3, seed=1)
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]
    assert shards != even_shards(10, 3, seed=2)


def test_hyperplane_slices_are_equal_width_bands_parallel_to_the_labelling_plane():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(2000, 5, generator=g) * 2 - 1
    normal, offset = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0]), 0.1
    shards = hyperplane_slices(points, normal, offset, num_replicas=4)
    assert sorted(i for s in shards for i in s) == list(range(2000))
    # The reference in float64: the signed distance to the plane, and the four bands between min and max.
    distance = [(sum(float(a) * float(b) for a, b in zip(x, normal)) - offset) / math.sqrt(1 + 4 + 0.25 + 1)
                for x in points.tolist()]
    low, high = min(distance), max(distance)
    width = (high - low) / 4
    for k, shard in enumerate(shards):
        assert all(low + k * width - 1e-9 <= distance[i] <= low + (k + 1) * width + 1e-9 for i in shard)
    # Bands of equal width hold unequal counts (the middle ones most), and only the band that the labelling
    # plane crosses holds both labels.
    assert len(shards[1]) > 2 * len(shards[0]) and len(shards[2]) > 2 * len(shards[3])
    mixed = [k for k, shard in enumerate(shards) if len({distance[i] > 0 for i in shard}) == 2]
    assert mixed == [int((0 - low) // width)]


def test_hyperplane_slices_validate_shapes():
    with pytest.raises(ValueError, match=r"normal \(d,\)"):
        hyperplane_slices(torch.zeros(4, 3), torch.zeros(2), 0.0, 2)


def test_an_empty_worker_takes_part_in_every_sync_with_its_replica_unchanged(core_runs):
    """worst_case over two real processes: rank 1 has no data and only calls engine.step(); every sync averages
    rank 0's replica with the unchanged x_r (x_{r+1} = (x_0 + x_r) / 2), checked against float64 local GD."""
    r0, r1 = core_runs["partition"]
    owner, empty = r0["worst_case"], r1["worst_case"]
    assert owner["globals"] == empty["globals"]  # every sync reached both ranks
    assert all(before == after for before, after in zip(empty["before_sync"], empty["globals"][:-1]))
    x = [0.0] * 4  # weights of 3 features and a bias, lr 0.1, full-batch least squares on rank 0's 8 rows
    data = owner["data"]
    for synced in owner["globals"][1:]:
        local = list(x)
        for _ in range(3):  # H = 3
            grad = [0.0] * 4
            for *features, target in data:
                residual = sum(w * f for w, f in zip(local, [*features, 1.0])) - target
                for j, f in enumerate([*features, 1.0]):
                    grad[j] += 2 * residual * f / len(data)
            local = [w - 0.1 * gj for w, gj in zip(local, grad)]
        x = [(a + b) / 2 for a, b in zip(local, x)]
        assert synced == pytest.approx(x, abs=1e-6)
