"""Communication schedules: the number of inner steps H of the round that starts at a given step.

"Communicate often early, rarely later": early training behaves as O(K/T), where local steps barely help
("Faster Convergence of Local SGD for Over-Parameterized Models", arXiv:2201.12719, §4.1), and the
outer-optimizer study (arXiv:2509.10439, App. A.1.5) suggests growing H as the inner learning rate decays.
Each schedule is a deterministic function of the step, or of the step and the inner learning rate, which
every rank shares, so all ranks agree on every sync step without communicating.
"""

from __future__ import annotations

import math
from typing import Callable

from .options import LocalSGDOptions


def sync_every_schedule(
    kind: str,
    sync_every: int,
    sync_every_min: int,
    start_step: int,
    end_step: int,
    stages: int = 4,
    current_lr: Callable[[], float] | None = None,
    peak_lr: float | None = None,
    lr_warmup_end: int = 0,
) -> int | Callable[[int], int]:
    """H as a function of the number of steps already taken (an int for ``constant``).

    - ``constant``: ``sync_every``.
    - ``linear``: from ``sync_every_min`` at ``start_step`` (the first local step) up to ``sync_every`` at
      ``end_step``, linearly in the step.
    - ``stepwise``: the same ramp in ``stages`` equal spans of steps, constant within each.
    - ``inverse_lr``: ``H = floor(sync_every_min · peak_lr / lr)``, clipped to [sync_every_min, sync_every],
      where lr is the inner learning rate when the round starts (``current_lr()``) and ``peak_lr`` the
      schedule's peak (``sync_every_min`` until ``lr_warmup_end``, while the lr still ramps up). A replica's
      drift from the others grows with lr·H, so this keeps lr·H, and the drift per round, about constant
      as the learning rate decays (our rule, after the outer-optimizer study's suggestion). It depends on the step and
      the lr only, so a resumed run makes the same choices.
    """
    if kind == "constant":
        return sync_every
    span = max(end_step - start_step, 1)

    if kind == "linear":
        def schedule(step: int) -> int:
            progress = min(max(step - start_step, 0) / span, 1.0)
            return round(sync_every_min + progress * (sync_every - sync_every_min))
    elif kind == "stepwise":
        def schedule(step: int) -> int:
            stage = min(int(stages * max(step - start_step, 0) / span), stages - 1)
            return round(sync_every_min + stage * (sync_every - sync_every_min) / max(stages - 1, 1))
    elif kind == "inverse_lr":
        if current_lr is None or peak_lr is None:
            raise ValueError("sync_every_schedule='inverse_lr' needs the inner learning rate and its peak")

        def schedule(step: int) -> int:
            lr = current_lr()
            if step < lr_warmup_end or lr >= peak_lr:  # the lr is still ramping up: communicate often
                return sync_every_min
            if lr <= 0:
                return sync_every
            return int(min(max(math.floor(sync_every_min * peak_lr / lr), sync_every_min), sync_every))
    else:
        raise ValueError(f"sync_every_schedule: unknown schedule {kind!r}")
    return schedule


def build_sync_schedule(
    options: LocalSGDOptions,
    total_steps: int | None,
    optimizer=None,
    peak_lr: float | None = None,
    lr_warmup_steps: int = 0,
) -> int | Callable[[int], int]:
    """The H schedule the options describe, over local steps from the warm-up's end to ``total_steps``;
    ``inverse_lr`` reads the inner lr from ``optimizer``."""
    if options.sync_every_schedule in ("linear", "stepwise") and total_steps is None:
        raise ValueError(f"sync_every_schedule: {options.sync_every_schedule!r} ramps up over the run: give the "
                         "engine total_steps")
    if options.sync_every_schedule == "inverse_lr" and optimizer is None:
        raise ValueError("sync_every_schedule: 'inverse_lr' follows the inner lr: give the engine the optimizer")
    current_lr = None if optimizer is None else (lambda: optimizer.param_groups[0]["lr"])
    return sync_every_schedule(
        options.sync_every_schedule, options.sync_every, options.sync_every_min,
        options.local_sgd_warmup_steps, total_steps or 0, stages=options.sync_every_stages,
        current_lr=current_lr, peak_lr=peak_lr, lr_warmup_end=lr_warmup_steps,
    )


def total_rounds(options: LocalSGDOptions, schedule: int | Callable[[int], int], total_steps: int | None) -> int | None:
    """The rounds a decaying outer lr schedule spreads over (None for a constant outer lr)."""
    if options.outer_lr_scheduler == "constant":
        return None
    if total_steps is None:
        raise ValueError(f"outer_lr_scheduler: {options.outer_lr_scheduler!r} decays over the run: give the engine "
                         "total_steps")
    return count_rounds(schedule, options.local_sgd_warmup_steps, total_steps)


def peak_lr(optimizer=None, lr_scheduler=None) -> float | None:
    """The inner lr schedule's peak (its base lr), for the rules that follow the inner lr."""
    if lr_scheduler is not None and getattr(lr_scheduler, "base_lrs", None):
        return lr_scheduler.base_lrs[0]
    if optimizer is not None:
        group = optimizer.param_groups[0]
        return group.get("initial_lr", group["lr"])
    return None


def count_rounds(sync_every: int | Callable[[int], int], start_step: int, end_step: int) -> int:
    """Rounds between ``start_step`` and ``end_step`` (the last one possibly partial) for a step-based H."""
    rounds, step = 0, start_step
    while step < end_step:
        step += sync_every if isinstance(sync_every, int) else sync_every(step)
        rounds += 1
    return max(rounds, 1)
