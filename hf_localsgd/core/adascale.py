"""AdaScale and LocalAdaScale learning-rate scaling ("On the Choice of Learning Rate for Local SGD", Balles,
Teja S and Archambeau, TMLR 2024, §5, Alg. 1, Eqs. 14, 15 and 49; docs/methods.md, "LocalAdaScale").

The gain ratio ρ says how many base-case steps (one worker, H = 1) one step of K workers is worth: ρ = 1 when
the gradients carry no noise (more workers do not help), ρ → K when noise dominates. With H = 1 (AdaScale)
ρ ∈ [1, K]; with H > 1 it is in (0, K] and falls below 1 when the local steps' drift outweighs the noise
averaged away (Eq. 14 as published: local SGD at large H needs a lower lr and more steps than the base run).
The inner learning rate is ρ·γ(s), where s is the scale-invariant iteration counter (s += ρ per step), so the
learning-rate schedule is stretched and training ends when s reaches the base-case budget S.
"""

from __future__ import annotations

import math

import torch

from .hooks import RoundHook


def gain_ratio(G: float, sigma2: float, K: int, H: int, c: float = 1.0) -> float:
    """Eq. 49: ρ = 2(G + σ²) / (G + σ²/K + sqrt((G + σ²/K)² + 3c(H - 1)·G·σ²)), not clipped.

    c = 1 is LocalAdaScale (Eq. 14), c = 0 AdaScale; with H = 1 both are AdaScale's (G + σ²) / (G + σ²/K).
    For G, σ² >= 0 the value is in (0, K] without clipping: the square root is at least G + σ²/K, so
    ρ <= (G + σ²) / (G + σ²/K) <= K. It is below 1 when 4(1 - 1/K)(G + σ²) < 3c(H - 1)G (e.g. K = 4, H = 16,
    σ²/G = 1: 0.495). The paper states no lower clip; the estimates of Eq. 15 can come out negative by
    chance, and are taken as 0 (no noise, or no signal) here.
    """
    if not (math.isfinite(G) and math.isfinite(sigma2)):
        raise FloatingPointError(
            f"lr_scaling: the gradient statistics are not finite (G={G}, σ²={sigma2}): a round's first gradients "
            "overflowed or were NaN; lower the learning rate or clip the gradients (max_grad_norm)"
        )
    G, sigma2 = max(G, 0.0), max(sigma2, 0.0)
    a = G + sigma2 / K
    denominator = a + math.sqrt(a * a + 3.0 * c * (H - 1) * G * sigma2)
    if denominator <= 0:  # G = σ² = 0: a zero gradient; the base case's step, ρ = 1
        return 1.0
    rho = 2.0 * (G + sigma2) / denominator
    if not math.isfinite(rho) or rho <= 0:
        raise FloatingPointError(f"lr_scaling: the gain ratio came out {rho} (G={G}, σ²={sigma2}, K={K}, H={H}, "
                                 f"c={c}): the statistics overflowed; lower the learning rate or clip the gradients")
    return rho


