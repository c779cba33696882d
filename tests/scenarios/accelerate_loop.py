"""The README's plain Accelerate loop on 2 processes: no Trainer, the engine alone. 10 steps with H = 4, then the
final partial round; with the option `resume`, the same loop stopped after step 6 (mid-round), saved with the
per-rank checkpoint helpers, and continued by fresh objects in the same processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from common import count_collectives, dataset, digest, flat_params, main, tiny_model
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from hf_localsgd import RoundEngine, resume_rank_state, save_rank_state


STEPS, SAVE_AT = 10, 6


def build():
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(dataset().remove_columns("start").with_format("torch"), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    engine = RoundEngine(accelerator.unwrap_model(model), sync_every=4, outer_optimizer="nesterov")
    return accelerator, model, optimizer, loader, engine


def train(accelerator, model, optimizer, batches, engine, steps: int) -> list[float]:
    losses = []
    for _, batch in zip(range(steps), batches):
        with accelerator.no_sync(model):  # inner steps: no gradient all-reduce
            loss = model(**batch).loss
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        engine.step()  # every 4th step: one all-reduce of the outer gradient and an outer step
        losses.append(loss.item())
    return losses


def run(out_dir: str, mode: str = "plain") -> dict:
    accelerator, model, optimizer, loader, engine = build()
    hook_calls = []
    model.register_comm_hook(None, lambda pg, bucket: hook_calls.append(1) or default_hooks.allreduce_hook(pg, bucket))
    counts = count_collectives()
    if mode == "plain":
        losses = train(accelerator, model, optimizer, iter(loader), engine, STEPS)
        engine.finish()  # the last, partial round; the model holds the global model
        return {"hash": digest(flat_params(model)), "ddp_hook_calls": len(hook_calls),
                "engine_all_reduce": counts["all_reduce"], "num_syncs": engine.num_syncs, "losses": losses}

    # resume: the full run, then the interrupted one continued from its checkpoint
    train(accelerator, model, optimizer, iter(loader), engine, STEPS)
    engine.finish()
    full = digest(flat_params(model))
    accelerator, model, optimizer, loader, engine = build()
    train(accelerator, model, optimizer, iter(loader), engine, SAVE_AT)
    checkpoint = f"{out_dir}/checkpoint-{SAVE_AT}"
    save_rank_state(checkpoint, engine, optimizer)
    accelerator.wait_for_everyone()
    accelerator, model, optimizer, loader, engine = build()  # fresh weights, optimizer and engine
    resumed_from = resume_rank_state([checkpoint], engine, optimizer)
    position = (engine.num_steps, engine.inner_step, engine.num_syncs)
    train(accelerator, model, optimizer, iter(accelerator.skip_first_batches(loader, SAVE_AT)), engine,
          STEPS - SAVE_AT)
    engine.finish()
    return {"full": full, "resumed": digest(flat_params(model)), "resumed_from": resumed_from, "position": position}


if __name__ == "__main__":
    main(run)
