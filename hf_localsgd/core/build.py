"""From options to the engine's parts: the one place where option values become objects.

`RoundEngine` asks here for the collective that sums the outer gradients, the sync unit that holds the global
model and its outer optimizer, and the round hooks the options switch on; a new variant of any of them is a
new class and a new branch here, not a flag inside the engine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .adascale import GainRatioScaling
from .collectives import AllReduce
from .hooks import RoundHook
from .options import LocalSGDOptions
from .palsgd import PseudoSync
from .flat import FlatParams
from .quantize import Int8AllReduce
from .shard import IslandShard, Replica, build_shard, is_sharded
from .sync import OuterSync
from .topology import Topology


def build_islands(options: LocalSGDOptions, flat: FlatParams, group: dist.ProcessGroup | None,
                  topology: Topology | None) -> tuple[Topology, Replica | IslandShard]:
    """The islands (given, e.g. the mesh FSDP2 shards the model over, or cut by ``island_size``) and what of the
    global model this rank keeps in them."""
    if topology is not None and topology.island_size != options.island_size:
        raise ValueError(f"island_size: the options say {options.island_size}, the islands given (the mesh the "
                         f"model is sharded over) have {topology.island_size} ranks: make them agree")
    topology = topology or Topology.build(options.island_size, group, flat.device.type)
    return topology, build_shard(flat, topology, replicated_within_island=not is_sharded(flat.params))


def build_reducer(options: LocalSGDOptions, group: dist.ProcessGroup | None) -> AllReduce | Int8AllReduce:
    """The collective of the outer gradients. (Int8AllReduce creates a process group: every rank calls this.)"""
    if options.outer_comm_dtype == "int8":
        return Int8AllReduce(group)
    return AllReduce(group, options.outer_comm_dtype)


def build_sync(options: LocalSGDOptions, shard: Replica | IslandShard, reducer: AllReduce | Int8AllReduce,
               total_rounds: int | None, topology: Topology) -> OuterSync:
    if options.outer_error_feedback and not getattr(OuterSync, "error_feedback", False):
        # The reducers take a residual (sum_/start(buf, residual=...)); the sync unit does not keep one yet.
        raise ValueError("outer_error_feedback: this version's sync unit keeps no residual yet, so error feedback "
                         "would do nothing; leave outer_error_feedback off")
    if isinstance(reducer, Int8AllReduce):  # each bucket is padded to whole blocks: bytes_sent counts them
        reducer.expect_buffers(b.numel for b in shard.owned.buckets)
    state_device = shard.owned.device if options.outer_state_device == "model" else torch.device("cpu")
    return OuterSync(shard, reducer, options, state_device, total_rounds, topology)


def build_hooks(options: LocalSGDOptions, *, seed: int, total_steps: int | None) -> list[RoundHook]:
    hooks: list[RoundHook] = []
    if options.pseudo_sync_prob > 0:
        hooks.append(PseudoSync(options.pseudo_sync_prob, options.pseudo_sync_rate,
                                options.pseudo_sync_rate_schedule, seed=seed))
    if options.lr_scaling != "none":
        hooks.append(GainRatioScaling(options.resolved_lr_scaling_c, options.lr_scaling_ema, budget=total_steps))
    return hooks
