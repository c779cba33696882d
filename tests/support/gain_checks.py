"""What the lr-scaling tests check of each sync's logged gradient statistics."""

from __future__ import annotations

import pytest

from hf_localsgd.core.adascale import gain_ratio


def check_logged_statistics(logs: list[dict], stats: list[dict], K: int, H: int) -> None:
    """Each sync's logged σ², G and ρ against the statistics of Eq. 15 computed directly from the gradients."""
    assert len(logs) >= 2
    for log, expected in zip(logs, stats):
        assert log["local_sgd/sigma2"] == pytest.approx(expected["sigma2"], rel=1e-3)
        assert log["local_sgd/G"] == pytest.approx(expected["G"], rel=1e-3, abs=1e-6 * abs(expected["sigma2"]))
        assert log["local_sgd/gain_ratio"] == pytest.approx(
            gain_ratio(expected["G"], expected["sigma2"], K=K, H=H, c=1.0), rel=1e-3)
