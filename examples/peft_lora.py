"""PEFT LoRA with `LocalSGDTrainer`: only the adapters are trained, so only they are averaged and communicated.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml examples/peft_lora.py

Offline and CPU-sized (about a minute on 2 CPU processes): a tiny GPT-Neo from a config with LoRA adapters on its
attention projections, on the package's built-in stories (`pip install -e ".[recipes]" peft`). The engine averages
the trainable parameters alone: each outer sync moves the adapters' bytes, not the model's, and the frozen base
weights stay as they were on every rank. On a machine without a GPU keep `use_cpu=True` (or launch with
ACCELERATE_USE_CPU=true).
"""

from __future__ import annotations

import argparse

from peft import LoraConfig, get_peft_model
from transformers import default_data_collator, set_seed

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer
from hf_localsgd.recipes.data import DataArguments, build_lm_datasets
from hf_localsgd.recipes.demo_data import train_demo_tokenizer
from hf_localsgd.recipes.models import build_model, build_model_config


def build_trainer(output_dir: str, max_steps: int = 32, sync_every: int = 8) -> LocalSGDTrainer:
    tokenizer = train_demo_tokenizer()
    train, held_out = build_lm_datasets(DataArguments(block_size=64, max_eval_samples=32), tokenizer)
    set_seed(0)  # every rank builds the same model: local-SGD replicas start from one global model
    base = build_model(build_model_config("demo", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    args = LocalSGDConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=sync_every, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        sync_every=sync_every, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9,
    )
    return LocalSGDTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                           data_collator=default_data_collator)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/peft-lora-diloco")
    parser.add_argument("--max_steps", type=int, default=32)
    args = parser.parse_args(argv)
    trainer = build_trainer(args.output_dir, args.max_steps)
    trainer.train()
    held_out = trainer.evaluate()  # every rank: evaluation gathers across them
    if trainer.is_world_process_zero():
        print(f"averaged {trainer.local_sgd.engine.flat.numel:,} adapter parameters per sync; "
              f"held-out loss {held_out['eval_loss']:.3f}")
    trainer.save_model()  # the global adapters (PEFT saves the adapter weights)


if __name__ == "__main__":
    main()
