"""Engines built one after the other in the same 2 processes (a search over settings; train() called again)
release what they made for their sums: after `RoundEngine.close()` the process has the open files and threads
it had before the first engine. ``eager_int8``: the private group of the sums in flight, the int8 reducer's own
group and its thread; ``streaming``: the private group (P = 2); ``in_flight``: ``eager_int8`` closed without
finish(), a round's sum in flight (as when Trainer stops early and loads its best checkpoint), which close() waits
for and drops. An engine closed refuses to sync, naming close(). ``leak`` is ``eager_int8`` without close() (what
the test's own check must see grow).
"""

from __future__ import annotations

import gc
import os
import threading

import torch
import torch.distributed as dist
from common import LinearRegression, main

from hf_localsgd import RoundEngine


VARIANTS = {"eager_int8": dict(outer_overlap="eager", outer_comm_dtype="int8"),
            "streaming": dict(num_fragments=2, fragment_sync_delay=1),
            "leak": dict(outer_overlap="eager", outer_comm_dtype="int8"),
            "in_flight": dict(outer_overlap="eager", outer_comm_dtype="int8")}


def resources() -> list[int]:
    gc.collect()
    return [len(os.listdir("/proc/self/fd")), threading.active_count()]


def train_step(model, optimizer) -> None:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(dist.get_rank()))
    optimizer.zero_grad()
    model(x, x.sum(1))["loss"].backward()
    optimizer.step()


def run(out_dir: str, variant: str) -> dict:
    before, after, engine, dropped = resources(), [], None, []
    for _ in range(3):
        model = LinearRegression()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        engine = RoundEngine(model, sync_every=4, outer_optimizer="nesterov", **VARIANTS[variant])
        for _ in range(5 if variant == "in_flight" else 10):
            train_step(model, optimizer)
            engine.step()
        if variant != "in_flight":
            engine.finish()
        if variant != "leak":
            engine.close()
            dropped.append(not engine.outer.in_flight)  # (None, or streaming's empty dict)
        after.append(resources())
    error = None
    if variant != "leak":
        try:
            train_step(model, optimizer)
            engine.step()  # streaming sends its first fragment here
            engine.sync()
        except RuntimeError as e:
            error = str(e)
    return {"before": before, "after": after, "error": error, "dropped": dropped}


if __name__ == "__main__":
    main(run)
