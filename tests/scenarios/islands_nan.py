"""Eager outer steps inside DDP islands (4 processes, 2 islands x 2 ranks), a bare linear model whose weights
move alike on an island's ranks. Island 1's replica turns NaN in its bias, mid-round 2: the bias is in the span
of the island's second rank only, so only that rank's part of the replica's own outer gradient is not finite.
The island's ranks decide together: both drop the replica's eager part at the end of round 2 (its weights are
then the consensus), island 0 keeps its own; the sum of round 2 is skipped at the end of round 3.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import LinearRegression, main

from hf_localsgd import RoundEngine


H = 3


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(out_dir: str) -> dict:
    island = dist.get_rank() // 2
    model = LinearRegression()
    engine = RoundEngine(model, sync_every=H, island_size=2, outer_overlap="eager", outer_optimizer="nesterov")
    log = {"equals_consensus": [], "eager_part_zero": [], "finite": [], "skipped": []}
    for step in range(1, 4 * H + 1):
        with torch.no_grad():  # an inner step: the same on an island's ranks, different between islands
            for p in model.parameters():
                p.add_(0.01 * (island + 1) * (1 + (step % 2)))
            if island == 1 and step == H + 2:
                model.linear.bias.fill_(float("nan"))
        if engine.step():
            consensus = engine.global_model_params()  # (the island's ranks gather their parts)
            log["equals_consensus"].append(bool(torch.equal(flat(model), consensus)))
            log["eager_part_zero"].append(bool((engine.outer.eager_params == 0).all()))
            log["finite"].append(bool(torch.isfinite(flat(model)).all()))
            log["skipped"].append(engine.outer.skipped)
    engine.finish()
    engine.close()
    return log


if __name__ == "__main__":
    main(run)
