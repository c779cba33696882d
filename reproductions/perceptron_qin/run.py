"""Qin, Etesami, Uribe, "Faster Convergence of Local SGD for Over-Parameterized Models" (arXiv:2201.12719), §4.2:
a perceptron on linearly separable data, 16 workers, Local SGD with K local steps, three data partitions.

Sixteen real processes (torch.multiprocessing, gloo) each run this package's `RoundEngine` with
outer_optimizer="average" (Local SGD / FedAvg) over their own shard; a worker without data (worst case) only
calls `engine.step()` and takes part in every sync with its replica unchanged.

    python reproductions/perceptron_qin/run.py            # the full run (about 5 minutes on 2 CPU cores)
    python reproductions/perceptron_qin/run.py --smoke    # a few rounds, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_localsgd.core.engine import RoundEngine
from hf_localsgd.core.partition import even_shards, hyperplane_slices, worst_case_shards

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL_STEPS = (1, 2, 5, 10, 20)  # the paper's K; this package calls it H (sync_every)
PARTITIONS = ("even", "pathological", "worst_case")


def make_data(n: int, d: int, gap: float, seed: int = 0):
    """N points uniform in [−1, 1]^d, labelled by a random hyperplane, the two sides pulled apart by `gap`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
    normal = torch.randn(d, generator=g, dtype=torch.float64)
    normal /= normal.norm()
    offset = float(torch.rand((), generator=g, dtype=torch.float64) * 0.2 - 0.1)
    y = torch.where(x @ normal > offset, 1.0, -1.0).double()
    x = x + y[:, None] * normal * gap / 2
    return x.float(), y.float(), normal, offset + 0.0  # (the pull keeps the plane where it was)


def shards(partition: str, x, normal, offset, workers: int) -> list[list[int]]:
    if partition == "even":
        return even_shards(len(x), workers, seed=1)
    if partition == "pathological":  # 17 parallel, equally spaced hyperplanes; one slice per worker
        return hyperplane_slices(x, normal.float(), offset, workers)
    return worst_case_shards(len(x), workers)


def squared_hinge(model, x, y) -> torch.Tensor:
    return torch.clamp(1 - y * model(x).squeeze(1), min=0).pow(2).mean()


def worker(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.workers))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    x, y, normal, offset = make_data(args.n, args.d, args.gap)
    results = {}
    for partition in PARTITIONS:
        mine = shards(partition, x, normal, offset, args.workers)[rank]
        xs, ys = x[mine], y[mine]
        for k in LOCAL_STEPS:
            model = torch.nn.Linear(args.d, 1)
            torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
            optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
            engine = RoundEngine(model, sync_every=k, outer_optimizer="average")
            losses = []
            with torch.no_grad():
                losses.append(squared_hinge(model, x, y).item())
            while engine.num_syncs < args.rounds:
                if len(mine):  # the local loss of worker i is the mean over its own points (full local batch)
                    squared_hinge(model, xs, ys).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                if engine.step() and rank == 0:  # the global model is in the model right after a sync
                    with torch.no_grad():
                        losses.append(squared_hinge(model, x, y).item())
            results[f"{partition}/{k}"] = losses
            if rank == 0:
                print(f"{partition:12s} K={k:2d}: loss {losses[0]:.3f} -> {losses[-1]:.5f} after {args.rounds} "
                      f"rounds ({len(xs)} points on worker 0)", flush=True)
    if rank == 0:
        sizes = {p: [len(s) for s in shards(p, x, normal, offset, args.workers)] for p in PARTITIONS}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"settings": vars(args), "shard_sizes": sizes, "losses": results}, f)
    dist.barrier()
    dist.destroy_process_group()


def slope(losses: list[float]) -> float:
    """Least-squares slope of 1/loss against the round, over the second half of the run (past the transient)."""
    inv = torch.tensor([1 / v for v in losses], dtype=torch.float64)
    r = torch.arange(len(inv), dtype=torch.float64)
    half = len(inv) // 2
    r, inv = r[half:], inv[half:]
    return float(((r - r.mean()) * (inv - inv.mean())).sum() / ((r - r.mean()) ** 2).sum())


def report(out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out, "results.json")) as f:
        data = json.load(f)
    losses = data["losses"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for col, partition in enumerate(PARTITIONS):
        for k in LOCAL_STEPS:
            curve = losses[f"{partition}/{k}"]
            axes[0, col].semilogy(curve, label=f"K={k}")
            axes[1, col].plot([1 / v for v in curve], label=f"K={k}")
        axes[0, col].set_title(f"{partition}: training loss (Fig. 4)")
        axes[1, col].set_title(f"{partition}: 1/training loss (Fig. 5)")
        axes[1, col].set_xlabel("communication rounds")
        axes[0, col].legend(fontsize=8)
    fig.suptitle("Local SGD, perceptron, 16 workers (hf_localsgd RoundEngine, outer_optimizer='average')")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "perceptron.png"), dpi=90)
    table = {p: {k: slope(losses[f"{p}/{k}"]) for k in LOCAL_STEPS} for p in PARTITIONS}
    with open(os.path.join(out, "slopes.json"), "w") as f:
        json.dump(table, f, indent=1)
    print("slope of 1/loss per round (second half):")
    for p in PARTITIONS:
        print(f"  {p:12s} " + "  ".join(f"K={k}: {table[p][k]:.3g}" for k in LOCAL_STEPS))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="4 workers, 1,000 points, 3 rounds")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--gap", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.075)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.n, args.rounds = 4, 1000, 3
        args.out = os.path.join(args.out, "smoke") if args.out != HERE else os.path.join("/tmp", "perceptron_smoke")
    os.makedirs(args.out, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    mp.spawn(worker, args=(args, port), nprocs=args.workers, join=True)
    report(args.out)
    print(f"done in {time.time() - started:.0f} s; wrote {args.out}/perceptron.png", file=sys.stderr)


if __name__ == "__main__":
    main()