def lowest_gain_ratio(K: int, H: int, c: float = 1.0) -> float:
    """The smallest ρ of Eq. 49 over all noise levels σ²/G >= 0 (at most 1: σ² = 0 gives 1), a little under.

    A run that spends a budget of S scale-invariant steps takes at most ceil(S / lowest_gain_ratio) steps: the
    bound the Trainer's loop is raised to. ρ depends on G and σ² only through x = σ²/G; it falls from 1 at
    x = 0 to a minimum and rises to K as x -> ∞, so a grid over log x, then golden-section refinement.
    """
    def rho(log_x: float) -> float:
        x = 10.0**log_x
        a = 1.0 + x / K
        return 2.0 * (1.0 + x) / (a + math.sqrt(a * a + 3.0 * c * (H - 1) * x))

    grid = [i / 20 for i in range(-200, 301)]  # x from 1e-10 to 1e15
    best = min(range(len(grid)), key=lambda i: rho(grid[i]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, m2) if rho(m1) < rho(m2) else (m1, hi)
    return min(1.0, rho((lo + hi) / 2)) * (1 - 1e-9)


def gradient_statistics(mean_sq_norm: float, sq_norm_of_mean: float, K: int) -> tuple[float, float]:
    """Eq. 15 from mean_k ‖g_k‖² and ‖ḡ‖²: σ² = K/(K-1)·(mean_k ‖g_k‖² - ‖ḡ‖²), G = ‖ḡ‖² - σ²/K."""
    sigma2 = K / (K - 1) * (mean_sq_norm - sq_norm_of_mean)
    return sigma2, sq_norm_of_mean - sigma2 / K


def most_steps(budget: int, K: int, H: int, c: float) -> int:
    """The most optimizer steps a run can take to spend ``budget`` scale-invariant steps with rounds of at most
    ``H`` steps: each step adds ρ >= lowest_gain_ratio(K, H, c) to s (a warm-up step adds 1). AdaScale's ρ is
    at least 1, so its runs take at most ``budget`` steps."""
    return math.ceil(budget / lowest_gain_ratio(K, H, c))


class GainRatio:
    """The smoothed statistics, the current ρ and the scale-invariant step: the checkpointable state."""

    def __init__(self, K: int, c: float, ema: float):
        self.K, self.c, self.ema = K, c, ema
        self.sigma2: float | None = None
        self.G: float | None = None
        self.rho = 1.0
        self.scale_invariant_step = 0.0

    def update(self, mean_sq_norm: float, sq_norm_of_mean: float, H: int) -> float:
        """Fold one round's gradient statistics into the moving averages; returns the ρ of the round that
        starts now, whose length is ``H``."""
        sigma2, G = gradient_statistics(mean_sq_norm, sq_norm_of_mean, self.K)
        if self.sigma2 is None:
            self.sigma2, self.G = sigma2, G
        else:
            self.sigma2 = self.ema * self.sigma2 + (1 - self.ema) * sigma2
            self.G = self.ema * self.G + (1 - self.ema) * G
        return self.start_round(H)

    def start_round(self, H: int) -> float:
        """The ρ of a round of ``H`` steps from the statistics so far (1 before the first): Eq. 14 with the H
        of the round it scales, which a communication schedule may change from one round to the next."""
        if self.sigma2 is not None:
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
            # The gradients the optimizer uses (so after clipping) of the round's first step, and ‖g_k‖²: of the
            # part of the model this rank keeps the global model of (all of it, unless islands share it out).
            owned = engine.shard.owned
            cache = torch.empty(owned.numel + 1, dtype=torch.float32, device=owned.device)
            owned.copy_grads(cache[:-1])
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
        """``sync_every`` is the H of the round that starts now, the one the new ρ scales."""
        if summed is not None:  # the cached gradients, summed (in float32) by the outer all-reduce
            k, grad_sum = self.engine.world_size, summed[:-1]
            # Sums over this rank's part of the model; its island's ranks add theirs.
            sums = self.engine.topology.sum_within(torch.stack([summed[-1], grad_sum.dot(grad_sum)]))
            mean_sq_grad, sq_norm_of_mean = sums[0].item() / k, sums[1].item() / k**2
            self.gain.update(mean_sq_grad, sq_norm_of_mean, sync_every)
            self.cache = None
        else:
            self.gain.start_round(sync_every)
        metrics = {"gain_ratio": self.gain.rho, "scale_invariant_step": self.gain.scale_invariant_step}
        if self.gain.sigma2 is not None:
            metrics["sigma2"], metrics["G"] = self.gain.sigma2, self.gain.G
        return metrics

    def state_dict(self) -> dict:
        return {"gain": self.gain.state_dict(), "grad_cache": self.cache}

    def load_state_dict(self, state: dict) -> None:
        self.gain.load_state_dict(state["gain"])
        cache = state["grad_cache"]
        self.cache = None if cache is None else cache.to(self.engine.shard.owned.device)
