"""Time and steps to DDP's loss: DDP vs Local SGD vs DiLoCo (blocking, overlapped, streaming, int8) vs PALSGD on 2
workers (BENCHMARKS.md §3 and §7).

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

For `LocalSGDTrainer` runs rank 0 also logs, per step, the engine's counters (cumulative): ``sync_s``
(`RoundEngine.seconds_in_sync`: host seconds the inner loop spent inside ``sync()`` and the streaming steps'
``at_step``), ``syncs`` (`num_syncs`, rounds), ``bytes`` (`bytes_sent` by this rank) and ``flush_s`` (the final
``flush()`` of an overlapped run, which waits for the last sum in flight and is not in ``seconds_in_sync``);
at the end a ``summary`` line (the same counters, the parameter count; for DDP the bytes of its per-step ring
all-reduce, ``2 (K-1)/K`` x 4 bytes x parameters) and an ``eval`` line (the held-out metrics of the final
global model). When the logs have summaries, ``analyze`` adds a per-sync table: wait per sync
(``seconds_in_sync / num_syncs``), bytes per sync, the median step time, the losses at step ``--m`` (default:
the reference's last step), each with its ratio to ``--reference`` (default ``diloco``, blocking DiLoCo) in
the same repetition; every cell is the median over repetitions (min-max).
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
            self.engine = None
            self.flush_seconds = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            rank = dist.get_rank() if dist.is_initialized() else 0
            if rank == 0:
                os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
                self.file = open(log_path, "w")
            # LocalSGDTrainer's engine (built by its callback's on_train_begin, which runs before this one). Its
            # counters are read directly: Trainer's logging is off, so the engine's last_metrics are not computed.
            local_sgd = getattr(self.trainer, "local_sgd", None)
            self.engine = None if local_sgd is None else local_sgd.engine
            if self.engine is not None:  # the final flush (outer_overlap) is not in seconds_in_sync: timed here
                flush = self.engine.flush

                def timed_flush():
                    started = time.perf_counter()
                    try:
                        return flush()
                    finally:
                        self.flush_seconds += time.perf_counter() - started

                self.engine.flush = timed_flush
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.file is not None:
                row = {"step": state.global_step, "loss": self.trainer._step_loss,
                       "time": time.perf_counter() - self.start}
                if self.engine is not None:  # cumulative: host seconds inside sync()/at_step, syncs, bytes sent
                    row.update(sync_s=self.engine.seconds_in_sync, syncs=self.engine.num_syncs,
                               bytes=self.engine.bytes_sent, flush_s=self.flush_seconds)
                self.file.write(json.dumps(row) + "\n")

        def on_train_end(self, args, state, control, **kwargs):
            if self.file is not None:
                params = sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)
                world = dist.get_world_size() if dist.is_initialized() else 1
                summary = {"params": params, "world_size": world, "train_seconds": time.perf_counter() - self.start}
                if self.engine is not None:
                    summary.update(seconds_in_sync=self.engine.seconds_in_sync, num_syncs=self.engine.num_syncs,
                                   bytes_sent=self.engine.bytes_sent, flush_seconds=self.flush_seconds)
                else:  # DDP: one ring all-reduce of the float32 gradients per step (what the engine counts)
                    summary.update(bytes_per_step=2 * (world - 1) / world * 4 * params)
                self.summary = summary
                self.file.write(json.dumps({"summary": summary}) + "\n")
                self.file.flush()

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
    metrics = train_script.main(argv + ["--logging_strategy", "no", "--eval_strategy", "no", "--save_strategy", "no"])
    if int(os.environ.get("RANK", "0")) == 0:  # the held-out loss of the final global model (the group is gone)
        with open(log_path, "a") as f:
            f.write(json.dumps({"eval": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}) + "\n")


def load(path: str) -> list[dict]:
    """The per-step rows of a log (its summary and eval lines, if any, are in `load_extra`)."""
    with open(path) as f:
        return [row for line in f if line.strip() and "step" in (row := json.loads(line))]


def load_extra(path: str) -> dict:
    """{"summary": {...}, "eval": {...}} of a log, where present."""
    extra = {}
    with open(path) as f:
        for line in f:
            if line.strip() and "step" not in (row := json.loads(line)):
                extra.update(row)
    return extra


def smoothed(rows: list[dict], window: int) -> list[float]:
    losses = [r["loss"] for r in rows]
    return [statistics.fmean(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]


def analyze(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="time_to_loss.py analyze")
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--n", type=int, required=True, help="DDP's step count N that sets the target")
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--baseline", default="ddp")
    parser.add_argument("--reference", default="diloco",
                        help="the method the per-sync table's ratios are to (blocking DiLoCo)")
    parser.add_argument("--m", type=int, default=None,
                        help="the step of 'loss at step M' in the per-sync table (default: the reference's last)")
    args = parser.parse_args(argv)
    for d in args.dirs:
        logs: dict[str, dict[str, list[dict]]] = {}
        extras: dict[str, dict[str, dict]] = {}
        for path in sorted(glob.glob(os.path.join(d, "*.jsonl"))):
            method, rep = Path(path).stem.rsplit("_", 1)
            logs.setdefault(method, {})[rep] = load(path)
            extras.setdefault(method, {})[rep] = load_extra(path)
        reps = sorted(logs[args.baseline])
        methods = [args.baseline] + sorted(m for m in logs if m != args.baseline)
        res = {m: {"steps": [], "time": [], "ratio": [], "loss_n": [], "sps": [], "miss": 0, "by_rep": {}}
               for m in methods}
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
                res[m]["by_rep"][rep] = rows[hit]["time"]
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
        if any("summary" in e for per_rep in extras.values() for e in per_rep.values()):
            sync_table(logs, extras, res, methods, args)


def spread(xs: list[float], fmt: str, bold: bool = False) -> str:
    """'median (min–max)' of the per-repetition values."""
    if not xs:
        return "n/a"
    text = fmt.format(statistics.median(xs))
    text = f"**{text}**" if bold else text
    return text if len(xs) == 1 else f"{text} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def sync_table(logs, extras, res, methods, args) -> None:
    """Per-sync figures from the engine's counters (the logs' summary lines): the inner loop's wait per sync
    (host seconds inside sync() and the streaming steps' at_step, over the syncs; the final flush of an
    overlapped run apart), bytes sent per sync, their ratios to the reference method in the same repetition,
    the median step time (the compute, and what a sum in flight takes from it), the losses at equal steps."""
    ref = args.reference
    m_step = args.m or min((len(rows) for rows in logs.get(ref, {}).values()), default=None)
    out = {m: {k: [] for k in ("target", "target_ratio", "run", "run_ratio", "wait", "wait_ratio", "bytes",
                               "bytes_ratio", "flush", "step", "step_ratio", "syncs", "loss_m", "loss_m_ratio",
                               "eval", "eval_ratio")} for m in methods}

    def figures(m, rep):
        rows, extra = logs[m][rep], extras[m][rep]
        summary = extra.get("summary", {})
        f = {"step": statistics.median(b["time"] - a["time"] for a, b in zip(rows[:-2], rows[1:-1]))}
        if rep in res[m]["by_rep"]:
            f["target"] = res[m]["by_rep"][rep]
        if m_step and len(rows) >= m_step and m != args.baseline:
            f["run"] = rows[m_step - 1]["time"]
        if summary.get("num_syncs"):
            f.update(wait=summary["seconds_in_sync"] / summary["num_syncs"], syncs=summary["num_syncs"],
                     bytes=summary["bytes_sent"] / summary["num_syncs"], flush=summary["flush_seconds"])
        elif "bytes_per_step" in summary:
            f["bytes"] = summary["bytes_per_step"]
        if m_step and len(rows) >= m_step:
            f["loss_m"] = smoothed(rows, args.window)[m_step - 1]
        if "eval_loss" in extra.get("eval", {}):
            f["eval"] = extra["eval"]["eval_loss"]
        return f

    for rep in sorted(logs.get(ref, {})):
        base = figures(ref, rep)
        for m in methods:
            if rep not in logs[m]:
                continue
            f = figures(m, rep)
            for key, value in f.items():
                out[m][key].append(value)
                if f"{key}_ratio" in out[m] and key in base and base[key]:
                    out[m][f"{key}_ratio"].append(value / base[key])
    print(f"\nPer sync (engine counters), ratios to {ref} in the same repetition; median (min–max) over "
          f"repetitions; loss at step {m_step} = trailing {args.window}-step mean; eval = held-out loss of the final "
          "global model\n")
    print(f"| method | time to target vs DDP | vs {ref} | {m_step} steps vs {ref} | wait per sync | vs {ref} | syncs | "
          f"final flush | bytes per sync (DDP: per step) | vs {ref} | median step | vs {ref} | loss at step {m_step} | "
          f"vs {ref} | eval loss | vs {ref} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        o = out[m]
        ratio = "1 (baseline)" if m == args.baseline else spread(res[m]["ratio"], "{:.2f}x", bold=True)
        print(f"| {m} | {ratio} | {spread(o['target_ratio'], '{:.2f}x')} | {spread(o['run_ratio'], '{:.2f}x')} | "
              f"{spread(o['wait'], '{:.3f} s')} | {spread(o['wait_ratio'], '{:.3f}x', bold=True)} | "
              f"{spread(o['syncs'], '{:.0f}')} | {spread(o['flush'], '{:.2f} s')} | "
              f"{spread([b / 1e6 for b in o['bytes']], '{:.2f} MB')} | {spread(o['bytes_ratio'], '{:.4f}x')} | "
              f"{spread(o['step'], '{:.3f} s')} | {spread(o['step_ratio'], '{:.2f}x')} | "
              f"{spread(o['loss_m'], '{:.3f}')} | {spread(o['loss_m_ratio'], '{:.4f}x')} | "
              f"{spread(o['eval'], '{:.3f}')} | {spread(o['eval_ratio'], '{:.4f}x')} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        run(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "analyze":
        analyze(sys.argv[2:])
    else:
        sys.exit(__doc__)
