"""Crashes around checkpoints, on real ranks (tests/distributed/test_faults.py runs each mode in its own launch):

- `crash OUT`: LocalSGDTrainer, rounds of 4, a checkpoint every 3 steps; rank 1 is killed (SIGKILL, by itself)
  half-way through writing its state file of the 2nd checkpoint (checkpoint-6). The launch fails; what it leaves
  on disk is what a real crash leaves.
- `resume OUT`: in the same OUT, `train(resume_from_checkpoint=True)` must skip the incomplete checkpoint-6,
  resume from checkpoint-3 and end bit-identical to an uninterrupted run (trained here too). Then rank 0 cuts
  rank 1's state file of that run's checkpoint-9 short, and both resuming from it explicitly (the Trainer's
  check) and resuming a plain engine with `resume_rank_state` (the core's agreement) must stop every rank with
  an error naming the file and rank 1, and so must a plain engine resuming a checkpoint that only rank 0 wrote
  its file into. Returns the errors.
- `long OUT` (under `accelerate launch`): trains on and on (rounds of 4); at step 6, mid-round, each rank
  writes its pid to `OUT/ready_rank{R}` for the test, which then SIGKILLs one of them.
- `truncated_exit OUT CHECKPOINT`: resume from that damaged checkpoint with nothing catching the error: every
  rank must exit non-zero by itself (no rank left waiting in a collective), printing the error.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch
import torch.distributed as dist
from common import common_args, dataset, digest, flat_params, main, tiny_model
from transformers import TrainerCallback

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer, RoundEngine, resume_rank_state, save_rank_state
from hf_localsgd.core.checkpoint import CheckpointError


def trainer(out_dir: str, **overrides) -> LocalSGDTrainer:
    settings = {"max_steps": 12, "save_strategy": "steps", "save_steps": 3, "save_total_limit": 1, "max_grad_norm": 1.0,
                **overrides}
    args = LocalSGDConfig(**common_args(out_dir, **settings), sync_every=4, outer_optimizer="nesterov")
    return LocalSGDTrainer(model=tiny_model(dropout=0.1), args=args, train_dataset=dataset())


def outcome(t: LocalSGDTrainer) -> list:
    return [digest(flat_params(t.model)), digest(t.local_sgd.engine.global_params), t.local_sgd.engine.num_syncs]


def die_while_writing_state(at_checkpoint: int) -> None:
    """From now on, this rank's `at_checkpoint`-th state file is written half, then the process is SIGKILLed:
    as if the machine went away in the middle of torch.save."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        name = getattr(f, "name", f)
        if isinstance(name, str) and name.endswith(".pt.tmp"):
            calls.append(name)
            if len(calls) == at_checkpoint:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


class SayReady(TrainerCallback):
    def __init__(self, out_dir: str, at_step: int):
        self.path, self.at_step = os.path.join(out_dir, f"ready_rank{dist.get_rank()}"), at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            with open(self.path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(self.path + ".tmp", self.path)


def run(out_dir: str, mode: str, checkpoint: str | None = None) -> dict:
    crashed = os.path.join(out_dir, "crashed")
    if mode == "long":
        t = trainer(os.path.join(out_dir, "long"), max_steps=100_000, save_strategy="no")
        t.add_callback(SayReady(out_dir, at_step=6))
        t.train()
        return {"error": "never killed"}
    if mode == "crash":
        if dist.get_rank() == 1:
            die_while_writing_state(at_checkpoint=2)
        trainer(crashed).train()
        return {"error": "rank 1 was not killed"}

    if mode == "truncated_exit":  # nothing catches the error: the process must exit non-zero
        trainer(os.path.join(out_dir, "again")).train(resume_from_checkpoint=checkpoint)
        return {"error": None}

    result = {"crashed_checkpoints": {name: sorted(os.listdir(os.path.join(crashed, name)))
                                      for name in sorted(os.listdir(crashed)) if name.startswith("checkpoint-")}}
    full = trainer(os.path.join(out_dir, "full"))
    full.train()
    result["full"] = outcome(full)
    resumed = trainer(crashed)
    resumed.train(resume_from_checkpoint=True)
    result["resumed_from"] = os.path.basename(resumed.local_sgd.resume_from_checkpoint)
    result["resumed"] = outcome(resumed)
    result["checkpoints_after"] = sorted(os.listdir(crashed))

    # A state file cut short: rank 1's of the full run's last checkpoint (save_total_limit=1 kept only it).
    damaged = os.path.join(out_dir, "full", "checkpoint-12")
    dist.barrier()
    if dist.get_rank() == 0:
        path = os.path.join(damaged, "local_sgd_rank1.pt")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    dist.barrier()
    try:
        trainer(os.path.join(out_dir, "again")).train(resume_from_checkpoint=damaged)
        result["trainer_error"] = None
    except CheckpointError as error:
        result["trainer_error"] = str(error)
    dist.barrier()
    result["damaged"] = damaged

    # The same file met by a plain loop's resume_rank_state: the ranks agree in one all-reduce, all raise.
    engine = RoundEngine(tiny_model(), sync_every=4)
    try:
        resume_rank_state([damaged], engine, fallbacks=[damaged, os.path.join(crashed, "checkpoint-12")])
        result["engine_error"] = None
    except CheckpointError as error:
        result["engine_error"] = str(error)

    # A checkpoint only rank 0 wrote its file into: every rank stops, rather than one resuming mid-round.
    one_rank = os.path.join(out_dir, "one_rank")
    if dist.get_rank() == 0:
        save_rank_state(one_rank, engine)
    dist.barrier()
    try:
        resume_rank_state([one_rank], RoundEngine(tiny_model(), sync_every=4))
        result["missing_error"] = None
    except ValueError as error:
        result["missing_error"] = str(error)
    return result


if __name__ == "__main__":
    if sys.argv[2] != "resume":  # crash / long / truncated_exit: a run that must not come back
        dist.init_process_group("gloo")
        run(sys.argv[1], *sys.argv[2:])
        dist.destroy_process_group()
    else:
        sys.argv = [sys.argv[0], sys.argv[1], "resume"]
        main(run)
