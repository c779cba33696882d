"""One process: LocalSGDCallback on other trainers, the errors it gives at start, the progress bar and summary,
and the per-step variants (communication schedules, PALSGD's pull) through Trainer's events."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from tiny import data, flat, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from hf_localsgd import LocalSGDArguments, LocalSGDCallback, LocalSGDConfig, LocalSGDTrainer


def config(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                disable_tqdm=True, save_strategy="no", learning_rate=3e-3, sync_every=4,
                outer_optimizer="schedule_free")
    base.update(kwargs)
    return LocalSGDConfig(**base)


def test_callback_with_another_trainer_and_separate_options(tmp_path, caplog):
    """Plain `Trainer` + `callbacks=[...]` works in a single process; world size 1 is logged once."""
    options = LocalSGDArguments(sync_every=3, outer_optimizer="nesterov")
    trainer = Trainer(
        model=tiny_model(), train_dataset=data(), callbacks=[LocalSGDCallback(options)],
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=7, per_device_train_batch_size=4, report_to=[],
                               use_cpu=True, disable_tqdm=True, save_strategy="no"),
    )
    with caplog.at_level(logging.INFO, logger="hf_localsgd"):
        trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LocalSGDCallback))
    assert callback.engine.num_syncs == 3  # steps 3, 6, and the final partial round
    assert sum("world size 1" in r.getMessage() for r in caplog.records) == 1
    assert "hf_localsgd" in trainer.model.model_tags


def test_callback_needs_local_sgd_options(tmp_path):
    """Said when the Trainer is built (the callback's on_init_end), not when training starts."""
    with pytest.raises(TypeError, match="LocalSGDArguments"):
        Trainer(
            model=tiny_model(), train_dataset=data(), callbacks=[LocalSGDCallback()],
            args=TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True),
        )


def test_unattached_callback_refuses_multi_process_runs(monkeypatch):
    """Callbacks never see the DDP wrapper: rather than let DDP average gradients, stop and say what to do."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    callback = LocalSGDCallback(LocalSGDArguments())
    state = SimpleNamespace(max_steps=10, global_step=0)
    with pytest.raises(RuntimeError, match=r"LocalSGDCallback.attach\(trainer"):
        callback.on_train_begin(SimpleNamespace(n_gpu=1), state, None, model=tiny_model())
    # Given to a Trainer's constructor in callbacks=[...], it says so there (on_init_end), before training starts.
    with pytest.raises(RuntimeError, match=r"LocalSGDCallback.attach\(trainer"):
        callback.on_init_end(SimpleNamespace(world_size=2), state, None)
    callback.on_init_end(SimpleNamespace(world_size=1), state, None)


@pytest.mark.parametrize("distributed_type", ["XLA", "FSDP"])
def test_sharded_setups_stop_at_start(distributed_type):
    callback = LocalSGDCallback(LocalSGDArguments())
    callback.trainer = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=f"DistributedType.{distributed_type}"))
    with pytest.raises(RuntimeError, match=distributed_type):
        callback.on_train_begin(SimpleNamespace(n_gpu=1), SimpleNamespace(max_steps=10, global_step=0), None,
                                model=tiny_model())
    # attach (what LocalSGDTrainer's constructor calls) refuses already, before Trainer prepares the model
    added = []
    trainer = SimpleNamespace(accelerator=callback.trainer.accelerator, args=SimpleNamespace(n_gpu=1),
                              add_callback=added.append)
    with pytest.raises(RuntimeError, match=distributed_type):
        LocalSGDCallback.attach(trainer, LocalSGDArguments())
    assert not added


def test_a_warmup_without_ddp_in_a_multi_process_run_is_an_error(monkeypatch):
    """Nothing would all-reduce the warm-up's gradients: the replicas would leave it different."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    model = tiny_model()
    callback = LocalSGDCallback(LocalSGDArguments(local_sgd_warmup_steps=2))
    callback.trainer = SimpleNamespace(model_wrapped=model)  # not wrapped in DDP
    with pytest.raises(RuntimeError, match="did not wrap the model in DistributedDataParallel"):
        callback.on_train_begin(SimpleNamespace(n_gpu=1, average_tokens_across_devices=False),
                                SimpleNamespace(max_steps=10, global_step=0), None, model=model)


