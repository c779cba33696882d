"""LocalSGDTrainer with island_size=2 on 4 processes: DDP inside each island of 2 ranks (through Trainer's own DDP
wrapper and the engine's comm hook), the round across the 2 islands. Records every rank's weights after every
step, the collectives per process group, the evaluation of step 4 (mid-round) and the model saved at the end;
then trains again with a second train() call on the same trainer."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from common import common_args, count_collectives_by_group, dataset, digest, flat_params, main, tiny_model
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


class Recorder(TrainerCallback):
    """Runs after LocalSGDCallback."""

    def __init__(self, trainer, counts):
        self.trainer, self.counts = trainer, counts
        self.hashes, self.synced, self.collectives, self.evaluated = [], [], [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.local_sgd.engine
        self.hashes.append(digest(engine.local_params()))  # (the replica's: an evaluation may have the global in)
        self.synced.append(engine.num_syncs > sum(self.synced))
        self.collectives.append(dict(self.counts))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # what the model held for the evaluation (the next step's begin restores this rank's weights)
        self.evaluated.append(digest(flat_params(model)))


def run(out_dir: str) -> dict:
    args = LocalSGDConfig(
        **common_args(out_dir, max_steps=9, logging_steps=100, eval_strategy="steps", eval_steps=4,
                      per_device_eval_batch_size=8),
        sync_every=3, outer_optimizer="nesterov", local_sgd_warmup_steps=2, island_size=2,
    )
    data = dataset()
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data, eval_dataset=data.select(range(32)))
    counts = count_collectives_by_group()
    recorder = Recorder(trainer, counts)
    trainer.add_callback(recorder)
    trainer.train()
    engine = trainer.local_sgd.engine
    trainer.save_model(os.path.join(out_dir, "final"))
    dist.barrier()
    saved = load_file(os.path.join(out_dir, "final", "model.safetensors"))
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    x = engine.global_model_params()
    saved_is_global = all(torch.equal(saved[n], v) for n, v in zip(names, engine.flat.views(x)) if n in saved)
    first = {"hashes": recorder.hashes, "evaluated": recorder.evaluated, "synced": recorder.synced,
             "collectives": recorder.collectives, "rank": dist.get_rank(), "saved_is_global": saved_is_global,
             "num_syncs": engine.num_syncs, "workers": engine.world_size}
    # A second train() on the same trainer: the same DDP wrapper (DDP takes one comm hook), a new engine.
    recorder.hashes, recorder.synced = [], []
    trainer.train()
    return {**first, "again_hashes": recorder.hashes, "again_synced": recorder.synced,
            "again_num_syncs": trainer.local_sgd.engine.num_syncs}


if __name__ == "__main__":
    main(run)
