"""From options to the engine's parts: the one place where option values become objects.

`RoundEngine` asks here for the collective that sums the outer gradients, the sync unit that holds the global
model and its outer optimizer, and the round hooks the options switch on; a new variant of any of them is a
new class and a new branch here, not a flag inside the engine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .adascale import GainRatioScaling
from .collectives import AllReduce
from .flat import FlatParams, MasterWeights
from .hooks import RoundHook
from .options import LocalSGDOptions
from .palsgd import PseudoSync
from .overlap import DelayedSync, EagerSync
from .quantize import Int8AllReduce
from .shard import IslandShard, Replica, build_shard, is_sharded, reshard_before_writes
from .streaming import StreamingSync, fragment_spans
from .sync import OuterSync
from .topology import Topology


SYNCS = {"none": OuterSync, "delayed": DelayedSync, "eager": EagerSync}


def build_layout(model, masters: MasterWeights | None, bucket_size_mb: float) -> FlatParams:
    """The flat layout of what the round reads and writes: the trainable parameters of ``model`` (a module or
    its parameters), or the float32 master weights of its optimizer when given."""
    if masters is not None:
        return FlatParams(masters.tensors, bucket_size_mb * 2**20 / 4, after_write=masters.refresh,
                          device=masters.device)
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model) if p.requires_grad]
    return FlatParams(params, bucket_size_mb * 2**20 / 4, before_write=reshard_before_writes(model))


def build_islands(options: LocalSGDOptions, flat: FlatParams, group: dist.ProcessGroup | None,
                  topology: Topology | None, sharded: bool = False) -> tuple[Topology, Replica | IslandShard]:
    """The islands (given, e.g. the mesh FSDP2 shards the model over, or cut by ``island_size``) and what of the
    global model this rank keeps in them. ``sharded``: the ranks of an island hold different parts of the replica
    (ZeRO's partitions of the master weights; FSDP2's shards are recognized by their type)."""
    if topology is not None and topology.island_size != options.island_size:
        raise ValueError(f"island_size: the options say {options.island_size}, the islands given (the mesh the "
                         f"model is sharded over) have {topology.island_size} ranks: make them agree")
    topology = topology or Topology.build(options.island_size, group, flat.device.type)
    return topology, build_shard(flat, topology, replicated_within_island=not (sharded or is_sharded(flat.params)))


def build_reducer(options: LocalSGDOptions, topology: Topology) -> AllReduce | Int8AllReduce:
    """The collective of the outer gradients. (Int8AllReduce and a sum left in flight take a process group of
    their own, which every rank creates here: on the group other collectives use, such as Trainer's metric
    gathers, those would queue behind the sum in flight.)"""
    private = options.overlapped
    group = topology.private_across() if private else topology.across
    if options.outer_comm_dtype == "int8":
        return Int8AllReduce(group, owns_group=private)
    return AllReduce(group, options.outer_comm_dtype, owns_group=private)


def build_sync(options: LocalSGDOptions, shard: Replica | IslandShard, reducer: AllReduce | Int8AllReduce,
               total_rounds: int | None, topology: Topology, model=None,
               default_timeout: float | None = None) -> OuterSync | StreamingSync:
    """The sync unit: blocking, delayed, eager, or streaming fragments (each a blocking unit of its own part)."""
    state_device = shard.owned.device if options.outer_state_device == "model" else torch.device("cpu")
    timeout = options.sync_timeout_seconds if options.sync_timeout_seconds is not None else default_timeout
    if options.num_fragments > 1:
        flat = shard.full
        fragments = []
        for spans in fragment_spans(model, flat, options.num_fragments):
            fragment_shard = build_shard(flat.with_spans(spans), topology,
                                         replicated_within_island=isinstance(shard, IslandShard))
            fragments.append(OuterSync(fragment_shard, reducer, options, state_device, total_rounds, topology,
                                       timeout))
        return StreamingSync(fragments, options.fragment_sync_delay, options.fragment_update_alpha)
    return SYNCS[options.outer_overlap](shard, reducer, options, state_device, total_rounds, topology, timeout)


def build_hooks(options: LocalSGDOptions, *, seed: int, total_steps: int | None) -> list[RoundHook]:
    hooks: list[RoundHook] = []
    if options.pseudo_sync_prob > 0:
        hooks.append(PseudoSync(options.pseudo_sync_prob, options.pseudo_sync_rate,
                                options.pseudo_sync_rate_schedule, seed=seed))
    if options.lr_scaling != "none":
        hooks.append(GainRatioScaling(options.resolved_lr_scaling_c, options.lr_scaling_ema, budget=total_steps))
    return hooks
