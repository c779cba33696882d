"""Extra bytes per parameter that local training costs on the training device (issue part 2), with the outer
state on the model's device (``outer_state_device="model"``) and on the CPU (``"cpu"``), and what the CPU
option costs in sync time.

    python bench/memory_bench.py --reps 9 --json bench/memory.json        # CUDA if available, else CPU

One process (world size 1: the sync has no all-reduce, so its time is exactly the copies and the outer step
that the offload changes; the network part is the same for both options). The model is GPT-Neo 8M of
``hf_localsgd.recipes.models`` with an AdamW inner optimizer that has taken one step (its state exists).

Two measurements per (outer optimizer, state device):

- accounting, exact on any device: every tensor the engine keeps (``global_params`` and the outer
  optimizer's state) summed by the device it lives on, divided by the number of trainable parameters;
  plus the outer gradient that ``sync()`` allocates (on the state device) and the per-bucket staging
  buffers it moves through the model's device when offloaded.
- allocator, CUDA only: ``torch.cuda.memory_allocated()`` before and after building the engine and one
  sync (persistent extra), and ``torch.cuda.max_memory_allocated()`` during a sync (transient peak extra),
  each relative to the model + AdamW baseline. On a CPU-only machine the model's device *is* the host, so
  the CPU option cannot save anything there; the accounting shows where each byte would live.

Sync time: both options' engines over the same model, one sync each per repetition in alternating order
(each preceded by an untimed perturbation of the weights so that the round has something to average),
``torch.cuda.synchronize()`` around each on CUDA; the table gives the medians and the median per-repetition
ratio cpu / model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_localsgd import RoundEngine  # noqa: E402
from hf_localsgd.recipes.models import build_model, build_model_config  # noqa: E402


def tensor_bytes_by_device(engine: RoundEngine) -> dict[str, int]:
    out: dict[str, int] = {}
    tensors = [engine.global_params]
    for state in engine.outer_optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
    seen = set()
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        key = str(t.device)
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def perturb(model, engine, amount: float) -> None:
    with torch.no_grad():
        torch._foreach_add_([p for p in model.parameters() if p.requires_grad], amount)


def timed_sync(model, engine, device, amount) -> float:
    perturb(model, engine, amount)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    engine.step()  # H = 1: every step is a round and its sync
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-neo-8m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--bucket_size_mb", type=float, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    torch.manual_seed(0)
    model = build_model(build_model_config(args.model)).to(device)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    inner.step()
    inner.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated() if cuda else None

    rows = []
    for outer in ["average", "nesterov", "schedule_free"]:
        for state_device in ["model", "cpu"]:
            engine = RoundEngine(model, sync_every=1, outer_optimizer=outer, outer_state_device=state_device,
                                 bucket_size_mb=args.bucket_size_mb)
            perturb(model, engine, 1e-4)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before_sync = torch.cuda.memory_allocated()
            engine.step()  # H = 1: a sync, which creates the outer optimizer's state
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
                after = torch.cuda.memory_allocated()
            acct = tensor_bytes_by_device(engine)
            dev_key = str(engine.flat.device)
            on_dev = sum(v for k, v in acct.items() if k == dev_key)
            on_host = sum(v for k, v in acct.items() if k != dev_key)
            # Transient during sync (from the code path): outer gradient on the state device; when offloaded,
            # the largest bucket's staging buffer plus its copy of the global slice on the model's device.
            biggest = max(bucket.numel for bucket in engine.flat.buckets)
            if engine.global_params.device == engine.flat.device:
                trans_dev = 4 * numel
            else:
                trans_dev = 2 * 4 * biggest
            row = {
                "outer": outer, "state_device": state_device, "engine_device": dev_key,
                "persistent_device_B_per_param": on_dev / numel, "persistent_host_B_per_param": on_host / numel,
                "transient_device_B_per_param_accounting": trans_dev / numel,
            }
            if cuda:
                row["measured_persistent_device_B_per_param"] = (after - base) / numel
                row["measured_peak_extra_device_B_per_param"] = (peak - base) / numel
                row["measured_peak_over_persistent_B_per_param"] = (peak - before_sync) / numel
            rows.append(row)
            del engine
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    # Sync time: model vs cpu state, same model, interleaved.
    engines = {sd: RoundEngine(model, sync_every=1, outer_optimizer="nesterov", outer_state_device=sd,
                               bucket_size_mb=args.bucket_size_mb) for sd in ["model", "cpu"]}
    for sd, e in engines.items():  # warm-up (also creates momentum)
        timed_sync(model, e, device, 1e-4)
    times = {sd: [] for sd in engines}
    ratios = []
    for rep in range(args.reps):
        order = ["model", "cpu"] if rep % 2 == 0 else ["cpu", "model"]
        this = {}
        for sd in order:
            this[sd] = timed_sync(model, engines[sd], device, 1e-4 * (1 if rep % 2 else -1))
            times[sd].append(this[sd])
        ratios.append(this["cpu"] / this["model"])

    name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    print(f"machine: {os.cpu_count()} cpus, device {args.device} ({name}); torch {torch.__version__}")
    print(f"model {args.model}: {numel:,} trainable parameters; model + AdamW (fp32) = 16 B/param on the device "
          f"before any local-SGD state\n")
    head = "| outer optimizer | outer_state_device | persistent extra on device (accounting) | on host (accounting) | transient on device during sync (accounting) |"
    sep = "|---|---|---|---|---|"
    if cuda:
        head += " persistent extra on device (measured) | peak extra on device during sync (measured) |"
        sep += "---|---|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['outer']} | {r['state_device']} | {r['persistent_device_B_per_param']:.2f} B/param | "
                f"{r['persistent_host_B_per_param']:.2f} B/param | {r['transient_device_B_per_param_accounting']:.2f} B/param |")
        if cuda:
            line += (f" {r['measured_persistent_device_B_per_param']:.2f} B/param | "
                     f"{r['measured_peak_extra_device_B_per_param']:.2f} B/param |")
        print(line)
    print(f"\nsync time, nesterov, {args.reps} reps interleaved (world size 1: copies + outer step, no network):\n")
    print("| outer_state_device | median sync | p10–p90 | ratio to `model` (median of per-rep ratios) |")
    print("|---|---|---|---|")
    for sd in ["model", "cpu"]:
        s = sorted(times[sd])
        lo, hi = s[int(0.1 * (len(s) - 1))], s[int(round(0.9 * (len(s) - 1)))]
        ratio = "1 (baseline)" if sd == "model" else f"**{statistics.median(ratios):.2f}x**"
        print(f"| {sd} | {statistics.median(s)*1e3:.2f} ms | {lo*1e3:.2f}–{hi*1e3:.2f} ms | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "numel": numel, "rows": rows, "sync_times": times, "ratios": ratios}, f,
                      indent=1)


if __name__ == "__main__":
    main()
