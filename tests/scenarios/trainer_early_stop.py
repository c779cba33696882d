"""LocalSGDTrainer stopped early with `load_best_model_at_end` (2 processes, eager outer steps with int8 outer
gradients, H = 4): a callback stops training after the evaluation of step 6, as EarlyStoppingCallback would,
while the sum of round 1 is in flight. Trainer then loads the best checkpoint's global model, and the engine's
close() waits for the sum and drops it before its groups and thread go. Records what is left in flight, the
threads, and whether the model is the best checkpoint's.
"""

from __future__ import annotations

import os
import threading

import torch
import torch.distributed as dist
from common import common_args, dataset, main, tiny_model
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


class StopAfterEvaluating(TrainerCallback):
    def __init__(self, trainer, at: int):
        self.trainer, self.at, self.in_flight_at_stop = trainer, at, None

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_training_stop = True
            self.in_flight_at_stop = self.trainer.local_sgd.engine.outer.in_flight is not None


def run(out_dir: str) -> dict:
    args = LocalSGDConfig(
        **common_args(out_dir, max_steps=12, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                      save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                      per_device_eval_batch_size=8),
        sync_every=4, outer_optimizer="nesterov", outer_overlap="eager", outer_comm_dtype="int8",
    )
    data = dataset()
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data, eval_dataset=data.select(range(16)))
    stopper = StopAfterEvaluating(trainer, at=6)
    trainer.add_callback(stopper)
    trainer.train()
    engine = trainer.local_sgd.engine
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
    is_best = all(torch.equal(best[n], p.detach()) for n, p in trainer.model.named_parameters() if n in best)
    return {"global_step": trainer.state.global_step, "in_flight_at_stop": stopper.in_flight_at_stop,
            "in_flight_after": engine.outer.in_flight is not None, "closed": engine.reducer.closed,
            "threads": sorted(t.name for t in threading.enumerate()), "model_is_best": is_best,
            "best": os.path.basename(trainer.state.best_model_checkpoint), "rank": dist.get_rank()}


if __name__ == "__main__":
    main(run)
