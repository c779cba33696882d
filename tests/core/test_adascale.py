"""AdaScale / LocalAdaScale ("On the Choice of Learning Rate for Local SGD"): the gain ratio against values worked out by hand from Eq. 14, and the
2-process estimates of σ² and G against the same statistics computed directly from the ranks' gradients."""

from __future__ import annotations

import pytest

from hf_localsgd.core.metrics import METRICS, PREFIX
from hf_localsgd.core.adascale import GainRatio, gain_ratio, gradient_statistics


def test_gain_ratio_by_hand():
    # No gradient noise: more workers do not help, ρ = 1, whatever K and H.
    assert gain_ratio(G=2.0, sigma2=0.0, K=8, H=16) == 1.0
    # H = 1 is AdaScale (Eq. 9/21): (G + σ²) / (G + σ²/K) = 4 / 1.75.
    assert gain_ratio(G=1.0, sigma2=3.0, K=4, H=1) == pytest.approx(4 / 1.75)
    # H = 5, c = 1: a = 1 + 3/4 = 1.75, sqrt(1.75² + 3·4·1·3) = sqrt(39.0625) = 6.25, ρ = 2·4 / (1.75 + 6.25) = 1.
    assert gain_ratio(G=1.0, sigma2=3.0, K=4, H=5, c=1.0) == pytest.approx(1.0)
    # c = 0 is AdaScale at any H; c in between interpolates.
    assert gain_ratio(G=1.0, sigma2=3.0, K=4, H=5, c=0.0) == pytest.approx(4 / 1.75)
    assert 1.0 < gain_ratio(G=1.0, sigma2=3.0, K=4, H=5, c=0.5) < 4 / 1.75
    # Noise dominates: ρ -> K, the linear scaling rule.
    assert gain_ratio(G=1e-12, sigma2=1.0, K=8, H=16) == pytest.approx(8.0, rel=1e-4)


def test_gradient_statistics_by_hand():
    # g_1 = (1, 2), g_2 = (1, -1): mean_k ‖g_k‖² = 3.5, ḡ = (1, 0.5), ‖ḡ‖² = 1.25.
    sigma2, G = gradient_statistics(mean_sq_norm=3.5, sq_norm_of_mean=1.25, K=2)
    assert sigma2 == pytest.approx((5 + 2) / 1 - 2 / 1 * 1.25)  # Eq. 15 as written: 4.5
    assert G == pytest.approx(1.25 - 4.5 / 2)
    smoothed = GainRatio(K=2, c=1.0, ema=0.5)
    smoothed.update(3.5, 1.25, H=4)
    smoothed.update(3.5 + 2.0, 1.25 + 2.0, H=4)  # σ² 4.5 again, G + 2
    assert (smoothed.sigma2, smoothed.G) == pytest.approx((4.5, G + 1.0))


def test_local_adascale_on_two_processes(core_runs):
    r0, r1 = core_runs["adascale"]
    logs, stats = r0["round_logs"], r0["stats"]
    ratios = [[log["local_sgd/gain_ratio"] for log in r["round_logs"]] for r in (r0, r1)]
    assert {key for log in logs for key in log if key.startswith(PREFIX)} <= {PREFIX + name for name in METRICS}
    assert ratios[0] == ratios[1]  # every rank computed the same ρ
    # Each sync carries the statistics of the previous round's first gradients (the first sync: its own).
    assert len(logs) >= 2
    for log, expected in zip(logs, stats):
        assert log["local_sgd/sigma2"] == pytest.approx(expected["sigma2"], rel=1e-3)
        assert log["local_sgd/G"] == pytest.approx(expected["G"], rel=1e-3, abs=1e-6 * abs(expected["sigma2"]))
        assert log["local_sgd/gain_ratio"] == pytest.approx(
            gain_ratio(expected["G"], expected["sigma2"], K=2, H=3, c=1.0), rel=1e-3)
    # The inner lr is ρ · γ(s) with the linear schedule read at the scale-invariant step s, s += ρ per step...
    total = 0.0
    for lr, s, rho in r0["lrs"]:
        assert s == pytest.approx(total)
        assert lr == pytest.approx(rho * 0.01 * (12 - int(s)) / 12)
        total += rho
    # ...and training stops as soon as s reaches the base-case budget of 12 steps (or at max_steps).
    assert any(rho > 1 for _, _, rho in r0["lrs"])
    cumulative = [sum(rho for _, _, rho in r0["lrs"][: t + 1]) for t in range(len(r0["lrs"]))]
    expected_steps = next((t + 1 for t, s in enumerate(cumulative) if s >= 12), 12)
    assert r0["global_step"] == len(r0["lrs"]) == expected_steps
    assert r0["scale_invariant_step"] == pytest.approx(total)
