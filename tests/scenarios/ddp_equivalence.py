"""H = 1, outer `average`, inner plain SGD (no momentum, no clipping): LocalSGDTrainer must equal ordinary
data-parallel `Trainer` on the same data and seed."""

from __future__ import annotations

from common import common_args, dataset, digest, flat_params, main, tiny_model
from transformers import Trainer, TrainingArguments

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


def run(out_dir: str) -> dict:
    common = common_args(out_dir, max_steps=8, optim="sgd", learning_rate=0.05, max_grad_norm=0.0, weight_decay=0.0)
    local = LocalSGDTrainer(
        model=tiny_model(), train_dataset=dataset(),
        args=LocalSGDConfig(**common, sync_every=1, outer_optimizer="average"),
    )
    local.train()
    ddp = Trainer(model=tiny_model(), train_dataset=dataset(), args=TrainingArguments(**common))
    ddp.train()
    a, b = flat_params(local.model), flat_params(ddp.model)
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "max_abs_change": (b - flat_params(tiny_model())).abs().max().item(),
        "hash_local": digest(a),
        "hash_ddp": digest(b),
    }


if __name__ == "__main__":
    main(run)
