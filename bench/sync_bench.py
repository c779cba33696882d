"""Cost of one outer synchronization of ``RoundEngine`` next to one raw all-reduce of the same size.

Run (2 CPU processes, gloo, one thread each), from the repository root:

    OMP_NUM_THREADS=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \
        bench/sync_bench.py --reps 20 --json /tmp/sync_bench.json

(``accelerate launch --cpu --num_processes 2`` would start ONE process; the config above is the way.)

Target (core issue): for GPT-Neo 8M (PALSGD's App. C shapes) on 2 CPU processes, one ``RoundEngine.sync()`` with the
``nesterov`` outer optimizer and float32 communication takes at most 1.5x the time of one raw
``dist.all_reduce`` of a flat float32 buffer with as many elements as the model's trainable parameters. The
script exits with status 1 and prints ``TARGET MISSED`` when the median ratio is above ``--target``.

What is timed, per repetition, each case once, in an order rotated every repetition, each preceded by
``dist.barrier()`` and by its (untimed) preparation; a case's time is the slowest rank's wall-clock time:

- ``all_reduce fp32``: ``dist.all_reduce`` (SUM) of a flat float32 tensor of ``numel`` elements (refilled
  with ones before each call so the values never grow).
- ``engine <opt> ...``: one ``RoundEngine.sync()``: outer gradient written into a flat buffer, all-reduce,
  outer optimizer step and LR scheduler step, copy of the global model back into the model.
  Before it the model's weights are moved by a rank-dependent amount (one ``_foreach_add_``, untimed); the
  engine has H = 1, so every ``engine.step()`` ends a real round and runs its sync. One engine per case,
  all over the same model: average / nesterov / schedule_free with float32 communication, nesterov with
  ``outer_comm_dtype="bfloat16"``, nesterov with ``outer_state_device="cpu"`` (the model's device here, so this
  only shows that the offload path costs nothing extra when there is nothing to move), and nesterov with
  ``track_metrics=True`` (when the engine has that option).
- ``nesterov passes, no comm``: the nesterov engine over a one-rank process group (each rank its own), so
  ``sync()`` runs the target case's element-wise work and communicates nothing.
- ``accelerate LocalSGD``: ``accelerate.local_sgd.LocalSGD._sync_and_avg_model_params()`` on a second copy
  of the model prepared by ``Accelerator`` (DDP-wrapped): ``wait_for_everyone()`` then, for every
  parameter, ``accelerator.reduce(param.data, "mean")`` (a clone, one all-reduce per parameter tensor, a
  division) assigned back to ``param.data``. That is exactly what ``LocalSGD.step()`` runs every
  ``local_sgd_steps`` steps. Its weights are perturbed the same way first.

The table gives the wall-clock median, p10 and p90 over the repetitions and each median's ratio to the raw
all-reduce's median (the target is on this ratio), then the median CPU time of the process over the same
interval (all threads, gloo's included; slowest rank) and its ratio: wall times swing with other jobs on a
shared machine, CPU times much less. ``--json PATH`` also writes every sample.

When the processes leave no core idle (one thread each, as many processes as cores) the script also prints
this engine's floor on the machine: ``(all_reduce cpu + passes cpu) / all_reduce``. Nothing can overlap the
all-reduce with the passes then (the cores are busy with one or the other), so a sync of this engine cannot take
much less; only fewer or cheaper passes could lower it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


# Allow `python bench/sync_bench.py` from the repository root without an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_localsgd import RoundEngine  # noqa: E402


ALL_REDUCE = "all_reduce fp32"
TARGET_CASE = "engine nesterov fp32"
ENGINE_CASES = {
    # case name: RoundEngine keyword arguments
    "engine average fp32": dict(outer_optimizer="average"),
    TARGET_CASE: dict(outer_optimizer="nesterov"),
    "engine schedule_free fp32": dict(outer_optimizer="schedule_free"),
    "engine nesterov bf16-comm": dict(outer_optimizer="nesterov", outer_comm_dtype="bfloat16"),
    "engine nesterov state=cpu": dict(outer_optimizer="nesterov", outer_state_device="cpu"),
}
if "track_metrics" in inspect.signature(RoundEngine).parameters:
    # Per-sync metrics: one more float in the same all-reduce, two dot products and a .item().
    ENGINE_CASES["engine nesterov +metrics"] = dict(outer_optimizer="nesterov", track_metrics=True)
LOCAL_SGD = "accelerate LocalSGD"
# The target case's element-wise work alone: the same engine over a one-rank group, so sync() runs Δ, the
# fused outer step and the copy back, and communicates nothing.
PASSES = "nesterov passes, no comm"


class FlatParams(nn.Module):
    """A synthetic 'model': ``numel`` float32 parameters split into ``tensors`` tensors of near-equal size."""

    def __init__(self, numel: int, tensors: int):
        super().__init__()
        sizes = [numel // tensors + (i < numel % tensors) for i in range(tensors)]
        self.params = nn.ParameterList(nn.Parameter(torch.randn(n) * 0.02) for n in sizes if n > 0)


def build(args) -> nn.Module:
    torch.manual_seed(0)  # same initial weights on every rank
    if args.numel:
        return FlatParams(args.numel, args.tensors)
    from hf_localsgd.recipes.models import build_model, build_model_config

    return build_model(build_model_config(args.model))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions of every case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--model", default="gpt-neo-8m", help="a name of hf_localsgd.recipes.models.MODEL_CONFIGS")
    parser.add_argument("--numel", type=int, default=0, help="synthetic model of this many parameters instead")
    parser.add_argument("--tensors", type=int, default=108, help="parameter tensors of the synthetic model")
    parser.add_argument("--target", type=float, default=1.5, help=f"max ratio of '{TARGET_CASE}' to the raw all-reduce")
    parser.add_argument("--no-local-sgd", action="store_true", help="skip accelerate's LocalSGD")
    parser.add_argument("--json", type=Path, help="write the results (and every sample) here")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when the target is missed")
    args = parser.parse_args()
    if args.model == "gptneo-8m":
        args.model = "gpt-neo-8m"

    # accelerate 1.15's multi_gpu launcher does not export the config's use_cpu (accelerate_configs/cpu_2proc.yaml).
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    from accelerate import Accelerator
    from accelerate.local_sgd import LocalSGD

    accelerator = Accelerator(cpu=True)
    if not dist.is_initialized() or dist.get_world_size() < 2:
        print("sync_bench needs >= 2 processes: OMP_NUM_THREADS=1 accelerate launch "
              "--config_file accelerate_configs/cpu_2proc.yaml bench/sync_bench.py", file=sys.stderr)
        return 2
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build(args)
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)

    cases: dict[str, tuple] = {}  # name: (prepare, run)

    flat = torch.ones(numel, dtype=torch.float32)
    cases[ALL_REDUCE] = (lambda: flat.fill_(1.0), lambda: dist.all_reduce(flat))

    def perturb(ps):
        # A different, tiny move on every rank: the next sync has a real (non-zero) outer gradient.
        with torch.no_grad():
            torch._foreach_add_(ps, 1e-4 * (rank + 1))

    engines = {}
    for name, kwargs in ENGINE_CASES.items():
        engine = RoundEngine(model, sync_every=1, **kwargs)  # every step() is a full round and its sync
        engines[name] = engine
        cases[name] = (lambda: perturb(params), engine.step)

    # new_group is collective: every rank creates every one-rank group, and keeps its own.
    own_group = [dist.new_group([r]) for r in range(world)][rank]
    passes = RoundEngine(model, sync_every=1, outer_optimizer="nesterov", process_group=own_group)
    engines[PASSES] = passes
    cases[PASSES] = (lambda: perturb(params), passes.step)

    if not args.no_local_sgd:
        ddp_model = accelerator.prepare(build(args))
        local_sgd = LocalSGD(accelerator=accelerator, model=ddp_model, local_sgd_steps=1)
        lsgd_params = [p for p in ddp_model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in lsgd_params) == numel
        # (LocalSGD assigns new tensors to param.data; the Parameter objects stay the same.)
        cases[LOCAL_SGD] = (lambda: perturb(lsgd_params), local_sgd._sync_and_avg_model_params)

    names = list(cases)
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu_samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.warmup + args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            prepare, run = cases[name]
            prepare()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            if rep >= args.warmup:
                samples[name].append(elapsed)
                cpu_samples[name].append(cpu)

    # Sanity check (untimed): after a sync every replica holds the same weights.
    cases[TARGET_CASE][0]()
    engines[TARGET_CASE].sync()
    with torch.no_grad():
        fingerprint = torch.stack([torch.cat([p.detach().reshape(-1) for p in params]).double().sum(),
                                   torch.tensor(float(engines[TARGET_CASE].num_syncs), dtype=torch.float64)])
    fingerprints = [torch.empty_like(fingerprint) for _ in range(world)]
    dist.all_gather(fingerprints, fingerprint)
    replicas_equal = all(torch.equal(f, fingerprints[0]) for f in fingerprints)

    # Slowest rank per sample: a synchronization is over when every rank is done.
    # Same for the CPU time of the process (all its threads, gloo's included): less sensitive than wall time
    # to other jobs on a shared machine.
    local = torch.tensor([[samples[n] for n in names], [cpu_samples[n] for n in names]], dtype=torch.float64)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    worst, worst_cpu = torch.stack(gathered).amax(0).tolist()
    samples, cpu_samples = dict(zip(names, worst)), dict(zip(names, worst_cpu))

    failed = False
    if rank == 0:
        base = statistics.median(samples[ALL_REDUCE])
        base_cpu = statistics.median(cpu_samples[ALL_REDUCE])
        results = {}
        for name in names:
            xs = samples[name]
            med, cpu = statistics.median(xs), statistics.median(cpu_samples[name])
            results[name] = dict(median_s=med, p10_s=percentile(xs, 0.1), p90_s=percentile(xs, 0.9),
                                 ratio=med / base, cpu_median_s=cpu, cpu_ratio=cpu / base_cpu, samples_s=xs,
                                 cpu_samples_s=cpu_samples[name])
        label = f"synthetic ({args.numel} in {args.tensors} tensors)" if args.numel else args.model
        print(f"\nmodel: {label}: {numel:,} trainable parameters in {len(params)} tensors "
              f"({numel * 4 / 1e6:.1f} MB float32); {world} processes, backend {dist.get_backend()}, "
              f"{torch.get_num_threads()} thread(s) each; {args.reps} reps after {args.warmup} warm-up")
        print(f"{'case':<28}{'median ms':>11}{'p10 ms':>9}{'p90 ms':>9}{'x all_reduce':>14}"
              f"{'cpu ms':>9}{'cpu x':>7}")
        for name, r in results.items():
            print(f"{name:<28}{r['median_s'] * 1e3:>11.1f}{r['p10_s'] * 1e3:>9.1f}{r['p90_s'] * 1e3:>9.1f}"
                  f"{r['ratio']:>14.2f}{r['cpu_median_s'] * 1e3:>9.1f}{r['cpu_ratio']:>7.2f}")
        print(f"replicas identical after a sync: {'yes' if replicas_equal else 'NO'}")
        # A sync is the all-reduce plus the passes. When the processes leave no core idle (1 thread each,
        # as many processes as cores), the two cannot overlap: the cores' time over a sync is at least the
        # processes' CPU time for both, so its wall time is about their sum at least (this engine's floor).
        cores = os.cpu_count() or 1
        floor = None
        if world * torch.get_num_threads() >= cores:
            floor = (base_cpu + results[PASSES]["cpu_median_s"]) / base
            print(f"this engine's floor here ({cores} cores, all busy): (all_reduce cpu + passes cpu) / "
                  f"all_reduce = {floor:.2f}")
        ratio = results[TARGET_CASE]["ratio"]
        failed = ratio > args.target or not replicas_equal
        verdict = "TARGET MISSED" if failed else "target met"
        print(f"\n{TARGET_CASE} / {ALL_REDUCE} = {ratio:.2f} (target <= {args.target}): {verdict}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(
                model=label, numel=numel, tensors=len(params), bytes_fp32=numel * 4, world_size=world,
                backend=dist.get_backend(), threads=torch.get_num_threads(), reps=args.reps, warmup=args.warmup,
                torch=torch.__version__, python=platform.python_version(), target=args.target,
                target_case=TARGET_CASE, target_ratio=ratio, target_met=not failed, replicas_equal=replicas_equal,
                cores=cores, floor_ratio=floor,
                results=results,
            ), indent=1))
    flag = torch.tensor([int(failed and not args.no_fail)])
    dist.broadcast(flag, src=0)
    dist.barrier()
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    sys.exit(main())
