"""Per-rank checkpoint files: what a replica needs to resume exactly, next to an ordinary checkpoint.

Each rank writes one file, ``local_sgd_rank{R}.pt``, holding its engine's state (position in the round, the
float32 global model, outer-optimizer and hook state), its own weights and its inner optimizer's state: the
model file a trainer saves holds the global model, and the optimizer file one rank's state only. The same
helpers serve `LocalSGDTrainer` and a plain loop:

    save_rank_state(checkpoint_dir, engine, optimizer)       # every rank, at the same step
    ...
    resume_rank_state([checkpoint_dir], engine, optimizer)   # every rank; True when resumed

Files are written atomically (a temporary file, flushed to disk, renamed, and the rename itself flushed to
disk with the directory), so a rank killed while saving leaves the previous file or the new one, never a
truncated one under the final name; what it leaves is a ``local_sgd_rank{R}.pt.tmp``, which marks the
checkpoint as incomplete. A file that cannot be read anyway (a disk that lost the tail, a copy cut short)
stops every rank with a `CheckpointError` naming the file and its rank, and the newest complete checkpoint
among those the caller offers as ``fallbacks``, instead of a pickle traceback on one rank and a hang on the
others.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .flat import DTensor, local_values


if TYPE_CHECKING:
    from .engine import RoundEngine


STATE_FILE = "local_sgd_rank{rank}.pt"
PARTIAL_SUFFIX = ".tmp"  # a save in progress, or one that a killed rank left behind
STATE_KEYS = ("engine", "local_params", "inner_optimizer")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from as it is on disk: a state file truncated, corrupted or missing."""


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
    for name, default in (("outer_overlap", "none"), ("num_fragments", 1), ("fragment_sync_delay", 1)):
        saved, ours = state.get(name, default), getattr(engine.options, name)
        if saved != ours:  # what is in flight, and the outer state's layout, differ
            raise ValueError(f"{name}: the checkpoint was written with {name}={saved!r}, this run has {ours!r}: "
                             f"resume with {name}={saved!r}")
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
    tmp = path + PARTIAL_SUFFIX  # one writer per file: each rank writes its own
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
    fsync_directory(directory)
    return path


def fsync_directory(directory: str) -> None:
    """Flush a directory's entries to disk: after a rename, a power loss could otherwise bring back the old
    name (or none) with the new contents already on disk. (Not possible on every platform: then skipped.)"""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- checking files before loading them
def state_file_problem(path: str) -> str | None:
    """What is wrong with a state file, read cheaply (its size and zip directory, not its tensors), or None.
    torch.save writes a zip archive whose central directory comes last, so a file cut short anywhere, or
    overwritten with something else, has none."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "is missing"
    if size == 0:
        return "is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"is truncated or corrupted ({size} bytes, no readable zip directory: {err})"
    if not any(e.filename.endswith("/data.pkl") for e in entries):
        return "is not a torch.save archive (no data.pkl)"
    end = max(e.header_offset + e.compress_size for e in entries)
    if end > size:
        return f"is truncated ({size} bytes, its records need at least {end})"
    return None


def checkpoint_problem(directory: str, world_size: int) -> str | None:
    """Why ``directory`` is not a complete checkpoint of ``world_size`` ranks (a state file of every rank that
    passes `state_file_problem`, and no save left half-done), or None when it is."""
    if not os.path.isdir(directory):
        return "does not exist"
    for rank in range(world_size):
        path = state_file(directory, rank)
        if os.path.exists(path + PARTIAL_SUFFIX):
            return f"{os.path.basename(path)}{PARTIAL_SUFFIX} is left by a save of rank {rank} that did not finish"
        problem = state_file_problem(path)
        if problem is not None:
            return f"{os.path.basename(path)} (rank {rank}) {problem}"
    return None


def newest_complete_checkpoint(candidates: Iterable[str | None], world_size: int) -> str | None:
    """The first of ``candidates`` (pass them newest first) that `checkpoint_problem` finds complete."""
    return next((d for d in candidates if d and checkpoint_problem(d, world_size) is None), None)


def fallback_advice(fallbacks: Iterable[str | None], world_size: int, exclude: str | None = None) -> str:
    """The end of an error about an unusable checkpoint: which complete one to resume from instead."""
    excluded = os.path.abspath(exclude) if exclude else None
    newest = newest_complete_checkpoint((d for d in fallbacks if d and os.path.abspath(d) != excluded), world_size)
    if newest is not None:
        return f"The newest complete checkpoint is {newest}: resume from it."
    return ("No complete checkpoint was found to resume from instead: start anew, or delete this checkpoint's "
            f"{STATE_FILE.format(rank='*')} files to start new rounds from its global model (outer-optimizer "
            "state reset).")


def read_rank_state(path: str, rank: int) -> dict:
    """Load a state file, turning what torch.load raises on a damaged file (a zip, pickle or EOF error) into a
    `CheckpointError` naming the file and the rank."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # anything torch.load raises here means this file cannot be resumed from
        problem = state_file_problem(path) or f"cannot be loaded ({type(err).__name__}: {err})"
        raise CheckpointError(f"{path}: the state file of rank {rank} {problem}") from err
    if not isinstance(saved, dict) or not all(key in saved for key in STATE_KEYS):
        raise CheckpointError(f"{path}: the state file of rank {rank} is not a local-SGD state file (it lacks "
                              f"{[k for k in STATE_KEYS if not isinstance(saved, dict) or k not in saved]})")
    return saved


