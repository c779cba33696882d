"""Round hooks: the variants of the round as self-contained objects (`build.py` makes them from the options).

A hook holds all of one variant's logic and state (PALSGD in `palsgd.py`, AdaScale / LocalAdaScale in
`adascale.py`); the engine calls it at fixed points and knows nothing else about it. Per inner step, in this
order (`RoundEngine`'s docstring shows the loop):

    begin_step()              the step starts (PALSGD draws whether it is a pseudo-synchronization)
    step_lrs(optimizer)       the inner lrs of this step's optimizer step, or None to keep the schedule's
    skips_gradient_step       True when the step's forward and backward are not needed
    before_optimizer_step()   the gradients are ready (AdaScale keeps a round's first ones)
    end_step()                after the optimizer step, before the engine counts it (PALSGD's pull)

and per sync: `sync_payload()` gives floats to sum over the replicas together with the outer gradient (no
extra collective, summed in float32 whatever the wire dtype of the outer gradient), `after_sync(summed,
sync_every)` receives their sum and the H of the round that starts now, and returns the round's metrics.
`should_stop` ends training early; `state_dict()` holds what an exact resume needs (kept under the hook's
`name` in the engine's state). A hook whose `strict_resume` is set refuses a resume that would switch it on or
off (its state cannot be made up or dropped exactly); the others start afresh.
"""

from __future__ import annotations

import torch


class RoundHook:
    """Base class: every point is a no-op. ``name`` identifies the hook in checkpoints; ``option`` names the
    setting that switches it on, for errors; ``sets_inner_lr`` says that ``step_lrs`` gives the step's lrs."""

    name = ""
    option = ""
    sets_inner_lr = False
    strict_resume = True

    def attach(self, engine) -> None:
        self.engine = engine

    def begin_step(self) -> None:
        pass

    def step_lrs(self, optimizer: torch.optim.Optimizer) -> list[float] | None:
        return None

    @property
    def skips_gradient_step(self) -> bool:
        return False

    def before_optimizer_step(self) -> None:
        pass

    def end_step(self) -> None:
        pass

    @property
    def should_stop(self) -> bool:
        return False

    def sync_payload(self) -> torch.Tensor | None:
        return None

    def after_sync(self, summed: torch.Tensor | None, sync_every: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_hooks(hooks: list[RoundHook]) -> None:
    names = [hook.name for hook in hooks]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"hooks: every round hook needs a name of its own (its key in checkpoints), got {names}")
    setting = [hook.name for hook in hooks if hook.sets_inner_lr]
    if len(setting) > 1:
        raise ValueError(f"hooks: {setting} all set the inner lr of each step; only one hook may")
