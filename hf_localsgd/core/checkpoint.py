"""Per-rank checkpoint files: what a replica needs to resume exactly, next to an ordinary checkpoint.

Each rank writes one file, ``local_sgd_rank{R}.pt``, holding its engine's state (position in the round, the
float32 global model, outer-optimizer and hook state), its own weights and its inner optimizer's state: the
model file a trainer saves holds the global model, and the optimizer file one rank's state only. The same
helpers serve `LocalSGDTrainer` and a plain loop:

    save_rank_state(checkpoint_dir, engine, optimizer)       # every rank, at the same step
    ...
    resume_rank_state([checkpoint_dir], engine, optimizer)   # every rank; True when resumed

Files are written atomically (a temporary file, flushed to disk, then renamed), so a rank killed while
saving leaves the previous file or the new one, never a truncated one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .flat import DTensor, local_values


if TYPE_CHECKING:
    from .engine import RoundEngine


STATE_FILE = "local_sgd_rank{rank}.pt"


def state_file(directory: str, rank: int) -> str:
    return os.path.join(directory, STATE_FILE.format(rank=rank))


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def check_resumable(state: dict, engine: RoundEngine) -> dict[str, dict]:
    """Refuse an engine state that this run cannot continue exactly, saying what differs and what to do; returns
    the saved state of each of this run's hooks (none for a hook switched on since)."""
    again = "resume with the settings the checkpoint was written with, or delete its local_sgd_rank*.pt files to " \
            "start new rounds from its model"
    saved_islands = state.get("island_size", 1)  # (checkpoints before islands: every rank its own)
    if saved_islands != engine.topology.island_size:
        raise ValueError(
            f"island_size: the checkpoint was written with islands of {saved_islands} ranks, this run has "
            f"{engine.topology.island_size}: each rank resumes its part of its island's state, so resume with "
            f"island_size={saved_islands} and as many processes"
        )
    if state["world_size"] != engine.world_size:
        raise ValueError(
            f"Checkpoint was written by {state['world_size']} replicas, this run has {engine.world_size}: each "
            "replica resumes its own weights and inner-optimizer state, so resume with as many processes"
        )
    if state["outer_optimizer_name"] != engine.options.outer_optimizer:
        raise ValueError(f"Checkpoint was trained with outer_optimizer={state['outer_optimizer_name']!r}, this run "
                         f"uses {engine.options.outer_optimizer!r}: {again}")
    saved, hook_state = saved_hooks(state)
    ours = {hook.name: hook for hook in engine.hooks}
    for name in sorted(set(saved) ^ set(ours)):
        strict = saved[name]["strict"] if name in saved else ours[name].strict_resume
        if strict:
            option = saved[name]["option"] if name in saved else ours[name].option
            raise ValueError(f"Checkpoint was trained with {option} {'on' if name in saved else 'off'}, this run has "
                             f"it {'on' if name in ours else 'off'}: its state cannot be made up or dropped exactly; "
                             f"{again}")
    return {name: hook_state[name] for name in ours if name in hook_state}


def saved_hooks(state: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """The hooks a checkpoint's engine ran ({name: {"option", "strict"}}) and their states, in this version's
    layout or in hf_localsgd 0.1's (every variant's state at the top level, used or not)."""
    if "round_hooks" in state:
        return state["round_hooks"], state["hook_state"]
    hooks, hook_state = {}, {}
    if state["gain"] is not None:
        hooks["lr_scaling"] = {"option": "lr_scaling", "strict": True}
        hook_state["lr_scaling"] = {"gain": state["gain"], "grad_cache": state["grad_cache"]}
    hook_state["palsgd"] = {k: state[k] for k in ("pseudo_syncs_in_round", "pseudo_sync_draws")}  # if it runs now
    return hooks, hook_state


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with the FSDP2 shards (DTensors) of its state as this rank's local tensors: each
    rank saves what it holds (FSDP2's own optimizer checkpoints keep one island's, the same shard of another island
    being taken for a copy)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: local_values(v) if isinstance(v, DTensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what `local_optimizer_state` saved: the local tensors of a sharded parameter's state become DTensors
    placed as the parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state dict's numbering
    state = {**state, "state": {i: {k: DTensor.from_local(v, params[i].device_mesh, params[i].placements,
                                                          shape=params[i].shape, stride=params[i].stride())
                                    if isinstance(params[i], DTensor) and torch.is_tensor(v) and v.dim() > 0 else v
                                    for k, v in s.items()}
                                for i, s in state["state"].items()}}
    optimizer.load_state_dict(state)


def save_rank_state(directory: str, engine: RoundEngine, optimizer: torch.optim.Optimizer | None = None) -> str:
    """Write this rank's state into ``directory`` (created if needed); returns the file's path."""
    os.makedirs(directory, exist_ok=True)
    path = state_file(directory, global_rank())
    state = {
        "engine": engine.state_dict(),
        "local_params": engine.local_params(),  # this replica's weights, also while the global model is in
        "inner_optimizer": local_optimizer_state(optimizer) if optimizer is not None else None,
    }
    tmp = path + ".tmp"  # one writer per file: each rank writes its own
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_rank_state(path: str, engine: RoundEngine, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Restore this rank's engine, weights and inner-optimizer state from its file."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    engine.load_state_dict(saved["engine"])
    engine.load_params(saved["local_params"])
    if optimizer is not None and saved["inner_optimizer"] is not None:
        load_local_optimizer_state(optimizer, saved["inner_optimizer"])


def resume_rank_state(directories: Iterable[str | None], engine: RoundEngine,
                      optimizer: torch.optim.Optimizer | None = None) -> str | None:
    """Resume from this rank's file in the first of ``directories`` that has one; returns its path, or None
    when no rank found one. Every rank must call this together: either all resume or none does, since some
    resuming mid-round while others start new rounds would pair different steps in their outer all-reduces.
    (Each rank looks for its own file, so checkpoints on each node's own disk work.)"""
    rank = global_rank()
    path = next((state_file(d, rank) for d in directories if d and os.path.isfile(state_file(d, rank))), None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = torch.tensor([float(path is not None)], device=engine.flat.device)
        dist.all_reduce(found)
        found, world_size = int(found.item()), dist.get_world_size()
        if 0 < found < world_size:
            raise ValueError(
                f"{found} of {world_size} ranks found their {STATE_FILE.format(rank='*')} file in the checkpoint "
                "(written by another number of processes, or not visible to every rank): resume with as many "
                "processes as wrote it, or delete those files to start new rounds from the checkpoint's global "
                "model (outer-optimizer state reset)"
            )
    if path is not None:
        load_rank_state(path, engine, optimizer)
    return path
