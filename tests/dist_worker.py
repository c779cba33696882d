"""Worker for the multi-process tests: run under `accelerate launch`, writes one JSON result per rank.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml tests/dist_worker.py SCENARIO OUT_DIR

Scenarios:
- `rounds`: LocalSGDTrainer with a warm-up; counts DDP gradient all-reduces (through a DDP comm hook) and
  the engine's collectives, hashes every rank's weights after every step, checks each outer step against a
  Nesterov reference computed here from all ranks' weights, and keeps a rank-specific buffer to show that
  forward passes broadcast nothing.
- `ddp_equivalence`: H = 1, outer `average`, inner plain SGD vs ordinary DDP `Trainer`, same data and seed.
- `resume`: an uninterrupted run vs the same run resumed from a mid-round checkpoint.
- `resume_without_every_rank`: a checkpoint that lacks one rank's state file stops every rank with an error.
- `outer_reference`: the engine alone against float64 references of every outer optimizer, both
  communication dtypes, state on the model's device and offloaded in buckets.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState
from datasets import Dataset
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import GPTNeoConfig, GPTNeoForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


VOCAB, SEQ = 64, 16


def tiny_model(dropout: float = 0.0) -> GPTNeoForCausalLM:
    set_seed(0)
    config = GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=SEQ,
        attention_types=[[["global", "local"], 1]], window_size=8, bos_token_id=0, eos_token_id=0,
        embed_dropout=dropout, attention_dropout=dropout, resid_dropout=dropout,
    )
    return GPTNeoForCausalLM(config)


def dataset(n: int = 256) -> Dataset:
    # Learnable sequences: each row counts up from a random start, modulo the vocabulary.
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = ((starts + torch.arange(SEQ)) % VOCAB).tolist()
    # `start` is a label to partition by (data_partition="by_label"); the model never sees it.
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "start": starts[:, 0].tolist()})


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def common_args(out_dir: str, **overrides) -> dict:
    args = dict(
        output_dir=out_dir, per_device_train_batch_size=4, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    args.update(overrides)
    return args


class NesterovReference(TrainerCallback):
    """Before each outer step, gathers every replica's weights and predicts the next global model with a
    float64 Nesterov-SGD written from the equations (DiLoCo); after the step, records the largest error."""

    def __init__(self, trainer, lr: float, momentum: float):
        self.trainer, self.lr, self.momentum = trainer, lr, momentum
        self.global_, self.buf, self.expected, self.errors, self.stats = None, None, None, [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.local_sgd_warmup_steps == 0:
            self._start(model)

    def _start(self, model) -> None:
        self.global_ = flat_params(model).double()
        self.buf = torch.zeros_like(self.global_)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.local_sgd.engine
        step = engine.num_steps + 1  # the step LocalSGDCallback is about to count
        if step <= engine.warmup_steps:
            if step == engine.warmup_steps:  # local rounds start from the warmed-up model
                self._start(model)
            return
        if engine.inner_step + 1 < engine.sync_every:
            return
        local = flat_params(model).double()
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        deltas = torch.stack([self.global_ - x for x in gathered])
        delta = deltas.mean(0)
        # Exact per-round statistics, to check the engine's metrics against.
        average = torch.stack(gathered).mean(0)
        self.stats.append({
            "drift": torch.stack([(x - average).pow(2).sum() for x in gathered]).mean().item(),
            "outer_grad_norm": delta.norm().item(),
            "inner_product": (deltas[0] @ deltas[1]).item(),
            "mean_sq_norm": deltas.pow(2).sum(1).mean().item(),
            "numel": local.numel(),
        })
        self.buf = self.momentum * self.buf + delta
        self.global_ = self.global_ - self.lr * (delta + self.momentum * self.buf)
        self.expected = self.global_

    def check(self, engine) -> None:
        if self.expected is not None:
            self.errors.append((engine.global_params.double() - self.expected).abs().max().item())
            self.expected = None


class Recorder(TrainerCallback):
    """Runs after LocalSGDCallback: what every rank holds after each step."""

    def __init__(self, trainer, collectives: dict, reference: NesterovReference | None = None):
        self.trainer, self.collectives, self.reference = trainer, collectives, reference
        self.hashes, self.model_equals_global, self.grad_allreduces, self.total_collectives = [], [], [], []
        self.ddp_hook_calls = 0

    def on_train_begin(self, args, state, control, **kwargs):
        def counting_allreduce(process_group, bucket):
            self.ddp_hook_calls += 1
            return default_hooks.allreduce_hook(process_group, bucket)

        self.trainer.model_wrapped.register_comm_hook(None, counting_allreduce)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.local_sgd.engine
        self.hashes.append(digest(flat_params(model)))
        self.model_equals_global.append(bool(torch.equal(engine.local_params(), engine.global_params)))
        self.grad_allreduces.append(self.ddp_hook_calls)
        self.total_collectives.append(self.collectives["total"])
        if self.reference is not None:
            self.reference.check(engine)


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single",
               "barrier")


def count_collectives() -> dict:
    """Counts torch.distributed collectives: all of them ("total"), and those hf_localsgd issues itself."""
    counts = {"total": 0, "all_reduce": 0, "broadcast": 0}
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            counts["total"] += 1
            if _name in counts and sys._getframe(1).f_globals["__name__"].startswith("hf_localsgd"):
                counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapper)
    return counts


def scenario_rounds(out_dir: str) -> dict:
    rank = dist.get_rank()
    model = tiny_model()
    # A buffer that differs per rank: DDP's buffer broadcast on forward would overwrite rank 1's with rank 0's.
    model.register_buffer("rank_marker", torch.full((4,), float(rank)), persistent=False)
    args = LocalSGDConfig(
        # Trainer gathers the loss at each logging step: log every other step, to see the steps in between.
        **common_args(out_dir, max_steps=14, gradient_accumulation_steps=2, logging_steps=2),
        sync_every=4, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9, local_sgd_warmup_steps=2,
    )
    trainer = LocalSGDTrainer(model=model, args=args, train_dataset=dataset())
    reference = NesterovReference(trainer, lr=0.7, momentum=0.9)
    # The reference must see the weights before LocalSGDCallback's outer step: put it in front of it.
    trainer.callback_handler.callbacks.insert(trainer.callback_handler.callbacks.index(trainer.local_sgd), reference)
    counts = count_collectives()
    recorder = Recorder(trainer, counts, reference)
    trainer.add_callback(recorder)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {
        "hashes": recorder.hashes,
        "model_equals_global": recorder.model_equals_global,
        "grad_allreduces": recorder.grad_allreduces,
        "total_collectives": recorder.total_collectives,
        "engine_all_reduce": counts["all_reduce"],
        "engine_broadcast": counts["broadcast"],
        "num_syncs": trainer.local_sgd.engine.num_syncs,
        "reference_errors": reference.errors,
        "reference_stats": reference.stats,
        "round_logs": [log for log in trainer.state.log_history if "local_sgd/round" in log],
        "rank_marker": model.rank_marker.tolist(),
        "first_losses": losses[:3],
        "last_losses": losses[-3:],
        "final_hash": digest(flat_params(model)),
    }


def scenario_ddp_equivalence(out_dir: str) -> dict:
    common = common_args(out_dir, max_steps=8, optim="sgd", learning_rate=0.05, max_grad_norm=0.0, weight_decay=0.0)
    local = LocalSGDTrainer(
        model=tiny_model(), train_dataset=dataset(),
        args=LocalSGDConfig(**common, sync_every=1, outer_optimizer="average"),
    )
    local.train()
    ddp = Trainer(model=tiny_model(), train_dataset=dataset(), args=TrainingArguments(**common))
    ddp.train()
    a, b = flat_params(local.model), flat_params(ddp.model)
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "max_abs_change": (b - flat_params(tiny_model())).abs().max().item(),
        "hash_local": digest(a),
        "hash_ddp": digest(b),
    }


def scenario_resume(out_dir: str, outer_optimizer: str = "schedule_free", pseudo_sync_prob: str = "0",
                    lr_scaling: str = "none", sync_every_schedule: str = "constant", data_partition: str = "iid") -> dict:
    def run(resume_from=None, output="full"):
        args = LocalSGDConfig(
            **common_args(os.path.join(out_dir, output), max_steps=12, save_strategy="steps", save_steps=5,
                          save_total_limit=2, max_grad_norm=1.0),
            sync_every=4, outer_optimizer=outer_optimizer, pseudo_sync_prob=float(pseudo_sync_prob),
            lr_scaling=lr_scaling, sync_every_schedule=sync_every_schedule, sync_every_min=2,
            data_partition=data_partition, data_partition_column="start",
        )
        trainer = LocalSGDTrainer(model=tiny_model(dropout=0.1), args=args, train_dataset=dataset())
        trainer.train(resume_from_checkpoint=resume_from)
        engine = trainer.local_sgd.engine
        return digest(flat_params(trainer.model)), digest(engine.global_params), engine.num_syncs

    full = run()
    # The first checkpoint left (save_total_limit=2) that falls mid-round (H = 4): checkpoint-10, or
    # checkpoint-5 when lr scaling ends training early, at its scale-invariant budget.
    steps = sorted(int(name.split("-")[1]) for name in os.listdir(os.path.join(out_dir, "full")) if name.startswith("checkpoint-"))
    checkpoint = os.path.join(out_dir, "full", f"checkpoint-{next(s for s in steps if s % 4)}")
    resumed = run(resume_from=checkpoint, output="resumed")
    return {
        "full": full,
        "resumed": resumed,
        "checkpoints": sorted(os.listdir(os.path.join(out_dir, "full"))),
        "checkpoint_files": sorted(os.listdir(checkpoint)),
    }


def scenario_resume_without_every_rank(out_dir: str) -> dict:
    """A mid-round checkpoint that lacks rank 1's state file (as if written by one process): every rank must
    stop with the same error rather than rank 0 resume mid-round and rank 1 start new rounds."""
    def trainer(output):
        args = LocalSGDConfig(**common_args(os.path.join(out_dir, output), max_steps=6, save_strategy="steps",
                                            save_steps=5), sync_every=4, outer_optimizer="nesterov")
        return LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())

    trainer("full").train()
    checkpoint = os.path.join(out_dir, "full", "checkpoint-5")
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(os.path.join(checkpoint, "local_sgd_rank1.pt"))
    dist.barrier()
    try:
        trainer("resumed").train(resume_from_checkpoint=checkpoint)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def scenario_push(out_dir: str) -> dict:
    """Schedule-free (so the pushed x differs from the y training continues from), H = 4 over 6 steps (so the
    last round is partial), pushed to the Hub stand-in named by HF_ENDPOINT."""
    from safetensors.torch import save_file

    args = LocalSGDConfig(
        **common_args(out_dir, max_steps=6, push_to_hub=True, hub_model_id="user/tiny-localsgd"),
        sync_every=4, outer_optimizer="schedule_free",
    )
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    trainer.train()
    trainer.push_to_hub()
    engine = trainer.local_sgd.engine
    names = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    x = engine.global_model_params()
    expected = dict(zip(names, (v.clone() for v in engine._views(x, 0, engine.numel))))
    y = dict(zip(names, (v.clone() for v in engine._views(engine.global_params, 0, engine.numel))))
    if dist.get_rank() == 0:
        save_file(expected, os.path.join(out_dir, "expected_global.safetensors"))
        save_file(y, os.path.join(out_dir, "train_point_y.safetensors"))
    return {"num_syncs": engine.num_syncs, "inner_step": engine.inner_step}


def scenario_accelerate_loop(out_dir: str) -> dict:
    """The README's plain Accelerate loop: no Trainer, the engine alone."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from hf_localsgd import RoundEngine

    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(dataset().remove_columns("start").with_format("torch"), batch_size=4, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    hook_calls = []
    model.register_comm_hook(None, lambda pg, bucket: hook_calls.append(1) or default_hooks.allreduce_hook(pg, bucket))
    counts = count_collectives()

    engine = RoundEngine(accelerator.unwrap_model(model), sync_every=4, outer_optimizer="nesterov")
    losses = []
    for step, batch in enumerate(loader):
        with accelerator.no_sync(model):  # inner steps: no gradient all-reduce
            loss = model(**batch).loss
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        engine.step()  # every 4th step: one all-reduce of the outer gradient and an outer step
        losses.append(loss.item())
        if step == 9:
            break
    engine.sync()  # the last, partial round
    return {
        "hash": digest(flat_params(model)),
        "ddp_hook_calls": len(hook_calls),
        "engine_all_reduce": counts["all_reduce"],
        "num_syncs": engine.num_syncs,
        "losses": losses,
    }


class LinearRegression(torch.nn.Module):
    """The small model of the PALSGD reference test: y = w·x + b with a squared loss."""

    def __init__(self):
        super().__init__()
        set_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, features, labels):
        return {"loss": (self.linear(features).squeeze(-1) - labels).pow(2).mean()}


