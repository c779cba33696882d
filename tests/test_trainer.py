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
    # attach (what LocalSGDTrainer's constructor calls) refuses already, before Trainer prepares the model
    added = []
    trainer = SimpleNamespace(accelerator=callback.trainer.accelerator, args=SimpleNamespace(n_gpu=1),
                              add_callback=added.append)
    with pytest.raises(RuntimeError, match=distributed_type):
        LocalSGDCallback.attach(trainer, LocalSGDArguments())
    assert not added


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


def test_load_best_model_at_end_keeps_the_best_checkpoint(tmp_path):
    """Trainer loads the best checkpoint before on_train_end: this replica's weights, set aside for the last
    evaluation, must not come back over it."""
    from safetensors.torch import load_file

    # greater_is_better on the loss: the first evaluation (step 3, mid-round) stays the best and only checkpoint
    args = config(tmp_path, eval_strategy="steps", eval_steps=3, save_strategy="best", metric_for_best_model="loss",
                  greater_is_better=True, load_best_model_at_end=True)
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data(), eval_dataset=data(8))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
    weights = trainer.model.state_dict()
    assert all(torch.equal(weights[name], tensor) for name, tensor in best.items())
    assert not torch.equal(flat(trainer.model), trainer.local_sgd.engine.global_model_params())  # not step 10's


class AskAt(TrainerCallback):
    """Added after LocalSGDCallback: asks for an evaluation and a save mid-round, and records what is evaluated."""

    def __init__(self, trainer, step):
        self.trainer, self.step, self.evaluated = trainer, step, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_evaluate = control.should_save = True

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.evaluated.append(torch.equal(flat(model), self.trainer.local_sgd.engine.global_model_params()))


def test_evaluations_and_saves_asked_by_later_callbacks_see_the_global_model(tmp_path):
    from safetensors.torch import load_file

    reference = LocalSGDTrainer(model=tiny_model(), args=config(tmp_path / "a", outer_optimizer="nesterov"),
                                train_dataset=data())
    reference.train()
    trainer = LocalSGDTrainer(model=tiny_model(), args=config(tmp_path / "b", outer_optimizer="nesterov"),
                              train_dataset=data(), eval_dataset=data(8))
    probe = AskAt(trainer, 6)  # mid-round: H = 4
    trainer.add_callback(probe)
    trainer.train()
    assert probe.evaluated == [True]
    saved = load_file(os.path.join(tmp_path / "b", "checkpoint-6", "model.safetensors"))
    state = torch.load(os.path.join(tmp_path / "b", "checkpoint-6", "local_sgd_rank0.pt"), weights_only=True)
    names = [name for name, _ in trainer.model.named_parameters()]  # (the tied lm_head is not saved)
    assert torch.equal(torch.cat([saved[name].reshape(-1) for name in names]), state["engine"]["global_params"])
    assert not torch.equal(state["local_params"], state["engine"]["global_params"])
    assert torch.equal(flat(reference.model), flat(trainer.model))  # and training went on with the local weights


def test_a_second_train_call_writes_the_state_again(tmp_path):
    trainer = LocalSGDTrainer(model=tiny_model(), args=config(tmp_path / "a", max_steps=6, save_strategy="steps",
                                                              save_steps=6), train_dataset=data())
    trainer.train()
    trainer.args.output_dir = str(tmp_path / "b")
    trainer.train()
    assert os.path.isfile(os.path.join(tmp_path / "b", "checkpoint-6", "local_sgd_rank0.pt"))


def test_a_warmup_as_long_as_an_epoch_based_run_is_an_error(tmp_path):
    # 64 samples / 4 per step: 16 steps, known only when training starts
    args = config(tmp_path, max_steps=-1, num_train_epochs=1, local_sgd_warmup_steps=16)
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data())
    with pytest.raises(ValueError, match=r"local_sgd_warmup_steps \(16\) must be shorter than the run \(16 steps\)"):
        trainer.train()


def test_resuming_with_another_number_of_ranks_is_an_error(tmp_path):
    trainer = LocalSGDTrainer(model=tiny_model(), args=config(tmp_path / "a", max_steps=6, save_strategy="steps",
                                                              save_steps=6), train_dataset=data())
    trainer.train()
    path = tmp_path / "a" / "checkpoint-6" / "local_sgd_rank0.pt"
    saved = torch.load(path, weights_only=True)
    saved["engine"]["world_size"] = 2  # as if rank 0 of two had written it
    torch.save(saved, path)
    resumed = LocalSGDTrainer(model=tiny_model(), args=config(tmp_path / "b"), train_dataset=data())
    with pytest.raises(ValueError, match="written by 2 replicas, this run has 1"):
        resumed.train(resume_from_checkpoint=str(path.parent))


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