def apply_rank_state(saved: dict, engine: RoundEngine, optimizer: torch.optim.Optimizer | None = None) -> None:
    engine.load_state_dict(saved["engine"])
    engine.load_params(saved["local_params"])
    if optimizer is not None and saved["inner_optimizer"] is not None:
        load_local_optimizer_state(optimizer, saved["inner_optimizer"])


def load_rank_state(path: str, engine: RoundEngine, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Restore this rank's engine, weights and inner-optimizer state from its file."""
    apply_rank_state(read_rank_state(path, global_rank()), engine, optimizer)


def resume_rank_state(directories: Iterable[str | None], engine: RoundEngine,
                      optimizer: torch.optim.Optimizer | None = None,
                      fallbacks: Iterable[str | None] = ()) -> str | None:
    """Resume from this rank's file in the first of ``directories`` that has one; returns its path, or None
    when no rank found one. Every rank must call this together: either all resume or none does, since some
    resuming mid-round while others start new rounds would pair different steps in their outer all-reduces.
    (Each rank looks for its own file, so checkpoints on each node's own disk work.)

    Each rank reads its file before the ranks agree, in one all-reduce, on who found one and whose could not
    be read: a damaged file on one rank stops every rank with a `CheckpointError` naming it, rather than one
    rank raising while the others wait for it in their first collective. ``fallbacks`` (newest first, e.g. a
    trainer's other checkpoints) are checked cheaply for the newest complete one, which the error names."""
    rank = global_rank()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    directories = list(directories)
    path = next((state_file(d, rank) for d in directories if d and os.path.isfile(state_file(d, rank))), None)
    saved, damaged = None, None
    if path is not None:
        try:
            saved = read_rank_state(path, rank)
        except CheckpointError as err:
            damaged = err
    found, bad = int(path is not None), [rank] if damaged is not None else []
    if world_size > 1:
        flags = torch.zeros(1 + world_size, device=engine.flat.device)
        flags[0] = float(path is not None)
        flags[1 + rank] = float(damaged is not None)
        dist.all_reduce(flags)
        found = int(flags[0].item())
        bad = [r for r in range(world_size) if flags[1 + r].item() > 0]
    where = os.path.dirname(path) if path is not None else next((d for d in directories if d), None)
    if bad:
        if damaged is not None:
            what = str(damaged)
        else:  # another rank's file: say what can be seen of it from here (on a shared disk, the same)
            other = state_file(where, bad[0]) if where else STATE_FILE.format(rank=bad[0])
            seen = state_file_problem(other) if where and os.path.exists(other) else None
            what = f"{other}: the state file of rank {bad[0]} {seen or 'cannot be read (that rank reports why)'}"
        raise CheckpointError(f"{what}. No rank resumes from {where}. "
                              + fallback_advice(fallbacks, world_size, exclude=where)) from damaged
    if 0 < found < world_size:
        raise ValueError(
            f"{found} of {world_size} ranks found their {STATE_FILE.format(rank='*')} file in the checkpoint "
            "(written by another number of processes, or not visible to every rank): resume with as many "
            "processes as wrote it, or delete those files to start new rounds from the checkpoint's global "
            "model (outer-optimizer state reset). " + fallback_advice(fallbacks, world_size, exclude=where)
        )
    if saved is not None:
        apply_rank_state(saved, engine, optimizer)
    return path
