"""One process: LocalSGDTrainer, the evaluations and checkpoints of the global model, resumes, and errors at start."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from tiny import data, flat, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_localsgd import LocalSGDCallback, LocalSGDConfig, LocalSGDTrainer, LocalSGDTrainerMixin


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


def test_trainer_needs_local_sgd_options(tmp_path):
    with pytest.raises(TypeError, match="LocalSGDConfig"):
        LocalSGDTrainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


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


class LastStepProbe(TrainerCallback):
    """What Trainer evaluates at the last step."""

    def __init__(self):
        self.evaluated = {}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.evaluated[state.global_step] = flat(model).clone()


def test_the_last_steps_evaluation_and_checkpoint_hold_the_final_model(tmp_path):
    """Training ends mid-round (10 steps, H = 4): the partial round is synchronized before Trainer's last
    evaluation and save, not only at the end of training."""
    from safetensors.torch import load_file

    args = config(tmp_path, outer_optimizer="nesterov", eval_strategy="steps", eval_steps=10, save_strategy="steps",
                  save_steps=10)
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data(), eval_dataset=data(8))
    probe = LastStepProbe()
    trainer.add_callback(probe)
    trainer.train()
    final = flat(trainer.model)  # the global model after the last sync
    assert torch.equal(probe.evaluated[10], final)
    state = torch.load(tmp_path / "checkpoint-10" / "local_sgd_rank0.pt", weights_only=True)["engine"]
    assert (state["num_syncs"], state["inner_step"]) == (3, 0)
    saved = load_file(tmp_path / "checkpoint-10" / "model.safetensors")
    names = [name for name, _ in trainer.model.named_parameters()]  # (the tied lm_head is not saved)
    assert torch.equal(torch.cat([saved[name].reshape(-1) for name in names]), final)


def test_a_resume_without_state_files_starts_a_round_with_that_steps_h(tmp_path, caplog):
    """A checkpoint without local_sgd_rank*.pt (e.g. a plain Trainer's) resumes with a warning and starts a
    round at the checkpoint's step, with the H the ramp gives there (not the H of step 0)."""
    options = dict(max_steps=20, sync_every=8, sync_every_min=2, sync_every_schedule="linear", logging_steps=50,
                   outer_optimizer="nesterov", save_strategy="steps", save_steps=10)
    LocalSGDTrainer(model=tiny_model(), args=config(tmp_path / "a", **options), train_dataset=data()).train()
    checkpoint = tmp_path / "a" / "checkpoint-10"
    (checkpoint / "local_sgd_rank0.pt").unlink()
    resumed = LocalSGDTrainer(model=tiny_model(), args=config(tmp_path / "b", **options), train_dataset=data())
    with caplog.at_level(logging.WARNING, logger="hf_localsgd"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "without local_sgd_rank*.pt files" in caplog.text
    syncs = [(log["step"], log["local_sgd/sync_every"]) for log in resumed.state.log_history
             if "local_sgd/round" in log and log["step"] > 10]  # (the history before 10 is the checkpoint's)
    assert syncs[0] == (15, 5)  # round(2 + 10/20 * 6) = 5 steps from step 10


def test_the_mixin_gives_another_trainer_the_label_partition(tmp_path):
    from hf_localsgd.core.partition import LabelShardSampler

    class OtherTrainer(Trainer):  # stands in for e.g. TRL's SFTTrainer
        pass

    class OtherLocalSGDTrainer(LocalSGDTrainerMixin, OtherTrainer):
        pass

    rows = data()
    rows = rows.add_column("label", [i % 4 for i in range(len(rows))])
    trainer = OtherLocalSGDTrainer(model=tiny_model(), args=config(tmp_path, data_partition="by_label"),
                                   train_dataset=rows)
    assert isinstance(trainer._get_train_sampler(), LabelShardSampler)
    trainer.train()
    assert trainer.local_sgd.engine.num_syncs == 3


def test_tensorboard_receives_the_sync_metrics(tmp_path):
    """report_to=["tensorboard"]: the event file holds every local_sgd/* scalar of each sync."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hf_localsgd.core.metrics import PREFIX

    args = config(tmp_path, outer_optimizer="nesterov", report_to=["tensorboard"], logging_steps=4)
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data())
    trainer.train()
    (run,) = (tmp_path / "runs").iterdir()  # Trainer's default: output_dir/runs/<date and host>
    events = EventAccumulator(str(run)).Reload()
    logged = {tag for tag in events.Tags()["scalars"] if tag.startswith("train/" + PREFIX)}
    synced = {key for entry in trainer.state.log_history for key in entry if key.startswith(PREFIX)}
    assert len(synced) >= 9 and logged == {"train/" + key for key in synced}
    rounds = [event.value for event in events.Scalars(f"train/{PREFIX}round")]
    assert rounds == [1.0, 2.0, 3.0]  # syncs at steps 4, 8 and the final partial round at 10


class LrProbe(TrainerCallback):
    """After LocalSGDCallback: the inner lr of each optimizer step and the scale-invariant step it was read at."""

    def __init__(self, trainer):
        self.trainer, self.lrs = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        gain = self.trainer.local_sgd.engine.hook("lr_scaling").gain
        self.lrs.append((self.trainer.optimizer.param_groups[0]["lr"], gain.scale_invariant_step))


def test_lr_scaling_stretches_the_base_runs_schedule_over_more_steps(tmp_path, monkeypatch):
    from hf_localsgd.core import adascale

    def run(name):
        args = config(tmp_path / name, max_steps=8, lr_scaling="local_adascale", sync_every=64,
                      outer_optimizer="average", lr_scheduler_type="linear", learning_rate=0.01)
        trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=data())
        probe = LrProbe(trainer)
        trainer.add_callback(probe)
        trainer.train()
        return trainer, probe.lrs

    base, base_lrs = run("base")  # one worker: ρ = 1, the base run itself
    assert base.state.global_step == 8
    assert [lr for lr, _ in base_lrs] == pytest.approx([0.01 * (8 - t) / 8 for t in range(8)])

    class HalfGain(adascale.GainRatio):  # a fixed ρ = 0.5: every step is worth half a base step
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rho = 0.5

        def start_round(self, H):
            return self.rho

    monkeypatch.setattr(adascale, "GainRatio", HalfGain)
    stretched, lrs = run("stretched")
    # max_steps=8 is the base run's budget: at ρ = 0.5 it takes 2x the steps, within Trainer's raised loop
    # bound (ceil(8 / lowest ρ) for K = 1, H = 64, c = 1: 32), and ends when s reaches 8.
    assert stretched.state.max_steps == adascale.most_steps(8, 1, 64, 1.0) == 32
    assert stretched.state.global_step == 16
    assert [s for _, s in lrs] == [t / 2 for t in range(16)]
    # The schedule is the base run's, read at s: each base lr twice, times ρ; it ends where the base one ends.
    assert [lr for lr, _ in lrs] == pytest.approx([0.5 * base_lrs[t // 2][0] for t in range(16)])
    assert lrs[-1][0] == pytest.approx(0.5 * base_lrs[-1][0])


def test_lr_scaling_budget_from_epochs_is_the_base_runs():
    from hf_localsgd.integrations.trainer import base_budget

    class Args:
        max_steps, num_train_epochs = -1, 2.5

    # 2.5 epochs of a rank's 6 steps on 4 ranks: one worker's epoch is 24 steps, the budget 60.
    assert base_budget(Args, steps_per_epoch=6, workers=4) == 60
    Args.max_steps = 100
    assert base_budget(Args, steps_per_epoch=6, workers=4) == 100


def test_lr_scaling_needs_a_trainer_that_can_stretch_the_run(tmp_path):
    trainer = Trainer(model=tiny_model(), args=config(tmp_path, lr_scaling="adascale"), train_dataset=data())
    with pytest.raises(ValueError, match="^lr_scaling: .*LocalSGDTrainerMixin"):
        LocalSGDCallback.attach(trainer)
