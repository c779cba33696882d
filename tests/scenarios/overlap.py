"""The overlapped sync units on 2 processes against float64 references written here: RoundEngine over a small
model of 4 blocks and a head, plain SGD inner steps on each rank's own regression data, Nesterov outer steps.
Each reference runs both replicas in one process from the equations of docs/methods.md:

- ``delayed``: the consensus takes the sum of the previous round, the replicas restart from it;
- ``eager``: each replica keeps its own global copy and momentum and steps on (Δ_k^(r) + Σ_{j≠k} Δ_j^(r-1)) / K;
  the engine's global model is the consensus (the outer optimizer on the delayed sums);
- ``streaming`` (P = 2, τ = 1, α): fragment p (blocks p and p+2, and its share of the head) sent at step
  (p+1)·H/P - τ of a round, its outer step and the mix α local + (1 - α) global at (p+1)·H/P.

Also: the collectives of every step (one all-reduce where a sum starts, none elsewhere), an evaluation of the
global model mid-round, and with ``resume`` a run saved with a sum in flight and continued by fresh objects.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import count_collectives, digest, main
from torch import nn

from hf_localsgd import RoundEngine, resume_rank_state, save_rank_state


H, STEPS, LR, OUTER_LR, MOMENTUM = 4, 14, 0.05, 0.7, 0.9


class Blocks(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])
        self.head = nn.Linear(4, 1)
        self.to(dtype)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x).squeeze(-1)


def data(rank: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(16, 4, generator=g)
    return x.to(dtype), (x @ torch.tensor([1.0, -2.0, 0.5, 1.5]) + rank).to(dtype)


def inner_step(model, x, y):
    model.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(LR * p.grad)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


@torch.no_grad()
def load(model, vector: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():  # (copies: vector_to_parameters would make the parameters views of `vector`)
        p.copy_(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


class Nesterov:
    """DiLoCo's outer step, b <- μ b + g; x <- x - η (g + μ b), in float64."""

    def __init__(self, x: torch.Tensor):
        self.x, self.b = x.clone(), torch.zeros_like(x)

    def step(self, g: torch.Tensor, where=slice(None)) -> None:
        self.b[where] = MOMENTUM * self.b[where] + g
        self.x[where] = self.x[where] - OUTER_LR * (g + MOMENTUM * self.b[where])


def fragments_of(model) -> list[torch.Tensor]:
    """Fragment p's positions in the flat vector: blocks p and p + 2, and its half of the head's 5 values."""
    positions, offset, owner = [], 0, []
    for name, p in model.named_parameters():
        owner += [int(name.split(".")[1]) % 2 if name.startswith("blocks") else -1] * p.numel()
    owner = torch.tensor(owner)
    head = (owner == -1).nonzero().squeeze(1)
    owner[head[:3]], owner[head[3:]] = 0, 1  # ceil(5 / 2) = 3
    return [(owner == p).nonzero().squeeze(1) for p in (0, 1)]


def reference(variant: str, alpha: float = 0.0) -> tuple[list, list]:
    """The global model after each round and each rank's weights after each step, for both ranks."""
    replicas = [Blocks(torch.float64) for _ in range(2)]
    datasets = [data(k, torch.float64) for k in range(2)]
    x0 = flat(replicas[0])
    consensus, globals_, weights = Nesterov(x0), [], [[], []]
    own = [Nesterov(x0) for _ in range(2)]  # eager: each replica's global copy
    previous = None  # the previous round's outer gradients
    fragments = fragments_of(replicas[0])
    sent = {}
    for step in range(1, STEPS + 1):
        for k in range(2):
            inner_step(replicas[k], *datasets[k])
        inner = (step - 1) % H + 1
        if variant == "streaming":
            for p, where in enumerate(fragments):
                if inner == (p + 1) * H // 2 - 1:
                    sent[p] = [consensus.x[where] - flat(r)[where] for r in replicas]
                if inner == (p + 1) * H // 2:
                    consensus.step(sum(sent.pop(p)) / 2, where)
                    for r in replicas:
                        mixed = flat(r)
                        mixed[where] = alpha * mixed[where] + (1 - alpha) * consensus.x[where]
                        load(r, mixed)
        elif inner == H:
            start = [consensus.x if variant == "delayed" else own[k].x for k in range(2)]
            deltas = [start[k] - flat(replicas[k]) for k in range(2)]
            if variant == "delayed":
                if previous is not None:
                    consensus.step(sum(previous) / 2)
                for r in replicas:
                    load(r, consensus.x)
            else:  # eager
                consensus.step(sum(previous) / 2 if previous is not None else torch.zeros_like(x0))
                for k in range(2):
                    others = previous[1 - k] if previous is not None else torch.zeros_like(x0)
                    own[k].step((deltas[k] + others) / 2)
                    load(replicas[k], own[k].x)
            previous = deltas
        if inner == H:
            globals_.append(consensus.x.clone())
        for k in range(2):
            weights[k].append(flat(replicas[k]))
    return globals_, weights


