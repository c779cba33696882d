"""data_partition='by_label': four classes over two ranks; each batch's first feature is its class. Then the worst
case in a plain loop over RoundEngine: rank 0 holds all the data, rank 1 none."""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import LinearRegression, common_args, flat_params, main
from datasets import Dataset
from transformers import default_data_collator

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer
from hf_localsgd.core.engine import RoundEngine
from hf_localsgd.core.partition import worst_case_shards


def worst_case_loop() -> dict:
    """Rank 0: full-batch least squares on 8 rows, SGD lr 0.1; rank 1: no data, engine.step() only. H = 3,
    4 rounds. Records each rank's replica before each sync and the global model after each."""
    g = torch.Generator().manual_seed(5)
    rows = torch.cat([torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)], dim=1)
    shard = rows[worst_case_shards(len(rows), dist.get_world_size())[dist.get_rank()]]
    model = torch.nn.Linear(3, 1)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = RoundEngine(model, sync_every=3, outer_optimizer="average")
    before_sync, globals_ = [], [flat_params(model).tolist()]
    for _ in range(12):
        if len(shard):  # a worker without data takes no gradient step, but counts the step
            loss = (model(shard[:, :3]).squeeze(1) - shard[:, 3]).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if engine.inner_step + 1 == engine.sync_every:
            before_sync.append(flat_params(model).tolist())
        if engine.step():
            globals_.append(flat_params(model).tolist())
    return {"data": shard.tolist(), "before_sync": before_sync, "globals": globals_}


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
            "steps": trainer.state.global_step, "worst_case": worst_case_loop()}


if __name__ == "__main__":
    main(run)
