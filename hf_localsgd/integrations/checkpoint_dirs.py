"""Trainer's ``checkpoint-N`` folders: which are complete, which one a run resumes from, which rotation keeps.

A checkpoint of a local-SGD run is complete when Trainer's own save finished (``trainer_state.json``, which it
writes last, parses) and every rank's ``local_sgd_rank{R}.pt`` is there, whole (`core.checkpoint`), with no
``.tmp`` left by a save that a killed rank never finished. A crash mid-save leaves the newest folder
incomplete; Trainer's ``get_last_checkpoint`` would still pick it (by its number), and its rotation
(``save_total_limit``) would keep it as "the most recent" and could delete the last complete one. Here:

- `resolve_resume` turns ``resume_from_checkpoint=True`` into the newest checkpoint complete for *every*
  rank, and checks a given path, before Trainer loads anything from it: every rank looks at the files it can
  see (its own state file at least, so checkpoints on each node's disk work), and the ranks agree in one
  gather, so they all resume from the same folder or all stop with the same error. An explicit path is also
  checked against this run's settings (the number of processes, ``outer_optimizer``, ``lr_scaling``) from
  the rank's state file, read memory-mapped (its tensors are not read).
- `rotate_checkpoints` is Trainer's rotation that also keeps the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from ..core.build import build_hooks
from ..core.checkpoint import (PARTIAL_SUFFIX, STATE_FILE, CheckpointError, check_resumable, state_file,
                               state_file_problem)


TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, written last by Trainer's save
_STATE_NAME = re.compile(r"^local_sgd_rank(\d+)\.pt(" + re.escape(PARTIAL_SUFFIX) + r")?$")
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_dirs(run_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``run_dir``, newest (highest N) first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
             if (m := _CHECKPOINT_NAME.match(name)) and os.path.isdir(os.path.join(run_dir, name))]
    return [path for _, path in sorted(found, reverse=True)]


def trainer_state_problem(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, TRAINER_STATE), encoding="utf-8") as f:
            json.load(f)
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing (Trainer's save did not finish)"
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} cannot be read ({err})"
    return None


def checkpoint_problem(directory: str, rank: int, world_size: int | None = None) -> str | None:
    """Why ``directory`` is not a complete checkpoint as far as ``rank`` can see, or None. With ``world_size``,
    every rank's state file must be there (what a process that sees the whole folder checks); without it,
    this rank's own (others may be on their own nodes' disks). A folder without any state file is a plain
    Trainer checkpoint: complete (the run resumes from its weights with a warning)."""
    problem = trainer_state_problem(directory)
    if problem is not None:
        return problem
    names = sorted(os.listdir(directory))
    partial = next((n for n in names if (m := _STATE_NAME.match(n)) and m.group(2)), None)
    if partial is not None:
        return f"{partial} is left by a save that did not finish"
    present = sorted(int(m.group(1)) for n in names if (m := _STATE_NAME.match(n)))
    if not present:
        return None
    needed = range(world_size) if world_size is not None else [rank]
    missing = [r for r in needed if r not in present]
    if missing:
        return f"{STATE_FILE.format(rank=missing[0])} (the state of rank {missing[0]}) is missing"
    for r in present:
        problem = state_file_problem(state_file(directory, r))
        if problem is not None:
            return f"{STATE_FILE.format(rank=r)} (the state of rank {r}) {problem}"
    return None


def _gather(value):
    """Every rank's ``value``, in rank order (just ours without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def newest_complete(run_dir: str, world_size: int, exclude: str | None = None) -> str | None:
    """The newest checkpoint of ``run_dir`` with every rank's files, as this process sees it (no agreement:
    for messages and rotation)."""
    excluded = os.path.abspath(exclude) if exclude else None
    return next((d for d in checkpoint_dirs(run_dir)
                 if os.path.abspath(d) != excluded and checkpoint_problem(d, 0, world_size) is None), None)


def _advice(run_dir: str, world_size: int, exclude: str | None = None) -> str:
    newest = newest_complete(run_dir, world_size, exclude)
    if newest is not None:
        return f"The newest complete checkpoint is {newest}: pass it as resume_from_checkpoint."
    return "No complete checkpoint is left in " + run_dir + ": start without resume_from_checkpoint."


