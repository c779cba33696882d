"""Outer optimizers and outer learning-rate schedules (docs/methods.md, "The outer step").

The outer optimizer treats the averaged outer gradient ``Δ = mean_k (x_r - x_k)`` as the gradient of the
global model ``x_r``. All three optimizers work on any list of tensors, but the sync unit hands them a
single flat float32 tensor so that an outer step is a handful of fused vector operations.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


from .options import OUTER_DEFAULTS


class ScheduleFreeSGD(torch.optim.Optimizer):
    """Schedule-free SGD ("The Road Less Scheduled", Defazio et al. 2024, arXiv:2405.15682), the
    ``SGDScheduleFree`` of the ``schedulefree`` package without warm-up and without weight decay, as the outer
    optimizer of "Understanding Outer Optimizers in Local SGD" (arXiv:2509.10439, App. A.1.4).

    It keeps three sequences: ``z`` (plain SGD iterates), ``x`` (their weighted average, the model to
    evaluate) and ``y = (1 - β) z + β x`` (where gradients are taken). The parameters hold ``y`` at all
    times; ``averaged(p)`` returns ``x`` without touching ``y``, so switching between training and
    evaluation never perturbs the training trajectory (unlike the package's in-place ``eval()``/``train()``
    round trip, which is not bit-exact).
    """

    def __init__(self, params, lr: float = 2.0, momentum: float = 0.2, weight_lr_power: float = 2.0):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"schedule-free momentum must be in (0, 1), got {momentum}")
        defaults = dict(lr=lr, momentum=momentum, weight_lr_power=weight_lr_power, weight_sum=0.0, lr_max=0.0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None, grad_divisor: float = 1.0):
        """One step on the gradients divided by ``grad_divisor``, folded into the step sizes (no pass of its
        own; ``.grad`` is left as it is)."""
        loss = closure() if closure is not None else None
        inv_scale = 1.0 / grad_divisor
        for group in self.param_groups:
            lr, beta = group["lr"], group["momentum"]
            # Iterate weights c_{t+1} = w_t / sum_{i<=t} w_i with w_t = lr_max^power (r = 0 in the paper):
            # with a constant lr this is the uniform average c_{t+1} = 1 / (t + 1).
            group["lr_max"] = max(lr, group["lr_max"])
            weight = group["lr_max"] ** group["weight_lr_power"]
            group["weight_sum"] += weight
            ckp1 = weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                z = state["z"]
                # y_{t+1} = (1 - c) y_t + c z_t + lr (β (1 - c) - 1) g  and  z_{t+1} = z_t - lr g,
                # which keeps y = (1 - β) z + β x without ever storing x.
                p.lerp_(z, ckp1)
                p.add_(p.grad, alpha=lr * (beta * (1.0 - ckp1) - 1.0) * inv_scale)
                z.sub_(p.grad, alpha=lr * inv_scale)
        return loss

    @torch.no_grad()
    def averaged(self, p: torch.Tensor) -> torch.Tensor:
        """The evaluation point ``x = (y - (1 - β) z) / β`` for parameter ``p`` (a new tensor)."""
        state = self.state.get(p)
        if not state or "z" not in state:
            return p.detach().clone()  # no step taken yet: x = y = z
        beta = next(g["momentum"] for g in self.param_groups if any(q is p for q in g["params"]))
        return torch.lerp(p.detach(), state["z"], 1.0 - 1.0 / beta)


def outer_lr_lambda(name: str, total_rounds: int | None, plateau_fraction: float = 0.1):
    """Multiplier of the outer lr as a function of the number of outer steps already taken."""
    if name == "constant":
        return lambda r: 1.0
    if total_rounds is None or total_rounds < 1:
        raise ValueError(f"outer_lr_scheduler={name!r} needs the total number of rounds, got {total_rounds}")
    if name == "cosine":
        return lambda r: 0.5 * (1.0 + math.cos(math.pi * min(r, total_rounds) / total_rounds))
    if name == "linear_after_plateau":
        plateau = int(plateau_fraction * total_rounds)
        decay = max(total_rounds - plateau, 1)
        return lambda r: 1.0 if r < plateau else max(0.0, (total_rounds - r) / decay)
    raise ValueError(f"outer_lr_scheduler: unknown schedule {name!r}")


def build_outer_optimizer(name: str, params, lr: float | None = None, momentum: float | None = None):
    """Build the outer optimizer ``name`` over ``params``; ``None`` picks the defaults of ``OUTER_DEFAULTS``."""
    if name not in OUTER_DEFAULTS:
        raise ValueError(f"outer_optimizer: unknown optimizer {name!r}; choose one of {tuple(OUTER_DEFAULTS)}")
    default_lr, default_momentum = OUTER_DEFAULTS[name]
    lr = default_lr if lr is None else lr
    momentum = default_momentum if momentum is None else momentum
    if name == "schedule_free":
        return ScheduleFreeSGD(params, lr=lr, momentum=momentum)
    # average is SGD with lr 1 and no momentum: x - mean_k (x - x_k) = mean_k x_k.
    params = list(params)
    kwargs = dict(lr=lr, momentum=momentum, nesterov=(name == "nesterov" and momentum > 0))
    try:
        # One fused pass over the flat tensor instead of foreach's four passes and a temporary.
        return torch.optim.SGD(params, fused=True, **kwargs)
    except RuntimeError:  # no fused SGD kernel for this device
        return torch.optim.SGD(params, **kwargs)


def outer_step(optimizer: torch.optim.Optimizer, grad_divisor: float = 1) -> None:
    """``optimizer.step()`` on the gradients divided by ``grad_divisor`` (the round engine hands over the SUM
    of the replicas' outer gradients, K·Δ), without a pass over them of its own where the optimizer allows:

    - fused torch optimizers (``fused=True`` SGD) divide inside their own pass, through the ``grad_scale``
      tensor that ``torch.amp.GradScaler`` also hands them, and leave the divided gradients in ``.grad``;
    - ``ScheduleFreeSGD`` folds the division into its step sizes and leaves ``.grad`` as it was;
    - any other optimizer gets its gradients divided in place first.

    So ``.grad`` afterwards depends on the optimizer: callers must not read it.
    """
    if grad_divisor == 1:
        optimizer.step()
    elif isinstance(optimizer, ScheduleFreeSGD):
        optimizer.step(grad_divisor=grad_divisor)
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        device = optimizer.param_groups[0]["params"][0].device
        # float32, whatever the default dtype (the fused kernels read a float); torch.full launches a fill on
        # an accelerator rather than a blocking host-to-device copy.
        optimizer.grad_scale = torch.full((), float(grad_divisor), dtype=torch.float32, device=device)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
    else:
        for group in optimizer.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, grad_divisor)
        optimizer.step()


def build_outer_scheduler(optimizer, name: str = "constant", total_rounds: int | None = None, plateau_fraction=0.1):
    return LambdaLR(optimizer, outer_lr_lambda(name, total_rounds, plateau_fraction))
