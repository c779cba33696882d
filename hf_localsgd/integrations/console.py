"""What a run shows on the console: the round on the Trainer's progress bar, and a summary at the end."""

from __future__ import annotations

import math

from ..core.engine import RoundEngine
from ..core.metrics import format_bytes


def progress_postfix(engine: RoundEngine, step_seconds: float, finished: bool = False) -> str:
    """The progress bar's postfix after a step: the warm-up's progress, or the round and the time to its sync;
    after the last step, the syncs done."""
    if finished:
        return f"{engine.num_syncs} syncs done"
    if engine.in_warmup:
        return f"warm-up {engine.num_steps}/{engine.warmup_steps}"
    left = engine.sync_every - engine.inner_step
    return f"round {engine.num_syncs + 1}, sync in {left} steps ({left * step_seconds:.1f}s)"


def summary(engine: RoundEngine, log_history: list[dict], seconds: float) -> str:
    """A few lines on what training communicated, for the end of training."""
    ddp_bytes = engine.data_parallel_bytes
    lines = [
        f"Local SGD: {engine.num_syncs} outer syncs over {engine.num_steps} steps "
        f"({engine.world_size} replicas, {engine.options.outer_optimizer}, H={engine.sync_every})",
        f"  sent per rank: {format_bytes(engine.bytes_sent)}"
        + (f" ({engine.bytes_sent / ddp_bytes:.1%} of data-parallel training's)" if ddp_bytes else ""),
        f"  time in outer syncs: {engine.seconds_in_sync:.1f}s of {seconds:.1f}s "
        f"({engine.seconds_in_sync / max(seconds, 1e-9):.1%}); the rest is computation and Trainer's own work",
    ]
    evaluation = next((log for log in reversed(log_history) if "eval_loss" in log), None)
    if evaluation is not None:
        ppl = evaluation.get("eval_perplexity", math.exp(min(evaluation["eval_loss"], 700)))
        lines.append(f"  last evaluation (step {evaluation['step']}): loss {evaluation['eval_loss']:.4f}, "
                     f"perplexity {ppl:.2f}")
    return "\n".join(lines)
