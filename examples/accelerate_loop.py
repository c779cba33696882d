"""A plain Accelerate loop with DiLoCo (README, section 3): no Trainer, the round engine alone, with per-rank
checkpoints that resume bit-exactly.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml examples/accelerate_loop.py

Offline and CPU-sized (under a minute on 2 CPU processes): a tiny GPT-Neo from a config on the package's
built-in stories (`pip install -e ".[recipes]"`). On a machine without a GPU set ACCELERATE_USE_CPU=true: the
multi-GPU launcher does not pass the config's use_cpu on, and the engine stops with that advice otherwise.
Run it again with the same --output_dir and it resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator
from transformers import default_data_collator

from hf_localsgd import RoundEngine, resume_rank_state, save_rank_state
from hf_localsgd.recipes.data import DataArguments, build_lm_datasets
from hf_localsgd.recipes.demo_data import train_demo_tokenizer
from hf_localsgd.recipes.models import build_model, build_model_config


def build(seed: int = 0, sync_every: int = 8):
    """Accelerator, model (DDP-wrapped when distributed), optimizer, loader and engine."""
    accelerator = Accelerator()
    tokenizer = train_demo_tokenizer()
    with accelerator.main_process_first():
        train, _ = build_lm_datasets(DataArguments(block_size=64), tokenizer)
    torch.manual_seed(seed)  # every rank starts from the same model (the engine also broadcasts rank 0's)
    model = build_model(build_model_config("demo", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=8, collate_fn=default_data_collator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    engine = RoundEngine(model, sync_every=sync_every, outer_optimizer="nesterov")  # DDP wrapper: buffers stay local
    return accelerator, model, optimizer, loader, engine


def train(accelerator, model, optimizer, batches, engine, steps: int, save_every: int = 0, output_dir: str = ""):
    """`steps` inner steps from where the engine is; every `save_every` steps a checkpoint of every rank."""
    losses = []
    for _, batch in zip(range(steps), batches):
        with accelerator.no_sync(model):  # inner steps: no gradient all-reduce
            loss = model(**batch).loss
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        engine.step()  # every sync_every-th step: one all-reduce of the outer gradient, one outer step
        losses.append(loss.item())
        if save_every and engine.num_steps % save_every == 0:
            save_rank_state(os.path.join(output_dir, f"checkpoint-{engine.num_steps}"), engine, optimizer)
    return losses


def last_checkpoint(output_dir: str) -> str | None:
    steps = [int(n.split("-")[1]) for n in os.listdir(output_dir) if n.startswith("checkpoint-")] if os.path.isdir(
        output_dir) else []
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/accelerate-loop")
    parser.add_argument("--max_steps", type=int, default=48)
    parser.add_argument("--save_every", type=int, default=20)
    args = parser.parse_args(argv)

    accelerator, model, optimizer, loader, engine = build()
    checkpoint = last_checkpoint(args.output_dir)
    if checkpoint is not None and resume_rank_state([checkpoint], engine, optimizer):  # every rank, or none
        accelerator.print(f"resumed from {checkpoint} at step {engine.num_steps}")
    batches = iter(accelerator.skip_first_batches(loader, engine.num_steps))  # the batches already seen
    losses = train(accelerator, model, optimizer, batches, engine, args.max_steps - engine.num_steps,
                   args.save_every, args.output_dir)
    engine.finish()  # the last, partial round; the global model stays in the model
    accelerator.print(f"{engine.num_syncs} syncs over {engine.num_steps} steps, "
                      f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "nothing left to train")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
