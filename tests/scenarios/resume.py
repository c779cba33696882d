"""An uninterrupted run against the same run resumed from a mid-round checkpoint (options: outer optimizer,
PALSGD's p, lr scaling, H schedule, data partition, island size, overlapped syncs, streaming fragments). The resumed run also records, right after resuming, whether
this rank's inner-optimizer state is the one of its own state file (not Trainer's optimizer.pt, which holds
rank 0's), and how many gradient steps it took afterwards (a PALSGD pseudo-synchronization takes none)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from common import common_args, dataset, digest, flat_params, main, tiny_model
from transformers import TrainerCallback

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


def same_state(a, b) -> bool:
    """Two optimizer state dicts hold the same tensors (bit for bit) and hyperparameters."""
    if a.keys() != b.keys() or a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(a["state"][i][k], b["state"][i][k]) if torch.is_tensor(a["state"][i][k])
               else a["state"][i][k] == b["state"][i][k] for i in a["state"] for k in a["state"][i])


class ResumeProbe(TrainerCallback):
    """After LocalSGDCallback: the inner optimizer's state when the first step after resuming begins, and the
    gradient steps taken from there."""

    def __init__(self, trainer, checkpoint: str):
        self.trainer, self.checkpoint = trainer, checkpoint
        self.checked, self.gradient_steps = None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.checked is None:
            restored = self.trainer.optimizer.state_dict()
            own = torch.load(os.path.join(self.checkpoint, f"local_sgd_rank{dist.get_rank()}.pt"),
                             weights_only=True)["inner_optimizer"]
            trainers = torch.load(os.path.join(self.checkpoint, "optimizer.pt"), weights_only=True)
            self.checked = {"equals_own_file": same_state(restored, own),
                            "equals_optimizer_pt": same_state(restored, trainers)}

    def on_step_end(self, args, state, control, **kwargs):
        self.gradient_steps += not self.trainer.local_sgd.engine.skips_gradient_step


def run(out_dir: str, outer_optimizer: str = "schedule_free", pseudo_sync_prob: str = "0", lr_scaling: str = "none",
        sync_every_schedule: str = "constant", data_partition: str = "iid", island_size: str = "1",
        outer_overlap: str = "none", num_fragments: str = "1") -> dict:
    def train(resume_from=None, output="full"):
        args = LocalSGDConfig(
            **common_args(os.path.join(out_dir, output), max_steps=12, save_strategy="steps", save_steps=3,
                          save_total_limit=2, max_grad_norm=1.0),
            sync_every=4, outer_optimizer=outer_optimizer, pseudo_sync_prob=float(pseudo_sync_prob),
            lr_scaling=lr_scaling, sync_every_schedule=sync_every_schedule, sync_every_min=2,
            data_partition=data_partition, data_partition_column="start", island_size=int(island_size),
            outer_overlap=outer_overlap, num_fragments=int(num_fragments),
        )
        trainer = LocalSGDTrainer(model=tiny_model(dropout=0.1), args=args, train_dataset=dataset())
        probe = ResumeProbe(trainer, resume_from) if resume_from else None
        if probe:
            trainer.add_callback(probe)
        trainer.train(resume_from_checkpoint=resume_from)
        engine = trainer.local_sgd.engine
        return (digest(flat_params(trainer.model)), digest(engine.global_params), engine.num_syncs), probe

    full, _ = train()
    # The first checkpoint left (save_total_limit=2) that falls mid-round (H = 4): checkpoint-9, or an earlier
    # one when lr scaling ends training early, at its scale-invariant budget.
    steps = sorted(int(name.split("-")[1]) for name in os.listdir(os.path.join(out_dir, "full")) if name.startswith("checkpoint-"))
    checkpoint = os.path.join(out_dir, "full", f"checkpoint-{next(s for s in steps if s % 4)}")
    resumed, probe = train(resume_from=checkpoint, output="resumed")
    return {
        "full": full,
        "resumed": resumed,
        "checkpoints": sorted(os.listdir(os.path.join(out_dir, "full"))),
        "checkpoint_files": sorted(os.listdir(checkpoint)),
        "inner_optimizer": probe.checked,
        "gradient_steps_after_resume": probe.gradient_steps,
    }


if __name__ == "__main__":
    main(run)
