"""AdaScale and LocalAdaScale learning-rate scaling (seed 004 §5, Alg. 1, Eqs. 14, 15 and 49).

The gain ratio ρ ∈ [1, K] says how many of the K workers' gradients are "worth" a full step: ρ = 1 when the
gradients carry no noise (more workers do not help), ρ → K when noise dominates. The inner learning rate is
ρ·γ(s), where s is the scale-invariant iteration counter (s += ρ per step), so the learning-rate schedule is
stretched and training ends when s reaches the base-case budget.
"""

from __future__ import annotations

import math


LR_SCALINGS = ("none", "adascale", "local_adascale")


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
