"""What part of the global model a rank keeps, and how the model gets the new global values.

- `Replica`: the rank keeps the global model (and the outer-optimizer state) for everything it holds: the
  whole model when it is its own island, or the shards FSDP2 gives it inside an island (the other ranks of
  the island hold the other shards, and keep theirs).
- `IslandShard`: the ranks of a DDP island hold identical replicas, so keeping the global model on each
  would store and send it ``island_size`` times. Each rank keeps 1/island_size of it instead (a contiguous
  span of the flat layout, `FlatParams.part`), sums only that span of the outer gradient across islands, and
  the island all-gathers the new spans into every replica. Per island, one model crosses the slow link per
  sync, and the outer state per rank is 1/island_size of it.

Both give the sync unit ``owned`` (the layout the outer step works on) and write global values back with
``write``; ``gather`` gives the whole model from the parts (for evaluating and saving).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .collectives import all_gather_
from .data_parallel import fsdp_modules
from .flat import DTensor, FlatParams
from .topology import Topology


class Replica:
    """The rank keeps the global model of all it holds."""

    def __init__(self, flat: FlatParams, shards: int = 1):
        self.full = self.owned = flat
        self.replica_bytes = flat.bytes * shards  # the island's whole replica (FSDP2: its shards on every rank)

    def write(self, part: torch.Tensor) -> None:
        self.full.copy_to_model(part)

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        return part

    def pull_toward(self, part: torch.Tensor, weight: float) -> None:
        """The model moves ``weight`` of the way to ``part`` (PALSGD's pseudo-synchronization)."""
        self.full.lerp_model_toward(part, weight)


class IslandShard:
    """The rank at position ``member`` of a DDP island keeps the ``member``-th of ``island_size`` spans."""

    def __init__(self, flat: FlatParams, topology: Topology):
        self.full, self.group, self.size, self.member = flat, topology.within, topology.island_size, topology.member
        self.owned = flat.part(topology.member, self.size)
        self.chunk = flat.chunk(self.size)
        self.replica_bytes = flat.bytes

    @torch.no_grad()
    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """The whole flat model from every rank's ``part`` (one all-gather inside the island), on the model's
        device."""
        out = torch.empty(self.chunk * self.size, dtype=torch.float32, device=self.full.device)
        mine = out[self.member * self.chunk : (self.member + 1) * self.chunk]  # gathered in place
        mine[: part.numel()].copy_(part)
        mine[part.numel() :].zero_()  # (the last span is padded)
        all_gather_(out, mine, self.group)
        return out[: self.full.numel]

    def write(self, part: torch.Tensor) -> None:
        self.full.copy_to_model(self.gather(part))

    @torch.no_grad()
    def pull_toward(self, part: torch.Tensor, weight: float) -> None:
        # Every rank pulls its span, then the island shares the spans: the same as every rank pulling all of
        # them, since the replicas were identical and the pull is element-wise.
        self.owned.lerp_model_toward(part, weight)
        mine = self.owned.empty()
        self.owned.copy_from_model(mine)
        self.write(mine)


def build_shard(flat: FlatParams, topology: Topology, replicated_within_island: bool) -> Replica | IslandShard:
    """`IslandShard` when the island's ranks hold identical replicas (DDP inside), else `Replica`."""
    if topology.island_size > 1 and replicated_within_island:
        return IslandShard(flat, topology)
    return Replica(flat, shards=1 if replicated_within_island else topology.island_size)


def is_sharded(params) -> bool:
    """Whether parameters are FSDP2 shards (DTensors): each rank of an island then holds its own part."""
    return any(isinstance(p, DTensor) for p in params)


def reshard_before_writes(model) -> Callable[[], None] | None:
    """For a model sharded by FSDP2: a function that puts every FSDP module back to its sharded parameters, to call
    before writing into the shards. (After a forward without backward, an evaluation, FSDP2 leaves the root
    module's parameters gathered, and the next forward would use those rather than the shards written.)"""
    modules = fsdp_modules(model)
    if not modules:
        return None

    def reshard() -> None:
        for module in modules:
            module.reshard()

    return reshard
