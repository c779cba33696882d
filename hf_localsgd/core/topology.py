"""Islands: which ranks train one replica together, and which ranks are replicas of one another.

The world is cut into K islands of ``island_size`` consecutive ranks, so that ``island_size`` = GPUs per node
puts one island on each node. Inside an island, ordinary data parallelism runs every step over the fast link
(DDP, or FSDP2 sharding the parameters); an island is one worker of the round. Across islands only the outer
step communicates, over the slow link, among the ranks at the same position in their islands:

    rank      0 1 2 3 | 4 5 6 7        island_size = 4, K = 2 islands
    within    {0,1,2,3} {4,5,6,7}      data parallelism, every step
    across    {0,4} {1,5} {2,6} {3,7}  the outer all-reduce, every H steps

The groups are the dimensions of a 2-D `DeviceMesh` (``("across_islands", "within_island")``), or of the
mesh Accelerate built for FSDP2 (``dp_replicate`` x ``dp_shard``). With ``island_size=1`` every rank is its
own island and the outer all-reduce runs over the given group (the default group when ``None``).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .collectives import new_group_everywhere


logger = logging.getLogger(__name__)

MESH_DIMS = ("across_islands", "within_island")


class Topology:
    """This rank's place: island ``island`` of ``num_islands``, position ``member`` of ``island_size`` in it.

    ``across`` is the group of the outer all-reduce (this rank's counterparts in every island), ``within``
    this rank's island (``None`` when islands are single ranks); ``island_mesh`` the 1-D mesh of the island, to
    shard a model over with FSDP2 (``fully_shard(block, mesh=topology.island_mesh)``).
    """

    def __init__(self, across: dist.ProcessGroup | None, within: dist.ProcessGroup | None, island_size: int,
                 num_islands: int, island: int, member: int, island_mesh=None):
        self.across, self.within, self.island_mesh = across, within, island_mesh
        self.island_size, self.num_islands = island_size, num_islands
        self.island, self.member = island, member

    @classmethod
    def build(cls, island_size: int = 1, group: dist.ProcessGroup | None = None,
              device_type: str = "cpu") -> Topology:
        """Islands of ``island_size`` consecutive ranks of the default group; with ``island_size=1``, every rank
        of ``group`` its own island."""
        distributed = dist.is_initialized()
        if island_size == 1:
            world = dist.get_world_size(group) if distributed else 1
            return cls(group, None, 1, world, dist.get_rank(group) if distributed else 0, 0)
        if group is not None:
            raise ValueError("island_size: islands are cut from the default process group; a process_group of "
                             "your own is for island_size=1")
        world = dist.get_world_size() if distributed else 1
        if world % island_size:
            raise ValueError(f"island_size: the {world} processes cannot be cut into islands of {island_size} "
                             f"ranks; launch a multiple of {island_size} processes, or pick an island_size that "
                             f"divides {world} (GPUs per node, say)")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (world // island_size, island_size), mesh_dim_names=MESH_DIMS)
        return cls.from_mesh(mesh, *MESH_DIMS)

    @classmethod
    def from_mesh(cls, mesh, across_dim: str, within_dim: str) -> Topology:
        """The islands of a 2-D mesh: ``within_dim`` runs inside an island, ``across_dim`` across them."""
        return cls(mesh.get_group(across_dim), mesh.get_group(within_dim), mesh[within_dim].size(),
                   mesh[across_dim].size(), mesh.get_local_rank(across_dim), mesh.get_local_rank(within_dim),
                   island_mesh=mesh[within_dim])

    @property
    def replica_index(self) -> int:
        """A number of this rank's replica, unique across groups: its island's, or the global rank (PALSGD's
        draws: one stream per island, the same on its ranks, whose replicas must stay identical)."""
        if self.island_size > 1:
            return self.island
        return dist.get_rank() if dist.is_initialized() else 0

    def warn_if_single_island(self) -> None:
        if self.island_size > 1 and self.num_islands == 1:
            logger.warning("island_size=%d is the whole world: one island, so training is plain synchronous "
                           "data-parallel training, with an outer step on its updates every H steps",
                           self.island_size)

    def private_across(self) -> dist.ProcessGroup | None:
        """A process group of its own with the ranks of ``across``, for collectives left in flight while others
        run. Every rank of the default group must call it, at the same point."""
        if not dist.is_initialized():
            return None
        return new_group_everywhere(None if self.across is None else dist.get_process_group_ranks(self.across))

    @torch.no_grad()
    def sum_within(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over this rank's island, in place (statistics of the parts its ranks keep)."""
        if self.within is not None and self.island_size > 1:
            dist.all_reduce(t, group=self.within)
        return t

    def state(self) -> dict:
        """What a checkpoint records of the layout (a resume must have the same)."""
        return {"island_size": self.island_size, "num_islands": self.num_islands}
