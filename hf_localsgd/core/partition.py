"""Data partitions across workers, for research on heterogeneous data ("Faster Convergence of Local SGD for
Over-Parameterized Models", arXiv:2201.12719, §4.2).

`iid` is the Trainer's usual sampler: Accelerate deals each rank every K-th batch of one shuffled order.
`by_label` is the pathological partition: the dataset sorted by a label column and cut into one contiguous
shard per rank, so each worker sees only a band of labels.
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
            raise ValueError(f"{len(labels)} examples cannot fill one batch of {batch_size} on each of "
                             f"{num_replicas} ranks")
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
