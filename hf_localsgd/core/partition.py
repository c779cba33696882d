"""Data partitions across workers, for research on heterogeneous data ("Faster Convergence of Local SGD for
Over-Parameterized Models", arXiv:2201.12719, §4.2).

`iid` is the Trainer's usual sampler: Accelerate deals each rank every K-th batch of one shuffled order.
`by_label` is the pathological partition: the dataset sorted by a label column and cut into one contiguous
shard per rank, so each worker sees only a band of labels.

For plain loops over `RoundEngine` (the shards differ in size, which a Trainer's loop cannot run):
`worst_case_shards` (all data on one worker, none on the others), `even_shards` and `hyperplane_slices` (the
pathological partition of the paper's perceptron experiment: equal-width slices parallel to the labelling
hyperplane).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Sampler


class LabelShardSampler(Sampler[int]):
    """Sorts indices by label, cuts them into `num_replicas` contiguous shards, shuffles each shard per epoch,
    and yields them batch by batch in rank order (shard 0's batch, shard 1's batch, ...). Accelerate's batch
    sharding, which gives rank r batches r, r + K, r + 2K, ..., then hands rank r exactly shard r.

    Each shard is cut to a whole number of batches (the remainder is dropped) so that no batch mixes shards
    and every rank runs the same number of steps.
    """

    def __init__(self, labels: Sequence, num_replicas: int, batch_size: int, seed: int = 0):
        if num_replicas < 1 or batch_size < 1:
            raise ValueError(f"num_replicas and batch_size must be >= 1, got {num_replicas}, {batch_size}")
        order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
        per_shard = len(order) // num_replicas // batch_size * batch_size
        if per_shard == 0:
            raise ValueError(f"data_partition: {len(labels)} examples cannot fill one batch of {batch_size} on each "
                             f"of {num_replicas} ranks with 'by_label'; use more data or a smaller batch")
        self.shards = [order[r * per_shard : (r + 1) * per_shard] for r in range(num_replicas)]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shards = [[shard[i] for i in torch.randperm(len(shard), generator=generator).tolist()] for shard in self.shards]
        for start in range(0, len(shards[0]), self.batch_size):
            for shard in shards:
                yield from shard[start : start + self.batch_size]


# ---------------------------------------------------------------------- partitions for plain loops
# The two partitions below give workers shards of different sizes (or none at all), so that the workers take
# different numbers of gradient steps; a Trainer's loop needs the same on every rank, so they are for loops
# over `RoundEngine`, where a worker with nothing to train on still calls `engine.step()` every step and takes
# part in every sync with its replica unchanged (outer gradient Δ_k = 0).


def worst_case_shards(num_examples: int, num_replicas: int, owner: int = 0) -> list[list[int]]:
    """The worst-case partition: every example on worker ``owner``, none on the others (the setting of the paper's
    Example 1, where local steps cannot help: the average of one moving and K − 1 still replicas moves 1/K as far).
    """
    if num_replicas < 1 or not 0 <= owner < num_replicas:
        raise ValueError(f"owner must be in [0, num_replicas={num_replicas}), got {owner}")
    return [list(range(num_examples)) if rank == owner else [] for rank in range(num_replicas)]


def even_shards(num_examples: int, num_replicas: int, seed: int = 0) -> list[list[int]]:
    """The even (i.i.d.) partition: one random permutation cut into ``num_replicas`` shards whose sizes differ
    by at most one."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(order[rank::num_replicas]) for rank in range(num_replicas)]


def hyperplane_slices(points: torch.Tensor, normal: torch.Tensor, offset: float, num_replicas: int) -> list[list[int]]:
    """The pathological partition of the paper's perceptron experiment (§4.2): ``num_replicas + 1`` hyperplanes
    parallel to the labelling hyperplane ``normal · x = offset``, equally spaced from the lowest point to the
    highest, cut the data into ``num_replicas`` slices of equal width (not of equal count), and worker k gets
    slice k. Only the slice that the labelling hyperplane crosses holds both labels.

    Args:
        points: (N, d) data points.
        normal, offset: the labelling hyperplane (the label of x is the sign of ``normal · x − offset``).
        num_replicas: the number of workers (slices).
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if points.ndim != 2 or normal.shape != points.shape[1:]:
        raise ValueError(f"points must be (N, d) and normal (d,), got {tuple(points.shape)} and {tuple(normal.shape)}")
    distance = (points.double() @ normal.double() - offset) / normal.double().norm()
    low, high = distance.min(), distance.max()
    width = (high - low) / num_replicas
    if width <= 0:  # all points on one hyperplane: one slice holds them
        return worst_case_shards(len(points), num_replicas)
    # Slice k is [low + k·width, low + (k+1)·width); the highest point closes the last one.
    slice_of = ((distance - low) / width).floor().long().clamp(max=num_replicas - 1)
    return [torch.nonzero(slice_of == rank).flatten().tolist() for rank in range(num_replicas)]
