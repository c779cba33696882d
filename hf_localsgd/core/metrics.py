"""The per-sync metrics: their names, defined once, and how they are computed from one sync's sums.

The engine fills `RoundEngine.last_metrics` with the short names below; the Trainer glue logs them with the
`PREFIX` (`local_sgd/drift`, ...), and `hf-localsgd plot` reads them back by `logged(name)`. No torch here,
so the plotting tool stays light.
"""

from __future__ import annotations

import math


PREFIX = "local_sgd/"

# name: meaning (README's "Monitoring" section says the same in prose)
METRICS = {
    "round": "outer syncs so far",
    "sync_every": "H of the round that just ended",
    "outer_lr": "outer learning rate of the step just taken",
    "outer_grad_norm": "‖Δ‖, the norm of the averaged outer gradient",
    "cosine_similarity": "mean pairwise cosine between the replicas' outer gradients",
    "drift": "mean squared distance of the replicas to their average, before the sync",
    "sync_seconds": "wall-clock time of the sync",
    "sync_wait_seconds": "how long the inner loop waited for outer-gradient sums in flight (overlapped syncs)",
    "skipped_syncs": "syncs skipped so far because the summed outer gradient was not finite",
    "bytes_sent": "bytes this rank sent in the sync",
    "bytes_total": "bytes this rank sent so far (warm-up all-reduces included)",
    "ddp_bytes_total": "bytes data-parallel training would have sent for the same steps",
    "bytes_vs_ddp": "bytes_total / ddp_bytes_total",
    "pseudo_syncs": "PALSGD: this rank's pseudo-synchronizations in the round",
    "gain_ratio": "lr scaling: the gain ratio ρ",
    "sigma2": "lr scaling: the smoothed gradient variance σ²",
    "G": "lr scaling: the smoothed squared gradient norm G",
    "scale_invariant_step": "lr scaling: the scale-invariant step s",
}


def logged(name: str) -> str:
    """The key a metric has in the Trainer's logs."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    return PREFIX + name


def ring_bytes(payload_bytes: float, world_size: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``payload_bytes`` (reduce-scatter + all-gather)."""
    return 2 * (world_size - 1) / world_size * payload_bytes


def outer_gradient_metrics(mean_sq_norm: float, sq_norm_of_mean: float, world_size: int) -> dict[str, float]:
    """The norm, drift and cosine of one sync, from mean_k ‖Δ_k‖² and ‖Δ‖² (Δ = mean_k Δ_k)."""
    metrics = {
        "outer_grad_norm": math.sqrt(sq_norm_of_mean),
        # mean_k ‖x_k - x̄‖² = mean_k ‖Δ_k - Δ‖² = mean_k ‖Δ_k‖² - ‖Δ‖²
        "drift": max(mean_sq_norm - sq_norm_of_mean, 0.0),
    }
    k = world_size
    if k > 1 and mean_sq_norm > 0:
        # Σ_{k≠l} <Δ_k, Δ_l> = ‖Σ_k Δ_k‖² - Σ_k ‖Δ_k‖², over k(k-1) ordered pairs, divided by the mean ‖Δ_k‖²:
        # the mean pairwise cosine, exact when the replicas' outer gradients have equal norms.
        metrics["cosine_similarity"] = (k * sq_norm_of_mean - mean_sq_norm) / ((k - 1) * mean_sq_norm)
    return metrics


def traffic_metrics(sent: float, total: float, data_parallel_total: float) -> dict[str, float]:
    """The bytes of one sync, of all so far, and what data-parallel training would have sent."""
    metrics = {"bytes_sent": sent, "bytes_total": total, "ddp_bytes_total": data_parallel_total}
    if data_parallel_total > 0:
        metrics["bytes_vs_ddp"] = total / data_parallel_total
    return metrics


def format_bytes(n: float) -> str:
    """``n`` bytes in the unit that fits (B, kB, MB, GB, TB; powers of 1000), 3 significant digits."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
