"""Soak run: a long 2-process run of the demo recipe, watching each rank's resident memory and open file
descriptors at every outer sync. A leak per sync (a buffer, a work handle, a log file, a socket kept by each
collective) is invisible in a 40-step test and fatal in a week-long run; over hundreds of syncs it shows as a
steady growth per sync. Not a test (it takes minutes): BENCHMARKS.md records its figures.

    OMP_NUM_THREADS=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \\
        bench/soak.py --max_steps 2000 --sync_every 4 --json bench/soak.json

Each rank trains the demo recipe (`recipes/gptneo-tinystories/demo.yaml`: its model, data, warm-up and
optimizer; no evaluation, no checkpoints) with `LocalSGDTrainer`, and a callback placed after the local-SGD
one samples, right after every outer sync: this process's `VmRSS` (`/proc/self/status`), the number of
entries of `/proc/self/fd`, the bytes glibc's malloc has handed out and not had back (`mallinfo2`: what a
leak of native memory grows, while RSS also moves with the allocator's free pages) and the number of Python
objects the garbage collector tracks. Rank 0 then prints, per rank, the figures at the first, the 10th sync
(after the first syncs have allocated what every sync reuses) and the last, and the growth per 100 syncs from
the 10th on: the least-squares slope (robust to the allocator's steps) and, for RSS, the plain difference.

It also checks that nothing was lost: Trainer reached `max_steps` on every rank, every rank made every
expected outer sync (`ceil((max_steps - warm-up) / H)`, the last partial round included), every sync was
sampled, and the ranks end with bit-identical, finite weights. It exits 1 when a check fails, or when the
fitted growth per 100 syncs of the memory in use exceeds `--max-heap-growth-mb` or that of open fds
`--max-fd-growth` (so a leak fails a scripted run). RSS is reported, not judged: on glibc it grows in steps
as freed pages stay with the process, without anything leaking (BENCHMARKS.md shows both).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback, default_data_collator  # noqa: E402

from hf_localsgd import LocalSGDTrainer  # noqa: E402
from hf_localsgd.recipes.data import build_lm_datasets, load_tokenizer  # noqa: E402
from hf_localsgd.recipes.train import build_recipe_model, parse_args  # noqa: E402


DEMO = Path(__file__).resolve().parents[1] / "recipes" / "gptneo-tinystories" / "demo.yaml"
SKIP = 10  # syncs before the growth is measured: the first ones allocate what the later ones reuse


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def heap_kb() -> tuple[int, int]:
    """glibc's malloc, in kB (all arenas): what it has handed out and not had back (mmapped blocks included), and
    what it holds free; (-1, -1) without glibc >= 2.33. RSS can grow while the first stays flat (freed pages kept
    by the allocator: the second); a leak grows the first."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return -1, -1
    return (info.uordblks + info.hblkhd) // 1024, info.fordblks // 1024


def entry_bytes(entry: dict) -> int:
    return sys.getsizeof(entry) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in entry.items())


