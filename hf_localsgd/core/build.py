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
from .flat import FlatParams
from .hooks import RoundHook
from .options import LocalSGDOptions
from .palsgd import PseudoSync
from .sync import OuterSync


def build_reducer(options: LocalSGDOptions, group: dist.ProcessGroup | None) -> AllReduce:
    return AllReduce(group, options.outer_comm_dtype)


def build_sync(options: LocalSGDOptions, flat: FlatParams, reducer: AllReduce, total_rounds: int | None) -> OuterSync:
    state_device = flat.device if options.outer_state_device == "model" else torch.device("cpu")
    return OuterSync(flat, reducer, options, state_device, total_rounds)


def build_hooks(options: LocalSGDOptions, *, seed: int, total_steps: int | None) -> list[RoundHook]:
    hooks: list[RoundHook] = []
    if options.pseudo_sync_prob > 0:
        hooks.append(PseudoSync(options.pseudo_sync_prob, options.pseudo_sync_rate,
                                options.pseudo_sync_rate_schedule, seed=seed))
    if options.lr_scaling != "none":
        hooks.append(GainRatioScaling(options.resolved_lr_scaling_c, options.lr_scaling_ema, budget=total_steps))
    return hooks
