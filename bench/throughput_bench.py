"""Inner-step throughput of ``LocalSGDTrainer`` next to plain ``transformers.Trainer`` (issue part 4).

One process, the same model (GPT-Neo 8M of ``hf_localsgd.recipes.models``), the same random token batches, the same
seed. Each repetition trains a fresh model for ``--steps`` steps with each trainer, in an order that
alternates every repetition; a ``TrainerCallback`` stamps ``time.perf_counter()`` at every ``on_step_begin``
and the timed window is steps ``--skip`` .. ``--steps - 1`` (begin to begin), so the first steps (allocator
warm-up) and the last step (where ``LocalSGDTrainer`` runs its final, partial sync) are outside it.
``sync_every`` is larger than ``--steps``: no outer sync falls inside the window, which measures what every
inner step costs (the callback's hooks, the engine's bookkeeping), not the sync (see ``bench/sync_bench.py``).

    OMP_NUM_THREADS=1 python bench/throughput_bench.py --reps 7 --steps 40 --json bench/throughput.json

The ratio reported is, per repetition, Trainer's seconds per step / LocalSGDTrainer's seconds per step
(so > 1 means LocalSGDTrainer is faster); the table gives the median over repetitions. Target: >= 0.98.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer  # noqa: E402
from hf_localsgd.recipes.models import build_model, build_model_config  # noqa: E402


class StepClock(TrainerCallback):
    def __init__(self):
        self.stamps: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def run_one(kind: str, model_name: str, dataset, steps: int, skip: int, batch: int, outdir: str,
            outer: str, pseudo_sync_prob: float) -> float:
    set_seed(0)
    model = build_model(build_model_config(model_name))
    common = dict(
        output_dir=outdir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
        max_grad_norm=1.0, lr_scheduler_type="constant", logging_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=0,
        dataloader_num_workers=0,
    )
    if kind == "Trainer":
        args = TrainingArguments(**common)
        trainer_class = Trainer
    else:
        args = LocalSGDConfig(**common, sync_every=10 * steps, outer_optimizer=outer,
                              pseudo_sync_prob=pseudo_sync_prob)
        trainer_class = LocalSGDTrainer
    clock = StepClock()
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                            callbacks=[clock])
    trainer.train()
    window = clock.stamps[skip:steps]
    return (window[-1] - window[0]) / (len(window) - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-neo-8m")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--outer_optimizer", default="nesterov")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    vocab = build_model_config(args.model).vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.steps * args.batch, args.block_size), generator=g)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    dataset.set_format("torch")

    kinds = ["Trainer", "LocalSGDTrainer"]
    samples = {k: [] for k in kinds}
    ratios = []
    with tempfile.TemporaryDirectory() as outdir:
        run_one("Trainer", args.model, dataset, args.skip + 3, 1, args.batch, outdir, args.outer_optimizer, 0.0)
        for rep in range(args.reps):
            order = kinds if rep % 2 == 0 else kinds[::-1]
            this = {}
            for kind in order:
                this[kind] = run_one(kind, args.model, dataset, args.steps, args.skip, args.batch, outdir,
                                     args.outer_optimizer, 0.0)
                samples[kind].append(this[kind])
            ratios.append(this["Trainer"] / this["LocalSGDTrainer"])
            print(f"rep {rep}: Trainer {this['Trainer']*1e3:.1f} ms/step, LocalSGDTrainer "
                  f"{this['LocalSGDTrainer']*1e3:.1f} ms/step, throughput ratio {ratios[-1]:.3f}", flush=True)

    med = statistics.median(ratios)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"\nmachine: {os.cpu_count()} cpus, {device}; torch {torch.__version__}, threads {args.threads}")
    print(f"model {args.model}, batch {args.batch} x {args.block_size} tokens, steps {args.skip}..{args.steps - 1} "
          f"timed, {args.reps} reps (order alternated)\n")
    print("| trainer | median ms/step | p10–p90 ms/step | throughput vs Trainer (median of per-rep ratios) |")
    print("|---|---|---|---|")
    for kind in kinds:
        s = sorted(samples[kind])
        lo, hi = s[int(0.1 * (len(s) - 1))], s[int(round(0.9 * (len(s) - 1)))]
        ratio = "1 (baseline)" if kind == "Trainer" else f"**{med:.3f}x** (min {min(ratios):.3f}, max {max(ratios):.3f})"
        print(f"| {kind} | {statistics.median(s)*1e3:.1f} | {lo*1e3:.1f}–{hi*1e3:.1f} | {ratio} |")
    verdict = "met" if med >= args.target else "MISSED"
    print(f"\ntarget >= {args.target}: {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "samples": samples, "ratios": ratios, "median_ratio": med}, f, indent=1)


if __name__ == "__main__":
    main()
