"""A mid-round checkpoint that lacks rank 1's state file (as if written by one process): every rank must stop
with the same error rather than rank 0 resume mid-round and rank 1 start new rounds."""

from __future__ import annotations

import os

import torch.distributed as dist
from common import common_args, dataset, main, tiny_model

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


def run(out_dir: str) -> dict:
    def trainer(output):
        args = LocalSGDConfig(**common_args(os.path.join(out_dir, output), max_steps=6, save_strategy="steps",
                                            save_steps=5), sync_every=4, outer_optimizer="nesterov")
        return LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())

    trainer("full").train()
    checkpoint = os.path.join(out_dir, "full", "checkpoint-5")
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(os.path.join(checkpoint, "local_sgd_rank1.pt"))
    dist.barrier()
    try:
        trainer("resumed").train(resume_from_checkpoint=checkpoint)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


if __name__ == "__main__":
    main(run)
