"""LocalAdaScale with no smoothing, H = 3, a linear lr decay over a budget of 12 scale-invariant steps: the
gradient statistics computed here from all ranks' gradients, and the lr and scale-invariant step of every step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import common_args, dataset, main, tiny_model
from transformers import TrainerCallback

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


class GradientProbe(TrainerCallback):
    """After LocalSGDCallback: at the first step of each round, the gradient statistics of Eq. 15 computed
    directly from all ranks' gradients; at every step, the lr the optimizer uses and the scale-invariant step."""

    def __init__(self, trainer, island_size: int = 1):
        self.trainer, self.stats, self.lrs, self.island_size = trainer, [], [], island_size

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.local_sgd.engine
        gain = engine.hook("lr_scaling").gain
        self.lrs.append((self.trainer.optimizer.param_groups[0]["lr"], gain.scale_invariant_step, gain.rho))
        if engine.inner_step != 0:
            return
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double()
        gathered = [torch.empty_like(g) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, g)
        gathered = gathered[:: self.island_size]  # one rank per island: its ranks hold the island's mean gradient
        k = len(gathered)
        mean = torch.stack(gathered).mean(0)
        sigma2 = sum(x.pow(2).sum() for x in gathered) / (k - 1) - k / (k - 1) * mean.pow(2).sum()
        self.stats.append({"sigma2": sigma2.item(), "G": (mean.pow(2).sum() - sigma2 / k).item()})


def run(out_dir: str, island_size: str = "1") -> dict:
    """LocalAdaScale with no smoothing, H = 3, a linear lr decay over a budget of 12 scale-invariant steps (with
    islands: each island one worker, whose gradient DDP averaged over its ranks)."""
    island_size = int(island_size)
    args = LocalSGDConfig(
        **common_args(out_dir, max_steps=12, learning_rate=0.01, lr_scheduler_type="linear", max_grad_norm=0.0,
                      logging_steps=100, per_device_train_batch_size=2),
        sync_every=3, outer_optimizer="average", lr_scaling="local_adascale", lr_scaling_ema=0.0,
        island_size=island_size,
    )
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    probe = GradientProbe(trainer, island_size)
    trainer.add_callback(probe)
    trainer.train()
    return {
        "stats": probe.stats,
        "lrs": probe.lrs,
        "round_logs": [log for log in trainer.state.log_history if "local_sgd/round" in log],
        "global_step": trainer.state.global_step,
        "scale_invariant_step": trainer.local_sgd.engine.hook("lr_scaling").gain.scale_invariant_step,
        "base_lr": 0.01,
    }


if __name__ == "__main__":
    main(run)
