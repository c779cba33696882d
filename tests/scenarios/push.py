"""Schedule-free (so the pushed x differs from the y training continues from), H = 4 over 6 steps (so the last
round is partial), pushed to the Hub stand-in named by HF_ENDPOINT."""

from __future__ import annotations

import os

import torch.distributed as dist
from common import common_args, dataset, main, tiny_model

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


def run(out_dir: str) -> dict:
    from safetensors.torch import save_file

    args = LocalSGDConfig(
        **common_args(out_dir, max_steps=6, push_to_hub=True, hub_model_id="user/tiny-localsgd"),
        sync_every=4, outer_optimizer="schedule_free",
    )
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    trainer.train()
    trainer.push_to_hub()
    engine = trainer.local_sgd.engine
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    x = engine.global_model_params()
    expected = dict(zip(names, (v.clone() for v in engine.flat.views(x))))
    y = dict(zip(names, (v.clone() for v in engine.flat.views(engine.global_params))))
    if dist.get_rank() == 0:
        save_file(expected, os.path.join(out_dir, "expected_global.safetensors"))
        save_file(y, os.path.join(out_dir, "train_point_y.safetensors"))
    return {"num_syncs": engine.num_syncs, "inner_step": engine.inner_step}


if __name__ == "__main__":
    main(run)
