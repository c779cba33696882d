"""examples/accelerate_loop.py (README, section 3) on 2 processes: no Trainer, the engine alone. 10 steps with H = 4,
then the final partial round; with the option `resume`, the same loop stopped after step 6 (mid-round), saved with
the per-rank checkpoint helpers, and continued by fresh objects in the same processes."""

from __future__ import annotations

import sys
from pathlib import Path

from common import count_collectives, digest, flat_params, main
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from accelerate_loop import build, train  # noqa: E402

from hf_localsgd import resume_rank_state, save_rank_state  # noqa: E402


STEPS, SAVE_AT, H = 10, 6, 4


def run(out_dir: str, mode: str = "plain") -> dict:
    accelerator, model, optimizer, loader, engine = build(sync_every=H)
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
    accelerator, model, optimizer, loader, engine = build(sync_every=H)
    train(accelerator, model, optimizer, iter(loader), engine, SAVE_AT)
    checkpoint = f"{out_dir}/checkpoint-{SAVE_AT}"
    save_rank_state(checkpoint, engine, optimizer)
    accelerator.wait_for_everyone()
    # other weights, a fresh optimizer and engine: everything must come from the checkpoint
    accelerator, model, optimizer, loader, engine = build(seed=1, sync_every=H)
    resumed_from = resume_rank_state([checkpoint], engine, optimizer)
    position = (engine.num_steps, engine.inner_step, engine.num_syncs)
    train(accelerator, model, optimizer, iter(accelerator.skip_first_batches(loader, SAVE_AT)), engine,
          STEPS - SAVE_AT)
    engine.finish()
    return {"full": full, "resumed": digest(flat_params(model)), "resumed_from": resumed_from, "position": position}


if __name__ == "__main__":
    main(run)
