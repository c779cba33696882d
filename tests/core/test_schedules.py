"""Communication schedules: H per round from the step (and the inner lr)."""

from __future__ import annotations


from hf_localsgd.core.schedules import count_rounds, sync_every_schedule


def test_ramps():
    linear = sync_every_schedule("linear", 8, 2, start_step=10, end_step=30)
    assert [linear(s) for s in (0, 10, 20, 30, 99)] == [2, 2, 5, 8, 8]
    stepwise = sync_every_schedule("stepwise", 8, 2, start_step=0, end_step=40, stages=3)
    assert [stepwise(s) for s in (0, 13, 14, 27, 39, 40)] == [2, 2, 5, 8, 8, 8]
    assert sync_every_schedule("constant", 8, 2, 0, 40) == 8
    assert count_rounds(linear, 10, 30) == len([2, 3, 4, 5, 6]) and count_rounds(4, 0, 10) == 3  # 10+2+3+4+5+6=30


def test_inverse_lr_keeps_lr_times_h_constant():
    lr = [1.0]
    schedule = sync_every_schedule("inverse_lr", 16, 2, 0, 100, current_lr=lambda: lr[0], peak_lr=1.0,
                                   lr_warmup_end=5)
    assert schedule(0) == 2  # the lr is still warming up
    for value, h in ((1.0, 2), (0.5, 4), (0.25, 8), (0.2, 10), (0.1, 16), (0.01, 16), (0.0, 16)):
        lr[0] = value
        assert schedule(10) == h, value
