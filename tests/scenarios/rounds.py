"""LocalSGDTrainer with a warm-up on 2 processes: counts DDP's gradient all-reduces (through a comm hook) and the
engine's collectives, hashes every rank's weights after every step, checks each outer step against a Nesterov
reference computed here from all ranks' weights, and keeps a rank-specific buffer to show that forward passes
broadcast nothing."""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import common_args, count_collectives, dataset, digest, flat_params, main, tiny_model
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import TrainerCallback

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


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
        # A buffer that differs per rank, set once DDP has wrapped the model (which broadcasts rank 0's buffers
        # then, as it does its parameters): a broadcast on a forward pass would overwrite rank 1's with rank 0's.
        self.trainer.model.rank_marker.fill_(float(dist.get_rank()))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.local_sgd.engine
        self.hashes.append(digest(flat_params(model)))
        self.model_equals_global.append(bool(torch.equal(engine.local_params(), engine.global_params)))
        self.grad_allreduces.append(self.ddp_hook_calls)
        self.total_collectives.append(self.collectives["total"])
        if self.reference is not None:
            self.reference.check(engine)


def run(out_dir: str) -> dict:
    model = tiny_model()
    model.register_buffer("rank_marker", torch.zeros(4), persistent=False)  # made rank-specific by the Recorder
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


if __name__ == "__main__":
    main(run)
