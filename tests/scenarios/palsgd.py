"""PALSGD with plain SGD inside, a linear lr decay, p = 0.3, η = 2, H = 4, Nesterov outer step: each rank's
draws, lrs, batches and weights, for tests/core/test_palsgd.py's single-process simulation."""

from __future__ import annotations

from common import LinearRegression, common_args, flat_params, main, regression_data
from transformers import TrainerCallback, default_data_collator

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


class StepRecorder(TrainerCallback):
    """After LocalSGDCallback: whether each step was a pseudo-synchronization, its inner lr, the weights."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.palsgd = self.trainer.local_sgd.engine.hook("palsgd")
        self.steps.append({
            "pseudo_sync": self.palsgd.pseudo_step,
            "lr": self.palsgd.alpha,
            "weights": flat_params(model).tolist(),
        })


def run(out_dir: str) -> dict:
    """PALSGD with plain SGD inside, a linear lr decay, p = 0.3, η = 2, H = 4, Nesterov outer step."""
    batches = []

    def recording_collator(features):
        batch = default_data_collator(features)
        batches.append({k: v.tolist() for k, v in batch.items()})
        return batch

    args = LocalSGDConfig(
        **common_args(out_dir, max_steps=12, optim="sgd", learning_rate=0.05, lr_scheduler_type="linear",
                      max_grad_norm=0.0, weight_decay=0.0, logging_steps=100),
        sync_every=4, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9,
        pseudo_sync_prob=0.3, pseudo_sync_rate=2.0,
    )
    trainer = LocalSGDTrainer(model=LinearRegression(), args=args, train_dataset=regression_data(),
                              data_collator=recording_collator)
    recorder = StepRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    return {"steps": recorder.steps, "batches": batches[: len(recorder.steps)]}


if __name__ == "__main__":
    main(run)
