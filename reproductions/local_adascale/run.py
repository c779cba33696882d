"""Reproduce "On the Choice of Learning Rate for Local SGD" (Balles, Teja S, Archambeau; TMLR 2024) with
hf_localsgd's own code: the gain ratio of its Fig. 3 (`hf_localsgd.core.adascale.gain_ratio`), LocalAdaScale
against fixed learning rates at K = 8 workers (8 gloo processes, each a `RoundEngine`), and its cost model
(Eq. 16) from the steps those runs took and the m that `hf-localsgd advise` measured.

    python reproductions/local_adascale/run.py            # ~3-6 minutes on 2 CPU cores
    python reproductions/local_adascale/run.py --smoke    # a few steps on 2 workers: does it still run?

Writes fig3_gain_ratio.png, steps_to_target.png, cost_model.png and results.json next to this file (or to
--out). README.md holds the commands, the paper's claims and the table of its numbers next to ours.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_localsgd import RoundEngine
from hf_localsgd.core.adascale import gain_ratio


HERE = os.path.dirname(os.path.abspath(__file__))
DIM, HIDDEN, NOISE, BATCH, EVAL_SAMPLES = 20, 32, 0.5, 8, 2000


# ---------------------------------------------------------------------- Fig. 3: the gain ratio
def gain_ratio_curves(K: int = 8, Hs=(1, 2, 4, 8, 16, 32), points: int = 200) -> dict:
    """ρ of Eq. 14 (c = 1) against σ²/G on a log grid, one curve per H; H = 1 is AdaScale."""
    xs = [10 ** (-3 + 7 * i / (points - 1)) for i in range(points)]
    return {"K": K, "x": xs, "curves": {H: [gain_ratio(1.0, x, K, H) for x in xs] for H in Hs}}


def plot_gain_ratio(curves: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, inset) = plt.subplots(1, 2, figsize=(10, 4))
    for H, ys in curves["curves"].items():
        label = "AdaScale (H = 1)" if H == 1 else f"LocalAdaScale H = {H}"
        ax.plot(curves["x"], ys, label=label)
        small = [(x, y) for x, y in zip(curves["x"], ys) if x <= 2]
        inset.plot([x for x, _ in small], [y for _, y in small], label=label)
    for a, title in ((ax, f"gain ratio, K = {curves['K']}"), (inset, "small σ²/G (ρ < 1 for H > 1)")):
        a.set_xscale("log")
        a.axhline(1, color="gray", lw=0.5)
        a.set_xlabel("σ² / G")
        a.set_ylabel("ρ (Eq. 14)")
        a.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- the small problem
def teacher(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(DIM, 8, generator=g) / math.sqrt(DIM), torch.randn(8, 1, generator=g)
    return torch.tanh(x @ w1) @ w2


def batch(generator: torch.Generator, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, DIM, generator=generator)
    return x, teacher(x) + NOISE * torch.randn(n, 1, generator=generator)


def student() -> torch.nn.Module:
    torch.manual_seed(0)  # the same start on every worker
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


def schedule(steps: int, warmup_from: float = 1.0, warmup: int = 0):
    """The base run's lr schedule as a LambdaLR factor: a linear decay to 0 over ``steps``; linear scaling
    warms up from ``warmup_from`` (1/K) over ``warmup`` steps (5% of the budget, as in the paper)."""
    def factor(step: int) -> float:
        decay = max(0.0, (steps - step) / steps)
        if step < warmup:
            return decay * (warmup_from + (1 - warmup_from) * step / warmup)
        return decay
    return factor


def train(config: dict, rank: int, eval_set, eval_every: int) -> dict:
    """One run of the RoundEngine on this worker; rank 0 evaluates the global model after syncs."""
    model = student()
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config["schedule_steps"], *config["warmup"]))
    engine = RoundEngine(model, sync_every=config["H"], outer_optimizer="average", lr_scaling=config["lr_scaling"],
                         lr_scaling_ema=0.9, optimizer=optimizer, lr_scheduler=scheduler,
                         total_steps=config["schedule_steps"], track_metrics=True)
    data = torch.Generator().manual_seed(1000 * config["seed"] + rank)
    curve, rhos, steps = [], [], 0
    while steps < config["max_steps"] and not engine.should_stop:
        engine.begin_step()
        x, y = batch(data)
        torch.nn.functional.mse_loss(model(x), y).backward()
        engine.before_optimizer_step()
        optimizer.step()
        engine.after_optimizer_step()
        scheduler.step()
        optimizer.zero_grad()
        synced = engine.step()
        steps += 1
        if synced:
            rhos.append(engine.last_metrics.get("gain_ratio", 1.0))
            if rank == 0 and (engine.num_syncs % max(1, eval_every // config["H"]) == 0):
                curve.append((steps, evaluate(model, eval_set)))
    engine.finish()
    if rank == 0:
        curve.append((steps, evaluate(model, eval_set)))
    return {"steps": steps, "curve": curve, "rho": rhos}


@torch.no_grad()
def evaluate(model, eval_set) -> float:
    x, y = eval_set
    return torch.nn.functional.mse_loss(model(x), y).item()


def configs(K: int, budget: int, lr: float, Hs) -> list[dict]:
    """What runs on the K workers: synchronous SGD with AdaScale, and per H local SGD at the base lr, with
    linear scaling (K x lr, warmed up) and with LocalAdaScale. The fixed-lr runs take budget / K steps (K
    workers see the base run's samples); the adaptive ones spend the budget in scale-invariant steps."""
    runs = [dict(name="SGD + AdaScale", H=1, lr=lr, lr_scaling="adascale", schedule_steps=budget, warmup=(1.0, 0),
                 max_steps=budget * 4)]
    for H in Hs:
        runs += [
            dict(name=f"local, base lr, H={H}", H=H, lr=lr, lr_scaling="none", schedule_steps=budget // K,
                 warmup=(1.0, 0), max_steps=budget // K),
            dict(name=f"local, linear scaling, H={H}", H=H, lr=K * lr, lr_scaling="none", schedule_steps=budget // K,
                 warmup=(1 / K, max(1, budget // K // 20)), max_steps=budget // K),
            dict(name=f"LocalAdaScale, H={H}", H=H, lr=lr, lr_scaling="local_adascale", schedule_steps=budget,
                 warmup=(1.0, 0), max_steps=budget * 4),
        ]
    for seed, run in enumerate(runs):
        run["seed"] = seed + 1
    return runs


def worker(rank: int, K: int, port: int, runs: list[dict], queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=K)
    eval_set = batch(torch.Generator().manual_seed(99), EVAL_SAMPLES)
    results = []
    for run in runs:
        started = time.perf_counter()
        result = train(run, rank, eval_set, eval_every=16)
        results.append({**run, **result, "seconds": time.perf_counter() - started})
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def base_run(budget: int, lr: float, eval_set) -> dict:
    """The base case, one worker and H = 1 (the engine in one process communicates nothing)."""
    run = dict(name="base (K = 1)", H=1, lr=lr, lr_scaling="none", schedule_steps=budget, warmup=(1.0, 0),
               max_steps=budget, seed=0)
    return {**run, **train(run, 0, eval_set, eval_every=16)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_to(curve, target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


# ---------------------------------------------------------------------- Eq. 16: the cost model
def pseudo_wall_clock(n: int, K: int, H: int, m: float) -> float:
    """Eq. 16: T = n / K (1 + m / H), in units of one minibatch step (n: steps of each of the K workers, so
    n / K of the paper's epochs-based n is per-worker steps here: T = steps (1 + m / H) / K up to a constant)."""
    return n * (1 + m / H)


def crossover(n_sync: int, n_local: int, H: int) -> float | None:
    """The m above which local SGD with n_local steps at H beats synchronous SGD's n_sync steps (Eq. 16)."""
    # n_local (1 + m/H) < n_sync (1 + m)  <=>  m (n_sync - n_local / H) > n_local - n_sync
    slope = n_sync - n_local / H
    if n_local <= n_sync:
        return 0.0
    return (n_local - n_sync) / slope if slope > 0 else None


def plot_results(base: dict, results: list[dict], target: float, measured_m: dict, path_steps: str,
                 path_cost: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(*zip(*base["curve"]), color="black", label=base["name"])
    for r in results:
        style = "-" if "AdaScale" in r["name"] else ("--" if "linear" in r["name"] else ":")
        diverged = not math.isfinite(r["curve"][-1][1]) or r["curve"][-1][1] > 10
        ax.plot(*zip(*r["curve"]), style, label=r["name"] + (" (diverged, off the plot)" if diverged else ""))
    ax.axhline(target, color="gray", lw=0.8, label="target")
    ax.set_ylim(0.2, 3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer steps per worker")
    ax.set_ylabel("held-out MSE")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path_steps, dpi=110)
    plt.close(fig)

    K = results[0]["K"]
    sync = next(r for r in results if r["H"] == 1)
    ms = [10 ** (-2 + 4 * i / 99) for i in range(100)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ms, [pseudo_wall_clock(sync["steps"], K, 1, m) for m in ms], color="black", label=sync["name"])
    for r in results:
        if r["name"].startswith("LocalAdaScale"):
            ax.plot(ms, [pseudo_wall_clock(r["steps"], K, r["H"], m) for m in ms], "--", label=r["name"])
    for label, m in measured_m.items():
        ax.axvline(m, color="gray", lw=0.8)
        ax.text(m, ax.get_ylim()[1], f" {label}", rotation=90, va="top", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("m = t_comm / t_step")
    ax.set_ylabel("pseudo-wall-clock time (steps x (1 + m/H))")
    ax.set_title(f"Eq. 16 with the steps of the K = {K} runs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_cost, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 workers, a few steps: checks that it runs")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--budget", type=int, default=2048, help="the base run's steps S")
    parser.add_argument("--lr", type=float, default=0.05, help="the base run's lr")
    parser.add_argument("--sync_every", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args()
    if args.smoke:
        args.workers, args.budget, args.sync_every = 2, 32, [4]
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)

    curves = gain_ratio_curves()
    plot_gain_ratio(curves, os.path.join(args.out, "fig3_gain_ratio.png"))
    table = {H: {x: gain_ratio(1.0, x, 8, H) for x in (0.0, 0.1, 1.0, 10.0, 100.0, 1000.0)} for H in curves["curves"]}

    eval_set = batch(torch.Generator().manual_seed(99), EVAL_SAMPLES)
    started = time.perf_counter()
    base = base_run(args.budget, args.lr, eval_set)
    # The target: the base run's final held-out loss, with 5% slack for the noise of one evaluation.
    target = 1.05 * base["curve"][-1][1]
    runs = configs(args.workers, args.budget, args.lr, args.sync_every)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(args.workers, free_port(), runs, queue), nprocs=args.workers, start_method="spawn")
    results = queue.get()
    for r in results:
        r["K"] = args.workers
        r["steps_to_target"] = steps_to(r["curve"], target)
        r["final_loss"] = r["curve"][-1][1]
        r["mean_rho"] = sum(r["rho"]) / len(r["rho"]) if r["rho"] else 1.0

    measured_m = {}
    for path in sorted(glob.glob(os.path.join(HERE, "advise_*.json"))):
        measured_m[os.path.basename(path)[len("advise_"):-len(".json")]] = json.load(open(path))["m"]
    sync = next(r for r in results if r["H"] == 1)
    crossovers = {r["name"]: crossover(sync["steps"], r["steps"], r["H"]) for r in results
                  if r["name"].startswith("LocalAdaScale")}
    plot_results(base, results, target, measured_m, os.path.join(args.out, "steps_to_target.png"),
                 os.path.join(args.out, "cost_model.png"))

    summary = {"gain_ratio_table_K8": table, "budget": args.budget, "base_lr": args.lr, "target": target,
               "base": {"steps": base["steps"], "final_loss": base["curve"][-1][1],
                        "steps_to_target": steps_to(base["curve"], target)},
               "runs": [{k: r[k] for k in ("name", "H", "lr", "steps", "steps_to_target", "final_loss", "mean_rho",
                                           "seconds")} for r in results],
               "measured_m": measured_m, "crossover_m": crossovers, "seconds": time.perf_counter() - started}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"target (1.05 x base final loss): {target:.4f}; base: {base['steps']} steps")
    print(f"{'run':34} {'steps':>6} {'to target':>9} {'final':>8} {'mean ρ':>7}")
    for r in results:
        print(f"{r['name']:34} {r['steps']:>6} {str(r['steps_to_target']):>9} {r['final_loss']:>8.4f} "
              f"{r['mean_rho']:>7.3f}")
    print("local SGD beats SGD + AdaScale (Eq. 16) for m above:", {k: v for k, v in crossovers.items()})
    print("measured m:", measured_m, f"({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
