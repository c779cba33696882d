"""Time and steps to DDP's loss: DDP vs Local SGD vs DiLoCo vs PALSGD on 2 workers (issue part 3).

Two sub-commands.

``run`` is what every rank executes (under ``accelerate launch`` or any torchrun-style launcher: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). It is ``python -m hf_localsgd.train`` (same recipe, same
flags) with one addition: rank 0 writes one JSON line per optimizer step to ``--log`` with the step, its
training loss (rank 0's own loss on its own batch: no extra collective, so the timing is not changed by
the measurement) and the wall-clock seconds since ``on_train_begin``. Trainer's own loss logging is switched
off (``logging_strategy=no``), because it all-gathers the loss, one extra collective per logged step.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml bench/time_to_loss.py run \\
        --log runs/loopback/ddp_0.jsonl recipes/gptneo-tinystories/demo.yaml --trainer ddp ...

``bench/launch_wan.sh`` runs the whole comparison (all methods, interleaved repetitions) on loopback or
inside the network namespaces of ``../shared/tools/wan`` (or any per-rank prefix and master address).

``analyze`` reads the logs ``DIR/<method>_<rep>.jsonl`` and prints the table:

    python bench/time_to_loss.py analyze runs/loopback --n 150 --window 25

For each repetition, the target is DDP's loss at step N, smoothed (the mean of the last ``--window`` steps
ending at N); for each method, the first step whose trailing mean is at or below it, the wall-clock time of
that step, and the ratio of that time to DDP's time for N steps in the *same* repetition. The table gives
medians over repetitions, and each method's smoothed loss at step N (equal steps).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(argv: list[str]) -> None:
    import torch.distributed as dist
    from transformers import TrainerCallback

    import hf_localsgd.recipes.train as train_script

    log_path = argv[argv.index("--log") + 1]
    argv = argv[: argv.index("--log")] + argv[argv.index("--log") + 2:]

    class StepLog(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer
            self.file = None
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            rank = dist.get_rank() if dist.is_initialized() else 0
            if rank == 0:
                os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
                self.file = open(log_path, "w")
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.file is not None:
                loss = self.trainer._step_loss
                self.file.write(json.dumps({"step": state.global_step, "loss": loss,
                                            "time": time.perf_counter() - self.start}) + "\n")

        def on_train_end(self, args, state, control, **kwargs):
            if self.file is not None:
                self.file.close()
                self.file = None

    def timed(base):
        class Timed(base):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self._step_loss = float("nan")
                # Added last: on_step_end runs after LocalSGDCallback's (so a sync's time is in its step).
                self.add_callback(StepLog(self))

            def training_step(self, *a, **k):
                loss = super().training_step(*a, **k)
                self._step_loss = loss.detach().float().item()
                return loss

        return Timed

    train_script.Trainer = timed(train_script.Trainer)
    train_script.LocalSGDTrainer = timed(train_script.LocalSGDTrainer)
    train_script.main(argv + ["--logging_strategy", "no", "--eval_strategy", "no", "--save_strategy", "no"])


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def smoothed(rows: list[dict], window: int) -> list[float]:
    losses = [r["loss"] for r in rows]
    return [statistics.fmean(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]


def analyze(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="time_to_loss.py analyze")
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--n", type=int, required=True, help="DDP's step count N that sets the target")
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--baseline", default="ddp")
    args = parser.parse_args(argv)
    for d in args.dirs:
        logs: dict[str, dict[str, list[dict]]] = {}
        for path in sorted(glob.glob(os.path.join(d, "*.jsonl"))):
            method, rep = Path(path).stem.rsplit("_", 1)
            logs.setdefault(method, {})[rep] = load(path)
        reps = sorted(logs[args.baseline])
        methods = [args.baseline] + sorted(m for m in logs if m != args.baseline)
        res = {m: {"steps": [], "time": [], "ratio": [], "loss_n": [], "sps": [], "miss": 0} for m in methods}
        targets = []
        for rep in reps:
            base = logs[args.baseline][rep]
            if len(base) < args.n:
                continue
            target = smoothed(base, args.window)[args.n - 1]
            base_time = base[args.n - 1]["time"]
            targets.append(target)
            for m in methods:
                rows = logs[m].get(rep)
                if rows is None:
                    continue
                sm = smoothed(rows, args.window)
                if len(rows) >= args.n:
                    res[m]["loss_n"].append(sm[args.n - 1])
                    res[m]["sps"].append(args.n / rows[args.n - 1]["time"])
                hit = next((i for i, v in enumerate(sm) if i >= args.window - 1 and v <= target), None)
                if m == args.baseline:
                    hit = args.n - 1  # by definition: DDP reaches its own loss at N
                if hit is None:
                    res[m]["miss"] += 1
                    continue
                res[m]["steps"].append(rows[hit]["step"])
                res[m]["time"].append(rows[hit]["time"])
                res[m]["ratio"].append(rows[hit]["time"] / base_time)
        med = lambda xs, fmt: (fmt.format(statistics.median(xs)) if xs else "n/a")  # noqa: E731
        print(f"\n{d}: {len(targets)} repetition(s); target = DDP's loss at step {args.n} "
              f"(trailing {args.window}-step mean), median {med(targets, '{:.3f}')}\n")
        print("| method | steps to target | wall-clock to target | time vs DDP (median of per-rep ratios) | "
              f"loss at step {args.n} | steps/s (first {args.n}) |")
        print("|---|---|---|---|---|---|")
        for m in methods:
            r = res[m]
            missed = f" ({r['miss']} rep(s) never reached it)" if r["miss"] else ""
            ratio = "1 (baseline)" if m == args.baseline else med(r["ratio"], "**{:.2f}x**")
            if m != args.baseline and len(r["ratio"]) > 1:
                ratio += " (" + ", ".join(f"{x:.2f}" for x in r["ratio"]) + ")"
            print(f"| {m} | {med(r['steps'], '{:.0f}')}{missed} | {med(r['time'], '{:.1f} s')} | {ratio} | "
                  f"{med(r['loss_n'], '{:.3f}')} | {med(r['sps'], '{:.2f}')} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        run(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "analyze":
        analyze(sys.argv[2:])
    else:
        sys.exit(__doc__)
