"""PALSGD ("Pseudo-Asynchronous Local SGD: Robust and Efficient Data-Parallel Training", Naganuma et al.), §4:
at a large H, PALSGD vs DiLoCo vs Local SGD, final loss and time to a target loss, with a small sweep of η.

Two real processes (torch.multiprocessing, gloo), each a plain AdamW loop over this package's `RoundEngine`
(PALSGD through its round hook: `begin_step` / `skips_gradient_step` / `before_optimizer_step` /
`after_optimizer_step`), train the demo GPT-Neo on the built-in stories; the held-out loss of the global model
is measured after every sync.

    python reproductions/palsgd/run.py          # 5 runs, a few minutes on 2 CPU cores
    python reproductions/palsgd/run.py --smoke  # a few steps, into /tmp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_localsgd.core.engine import RoundEngine

HERE = os.path.dirname(os.path.abspath(__file__))
OUTER_LR, MOMENTUM, P = 0.2, 0.9, 0.1  # PALSGD App. C (TinyStories): Nesterov outer lr 0.1-0.2, p = 0.1


def methods(etas) -> dict[str, dict]:
    runs = {"Local SGD": dict(outer_optimizer="average"),
            "DiLoCo": dict(outer_optimizer="nesterov", outer_lr=OUTER_LR, outer_momentum=MOMENTUM)}
    for eta in etas:
        runs[f"PALSGD η={eta:g}"] = dict(outer_optimizer="nesterov", outer_lr=OUTER_LR, outer_momentum=MOMENTUM,
                                        pseudo_sync_prob=P, pseudo_sync_rate=eta)
    return runs


def tokenize(block_size: int, path: str) -> None:
    from hf_localsgd.recipes.data import DataArguments, build_lm_datasets, load_tokenizer

    tokenizer = load_tokenizer("builtin:stories")
    train, held_out = build_lm_datasets(DataArguments(block_size=block_size), tokenizer)
    torch.save({"train": torch.tensor(train["input_ids"]), "held_out": torch.tensor(held_out["input_ids"][:64]),
                "vocab": len(tokenizer)}, path)


@torch.no_grad()
def held_out_loss(model, held) -> float:
    return sum(model(input_ids=held[i : i + 32], labels=held[i : i + 32]).loss.item()
               for i in range(0, len(held), 32)) / math.ceil(len(held) / 32)


def worker(rank: int, args, port: int, data_path: str) -> None:
    from transformers import set_seed

    from hf_localsgd.recipes.models import build_model, build_model_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    data = torch.load(data_path)
    mine, held = data["train"][rank :: args.workers], data["held_out"]
    results = {}
    for name, options in methods(args.etas).items():
        set_seed(0)
        model = build_model(build_model_config("demo", data["vocab"]))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        engine = RoundEngine(model, sync_every=args.sync_every, optimizer=optimizer, seed=0, **options)
        order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(rank))
        curve, train_seconds = [(0, 0.0, held_out_loss(model, held))], 0.0
        for step in range(args.steps):
            started = time.perf_counter()
            rows = order[(step * args.batch) % len(mine) :][: args.batch]
            engine.begin_step()
            if not engine.skips_gradient_step:  # a pseudo-synchronization takes no gradient
                batch = mine[rows]
                model(input_ids=batch, labels=batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            engine.before_optimizer_step()
            optimizer.step()
            engine.after_optimizer_step()
            optimizer.zero_grad()
            synced = engine.step()
            train_seconds += time.perf_counter() - started
            if synced:  # the global model is in the model right after a sync
                curve.append((step + 1, train_seconds, held_out_loss(model, held)))
        results[name] = curve
        if rank == 0:
            print(f"{name:16s} H={args.sync_every}: held-out loss {curve[-1][2]:.4f} after {args.steps} steps, "
                  f"{train_seconds:.0f} s of training", flush=True)
    if rank == 0:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"settings": vars(args), "curves": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def report(out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out, "results.json")) as f:
        data = json.load(f)
    curves = data["curves"]
    target = curves["Local SGD"][-1][2]  # the loss Local SGD ends at
    fig, ax = plt.subplots(figsize=(6.5, 4))
    print(f"target loss {target:.4f} (Local SGD's final held-out loss):")
    for name, curve in curves.items():
        ax.plot([s for s, _, _ in curve], [v for _, _, v in curve], marker="o", label=name)
        hit = next(((s, t) for s, t, v in curve if v <= target), None)
        when = f"step {hit[0]}, {hit[1]:.0f} s" if hit else "not reached"
        print(f"  {name:16s} final {curve[-1][2]:.4f}; target: {when}")
    ax.axhline(target, color="gray", linestyle=":", label="target (Local SGD final)")
    ax.set_xlabel("inner steps")
    ax.set_ylabel("held-out loss (global model)")
    ax.set_title(f"PALSGD vs DiLoCo vs Local SGD, H = {data['settings']['sync_every']}, 2 workers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "palsgd.png"), dpi=90)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="H = 2, 4 steps, one η")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sync_every", type=int, default=64)
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--etas", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sync_every, args.steps, args.etas = 2, 4, [4.0]
        args.out = os.path.join("/tmp", "palsgd_smoke") if args.out == HERE else args.out
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.pt")
        tokenize(args.block_size, data_path)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(args, port, data_path), nprocs=args.workers, join=True)
    report(args.out)
    print(f"done in {time.time() - started:.0f} s; wrote {args.out}/palsgd.png", file=sys.stderr)


if __name__ == "__main__":
    main()
