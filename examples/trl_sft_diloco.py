"""TRL's `SFTTrainer` with DiLoCo: the local-SGD options mixed into `SFTConfig`, the callback attached.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml examples/trl_sft_diloco.py

Offline and CPU-sized (about a minute on 2 CPU processes): a tiny GPT-Neo from a config, the package's built-in
stories and tokenizer (`pip install -e ".[recipes]" trl`). On a machine without a GPU, launch with
ACCELERATE_USE_CPU=true or keep `use_cpu=True` below. Between syncs nothing is communicated: the metrics TRL
gathers on every micro-batch (entropy, token accuracy, tokens seen) are answered from each rank's own batches
until the next logging step (see README, "With TRL").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from hf_localsgd import LocalSGDArguments, LocalSGDCallback
from hf_localsgd.recipes.demo_data import demo_datasets, train_demo_tokenizer
from hf_localsgd.recipes.models import build_model, build_model_config


@dataclass
class SFTLocalSGDConfig(LocalSGDArguments, SFTConfig):
    """SFTConfig with the local-SGD options (the README's mixin)."""


def build_trainer(output_dir: str, max_steps: int = 32, sync_every: int = 8, logging_steps: int = 8) -> SFTTrainer:
    tokenizer = train_demo_tokenizer()
    config = build_model_config("demo", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    args = SFTLocalSGDConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=8, max_length=64,
        learning_rate=3e-3, logging_steps=logging_steps, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        sync_every=sync_every, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9,
    )
    set_seed(0)  # every rank builds the same model: local-SGD replicas start from one global model
    trainer = SFTTrainer(model=build_model(config), args=args, train_dataset=demo_datasets(2000, 100)["train"],
                         processing_class=tokenizer)
    LocalSGDCallback.attach(trainer)  # binds the callback to the trainer, which owns the DDP wrapper
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/trl-sft-diloco")
    parser.add_argument("--max_steps", type=int, default=32)
    parser.add_argument("--sync_every", type=int, default=8)
    args = parser.parse_args(argv)
    trainer = build_trainer(args.output_dir, args.max_steps, args.sync_every)
    trainer.train()
    trainer.save_model()  # the global model


if __name__ == "__main__":
    main()
