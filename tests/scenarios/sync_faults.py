"""Faults at the outer sync on 2 processes, RoundEngine in a plain loop (SGD inner steps on a small regression):

- ``nan``: rank 1's weights turn NaN in the middle of round 2: the sync skips the outer step (the global model
  stays the previous sync's, finite on both ranks), every replica restarts from the global model, training goes
  on; ``nan,delayed`` the same with the delayed variant, whose sum of round 2 is skipped at the end of round 3;
  ``nan,none,int8`` (and ``bfloat16``) with error feedback, whose NaN residual is dropped, not carried on;
  ``nan,eager``: rank 1's own outer gradient of round 2 is NaN, so it drops its eager part at once, and the sum
  of round 2 is skipped a round later; ``nan,none,float32,2``: streaming, P = 2, τ = 1, α = 0.5: fragment 0 of
  round 2 was sent before the NaN and applies, rank 1 keeps α of its NaN part; fragment 1's sum of round 2 is
  skipped, and every replica restarts from the whole global model;
- ``nan_every_round``: rank 1 turns NaN in every round: after ``max_skipped_syncs`` (2) skipped syncs in a row
  both ranks stop with the error (the test expects a non-zero exit);
- ``hang``: rank 1 stops itself (SIGSTOP) mid-round; rank 0 waits ``sync_timeout_seconds`` (3 s) at the sync
  and stops with an error naming it (the test expects rank 0's non-zero exit, and kills rank 1);
  ``hang,none,int8`` the same while the int8 pipeline's thread is stuck in the collective; ``hang,eager`` and
  ``hang,none,float32,2`` (streaming) with the sum rank 0 waits for in flight.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist
from common import LinearRegression, main

from hf_localsgd import RoundEngine


H = 4


def batch(rank: int):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(16, 4, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0])


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(out_dir: str, mode: str = "nan", overlap: str = "none", comm: str = "float32", fragments: str = "1") -> dict:
    rank = dist.get_rank()
    model = LinearRegression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    streaming = dict(num_fragments=int(fragments), fragment_sync_delay=1, fragment_update_alpha=0.5) \
        if fragments != "1" else {}
    engine = RoundEngine(model, sync_every=H, outer_optimizer="nesterov", outer_overlap=overlap, track_metrics=True,
                         **streaming,
                         outer_comm_dtype=comm, outer_error_feedback=comm != "float32",
                         max_skipped_syncs=2 if mode == "nan_every_round" else 3,
                         sync_timeout_seconds=3.0 if mode == "hang" else None)
    features, labels = batch(rank)
    log = {"global_after_sync": [], "finite": [], "skipped": [], "replicas_equal_global": [], "model_finite": []}
    for step in range(1, 5 * H + 1):
        optimizer.zero_grad()
        model(features, labels)["loss"].backward()
        optimizer.step()
        poisoned = rank == 1 and ((mode == "nan" and step == H + 2) or (mode == "nan_every_round" and step % H == 2))
        if poisoned:
            with torch.no_grad():
                model.linear.weight.fill_(float("nan"))
        if mode == "hang" and rank == 1 and step == H + 2:
            with open(os.path.join(out_dir, "stopped"), "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)
        if engine.step():
            log["global_after_sync"].append(engine.global_params.tolist())
            log["finite"].append(bool(torch.isfinite(engine.global_params).all()))
            log["skipped"].append(engine.last_metrics["skipped_syncs"])
            log["replicas_equal_global"].append(bool(torch.equal(flat(model), engine.global_params)))
            log["model_finite"].append(bool(torch.isfinite(flat(model)).all()))
    engine.finish()
    return {**log, "final_finite": bool(torch.isfinite(flat(model)).all())}


if __name__ == "__main__":
    main(run)