def regression_data(n: int = 64) -> Dataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
    return Dataset.from_dict({"features": x.tolist(), "labels": y.tolist()})


class StepRecorder(TrainerCallback):
    """After LocalSGDCallback: whether each step was a pseudo-synchronization, its inner lr, the weights."""

    def __init__(self, local_sgd):
        self.local_sgd, self.steps = local_sgd, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({
            "pseudo_sync": self.local_sgd.pseudo_sync_step,
            "lr": self.local_sgd._inner_lr,
            "weights": flat_params(model).tolist(),
        })


def scenario_palsgd(out_dir: str) -> dict:
    """PALSGD with plain SGD inside, a linear lr decay, p = 0.3, η = 2, H = 4, Nesterov outer step."""
    from transformers import default_data_collator

    batches = []

    def recording_collator(features):
        batch = default_data_collator(features)
        batches.append({k: v.tolist() for k, v in batch.items()})
        return batch

    args = LocalSGDConfig(
        **common_args(out_dir, max_steps=12, optim="sgd", learning_rate=0.05, lr_scheduler_type="linear",
                      max_grad_norm=0.0, weight_decay=0.0, logging_steps=100),
        sync_every=4, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9,
        pseudo_sync_prob=0.3, pseudo_sync_rate=2.0,
    )
    trainer = LocalSGDTrainer(model=LinearRegression(), args=args, train_dataset=regression_data(),
                              data_collator=recording_collator)
    recorder = StepRecorder(trainer.local_sgd)
    trainer.add_callback(recorder)
    trainer.train()
    return {"steps": recorder.steps, "batches": batches[: len(recorder.steps)]}


