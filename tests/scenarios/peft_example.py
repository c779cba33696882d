"""examples/peft_lora.py on 2 processes: LoRA adapters under LocalSGDTrainer. What the engine averages, and the
base and adapter weights at the start and the end."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import digest, main


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from peft_lora import build_trainer  # noqa: E402


def weights(model, lora: bool) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for n, p in model.named_parameters() if ("lora_" in n) == lora])


def run(out_dir: str) -> dict:
    trainer = build_trainer(out_dir, max_steps=12, sync_every=4)
    base_before, adapters_before = weights(trainer.model, False), weights(trainer.model, True)
    trainer.train()
    engine = trainer.local_sgd.engine
    return {
        "engine_numel": engine.flat.numel,
        "adapter_numel": adapters_before.numel(),
        "trainable_numel": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "bytes_sent_per_sync": engine.last_metrics["bytes_sent"],
        "num_syncs": engine.num_syncs,
        "base_unchanged": bool(torch.equal(base_before, weights(trainer.model, False))),
        "adapters_moved": bool(not torch.equal(adapters_before, weights(trainer.model, True))),
        "adapters": digest(weights(trainer.model, True)),
    }


if __name__ == "__main__":
    main(run)