class PostfixProbe(TrainerCallback):
    """After LocalSGDCallback: what the progress bar shows after each step."""

    def __init__(self, trainer):
        self.trainer, self.postfixes = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        progress = next(cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback))
        self.postfixes.append(progress.training_bar.postfix)


def test_console_progress_and_summary(tmp_path, capsys):
    args = config(tmp_path, max_steps=8, sync_every=4, local_sgd_warmup_steps=2, disable_tqdm=False,
                  eval_strategy="steps", eval_steps=8, outer_optimizer="nesterov")
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data(), eval_dataset=data(8))
    probe = PostfixProbe(trainer)
    trainer.add_callback(probe)
    trainer.train()
    assert probe.postfixes[0] == "warm-up 1/2"
    assert probe.postfixes[1].startswith("round 1, sync in 4 steps (")  # the warm-up is over
    assert probe.postfixes[2].startswith("round 1, sync in 3 steps (")
    assert probe.postfixes[5].startswith("round 2, sync in 4 steps (")  # right after the sync at step 6
    assert probe.postfixes[-1] == "2 syncs done"  # after the last sync, not "round 3, sync in 4 steps"
    out = capsys.readouterr().out
    assert "Local SGD: 2 outer syncs over 8 steps (1 replicas, nesterov, H=4)" in out
    assert "sent per rank: 0 B" in out  # units that fit (one process sends nothing)
    assert "time in outer syncs:" in out and "last evaluation (step 8): loss" in out


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


class PullProbe(TrainerCallback):
    """Around LocalSGDCallback's on_step_end: how far each pseudo-synchronization pulled toward the global model,
    c in x_after - x = (1 - c)(x_before - x)."""

    def __init__(self, trainer):
        self.trainer, self.before, self.pulls = trainer, None, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.local_sgd.engine
        palsgd = engine.hook("palsgd")
        weights = flat(model)
        if self.before is None:  # called first: before LocalSGDCallback
            self.before = (weights, engine.inner_step + 1 < engine.sync_every, palsgd.alpha)
            return
        before, no_sync, lr = self.before
        self.before = None
        x = engine.global_params
        if palsgd.pseudo_step and no_sync and (before - x).norm() > 0:  # (not yet moved since a sync)
            self.pulls.append((lr, 1 - ((weights - x).norm() / (before - x).norm()).item()))


@pytest.mark.parametrize("schedule", ["constant", "inverse_lr"])
def test_pseudo_sync_rate_schedule(schedule, tmp_path):
    p, eta, lr0 = 0.7, 2.0, 0.01
    args = config(tmp_path, max_steps=24, sync_every=8, outer_optimizer="nesterov", learning_rate=lr0,
                  lr_scheduler_type="linear", pseudo_sync_prob=p, pseudo_sync_rate=eta,
                  pseudo_sync_rate_schedule=schedule)
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data())
    probe = PullProbe(trainer)
    handler = trainer.callback_handler
    handler.callbacks.insert(handler.callbacks.index(trainer.local_sgd), probe)
    handler.callbacks.append(probe)
    trainer.train()
    assert len({lr for lr, _ in probe.pulls}) >= 2  # pseudo-syncs at different inner lrs
    for lr, pull in probe.pulls:  # α_t η_t / p, with α_t η_t = lr0 η under inverse_lr
        assert pull == pytest.approx((lr if schedule == "constant" else lr0) * eta / p, rel=1e-3)


def test_attach_refuses_a_data_partition_it_cannot_build(tmp_path):
    """data_partition='by_label' replaces the train sampler: a callback on another trainer cannot, so attach
    says what to do instead of training on the usual sampler."""
    trainer = Trainer(model=tiny_model(), train_dataset=data(), args=TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True))
    with pytest.raises(ValueError, match=r"^data_partition: 'by_label' .*LocalSGDTrainerMixin"):
        LocalSGDCallback.attach(trainer, LocalSGDArguments(data_partition="by_label"))


def test_the_worst_case_partition_is_for_plain_loops(tmp_path):
    """data_partition='worst_case' leaves ranks without data, which a Trainer (every rank takes the same steps)
    cannot run: attach, and so LocalSGDTrainer, say where it runs instead."""
    with pytest.raises(ValueError, match=r"^data_partition: 'worst_case' .*worst_case_shards"):
        LocalSGDTrainer(model=tiny_model(), args=config(tmp_path, data_partition="worst_case"), train_dataset=data())
