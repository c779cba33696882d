"""Data parallelism inside a replica, and the switch that keeps inner steps off the slow link.

Gradients are averaged over all ranks only during the warm-up (``local_sgd_warmup_steps``); afterwards over
the ranks of the island at most. `gradient_sync(model, topology)` gives the switch for the model's wrapper:

- `GradientSync`, a `DistributedDataParallel` wrapper over all ranks (what Accelerate's ``prepare`` makes):
  every rank its own island, no gradient all-reduce at all after the warm-up (DDP's
  ``require_backward_grad_sync``, which its ``no_sync`` for gradient-accumulation micro-batches restores, so
  one flag covers every micro-batch); islands of several ranks, the all-reduce runs over the island only,
  through a DDP communication hook whose group the switch sets.
- `FSDPGradientSync`, a model sharded by FSDP2 over the island (``fully_shard(..., mesh=topology.island_mesh)``):
  FSDP2 reduce-scatters inside the island on every step; in the warm-up an all-reduce hook (FSDP2's
  ``set_all_reduce_hook``, its way to customize hybrid sharding) also averages each reduced shard across the
  islands, before clipping and the optimizer step, as hybrid sharding would.

Plain loops use it as the Trainer glue does:

    ddp = DistributedDataParallel(model)                 # over all ranks (accelerator.prepare does this)
    engine = RoundEngine(ddp, island_size=2, ...)
    gradients = gradient_sync(ddp, engine.topology)
    for batch in loader:
        gradients.set(engine.syncs_gradients)            # all ranks in the warm-up, then the island (or none)
        ddp(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad(); engine.step()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from .flat import keep_buffers_local
from .topology import Topology


class GradientSync:
    """Where ``ddp``'s per-step gradient all-reduce runs: over all ranks, over this rank's island, or nowhere.
    Buffers are never broadcast on forward passes: each replica's are its own."""

    def __init__(self, ddp: DistributedDataParallel, topology: Topology | None = None):
        self.ddp = ddp
        keep_buffers_local(ddp)
        self.island = topology.within if topology is not None and topology.island_size > 1 else None
        self._hook = _hook_of(ddp) if self.island is not None else None

    def set(self, all_ranks: bool) -> None:
        """``True``: all-reduce over all ranks (the warm-up); ``False``: over the island, or not at all."""
        if self.island is None:
            self.ddp.require_backward_grad_sync = all_ranks
        else:
            self._hook.group = None if all_ranks else self.island


class _HookState:
    group: dist.ProcessGroup | None = None  # None: all ranks


def _hook_of(ddp: DistributedDataParallel) -> _HookState:
    """The state of ``ddp``'s comm hook, registered on its first use: DDP takes one hook for its life, and a
    second train() call trains the same wrapper with a new engine (and new islands' groups)."""
    state = getattr(ddp, "_local_sgd_hook", None)
    if state is None:
        state = _HookState()
        ddp.register_comm_hook(state, _all_reduce_over_group)
        ddp._local_sgd_hook = state
    return state


def _all_reduce_over_group(state: _HookState, bucket):
    """DDP's own all-reduce (the mean over the group), over the group the switch set."""
    return default_hooks.allreduce_hook(state.group, bucket)


class AcrossIslands:
    """The switch of a replica sharded inside its island (FSDP2, DeepSpeed ZeRO), whose own reduction stays inside
    the island: in the warm-up (``set(True)``) `average` also averages a gradient across the islands, as hybrid
    sharding would; afterwards it does nothing."""

    def __init__(self, topology: Topology):
        self.across, self.islands = topology.across, topology.num_islands
        self.all_ranks = True

    def set(self, all_ranks: bool) -> None:
        self.all_ranks = all_ranks

    @torch.no_grad()
    def average(self, grad: torch.Tensor) -> None:
        if self.all_ranks and self.islands > 1:
            dist.all_reduce(grad, group=self.across)
            grad.div_(self.islands)


class FSDPGradientSync(AcrossIslands):
    """FSDP2's gradients, reduce-scattered inside the island, averaged across the islands in the warm-up by
    FSDP2's all-reduce hook."""

    def __init__(self, modules, topology: Topology):
        super().__init__(topology)
        for module in modules:
            module.set_all_reduce_hook(self.average)


def fsdp_modules(model) -> list:
    """The FSDP2 modules of ``model`` (empty without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)] if isinstance(model, torch.nn.Module) else []


def gradient_sync(model, topology: Topology) -> GradientSync | FSDPGradientSync | None:
    """The switch of ``model``'s data parallelism: its DDP wrapper, its FSDP2 modules, or None (nothing wraps it)."""
    if isinstance(model, DistributedDataParallel):
        return GradientSync(model, topology)
    modules = fsdp_modules(model)
    return FSDPGradientSync(modules, topology) if modules else None