class SyncProbe(TrainerCallback):
    """After LocalSGDCallback (added later, so called later): one sample per outer sync."""

    def __init__(self, trainer):
        self.trainer = trainer
        # (sync, step, RSS kB, open fds, malloc'd kB in use, Python objects tracked by the gc, kB held free by
        # malloc, kB of Trainer's log history: one entry per sync, kept by design)
        self.samples: list[tuple[int, ...]] = []
        self.seen = 0
        self.logged, self.log_bytes = 0, 0

    def on_step_end(self, args, state, control, **kwargs):
        syncs = self.trainer.local_sgd.engine.num_syncs
        if syncs != self.seen:
            self.seen = syncs
            self.log_bytes += sum(entry_bytes(e) for e in state.log_history[self.logged:])
            self.logged = len(state.log_history)
            in_use, free = heap_kb()
            self.samples.append((syncs, state.global_step, rss_kb(), open_fds(), in_use, len(gc.get_objects()), free,
                                 self.log_bytes // 1024))


def slope_per_100(xs: list[int], ys: list[int]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def summarize(samples: list[list[int]]) -> dict:
    later = [s for s in samples if s[0] >= SKIP]
    first, last = later[0], later[-1]
    per_100 = 100 / max(last[0] - first[0], 1)
    return {
        "syncs_sampled": len(samples),
        "rss_mb_at_first_sync": samples[0][2] / 1024, f"rss_mb_at_sync_{first[0]}": first[2] / 1024,
        "rss_mb_at_last_sync": last[2] / 1024,
        "rss_growth_mb_per_100_syncs_fit": slope_per_100([s[0] for s in later], [s[2] for s in later]) / 1024,
        "rss_growth_mb_per_100_syncs_endpoints": (last[2] - first[2]) / 1024 * per_100,
        "fds_at_first_sync": samples[0][3], f"fds_at_sync_{first[0]}": first[3], "fds_at_last_sync": last[3],
        "fd_growth_per_100_syncs_fit": slope_per_100([s[0] for s in later], [s[3] for s in later]),
        "fds_max": max(s[3] for s in later), "fds_min": min(s[3] for s in later),
        "heap_mb_at_first_sync": samples[0][4] / 1024, "heap_mb_at_last_sync": last[4] / 1024,
        "heap_growth_mb_per_100_syncs_fit": slope_per_100([s[0] for s in later], [s[4] for s in later]) / 1024,
        "heap_free_mb_at_first_sync": samples[0][6] / 1024, "heap_free_mb_at_last_sync": last[6] / 1024,
        "log_history_mb_per_100_syncs_fit": slope_per_100([s[0] for s in later], [s[7] for s in later]) / 1024,
        "objects_at_first_sync": samples[0][5], "objects_at_last_sync": last[5],
        "object_growth_per_100_syncs_fit": slope_per_100([s[0] for s in later], [s[5] for s in later]),
    }


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--max_steps", type=int, default=2000)
    cli.add_argument("--sync_every", type=int, default=4)
    cli.add_argument("--json", default=None, help="write every sample and the summary here (rank 0)")
    cli.add_argument("--max-heap-growth-mb", type=float, default=1.0, help="per 100 syncs, fitted (fail above)")
    cli.add_argument("--max-fd-growth", type=float, default=0.5, help="per 100 syncs, fitted (fail above)")
    opts = cli.parse_args()

    out = tempfile.mkdtemp(prefix="soak-")
    model_args, data_args, _, args = parse_args([
        str(DEMO), "--output_dir", out, "--max_steps", str(opts.max_steps), "--sync_every", str(opts.sync_every),
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "100", "--disable_tqdm", "true",
    ])
    tokenizer = load_tokenizer(model_args.tokenizer_name)
    train, _ = build_lm_datasets(data_args, tokenizer, args.main_process_first, seed=args.seed)
    model = build_recipe_model(model_args, tokenizer, args.seed)
    trainer = LocalSGDTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                              data_collator=default_data_collator)
    probe = SyncProbe(trainer)
    trainer.add_callback(probe)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started

    engine = trainer.local_sgd.engine
    weights = torch.cat([p.detach().reshape(-1).float() for p in trainer.model.parameters()])
    mine = {
        "rank": dist.get_rank(), "global_step": trainer.state.global_step, "num_syncs": engine.num_syncs,
        "samples": probe.samples, "finite": bool(torch.isfinite(weights).all()),
        "digest": hashlib.sha256(weights.numpy().tobytes()).hexdigest()[:16], "seconds": seconds,
    }
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() != 0:
        return 0

    warmup, h = args.local_sgd_warmup_steps, opts.sync_every
    expected_syncs = math.ceil((opts.max_steps - warmup) / h)
    checks = {
        "every rank reached max_steps": all(r["global_step"] == opts.max_steps for r in ranks),
        f"every rank made {expected_syncs} syncs": all(r["num_syncs"] == expected_syncs for r in ranks),
        "every sync sampled": all([s[0] for s in r["samples"]] == list(range(1, expected_syncs + 1)) for r in ranks),
        "ranks end bit-identical": len({r["digest"] for r in ranks}) == 1,
        "weights finite": all(r["finite"] for r in ranks),
    }
    summary = {f"rank{r['rank']}": summarize(r["samples"]) for r in ranks}
    print(f"\nsoak: {opts.max_steps} steps, H={h}, {warmup} warm-up steps, {len(ranks)} processes, "
          f"{max(r['seconds'] for r in ranks):.0f} s of training")
    for name, s in summary.items():
        print(f"  {name}: RSS {s['rss_mb_at_first_sync']:.1f} MB at sync 1, "
              f"{s[f'rss_mb_at_sync_{SKIP}']:.1f} MB at sync {SKIP}, {s['rss_mb_at_last_sync']:.1f} MB at the last; "
              f"growth per 100 syncs after sync {SKIP}: {s['rss_growth_mb_per_100_syncs_fit']:+.3f} MB (fit), "
              f"{s['rss_growth_mb_per_100_syncs_endpoints']:+.3f} MB (endpoints)")
        print(f"  {name}: open fds {s['fds_at_first_sync']} at sync 1, {s[f'fds_at_sync_{SKIP}']} at sync {SKIP}, "
              f"{s['fds_at_last_sync']} at the last (min {s['fds_min']}, max {s['fds_max']}); growth per 100 "
              f"syncs: {s['fd_growth_per_100_syncs_fit']:+.3f} (fit)")
        print(f"  {name}: malloc'd and in use {s['heap_mb_at_first_sync']:.1f} MB at sync 1, "
              f"{s['heap_mb_at_last_sync']:.1f} MB at the last, {s['heap_growth_mb_per_100_syncs_fit']:+.3f} MB per 100 "
              f"syncs (fit); Python objects {s['objects_at_first_sync']} -> {s['objects_at_last_sync']}, "
              f"{s['object_growth_per_100_syncs_fit']:+.1f} per 100 syncs (fit)")
        print(f"  {name}: of which Trainer's log history (an entry per sync, by design) "
              f"{s['log_history_mb_per_100_syncs_fit']:+.3f} MB per 100 syncs; held free by malloc "
              f"{s['heap_free_mb_at_first_sync']:.1f} MB at sync 1, {s['heap_free_mb_at_last_sync']:.1f} MB at the last")
    for what, ok in checks.items():
        print(f"  {'ok' if ok else 'FAILED'}: {what}")
    leaks = [name for name, s in summary.items()
             if s["heap_growth_mb_per_100_syncs_fit"] > opts.max_heap_growth_mb
             or s["fd_growth_per_100_syncs_fit"] > opts.max_fd_growth]
    if leaks:
        print(f"  FAILED: growth above --max-heap-growth-mb {opts.max_heap_growth_mb} / --max-fd-growth "
              f"{opts.max_fd_growth} per 100 syncs on {leaks}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"max_steps": opts.max_steps, "sync_every": h, "warmup": warmup, "checks": checks,
                       "summary": summary, "ranks": ranks}, f)
    return 0 if all(checks.values()) and not leaks else 1


if __name__ == "__main__":
    sys.exit(main())
