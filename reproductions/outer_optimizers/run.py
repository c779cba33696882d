"""The outer-optimizer report ("Understanding Outer Optimizers in Local SGD", arXiv:2509.10439), App. A.1.2,
Fig. 3: how averaging, Nesterov with a high outer lr and schedule-free SGD degrade as H grows.

Two real processes (torch.multiprocessing, gloo), each a plain AdamW loop over this package's `RoundEngine`, train
the demo GPT-Neo (hidden 64, 2 layers) on the built-in stories for the same number of inner steps at every H;
the held-out loss of the global model (schedule-free: its averaged x) is measured at the end.

    python reproductions/outer_optimizers/run.py          # 12 runs, a few minutes on 2 CPU cores
    python reproductions/outer_optimizers/run.py --smoke  # 2 runs of a few steps, into /tmp
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
# name: (outer_optimizer, outer_lr, outer_momentum)
METHODS = {
    "averaging": ("average", 1.0, 0.0),
    "nesterov (outer lr 1.0)": ("nesterov", 1.0, 0.9),
    "schedule-free SGD": ("schedule_free", 2.0, 0.2),
}


def tokenize(block_size: int, path: str) -> None:
    from hf_localsgd.recipes.data import DataArguments, build_lm_datasets, load_tokenizer

    tokenizer = load_tokenizer("builtin:stories")
    train, held_out = build_lm_datasets(DataArguments(block_size=block_size), tokenizer)
    torch.save({"train": torch.tensor(train["input_ids"]), "held_out": torch.tensor(held_out["input_ids"][:128]),
                "vocab": len(tokenizer)}, path)


def worker(rank: int, args, port: int, data_path: str) -> None:
    from transformers import set_seed

    from hf_localsgd.recipes.models import build_model, build_model_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    data = torch.load(data_path)
    mine = data["train"][rank :: args.workers]
    results = {}
    for name, (outer, lr, momentum) in METHODS.items():
        for h in args.sync_every:
            set_seed(0)  # the same initial model for every run (the engine also broadcasts rank 0's)
            model = build_model(build_model_config("demo", data["vocab"]))
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
            engine = RoundEngine(model, sync_every=h, outer_optimizer=outer, outer_lr=lr, outer_momentum=momentum)
            order = torch.randperm(len(mine), generator=torch.Generator().manual_seed(rank))
            for step in range(args.steps):
                rows = order[(step * args.batch) % len(mine) :][: args.batch]
                batch = mine[rows]
                model(input_ids=batch, labels=batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
                engine.step()
            engine.finish()  # the global model (schedule-free: x) stays in the model
            with torch.no_grad():
                held = data["held_out"]
                loss = sum(model(input_ids=held[i : i + 32], labels=held[i : i + 32]).loss.item()
                           for i in range(0, len(held), 32)) / math.ceil(len(held) / 32)
            results[f"{name}/{h}"] = loss
            if rank == 0:
                print(f"{name:24s} H={h:3d}: held-out loss {loss:.4f} (perplexity {math.exp(loss):.2f})", flush=True)
    if rank == 0:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"settings": vars(args), "held_out_loss": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def report(out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out, "results.json")) as f:
        data = json.load(f)
    hs, losses = data["settings"]["sync_every"], data["held_out_loss"]
    fig, ax = plt.subplots(figsize=(6, 4))
    print("perplexity degradation from the smallest to the largest H:")
    for name in METHODS:
        ppl = [math.exp(losses[f"{name}/{h}"]) for h in hs]
        ax.plot(hs, ppl, marker="o", label=name)
        print(f"  {name:24s} {ppl[0]:.2f} -> {ppl[-1]:.2f}: {100 * (ppl[-1] / ppl[0] - 1):+.1f}%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("inner steps H (same total steps)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Outer optimizers vs H (demo GPT-Neo, 2 workers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "outer_vs_h.png"), dpi=90)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="H in {2, 4}, 4 steps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sync_every", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=HERE)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sync_every, args.steps = [2, 4], 4
        args.out = os.path.join("/tmp", "outer_optimizers_smoke") if args.out == HERE else args.out
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
    print(f"done in {time.time() - started:.0f} s; wrote {args.out}/outer_vs_h.png", file=sys.stderr)


if __name__ == "__main__":
    main()
