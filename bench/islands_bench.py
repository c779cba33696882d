"""Islands (``island_size``): what the sharded outer state and sync of DDP islands save, per rank, on 4 processes.

Run (4 CPU processes, gloo, one thread each), from the repository root:

    OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_4proc.yaml \\
        bench/islands_bench.py --reps 15 --json /tmp/islands_bench.json

Three `RoundEngine`s over the same GPT-Neo 8M (bare model, no DDP: its weights are moved before each sync, the
same move on the ranks of an island, so that their replicas stay identical as DDP keeps them), each with
``sync_every=1`` (every ``step()`` is a round and its sync), ``outer_optimizer="nesterov"``, ``track_metrics=True``:

- ``islands of 1``: ``island_size=1``, each rank its own replica: the whole model all-reduced over 4 ranks.
- ``islands of 2, sharded``: ``island_size=2`` (`IslandShard`): each rank keeps the global model and outer state of
  its half, all-reduces that half of the outer gradient with its counterpart in the other island, and the island
  all-gathers the new halves.
- ``islands of 2, unsharded``: the same 2 x 2 topology, every rank keeping and all-reducing the whole model across
  the islands: the engine's ``shard`` and ``outer`` rebuilt as `RoundEngine.__init__` builds them, with
  `Replica` instead of `IslandShard` (`unshard` below; the library is unchanged).

Per rank, untimed: the bytes a sync sends across islands (``last_metrics["bytes_sent"]``, the outer all-reduce:
the outer gradient and the one float of ``track_metrics``), the island all-gather's bytes (inside the island,
computed: (island_size - 1) x the padded span); the outer state by accounting (``global_params`` + the outer
optimizer's state tensors), the growth of ``VmRSS`` over building the engine and its first sync, and the peak
RSS (``VmHWM``, reset first) of a second sync over the RSS before it: the sync's transient buffers. Each engine
is built in its own phase, between barriers. RSS moves with glibc's free pages and its dynamic mmap threshold
(freed buffers of up to 32 MB stay resident): read it as a check of the accounting, not an exact figure;
``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment makes large buffers go back to the system when freed.

Timed, per repetition, each case once in an order rotated every repetition, each after its untimed preparation
and a ``dist.barrier()``; a sample is the slowest rank's wall-clock time: one ``engine.step()`` (= one sync) of
each engine, and the components that explain their ratio: raw ``dist.all_reduce`` of the whole model over the
4 ranks, of the whole model and of half of it over the 2 ranks of an across-islands group (the two groups
run at once, as in the syncs), and the island's all-gather of the halves. ``--json PATH`` writes every sample.
The table gives the medians, p10 and p90 and the ratios of medians; then the median and p10-p90 of the ratios
taken within each repetition. Exits 1 when a ratio of bytes or outer state is not exactly 1/2 or the replicas
differ after a sync.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_localsgd import RoundEngine  # noqa: E402
from hf_localsgd.core.build import build_sync  # noqa: E402
from hf_localsgd.core.collectives import all_gather_  # noqa: E402
from hf_localsgd.core.shard import IslandShard, Replica  # noqa: E402
from hf_localsgd.core.topology import Topology  # noqa: E402
from hf_localsgd.recipes.models import build_model, build_model_config  # noqa: E402


ONE, SHARDED, UNSHARDED = "islands of 1", "islands of 2, sharded", "islands of 2, unsharded"
AR_WORLD, AR_WHOLE, AR_HALF, GATHER = ("all_reduce whole, 4 ranks", "all_reduce whole, across",
                                       "all_reduce half, across", "all_gather halves, island")


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (``VmRSS``), or its peak since `reset_peak_rss` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # (Linux: "5" resets VmHWM to VmRSS)
        f.write("5")


def unshard(engine: RoundEngine) -> RoundEngine:
    """The engine's islands, but this rank keeps the whole global model and outer state (`Replica`) and all-reduces
    all of the outer gradient across the islands: ``shard`` and ``outer`` built as `RoundEngine.__init__` builds
    them (``total_rounds`` is None for the constant outer lr), the `IslandShard`'s state dropped."""
    engine.shard = Replica(engine.flat)
    engine.outer = build_sync(engine.options, engine.shard, engine.reducer, None, engine.topology)
    engine.outer.broadcast()
    return engine


