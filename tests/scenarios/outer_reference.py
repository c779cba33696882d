"""RoundEngine alone (no Trainer): each outer optimizer x float32 / bfloat16 communication x one bucket / several,
3 rounds with rank-specific moves, metrics on, against float64 references fed the mean outer gradient of the
gathered replicas."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from common import main

from hf_localsgd import RoundEngine, ScheduleFreeSGD


def run(out_dir: str) -> dict:
    """After every sync the global model is compared with the reference, and the logged drift and norm with
    theirs. The model has BatchNorm statistics, which the engine must warn about (on rank 0)."""

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    logging.getLogger("hf_localsgd.core.flat").addHandler(records)
    rank, world = dist.get_rank(), dist.get_world_size()
    errors = {}
    for comm_dtype in ("float32", "bfloat16"):
        for bucket_size_mb in (256, 2e-4):  # the whole model in one bucket; ~52 elements a bucket
            for name in ("average", "nesterov", "schedule_free"):
                torch.manual_seed(0)  # same model on every rank
                model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
                engine = RoundEngine(model, sync_every=1, outer_optimizer=name, outer_comm_dtype=comm_dtype,
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
                errors[f"{name} {comm_dtype} buckets={len(engine.flat.buckets)}"] = worst
    return {"errors": errors, "buffer_warnings": sum("BatchNorm" in m and "1.running_mean" in m for m in records.messages)}


if __name__ == "__main__":
    main(run)
