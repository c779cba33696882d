"""Is local SGD worth it here? Measure one training step and one outer all-reduce on the processes and link
a run would use, and predict the time per step for a range of H (Eq. 16 of "On the Choice of Learning Rate for
Local SGD", §6.2).

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \\
        -m hf_localsgd advise recipes/gptneo-tinystories/demo.yaml --json advise.json

Takes the same recipe and flags as `hf_localsgd.train` and builds the same model (same tokenizer, hence the
same vocabulary), but reads no data: batches are random tokens of the recipe's per-device batch size and
`block_size`. Every rank times, together:

- t_step: one optimizer step without any communication (forward and backward of each gradient-accumulation
  micro-batch, gradient clipping, the Trainer's optimizer), the model not wrapped in DDP;
- t_comm: one sum of a flat float32 buffer of as many elements as the model has trainable parameters, over the
  default process group, by the reducer `RoundEngine` builds for the options: what it sends once per round, in
  `outer_comm_dtype` (`bfloat16`: the conversion included; `int8`: `Int8AllReduce`'s quantization,
  all-to-all, float32 sums and all-gather). Its bytes are the buffer's in the wire dtype (for int8 with scales).

Each is the median over `--timing_steps` repetitions (after `--timing_warmup` untimed ones) of the slowest
rank's time, every repetition starting from a barrier. m = t_comm / t_step, and with K replicas and n steps
the pseudo-wall-clock time is T = n/K (1 + m/H): the table gives t_step (1 + m/H) per step for each H.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import time

import torch
import torch.distributed as dist

from ..core.metrics import format_bytes


DEFAULT_SYNC_EVERY = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# ---------------------------------------------------------------------- the cost model (pure)
def advice(
    t_step: float,
    t_comm: float,
    comm_bytes: float,
    sync_every_values=DEFAULT_SYNC_EVERY,
    max_overhead: float = 0.1,
) -> dict:
    """The table of Eq. 16 of "On the Choice of Learning Rate for Local SGD" from two measured times.

    Args:
        t_step: seconds of one optimizer step without communication.
        t_comm: seconds of one outer all-reduce.
        comm_bytes: bytes of that all-reduce's buffer.
        sync_every_values: the H to tabulate.
        max_overhead: the recommendation is the smallest H whose communication overhead m/H is at most this.

    Returns a dict with `m`, the `rows` (one per H: predicted seconds per step t_step (1 + m/H), overhead m/H,
    speedup (1 + m) / (1 + m/H) over communicating every step, bytes per step, fraction of communication
    saved), `recommended_sync_every` (None when no H is cheap enough) and the inputs.
    """
    if t_step <= 0 or t_comm < 0:
        raise ValueError(f"need t_step > 0 and t_comm >= 0, got {t_step} and {t_comm}")
    m = t_comm / t_step
    rows = [
        {
            "sync_every": h,
            "seconds_per_step": t_step * (1 + m / h),
            "overhead": m / h,
            "speedup_vs_every_step": (1 + m) / (1 + m / h),
            "bytes_per_step": comm_bytes / h,
            "communication_saved": 1 - 1 / h,
        }
        for h in sorted(set(sync_every_values))
    ]
    recommended = next((row["sync_every"] for row in rows if row["overhead"] <= max_overhead), None)
    return {"t_step_s": t_step, "t_comm_s": t_comm, "comm_bytes": comm_bytes, "m": m,
            "max_overhead": max_overhead, "rows": rows, "recommended_sync_every": recommended}


def recommendation(result: dict) -> str:
    """What to do, in words: the H to use, whether local SGD pays off at this m, and the caveat on steps."""
    m, h, limit = result["m"], result["recommended_sync_every"], result["max_overhead"]
    if h == 1:
        text = (f"Communication is cheap here (m = {m:.3g}): communicating every step already costs under "
                f"{limit:.0%}. Use data-parallel training (--trainer ddp).")
    elif h is None:
        largest = result["rows"][-1]
        text = (f"Communication dominates (m = {m:.3g}): even H = {largest['sync_every']} leaves "
                f"{largest['overhead']:.0%} overhead. Use the largest H the loss tolerates, and a faster link "
                "or outer_comm_dtype=bfloat16 if you can.")
    else:
        row = next(r for r in result["rows"] if r["sync_every"] == h)
        text = (f"Recommended: sync_every = {h}, the smallest H with communication overhead under {limit:.0%} "
                f"(predicted {row['speedup_vs_every_step']:.2f}x faster per step than communicating every step).")
        if m < 2:
            text += (f" But m = {m:.3g} is small: 'On the Choice of Learning Rate for Local SGD' found Local SGD "
                     "faster than synchronous SGD in wall-clock time only for m >= 2-4, and DDP overlaps its all-reduce "
                     "with the backward pass, so data-parallel training is likely as fast.")
    return text + (" Larger H may need more steps to reach the same loss (T = n/K (1 + m/H)): H pays off only if "
                   "it needs fewer than its 'vs H=1' factor times the steps of communicating every step; compare "
                   "short runs with `hf-localsgd plot`.")


def format_table(result: dict, configured_sync_every: int | None = None, context: str = "") -> str:
    """The table printed by `main`; `configured_sync_every` marks the recipe's H."""
    lines = [
        f"t_step = {_seconds(result['t_step_s'])} (one optimizer step, no communication)",
        f"t_comm = {_seconds(result['t_comm_s'])} (one all-reduce of {format_bytes(result['comm_bytes'])}{context})",
        f"m = t_comm / t_step = {result['m']:.4g}",
        "",
        f"{'H':>5}  {'time/step':>10}  {'vs H=1':>7}  {'overhead m/H':>12}  {'sent/step':>10}  {'comm saved':>10}",
    ]
    for row in result["rows"]:
        mark = "  <- recipe" if row["sync_every"] == configured_sync_every else ""
        lines.append(
            f"{row['sync_every']:>5}  {_seconds(row['seconds_per_step']):>10}  {row['speedup_vs_every_step']:>6.2f}x  "
            f"{row['overhead']:>12.1%}  {format_bytes(row['bytes_per_step']):>10}  {row['communication_saved']:>10.1%}{mark}"
        )
    lines += [
        "",
        "H = 1 communicates every step like DDP, but DDP overlaps its gradient all-reduce with the backward pass: a",
        "real DDP step takes between t_step and t_step + t_comm.",
        "",
        textwrap.fill(recommendation(result), width=110),
    ]
    return "\n".join(lines)


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"