def outer_state_bytes(engine: RoundEngine) -> int:
    """``global_params`` and the outer optimizer's state tensors (Nesterov: the momentum), once each."""
    tensors = [engine.global_params] + [v for s in engine.outer_optimizer.state.values() for v in s.values()
                                        if torch.is_tensor(v) and v.numel() > 1]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(xs: list[float]) -> dict:
    return dict(median=statistics.median(xs), p10=percentile(xs, 0.1), p90=percentile(xs, 0.9))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions of every case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--model", default="gpt-neo-8m", help="a name of hf_localsgd.recipes.models.MODEL_CONFIGS")
    parser.add_argument("--json", type=Path, help="write the results (and every sample) here")
    args = parser.parse_args()

    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    from accelerate import Accelerator

    Accelerator(cpu=True)  # joins the launcher's processes (gloo)
    if not dist.is_initialized() or dist.get_world_size() != 4:
        print("islands_bench needs 4 processes: OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=true accelerate launch "
              "--config_file accelerate_configs/cpu_4proc.yaml bench/islands_bench.py", file=sys.stderr)
        return 2
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_model(build_model_config(args.model))
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)

    def move(engine: RoundEngine) -> None:
        # A different move per island (the same on an island's ranks): the sync has a real outer gradient.
        with torch.no_grad():
            torch._foreach_add_(params, 1e-4 * (engine.topology.island + 1))

    # The islands (one 2 x 2 mesh, shared by both island_size=2 engines) and the raw collectives, run once
    # before the memory phases so that neither the groups nor gloo's first use of them lands in an engine's RSS.
    topology = Topology.build(island_size=2)
    chunk_numel = -(-numel // 2)  # IslandShard's spans: this rank's half, padded to chunk_numel in the all-gather
    half_numel = min(chunk_numel, numel - topology.member * chunk_numel)
    whole, half, chunk = torch.ones(numel), torch.ones(half_numel), torch.ones(chunk_numel)
    gathered = torch.empty(2 * chunk_numel)
    cases = {AR_WORLD: (lambda: whole.fill_(1.0), lambda: dist.all_reduce(whole)),
             AR_WHOLE: (lambda: whole.fill_(1.0), lambda: dist.all_reduce(whole, group=topology.across)),
             AR_HALF: (lambda: half.fill_(1.0), lambda: dist.all_reduce(half, group=topology.across)),
             GATHER: (lambda: None, lambda: all_gather_(gathered, chunk, topology.within))}
    for prepare, run in cases.values():
        prepare(), run()

    # Untimed, one phase per engine: build it and run its first sync (the momentum exists after it), then a
    # second sync under a fresh peak-RSS mark.
    kw = dict(sync_every=1, outer_optimizer="nesterov", track_metrics=True)
    builders = {ONE: lambda: RoundEngine(model, island_size=1, **kw),
                SHARDED: lambda: RoundEngine(model, island_size=2, topology=topology, **kw),
                UNSHARDED: lambda: unshard(RoundEngine(model, island_size=2, topology=topology, **kw))}
    engines, measured = {}, {}
    for name, build in builders.items():
        dist.barrier()
        before = rss_bytes()
        engine = engines[name] = build()
        move(engine)
        engine.step()
        dist.barrier()
        sharded = isinstance(engine.shard, IslandShard)
        gather = (engine.topology.island_size - 1) * engine.shard.chunk * 4 if sharded else 0
        grown = rss_bytes() - before
        reset_peak_rss()  # the transient buffers of a sync: its peak RSS over the RSS before it
        before = rss_bytes()
        move(engine)
        engine.step()
        measured[name] = [engine.last_metrics["bytes_sent"], engine.reducer.bytes_sent(0, 1), gather,
                          outer_state_bytes(engine), grown, rss_bytes("VmHWM") - before]
    assert engines[SHARDED].outer.flat.numel == half_numel and engines[SHARDED].shard.chunk == chunk_numel
    cases = {**{name: ((lambda e=e: move(e)), e.step) for name, e in engines.items()}, **cases}

    names = list(cases)
    samples = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for rep in range(args.warmup + args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            prepare, run = cases[name]
            prepare()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            if rep >= args.warmup:
                samples[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)

    # Untimed check: after a sync of each engine, all 4 ranks hold the same weights.
    identical = True
    for engine in engines.values():
        move(engine)
        engine.step()
        with torch.no_grad():
            fingerprint = torch.cat([p.detach().reshape(-1) for p in params]).double().sum().reshape(1)
        everyone = [torch.empty_like(fingerprint) for _ in range(world)]
        dist.all_gather(everyone, fingerprint)
        identical &= all(torch.equal(f, everyone[0]) for f in everyone)

    # The slowest rank's time per sample; every rank's bytes and memory.
    local = torch.tensor([[samples[n] for n in names], [cpu[n] for n in names]], dtype=torch.float64)
    everyone = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(everyone, local)
    worst, worst_cpu = torch.stack(everyone).amax(0).tolist()
    samples, cpu = dict(zip(names, worst)), dict(zip(names, worst_cpu))
    mine = torch.tensor([measured[n] for n in builders], dtype=torch.float64)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    per_rank = {n: torch.stack(everyone)[:, i].tolist() for i, n in enumerate(builders)}  # [rank][field]

    ok = identical
    if rank == 0:
        mb = 1e6
        print(f"\nmodel: {args.model}: {numel:,} trainable parameters ({numel * 4 / mb:.2f} MB float32); "
              f"{world} processes, backend {dist.get_backend()}, {torch.get_num_threads()} thread(s) each, "
              f"{os.cpu_count()} cores; {args.reps} reps after {args.warmup} warm-up")
        print("\nper rank (ranks 0 / 1 / 2 / 3), MB = 1e6 bytes")
        fields = ["sent across islands/sync", "of it the metrics float", "all-gather in island",
                  "outer state (accounting)", "RSS growth (build+1st sync)", "RSS peak in a sync over before"]
        for i, field in enumerate(fields):
            print(f"  {field}")
            for name in builders:
                print(f"    {name:<26}" + " / ".join(f"{r[i] / mb:10.6f}" for r in per_rank[name]))
        # Targets: sharded = exactly 1/2 of unsharded (same islands) for the bytes across and the outer state, and
        # of islands of 1 for the outer state. The bytes of islands of 1 are a ring over 4 ranks, 2(K-1)/K = 3/2
        # of the payload against 1 over 2 ranks: half the payload gives 1/3 there, shown but not a target.
        print("\nratios sharded / baseline, per rank (bytes: the outer gradient, the metrics float apart)")
        ratios, targets = {}, {(0, UNSHARDED), (3, UNSHARDED), (3, ONE)}
        for i, field in [(0, "bytes sent across"), (3, "outer state (accounting)"), (4, "RSS growth"),
                         (5, "RSS peak in a sync")]:
            for base in (UNSHARDED, ONE):
                rs = []
                for r in range(world):
                    a, b = per_rank[SHARDED][r], per_rank[base][r]
                    num, den = (a[0] - a[1], b[0] - b[1]) if i == 0 else (a[i], b[i])
                    rs.append(Fraction(int(num), int(den)) if i < 4 else num / den if den > 1e6 else float("nan"))
                ratios[f"{field}: sharded / {base}"] = [float(x) for x in rs]
                verdict = ""
                if (i, base) in targets:
                    met = all(x == Fraction(1, 2) for x in rs)
                    ok &= met
                    verdict = "  target 1/2: " + ("met, exactly" if met else "MISSED")
                shown = [str(x) if isinstance(x, Fraction) and x.denominator < 100 else f"{float(x):.4f}" for x in rs]
                print(f"  {field:<25}/ {base:<25}" + " / ".join(f"{x:>6}" for x in shown) + verdict)

        print(f"\n{'case (slowest rank)':<28}{'median ms':>10}{'p10':>8}{'p90':>8}{'x unsharded':>12}"
              f"{'x islands 1':>12}{'cpu ms':>8}")
        med = {n: statistics.median(samples[n]) for n in names}
        results = {}
        for n in names:
            r = results[n] = {f"{k}_s": v for k, v in spread(samples[n]).items()}
            r.update(cpu_median_s=statistics.median(cpu[n]), samples_s=samples[n], cpu_samples_s=cpu[n])
            print(f"{n:<28}{r['median_s'] * 1e3:>10.1f}{r['p10_s'] * 1e3:>8.1f}{r['p90_s'] * 1e3:>8.1f}"
                  f"{med[n] / med[UNSHARDED]:>12.2f}{med[n] / med[ONE]:>12.2f}{r['cpu_median_s'] * 1e3:>8.1f}")
        paired = {f"{a} / {b}": spread([x / y for x, y in zip(samples[a], samples[b])])
                  for a, b in [(SHARDED, UNSHARDED), (SHARDED, ONE), (UNSHARDED, ONE), (AR_HALF, AR_WHOLE),
                               (GATHER, AR_WHOLE)]}
        print("\nper-repetition ratios (median, p10-p90):")
        for k, v in paired.items():
            print(f"  {k:<56}{v['median']:.2f} ({v['p10']:.2f}-{v['p90']:.2f})")
        comm = (med[AR_HALF] + med[GATHER]) / med[AR_WHOLE]
        print(f"communication of a sharded sync vs an unsharded one: (all_reduce half + all_gather) / "
              f"all_reduce whole = {comm:.2f}")
        print(f"replicas identical on all 4 ranks after a sync of each engine: {'yes' if identical else 'NO'}")
        print("targets (sharded = exactly 1/island_size: bytes across vs unsharded, outer state vs unsharded and "
              "islands of 1; replicas identical):", "met" if ok else "MISSED")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(
                model=args.model, numel=numel, world_size=world, backend=dist.get_backend(),
                threads=torch.get_num_threads(), cores=os.cpu_count(), reps=args.reps, warmup=args.warmup,
                torch=torch.__version__, python=platform.python_version(),
                malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                per_rank={n: [dict(zip(fields, r)) for r in per_rank[n]] for n in builders}, ratios=ratios,
                results=results, paired_ratios=paired, comm_ratio=comm, replicas_identical=identical,
                targets_met=ok), indent=1))
    flag = torch.tensor([int(not ok)])
    dist.broadcast(flag, src=0)
    dist.barrier()
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    sys.exit(main())
