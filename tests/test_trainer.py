"""One process: LocalSGDTrainer and LocalSGDCallback glue (evaluation of the global model, errors at start)."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import GPTNeoConfig, GPTNeoForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed

from hf_localsgd import LocalSGDArguments, LocalSGDCallback, LocalSGDConfig, LocalSGDTrainer


def tiny_model():
    set_seed(0)
    return GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=16,
        attention_types=[[["global", "local"], 1]], window_size=8, bos_token_id=0, eos_token_id=0,
    ))


def data(n=64):
    ids = ((torch.randint(0, 64, (n, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(16)) % 64)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def config(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                disable_tqdm=True, save_strategy="no", learning_rate=3e-3, sync_every=4,
                outer_optimizer="schedule_free")
    base.update(kwargs)
    return LocalSGDConfig(**base)


class EvalProbe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.local_sgd.engine
        self.seen.append((state.global_step, torch.equal(flat(model), engine.global_model_params())))


def test_evaluation_between_syncs_sees_the_global_model_and_does_not_perturb_training(tmp_path):
    plain = LocalSGDTrainer(model=tiny_model(), args=config(tmp_path / "a"), train_dataset=data())
    plain.train()

    evaluated = LocalSGDTrainer(
        model=tiny_model(), args=config(tmp_path / "b", eval_strategy="steps", eval_steps=3),
        train_dataset=data(), eval_dataset=data(8),
    )
    probe = EvalProbe(evaluated)
    evaluated.add_callback(probe)
    evaluated.train()
    # Steps 3, 6, 9 fall between the syncs at 4 and 8, and Trainer evaluates the last step (10, after the
    # final partial round): each time the global model was evaluated, schedule-free's averaged x.
    assert probe.seen == [(3, True), (6, True), (9, True), (10, True)]
    assert torch.equal(flat(plain.model), flat(evaluated.model))
    # After training the model holds the global model, schedule-free's x.
    engine = evaluated.local_sgd.engine
    assert torch.equal(flat(evaluated.model), engine.global_model_params())
    assert not torch.equal(engine.global_model_params(), engine.global_params)


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


def test_trainer_needs_local_sgd_options(tmp_path):
    with pytest.raises(TypeError, match="LocalSGDConfig"):
        LocalSGDTrainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    trainer = Trainer(
        model=tiny_model(), train_dataset=data(), callbacks=[LocalSGDCallback()],
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True),
    )
    with pytest.raises(TypeError, match="LocalSGDArguments"):
        trainer.train()


def test_unattached_callback_refuses_multi_process_runs(monkeypatch):
    """Callbacks never see the DDP wrapper: rather than let DDP average gradients, stop and say what to do."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    callback = LocalSGDCallback(LocalSGDArguments())
    state = SimpleNamespace(max_steps=10, global_step=0)
    with pytest.raises(RuntimeError, match=r"LocalSGDCallback.attach\(trainer"):
        callback.on_train_begin(SimpleNamespace(n_gpu=1), state, None, model=tiny_model())


@pytest.mark.parametrize("distributed_type", ["DEEPSPEED", "FSDP"])
def test_sharded_setups_stop_at_start(distributed_type):
    callback = LocalSGDCallback(LocalSGDArguments())
    callback.trainer = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=f"DistributedType.{distributed_type}"))
    with pytest.raises(RuntimeError, match=distributed_type):
        callback.on_train_begin(SimpleNamespace(n_gpu=1), SimpleNamespace(max_steps=10, global_step=0), None,
                                model=tiny_model())


class PostfixProbe(TrainerCallback):
    """After LocalSGDCallback: what the progress bar shows after each step."""

    def __init__(self, trainer):
        self.trainer, self.postfixes = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.postfixes.append(self.trainer.local_sgd._progress.training_bar.postfix)


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
    out = capsys.readouterr().out
    assert "Local SGD: 2 outer syncs over 8 steps (1 replicas, nesterov, H=4)" in out
    assert "time in outer syncs:" in out and "last evaluation (step 8): loss" in out


class PullProbe(TrainerCallback):
    """Around LocalSGDCallback's on_step_end: how far each pseudo-synchronization pulled toward the global model,
    c in x_after - x = (1 - c)(x_before - x)."""

    def __init__(self, trainer):
        self.trainer, self.before, self.pulls = trainer, None, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        callback, engine = self.trainer.local_sgd, self.trainer.local_sgd.engine
        weights = flat(model)
        if self.before is None:  # called first: before LocalSGDCallback
            self.before = (weights, engine.inner_step + 1 < engine.sync_every, callback._inner_lr)
            return
        before, no_sync, lr = self.before
        self.before = None
        x = engine.global_params
        if callback.pseudo_sync_step and no_sync and (before - x).norm() > 0:  # (not yet moved since a sync)
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


def test_resume_true_without_a_checkpoint_is_an_error(tmp_path):
    trainer = LocalSGDTrainer(model=tiny_model(), args=config(tmp_path), train_dataset=data())
    with pytest.raises(ValueError, match="No valid checkpoint"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("trainer_class", [LocalSGDTrainer, Trainer])
def test_best_checkpoints_hold_the_state_when_pushed(trainer_class, tmp_path, monkeypatch, caplog):
    """save_strategy="best" decides to save after evaluating; a checkpoint Trainer pushes (hub_strategy) must
    already hold local_sgd_rank0.pt. LocalSGDTrainer writes it first; the callback alone can only warn."""
    args = config(tmp_path, eval_strategy="steps", eval_steps=3, save_strategy="best",
                  metric_for_best_model="loss", hub_strategy="checkpoint")
    if trainer_class is LocalSGDTrainer:
        trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data(), eval_dataset=data(8))
    else:
        trainer = Trainer(model=tiny_model(), args=args, train_dataset=data(), eval_dataset=data(8))
        LocalSGDCallback.attach(trainer)
    pushed = {}
    # Trainer pushes from _save_checkpoint when args.push_to_hub: record what the checkpoint holds then.
    monkeypatch.setattr(trainer.args, "push_to_hub", True)
    monkeypatch.setattr(trainer, "_push_from_checkpoint", lambda folder: pushed.update({folder: os.listdir(folder)}))
    with caplog.at_level(logging.WARNING, logger="hf_localsgd"):
        trainer.train()
    assert pushed  # at least the first evaluation is a new best
    has_state = ["local_sgd_rank0.pt" in files for files in pushed.values()]
    warned = "hub_strategy='checkpoint' lack them" in caplog.text
    if trainer_class is LocalSGDTrainer:
        assert all(has_state) and not warned
    else:
        assert not any(has_state) and warned
    for folder in pushed:  # either way the local checkpoints have it in the end
        assert os.path.isfile(os.path.join(folder, "local_sgd_rank0.pt"))