# ---------------------------------------------------------------------- measurements (collective)
def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_repeated(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds of `fn()` per repetition, each the slowest rank's. Every rank must call this together: each
    repetition starts from a barrier, and one all-reduce (MAX) of all the samples ends it."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    slowest = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def make_train_step(model, optimizer, training_args, batch_size: int, block_size: int, device: torch.device):
    """One optimizer step on random tokens, as Trainer runs it minus the DDP all-reduce."""
    generator = torch.Generator(device=device).manual_seed(training_args.seed)
    tokens = torch.randint(model.config.vocab_size, (batch_size, block_size), generator=generator, device=device)
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=training_args.bf16 or training_args.fp16)
    accumulation = training_args.gradient_accumulation_steps

    def step():
        for _ in range(accumulation):
            with autocast:
                loss = model(input_ids=tokens, labels=tokens).loss / accumulation
            loss.backward()
        if training_args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix of a training flag (--sync_every) must not match one of these.
    parser = argparse.ArgumentParser(
        prog="hf-localsgd advise", allow_abbrev=False, description=__doc__.split("\n\n")[0],
        usage="accelerate launch ... -m hf_localsgd advise [RECIPE.yaml] [options] [hf_localsgd.train flags]",
        epilog="The recipe and every other flag are those of hf_localsgd.train (hf-localsgd train --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--timing_steps", type=int, default=10, help="timed repetitions of each measurement")
    parser.add_argument("--timing_warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--sync_every_values", type=int, nargs="+", default=list(DEFAULT_SYNC_EVERY),
                        metavar="H", help="the H of the table")
    parser.add_argument("--max_overhead", type=float, default=0.1,
                        help="recommend the smallest H whose overhead m/H is at most this")
    parser.add_argument("--json", metavar="PATH", help="also write the measurements and the table as JSON")
    return parser


def main(argv: list[str] | None = None) -> dict:
    from transformers import Trainer

    from ..core.build import build_reducer
    from ..core.topology import Topology
    from ..recipes.data import load_tokenizer
    from ..recipes.offline import HubUnavailableError
    from ..recipes.train import build_recipe_model, parse_args

    parser = _parser()
    args, train_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.timing_steps < 1 or args.timing_warmup < 0 or min(args.sync_every_values) < 1:
        parser.error("need --timing_steps >= 1, --timing_warmup >= 0 and every H >= 1")
    model_args, data_args, _, training_args = parse_args(train_argv)

    device = training_args.device  # sets up the process group as Trainer would (use_cpu, ddp_backend, ...)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size < 2:
        sys.exit("error: advise measures the all-reduce between processes: run it under `accelerate launch` "
                 "with at least 2 processes")
    try:
        tokenizer = load_tokenizer(model_args.tokenizer_name)
    except HubUnavailableError as err:
        sys.exit(f"error: {err}")
    model = build_recipe_model(model_args, tokenizer, training_args.seed).to(device).train()  # train's model
    if training_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(training_args.gradient_checkpointing_kwargs)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    optimizer = optimizer_cls(model.parameters(), **optimizer_kwargs)

    step = make_train_step(model, optimizer, training_args, training_args.per_device_train_batch_size,
                           data_args.block_size, device)
    step_samples = time_repeated(step, device, args.timing_steps, args.timing_warmup)

    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model, optimizer, step  # the buffer below may be as large as the model
    # The engine's own reducer, summing a float32 buffer (a narrower wire's conversions included).
    reducer = build_reducer(training_args, Topology.build(1, device_type=device.type))
    buffer = torch.ones(numel, device=device)
    comm_samples = time_repeated(lambda: reducer.sum_(buffer), device, args.timing_steps, args.timing_warmup)
    comm_bytes = reducer.wire_bytes(numel)
    reducer.close()

    result = advice(statistics.median(step_samples), statistics.median(comm_samples), comm_bytes,
                    args.sync_every_values, args.max_overhead)
    result.update(
        world_size=world_size, backend=dist.get_backend(), device=str(device), model_config=model_args.model_config,
        num_parameters=numel, comm_dtype=training_args.outer_comm_dtype,
        per_device_train_batch_size=training_args.per_device_train_batch_size, block_size=data_args.block_size,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        step_samples_s=step_samples, comm_samples_s=comm_samples,
    )
    if dist.get_rank() == 0:
        context = (f" {training_args.outer_comm_dtype} over {world_size} processes, {dist.get_backend()}; "
                   f"{model_args.model_config}, {numel:,} parameters")
        print(format_table(result, training_args.sync_every, context), flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
    # Leave together, and tear the group down before exiting: a rank that exits while another still talks to it
    # (or with gloo's threads still up) can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
