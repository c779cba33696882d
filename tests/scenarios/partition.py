"""data_partition='by_label': four classes over two ranks; each batch's first feature is its class."""

from __future__ import annotations

import torch
from common import LinearRegression, common_args, main
from datasets import Dataset
from transformers import default_data_collator

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


def run(out_dir: str) -> dict:
    """data_partition='by_label': four classes over two ranks; each batch's first feature is its class."""
    seen = []

    def recording_collator(features):
        batch = default_data_collator(features)
        seen.extend(int(x[0]) for x in batch["features"].tolist())
        return batch

    g = torch.Generator().manual_seed(3)
    classes = torch.randint(0, 4, (64,), generator=g)
    x = torch.cat([classes[:, None].float(), torch.randn(64, 3, generator=g)], dim=1)
    dataset = Dataset.from_dict({"features": x.tolist(), "labels": x.sum(1).tolist(), "label": classes.tolist()})
    args = LocalSGDConfig(
        **common_args(out_dir, num_train_epochs=2, logging_steps=100, optim="sgd", learning_rate=0.01),
        sync_every=4, outer_optimizer="average", data_partition="by_label",
    )
    trainer = LocalSGDTrainer(model=LinearRegression(), args=args, train_dataset=dataset,
                              data_collator=recording_collator)
    trainer.train()
    return {"classes_seen": seen, "class_counts": torch.bincount(classes, minlength=4).tolist(),
            "steps": trainer.state.global_step}


if __name__ == "__main__":
    main(run)
