"""Communication schedules: H per round from the step (and the inner lr), and the sync steps they give."""

from __future__ import annotations

import math

import pytest

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer
from hf_localsgd.schedules import count_rounds, sync_every_schedule
from test_trainer import data, tiny_model


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


def sync_steps(trainer) -> list[tuple[int, int]]:
    return [(log["step"], log["local_sgd/sync_every"]) for log in trainer.state.log_history
            if "local_sgd/round" in log]


@pytest.mark.parametrize("schedule", ["linear", "inverse_lr"])
def test_trainer_syncs_where_the_schedule_says(schedule, tmp_path):
    steps, lr0 = 20, 0.01
    args = LocalSGDConfig(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", learning_rate=lr0, lr_scheduler_type="linear",
        logging_steps=50, sync_every=8, sync_every_min=2, sync_every_schedule=schedule,
    )
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data())
    trainer.train()

    def h(step):  # written from the rules, independently of hf_localsgd.schedules
        if schedule == "linear":
            return round(2 + min(step / steps, 1.0) * 6)
        lr = lr0 * (steps - step) / steps  # Trainer's linear decay: the lr of the step after `step`
        return min(max(math.floor(2 * lr0 / lr), 2), 8)

    expected, step = [], 0
    while step < steps:
        length = h(step)
        expected.append((min(step + length, steps), length))
        step += length
    assert sync_steps(trainer) == expected
    assert len({length for _, length in expected}) > 2  # H really changed


@pytest.mark.parametrize(
    "kwargs,field",
    [({"sync_every_min": 9}, "sync_every_min"), ({"sync_every_min": 0}, "sync_every_min"),
     ({"sync_every_stages": 0}, "sync_every_stages"), ({"sync_every_schedule": "cubic"}, "sync_every_schedule"),
     ({"sync_every_schedule": "inverse_lr", "outer_lr_scheduler": "cosine"}, "outer_lr_scheduler")],
)
def test_schedule_options_are_validated(kwargs, field, tmp_path):
    kwargs.setdefault("sync_every_schedule", "linear")
    with pytest.raises(ValueError, match=f"^{field}: "):
        LocalSGDConfig(output_dir=str(tmp_path), report_to=[], sync_every=8, **kwargs)
