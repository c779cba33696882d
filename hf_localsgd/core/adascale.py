"""AdaScale and LocalAdaScale learning-rate scaling ("On the Choice of Learning Rate for Local SGD", Balles,
Teja S and Archambeau, TMLR 2024, §5, Alg. 1, Eqs. 14, 15 and 49; docs/methods.md, "LocalAdaScale").

The gain ratio ρ ∈ [1, K] says how many of the K workers' gradients are "worth" a full step: ρ = 1 when the
gradients carry no noise (more workers do not help), ρ → K when noise dominates. The inner learning rate is
ρ·γ(s), where s is the scale-invariant iteration counter (s += ρ per step), so the learning-rate schedule is
stretched and training ends when s reaches the base-case budget.
"""

from __future__ import annotations

import math

import torch

from .hooks import RoundHook


def gain_ratio(G: float, sigma2: float, K: int, H: int, c: float = 1.0) -> float:
    """Eq. 49: ρ = 2(G + σ²) / (G + σ²/K + sqrt((G + σ²/K)² + 3c(H - 1)·G·σ²)), clipped to [1, K].

    c = 1 is LocalAdaScale (Eq. 14), c = 0 AdaScale; with H = 1 both are AdaScale's (G + σ²) / (G + σ²/K).
    """
    G, sigma2 = max(G, 0.0), max(sigma2, 0.0)
    a = G + sigma2 / K
    denominator = a + math.sqrt(a * a + 3.0 * c * (H - 1) * G * sigma2)
    if denominator <= 0:
        return 1.0
    return min(max(2.0 * (G + sigma2) / denominator, 1.0), float(K))


def gradient_statistics(mean_sq_norm: float, sq_norm_of_mean: float, K: int) -> tuple[float, float]:
    """Eq. 15 from mean_k ‖g_k‖² and ‖ḡ‖²: σ² = K/(K-1)·(mean_k ‖g_k‖² - ‖ḡ‖²), G = ‖ḡ‖² - σ²/K."""
    sigma2 = K / (K - 1) * (mean_sq_norm - sq_norm_of_mean)
    return sigma2, sq_norm_of_mean - sigma2 / K


class GainRatio:
    """The smoothed statistics, the current ρ and the scale-invariant step: the checkpointable state."""

    def __init__(self, K: int, c: float, ema: float):
        self.K, self.c, self.ema = K, c, ema
        self.sigma2: float | None = None
        self.G: float | None = None
        self.rho = 1.0
        self.scale_invariant_step = 0.0

    def update(self, mean_sq_norm: float, sq_norm_of_mean: float, H: int) -> float:
        """Fold one round's gradient statistics into the moving averages; returns the new ρ."""
        sigma2, G = gradient_statistics(mean_sq_norm, sq_norm_of_mean, self.K)
        if self.sigma2 is None:
            self.sigma2, self.G = sigma2, G
        else:
            self.sigma2 = self.ema * self.sigma2 + (1 - self.ema) * sigma2
            self.G = self.ema * self.G + (1 - self.ema) * G
        self.rho = gain_ratio(self.G, self.sigma2, self.K, H, self.c)
        return self.rho

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("sigma2", "G", "rho", "scale_invariant_step")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class GainRatioScaling(RoundHook):
    """The round hook of lr scaling: keeps each round's first gradients, sends them with the next outer
    all-reduce, updates ρ from them, sets the inner lr to ρ · γ(s) (the lr schedule read at the scale-invariant
    step s) and asks training to stop when s reaches ``budget`` base steps."""

    name = "lr_scaling"
    option = "lr_scaling"
    sets_inner_lr = True

    def __init__(self, c: float, ema: float, budget: int | None):
        self.c, self.ema, self.budget = c, ema, budget
        self.cache: torch.Tensor | None = None  # this round's first gradients, then ‖g_k‖²

    def attach(self, engine) -> None:
        super().attach(engine)
        if engine.optimizer is None:
            raise ValueError("lr_scaling: sets the inner lr of each step: give the engine the inner optimizer and its "
                             "schedule (RoundEngine(..., optimizer=optimizer, lr_scheduler=scheduler))")
        if not hasattr(engine.lr_scheduler, "lr_lambdas"):
            raise ValueError(
                "lr_scaling: reads the lr schedule at the scale-invariant step, which needs a LambdaLR schedule "
                f"(Trainer's linear, cosine, constant, ...): give the engine one, got {type(engine.lr_scheduler).__name__}"
            )
        self.gain = GainRatio(engine.world_size, self.c, self.ema)

    def step_lrs(self, optimizer) -> list[float]:
        scheduler, gain = self.engine.lr_scheduler, self.gain
        step = int(gain.scale_invariant_step)
        return [gain.rho * base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        engine = self.engine
        if engine.world_size > 1 and not engine.in_warmup and engine.inner_step == 0 and self.cache is None:
            # The gradients the optimizer uses (so after clipping) of the round's first step, and ‖g_k‖².
            cache = torch.empty(engine.flat.numel + 1, dtype=torch.float32, device=engine.flat.device)
            engine.flat.copy_grads(cache[:-1])
            cache[-1] = cache[:-1].dot(cache[:-1])
            self.cache = cache

    def end_step(self) -> None:  # the step just taken counted for ρ base steps (1 while synchronous)
        self.gain.scale_invariant_step += 1.0 if self.engine.in_warmup else self.gain.rho

    @property
    def should_stop(self) -> bool:
        return self.budget is not None and self.gain.scale_invariant_step >= self.budget

    def sync_payload(self) -> torch.Tensor | None:
        return self.cache

    def after_sync(self, summed, sync_every: int) -> dict[str, float]:
        if summed is not None:  # the cached gradients, summed by the outer all-reduce
            k = self.engine.world_size
            grad_sum, mean_sq_grad = summed[:-1], summed[-1].item() / k
            self.gain.update(mean_sq_grad, grad_sum.dot(grad_sum).item() / k**2, sync_every)
            self.cache = None
        metrics = {"gain_ratio": self.gain.rho, "scale_invariant_step": self.gain.scale_invariant_step}
        if self.gain.sigma2 is not None:
            metrics["sigma2"], metrics["G"] = self.gain.sigma2, self.gain.G
        return metrics

    def state_dict(self) -> dict:
        return {"gain": self.gain.state_dict(), "grad_cache": self.cache}

    def load_state_dict(self, state: dict) -> None:
        self.gain.load_state_dict(state["gain"])
        cache = state["grad_cache"]
        self.cache = None if cache is None else cache.to(self.engine.flat.device)