def build(variant: str, alpha: float, seed: int = 0):
    model = Blocks()
    if seed:
        with torch.no_grad():  # other weights: a resume must bring back everything
            for p in model.parameters():
                p.add_(0.5)
    kwargs = dict(num_fragments=2, fragment_sync_delay=1, fragment_update_alpha=alpha) if variant == "streaming" \
        else dict(outer_overlap=variant)
    engine = RoundEngine(model, sync_every=H, outer_optimizer="nesterov", outer_lr=OUTER_LR, outer_momentum=MOMENTUM,
                         track_metrics=True, **kwargs)
    return model, engine


TIMINGS = ("sync_seconds", "sync_wait_seconds")


def train(model, engine, first: int, last: int, log: dict | None = None, metrics: list | None = None) -> None:
    x, y = data(dist.get_rank())
    for step in range(first + 1, last + 1):
        inner_step(model, x, y)
        synced = engine.step()
        if synced and metrics is not None:  # each sync's metrics but the timings
            metrics.append({k: v for k, v in engine.last_metrics.items() if k not in TIMINGS})
        if log is None:
            continue
        log["weights"].append(flat(model))
        log["collectives"].append(log["counts"]["all_reduce"])
        if synced:
            log["globals"].append(engine.outer.gather_eval().double())
            log["wait"].append(engine.last_metrics["sync_wait_seconds"])
        if step == 6:  # mid-round: the global model in, then this replica's weights back
            with engine.global_model():
                log["evaluated"] = digest(flat(model))
                log["evaluated_is_global"] = bool(torch.equal(flat(model), engine.outer.gather_eval().double()))
        if step == 8:  # a round's end, where Trainer evaluates and saves with H among its steps
            with engine.global_model():
                log["boundary_is_global"] = bool(torch.equal(flat(model), engine.outer.gather_eval().double()))


def run(out_dir: str, variant: str = "delayed", alpha: str = "0", mode: str = "train") -> dict:
    alpha = float(alpha)
    rank = dist.get_rank()
    if mode == "resume":
        model, engine = build(variant, alpha)
        full_metrics, resumed_metrics = [], []
        train(model, engine, 0, STEPS, metrics=full_metrics)
        engine.finish()
        full = digest(flat(model))
        model, engine = build(variant, alpha)
        save_at = 7 if variant == "streaming" else 6  # streaming: fragment 1 sent at step 7, applied at 8
        train(model, engine, 0, save_at, metrics=resumed_metrics)
        in_flight = bool(engine.outer.in_flight)
        save_rank_state(f"{out_dir}/checkpoint", engine)
        dist.barrier()
        model, engine = build(variant, alpha, seed=1)
        resume_rank_state([f"{out_dir}/checkpoint"], engine)
        train(model, engine, save_at, STEPS, metrics=resumed_metrics)
        engine.finish()
        return {"full": full, "resumed": digest(flat(model)), "in_flight_when_saved": in_flight,
                "full_metrics": full_metrics, "resumed_metrics": resumed_metrics}

    model, engine = build(variant, alpha)
    log = {"weights": [], "globals": [], "collectives": [], "wait": [], "counts": count_collectives()}
    train(model, engine, 0, STEPS, log)
    expected_globals, expected_weights = reference(variant, alpha)
    weight_errors = [(got - want).abs().max().item() for got, want in zip(log["weights"], expected_weights[rank])]
    global_errors = [(got - want).abs().max().item() for got, want in zip(log["globals"], expected_globals)]
    engine.finish()
    final = engine.outer.gather_eval()
    return {
        "weight_errors": weight_errors, "global_errors": global_errors, "collectives": log["collectives"],
        "wait": log["wait"], "evaluated": log["evaluated"], "evaluated_is_global": log["evaluated_is_global"],
        "boundary_is_global": log["boundary_is_global"],
        "final_model": digest(flat(model)), "final_is_global": bool(torch.equal(flat(model), final.double())),
        "bytes_sent": engine.last_metrics["bytes_sent"], "model_numel": engine.flat.numel,
    }


if __name__ == "__main__":
    main(run)