def scenario_partition(out_dir: str) -> dict:
    """data_partition='by_label': four classes over two ranks; each batch's first feature is its class."""
    from transformers import default_data_collator

    seen = []

    def recording_collator(features):
        batch = default_data_collator(features)
        seen.extend(int(x[0]) for x in batch["features"].tolist())
        return batch

    g = torch.Generator().manual_seed(3)
    classes = torch.randint(0, 4, (64,), generator=g)
    x = torch.cat([classes[:, None].float(), torch.randn(64, 3, generator=g)], dim=1)
    dataset = Dataset.from_dict({"features": x.tolist(), "labels": x.sum(1).tolist(), "label": classes.tolist()})
    args = LocalSGDConfig(
        **common_args(out_dir, num_train_epochs=2, logging_steps=100, optim="sgd", learning_rate=0.01),
        sync_every=4, outer_optimizer="average", data_partition="by_label",
    )
    trainer = LocalSGDTrainer(model=LinearRegression(), args=args, train_dataset=dataset,
                              data_collator=recording_collator)
    trainer.train()
    return {"classes_seen": seen, "class_counts": torch.bincount(classes, minlength=4).tolist(),
            "steps": trainer.state.global_step}


class GradientProbe(TrainerCallback):
    """After LocalSGDCallback: at the first step of each round, the gradient statistics of Eq. 15 computed
    directly from all ranks' gradients; at every step, the lr the optimizer uses and the scale-invariant step."""

    def __init__(self, trainer):
        self.trainer, self.stats, self.lrs = trainer, [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.local_sgd.engine
        self.lrs.append((self.trainer.optimizer.param_groups[0]["lr"], engine.gain.scale_invariant_step,
                         engine.gain.rho))
        if engine.inner_step != 0:
            return
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double()
        gathered = [torch.empty_like(g) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, g)
        k = len(gathered)
        mean = torch.stack(gathered).mean(0)
        sigma2 = sum(x.pow(2).sum() for x in gathered) / (k - 1) - k / (k - 1) * mean.pow(2).sum()
        self.stats.append({"sigma2": sigma2.item(), "G": (mean.pow(2).sum() - sigma2 / k).item()})


def scenario_adascale(out_dir: str) -> dict:
    """LocalAdaScale with no smoothing, H = 3, a linear lr decay over a budget of 12 scale-invariant steps."""
    args = LocalSGDConfig(
        **common_args(out_dir, max_steps=12, learning_rate=0.01, lr_scheduler_type="linear", max_grad_norm=0.0,
                      logging_steps=100, per_device_train_batch_size=2),
        sync_every=3, outer_optimizer="average", lr_scaling="local_adascale", lr_scaling_ema=0.0,
    )
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    probe = GradientProbe(trainer)
    trainer.add_callback(probe)
    trainer.train()
    return {
        "stats": probe.stats,
        "lrs": probe.lrs,
        "round_logs": [log for log in trainer.state.log_history if "local_sgd/round" in log],
        "global_step": trainer.state.global_step,
        "scale_invariant_step": trainer.local_sgd.engine.gain.scale_invariant_step,
        "base_lr": 0.01,
    }


def scenario_outer_reference(out_dir: str) -> dict:
    """RoundEngine alone (no Trainer): each outer optimizer x float32 / bfloat16 communication x one bucket /
    several, 3 rounds with rank-specific moves, metrics on. After every sync the global model is compared with
    a float64 reference fed the mean outer gradient of the gathered replicas, and the logged drift and norm
    with theirs. The model has BatchNorm statistics, which the engine must warn about (on rank 0)."""
    import logging

    from hf_localsgd import RoundEngine, ScheduleFreeSGD

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    logging.getLogger("hf_localsgd.engine").addHandler(records)
    rank, world = dist.get_rank(), dist.get_world_size()
    errors = {}
    for comm_dtype in ("float32", "bfloat16"):
        for bucket_size_mb in (256, 2e-4):  # the whole model in one bucket; ~52 elements a bucket
            for name in ("average", "nesterov", "schedule_free"):
                torch.manual_seed(0)  # same model on every rank
                model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
                engine = RoundEngine(model, sync_every=1, outer_optimizer=name, comm_dtype=comm_dtype,
                                     bucket_size_mb=bucket_size_mb, track_metrics=True)
                params = list(model.parameters())
                x = torch.cat([q.detach().reshape(-1) for q in params]).double()
                if name == "schedule_free":
                    reference = ScheduleFreeSGD([x], lr=engine.outer_lr, momentum=0.2)
                else:
                    momentum = 0.9 if name == "nesterov" else 0.0
                    reference = torch.optim.SGD([x], lr=engine.outer_lr, momentum=momentum, nesterov=momentum > 0)
                generator = torch.Generator().manual_seed(100 + rank)
                worst = {"x": 0.0, "drift": 0.0, "outer_grad_norm": 0.0}
                for _ in range(3):
                    with torch.no_grad():
                        for q in params:
                            q.add_(0.01 * torch.randn(q.shape, generator=generator))
                    local = torch.cat([q.detach().reshape(-1) for q in params]).double()
                    gathered = [torch.empty_like(local) for _ in range(world)]
                    dist.all_gather(gathered, local)
                    deltas = [x.detach() - g for g in gathered]
                    mean_delta = torch.stack(deltas).mean(0)
                    engine.step()  # H = 1: every step is a sync
                    x.grad = mean_delta
                    reference.step()
                    scale = mean_delta.abs().max().item()
                    worst["x"] = max(worst["x"], (engine.global_params.double() - x.detach()).abs().max().item() / scale)
                    drift = torch.stack([(d - mean_delta).pow(2).sum() for d in deltas]).mean().item()
                    metrics = engine.last_metrics
                    worst["drift"] = max(worst["drift"], abs(metrics["drift"] - drift) / drift)
                    norm = mean_delta.norm().item()
                    worst["outer_grad_norm"] = max(worst["outer_grad_norm"], abs(metrics["outer_grad_norm"] - norm) / norm)
                errors[f"{name} {comm_dtype} buckets={len(engine._buckets)}"] = worst
    return {"errors": errors, "buffer_warnings": sum("BatchNorm" in m and "1.running_mean" in m for m in records.messages)}


def main() -> None:
    scenario, out_dir, *options = sys.argv[1:]
    PartialState(cpu=True)  # joins the process group accelerate launch set up: gloo, CPU only
    os.makedirs(out_dir, exist_ok=True)
    result = globals()[f"scenario_{scenario}"](out_dir, *options)
    result["world_size"] = dist.get_world_size()
    with open(os.path.join(out_dir, f"result_rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    # Leave together: a rank that exits while the other still talks to it can abort gloo's threads.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
