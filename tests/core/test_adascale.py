"""AdaScale / LocalAdaScale ("On the Choice of Learning Rate for Local SGD"): the gain ratio against values worked out by hand from Eq. 14, and the
2-process estimates of σ² and G against the same statistics computed directly from the ranks' gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from toy import local_steps, model

from hf_localsgd import LocalSGDOptions, RoundEngine, RoundHook
from hf_localsgd.core.adascale import GainRatio, GainRatioScaling, gain_ratio, gradient_statistics, lowest_gain_ratio
from hf_localsgd.core.collectives import AllReduce
from hf_localsgd.core.flat import FlatParams
from hf_localsgd.core.metrics import METRICS, PREFIX
from hf_localsgd.core.shard import Replica
from hf_localsgd.core.sync import OuterSync


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


def test_gain_ratio_falls_below_one_at_large_H_as_published():
    # Eq. 14, K = 4, H = 16, σ² = G = 1: a = 1 + 1/4, ρ = 2·2 / (1.25 + sqrt(1.25² + 3·15·1·1)) = 4 / 8.0737 = 0.495.
    assert gain_ratio(G=1.0, sigma2=1.0, K=4, H=16) == pytest.approx(4 / (1.25 + math.sqrt(1.5625 + 45)), rel=1e-12)
    assert gain_ratio(G=1.0, sigma2=1.0, K=4, H=16) == pytest.approx(0.4954, abs=1e-4)
    # Below 1 exactly when 4(1 - 1/K)(G + σ²) < 3c(H - 1)G: K = 8, G = 1, σ² = 3, c = 1 crosses at H = 1 + 14/3.
    assert gain_ratio(G=1.0, sigma2=3.0, K=8, H=5) > 1 > gain_ratio(G=1.0, sigma2=3.0, K=8, H=6)
    # c = 0.5, K = 2, H = 33, σ² = G = 2: a = 3, sqrt(9 + 1.5·32·4) = sqrt(201); ρ = 8 / (3 + sqrt(201)).
    assert gain_ratio(G=2.0, sigma2=2.0, K=2, H=33, c=0.5) == pytest.approx(8 / (3 + math.sqrt(201)), rel=1e-12)
    # No gradient noise: ρ = 1 at any H (the base case's step), including H = 64.
    assert gain_ratio(G=5.0, sigma2=0.0, K=4, H=64) == 1.0
    # Never above K, with no clipping: G = 0 is pure noise, the linear scaling rule.
    assert gain_ratio(G=0.0, sigma2=1.0, K=8, H=64) == pytest.approx(8.0)


def test_non_finite_statistics_stop_with_the_way_out():
    with pytest.raises(FloatingPointError, match="^lr_scaling: .*not finite.*max_grad_norm"):
        gain_ratio(G=float("nan"), sigma2=1.0, K=4, H=8)
    with pytest.raises(FloatingPointError, match="^lr_scaling: "):
        GainRatio(K=2, c=1.0, ema=0.0).update(float("inf"), 1.0, H=4)
    with pytest.raises(FloatingPointError, match="^lr_scaling: the gain ratio came out"):
        gain_ratio(G=1e300, sigma2=1e300, K=4, H=8)


def test_lowest_gain_ratio_bounds_every_noise_level():
    for K, H, c in ((4, 16, 1.0), (8, 64, 1.0), (2, 3, 0.6), (1, 8, 1.0)):
        low = lowest_gain_ratio(K, H, c)
        grid = [gain_ratio(1.0, 10 ** (i / 50), K, H, c) for i in range(-400, 600)]
        assert low <= min(grid) <= low * (1 + 1e-4)
    assert lowest_gain_ratio(4, 16) == pytest.approx(0.49176, abs=1e-5)
    assert lowest_gain_ratio(8, 1) == pytest.approx(1.0) and lowest_gain_ratio(8, 32, c=0.0) == pytest.approx(1.0)


def test_rho_of_a_round_uses_that_rounds_H():
    gain = GainRatio(K=4, c=1.0, ema=0.0)
    assert gain.start_round(16) == 1.0  # no statistics yet: the base lr
    # The statistics of the round that ended (H = 2) scale the round that starts (H = 16): σ² = G = 1 from
    # mean_k ‖g_k‖² = G + σ² = 2 and ‖ḡ‖² = G + σ²/K = 1.25.
    assert gain.update(2.0, 1.25, H=16) == pytest.approx(gain_ratio(1.0, 1.0, K=4, H=16))
    assert gain.start_round(2) == pytest.approx(gain_ratio(1.0, 1.0, K=4, H=2))


def test_the_hooks_sync_sees_the_H_of_the_round_that_starts():
    class Recorder(RoundHook):
        name = "recorder"

        def __init__(self):
            self.seen = []

        def after_sync(self, summed, sync_every):
            self.seen.append((self.engine.num_steps, sync_every))
            return {}

    lengths = {0: 1, 1: 2, 3: 4, 7: 3}  # H of the round starting at each step
    recorder, m, g = Recorder(), model(), torch.Generator().manual_seed(0)
    engine = RoundEngine(m, schedule=lambda step: lengths.get(step, 5), hooks=[recorder], track_metrics=True)
    ended = []
    for _ in range(10):
        local_steps(m, 1, g)
        if engine.step():
            ended.append(engine.last_metrics["sync_every"])
    assert recorder.seen == [(1, 2), (3, 4), (7, 3), (10, 5)]
    assert ended == [1, 2, 4, 3]  # the metric is still the H of the round that ended


class FakeGroup:
    """Two replicas holding the same tensors, in one process: dist.all_reduce doubles, and records the dtypes."""

    def __init__(self, monkeypatch):
        self.wire = []
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor, group=None, async_op=False):
        self.wire.append((tensor.dtype, tensor.numel()))
        tensor.mul_(2)
        return None  # (done already: nothing to wait for)


@pytest.mark.parametrize("comm_dtype", ["bfloat16", "float32"])
def test_statistics_travel_in_float32_under_a_bfloat16_wire(monkeypatch, comm_dtype):
    group = FakeGroup(monkeypatch)
    m = model()
    flat = FlatParams(list(m.parameters()), 1e9)
    options = LocalSGDOptions(outer_optimizer="average", outer_comm_dtype=comm_dtype)
    reducer = AllReduce(None, comm_dtype)
    outer = OuterSync(Replica(flat), reducer, options, flat.device, None)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.25)
    # Near-equal statistics: 1 + 2^-20 is 1 in bfloat16.
    tail = torch.tensor([1.0 + 2.0**-20, 3.0], dtype=torch.float32)
    summed, norms = outer(tail, measure=True)
    assert summed.tolist() == [2 * (1.0 + 2.0**-20), 6.0]  # exact
    numel = flat.numel
    if comm_dtype == "bfloat16":
        assert group.wire == [(torch.bfloat16, numel), (torch.float32, 3)]
    else:
        assert group.wire == [(torch.float32, numel + 3)]  # the tail rides in the same collective
    # ‖Δ_k‖² = numel · 0.25², summed over the 2 replicas and exact in float32: mean_k ‖Δ_k‖².
    assert norms[0].item() == numel * 0.0625
    itemsize = 2 if comm_dtype == "bfloat16" else 4
    assert reducer.bytes_sent(numel, 3) == 2 * (2 - 1) / 2 * (numel * itemsize + 3 * 4)


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
    # ...and training stops as soon as s reaches the base-case budget of max_steps=12 steps, however many
    # steps that takes.
    assert any(rho > 1 for _, _, rho in r0["lrs"])
    cumulative = [sum(rho for _, _, rho in r0["lrs"][: t + 1]) for t in range(len(r0["lrs"]))]
    expected_steps = next(t + 1 for t, s in enumerate(cumulative) if s >= 12)
    assert r0["global_step"] == len(r0["lrs"]) == expected_steps
    assert r0["scale_invariant_step"] == pytest.approx(total)