def compatibility_problem(directory: str, rank: int, world_size: int, options, num_params: int | None = None) -> str | None:
    """Why this run (``world_size`` processes, ``options``, a model of ``num_params`` trainable parameters)
    cannot continue the state in this rank's file, read memory-mapped (only its small engine entries are
    touched), or None."""
    path = state_file(directory, rank)
    if not os.path.isfile(path):
        return None
    try:
        engine_state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["engine"]
    except Exception as err:  # the full load reports it with the file and rank (core.checkpoint)
        return (f"{STATE_FILE.format(rank=rank)} (the state of rank {rank}) cannot be loaded "
                f"({type(err).__name__}: {err})")
    island_size = getattr(options, "island_size", 1)
    saved_params = engine_state["global_params"].numel() if "global_params" in engine_state else None
    # (inside islands a rank keeps a part of the global model, streaming fragments their parts: the engine checks
    # their sizes when it loads them)
    if num_params is not None and island_size == 1 and saved_params not in (None, num_params):
        return (f"the checkpoint holds {saved_params} global parameters, the model has {num_params} (a checkpoint "
                "of another model, or of other trainable parameters)")
    # What check_resumable reads of an engine, without building one (no model, no collective): K islands of
    # island_size ranks.
    run = SimpleNamespace(world_size=world_size // island_size, options=options,
                          hooks=build_hooks(options, seed=0, total_steps=None),
                          topology=SimpleNamespace(island_size=island_size))
    try:
        check_resumable(engine_state, run)
    except ValueError as err:
        return str(err)
    return None


def resolve_resume(resume_from_checkpoint, run_dir: str, options, num_params: int | None = None):
    """What a local-SGD run should resume from, decided the same on every rank, before Trainer loads anything:
    ``True`` becomes the newest checkpoint complete for every rank (``True`` itself when ``run_dir`` has no
    checkpoint at all, for Trainer's own error); a path is checked. Raises `CheckpointError` starting with
    ``resume_from_checkpoint`` when there is nothing complete to resume from."""
    rank, world_size = _rank_and_world()
    if resume_from_checkpoint is True:
        candidates = checkpoint_dirs(run_dir)
        if not candidates:
            return True
        mine = {os.path.basename(d): checkpoint_problem(d, rank) for d in candidates}
        views = _gather(mine)
        for d in candidates:
            problems = [view.get(os.path.basename(d), "is not there") for view in views]
            if all(p is None for p in problems):
                return d
        newest = os.path.basename(candidates[0])
        r, problem = next((r, view[newest]) for r, view in enumerate(views) if view.get(newest, "") is not None)
        raise CheckpointError(
            f"resume_from_checkpoint: no checkpoint in {run_dir} is complete for every rank (the newest, "
            f"{candidates[0]}: {problem or 'not there'}, seen from rank {r}): start without "
            "resume_from_checkpoint, or restore a complete checkpoint"
        )
    if not isinstance(resume_from_checkpoint, str):
        return resume_from_checkpoint
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        problem = "the folder does not exist"
    else:
        problem = checkpoint_problem(path, rank) or compatibility_problem(path, rank, world_size, options, num_params)
    problems = _gather(problem)
    bad = [(r, p) for r, p in enumerate(problems) if p is not None]
    if bad:
        r, p = bad[0]
        where = f" (seen from rank {r})" if world_size > 1 else ""
        raise CheckpointError(f"resume_from_checkpoint: {path} cannot be resumed from: {p}{where}. "
                              + _advice(str(Path(path).parent), world_size, exclude=path))
    return path


def rotate_checkpoints(run_dir: str, save_total_limit: int | None, best_model_checkpoint: str | None,
                       world_size: int) -> None:
    """transformers' `rotate_checkpoints` (the same order: by modification time, falling back to the step;
    the same protection of the most recent and the best checkpoint), which also never deletes the newest
    complete checkpoint: after a crash mid-save, the most recent folder may be one no run can resume from."""
    if save_total_limit is None or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(run_dir, use_mtime=True)
    if len(checkpoints) <= save_total_limit:
        return
    protected = {checkpoints[-1]}
    if best_model_checkpoint is not None:
        protected.add(str(Path(best_model_checkpoint)))
    complete = newest_complete(run_dir, world_size)
    if complete is not None:
        protected.add(str(Path(complete)))
    remaining = len(checkpoints)
    for checkpoint in checkpoints:
        if remaining <= max(save_total_limit, len(protected)):
            break
        if checkpoint not in protected:
            shutil.rmtree(checkpoint, ignore_errors=True)
            remaining -= 1
