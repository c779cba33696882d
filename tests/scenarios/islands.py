"""Islands on 4 processes (2 islands x 2 ranks), RoundEngine in a plain loop: inside an island a DDP wrapper of all
ranks (`ddp`) or FSDP2 sharding over the island's mesh (`fsdp2`), with the `gradient_sync` switch. Every step
records the collectives per process group and every rank's weights, and a single-process reference of the 2
workers (each trained on its island's combined batch, AdamW inner steps, Nesterov outer steps in float64) runs
beside it on every rank. With the option `resume`, the same run stopped mid-round, saved with the per-rank helpers
and continued by fresh objects in the same processes.

    python tests/scenarios/batch.py OUT islands:fsdp2      # 4 ranks, as tests/distributed/test_islands.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import SEQ, VOCAB, count_collectives_by_group, digest, flat_params, main, tiny_model
from torch.nn.parallel import DistributedDataParallel

from hf_localsgd import RoundEngine, resume_rank_state, save_rank_state
from hf_localsgd.core.data_parallel import gradient_sync
from hf_localsgd.core.flat import local_values
from hf_localsgd.core.topology import Topology


STEPS, WARMUP, H, LR, SAVE_AT = 11, 2, 3, 3e-3, 6
OUTER = dict(outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9)


def batch(step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s batch at ``step``: 2 rows counting up from random starts."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randint(0, VOCAB, (2, 1), generator=g) + torch.arange(SEQ)) % VOCAB


# What the `combo` mode adds to each kind: the overlapped and compressed syncs, composed with islands.
COMBOS = {"ddp": dict(outer_overlap="eager", outer_comm_dtype="int8", outer_error_feedback=True),
          "fsdp2": dict(num_fragments=3, fragment_sync_delay=0, outer_comm_dtype="bfloat16")}


def build(kind: str, island_size: int, seed: int = 0, **extra):
    model = tiny_model()  # (the same weights on every rank)
    if seed:
        with torch.no_grad():  # other weights: a resume must bring back everything
            for p in model.parameters():
                p.add_(0.1)
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        topology = Topology.build(island_size)
        for block in model.transformer.h:
            fully_shard(block, mesh=topology.island_mesh)
        wrapped = fully_shard(model, mesh=topology.island_mesh)
    else:
        topology, wrapped = None, DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    engine = RoundEngine(wrapped, sync_every=H, local_sgd_warmup_steps=WARMUP, island_size=island_size,
                         track_metrics=True, optimizer=optimizer, topology=topology, **OUTER, **extra)
    return model, wrapped, optimizer, engine, gradient_sync(wrapped, engine.topology)


def held(model) -> torch.Tensor:
    """What this rank holds of the model: all of it, or its FSDP2 shards."""
    return torch.cat([local_values(p).reshape(-1).float() for p in model.parameters()])


def train(model, wrapped, optimizer, engine, gradients, first: int, last: int, log: dict | None = None) -> None:
    rank = dist.get_rank()
    for step in range(first, last):
        gradients.set(engine.syncs_gradients)
        ids = batch(step, rank)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        synced = engine.step()
        if log is not None:
            log["hashes"].append(digest(held(model)))
            log["synced"].append(synced)
            log["collectives"].append(dict(log["counter"]))
            if synced:  # this rank's span of the global model (all of it would take an all-gather)
                log["global"].append(engine.global_params.double().clone())
                log["metrics"].append(dict(engine.last_metrics))


def reference(world: int, island_size: int) -> list[torch.Tensor]:
    """The global model after each sync: K = world / island_size workers in one process, each taking AdamW steps
    on the mean of its ranks' losses (what DDP inside the island computes), the warm-up on all ranks' losses."""
    K = world // island_size
    workers = [tiny_model() for _ in range(K)]
    optimizers = [torch.optim.AdamW(w.parameters(), lr=LR) for w in workers]
    x = buf = None
    out = []
    for step in range(STEPS):
        for k, (w, opt) in enumerate(zip(workers, optimizers)):
            ranks = range(world) if step < WARMUP else range(k * island_size, (k + 1) * island_size)
            loss = sum(w(input_ids=batch(step, r), labels=batch(step, r)).loss for r in ranks) / len(ranks)
            loss.backward()
            opt.step()
            opt.zero_grad()
        if step + 1 == WARMUP:
            x, buf = flat_params(workers[0]).double(), None
        if step + 1 > WARMUP and (step + 1 - WARMUP) % H == 0:
            delta = torch.stack([x - flat_params(w).double() for w in workers]).mean(0)
            buf = delta if buf is None else OUTER["outer_momentum"] * buf + delta
            x = x - OUTER["outer_lr"] * (delta + OUTER["outer_momentum"] * buf)
            for w in workers:
                torch.nn.utils.vector_to_parameters(x.float(), w.parameters())
            out.append(x)
    return out


def this_ranks_part(engine, model, full: torch.Tensor) -> torch.Tensor:
    """The part of a whole flat model (in the model's parameter order) that ``engine.global_params`` holds."""
    if engine.shard.owned is not engine.flat:  # DDP inside: a span of the flat layout
        return engine.shard.owned.select(full)
    from torch.distributed.tensor import distribute_tensor

    parts, offset = [], 0
    for p in model.parameters():  # FSDP2: each parameter's shard, cut locally as FSDP2 cuts it
        whole = full[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        parts.append(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local().reshape(-1))
    return torch.cat(parts)


def run(out_dir: str, kind: str = "ddp", mode: str = "train", island_size: str = "2") -> dict:
    island_size = int(island_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "combo":  # composes: no reference, but DDP's ranks agree, and training ends on one global model
        model, wrapped, optimizer, engine, gradients = build(kind, island_size, **COMBOS[kind])
        log = {"hashes": [], "synced": [], "collectives": [], "global": [], "metrics": [],
               "counter": count_collectives_by_group()}
        train(model, wrapped, optimizer, engine, gradients, 0, STEPS, log)
        engine.finish()
        final = held(model)
        return {"hashes": log["hashes"], "final": digest(final), "finite": bool(torch.isfinite(final).all()),
                "num_syncs": engine.num_syncs, "rank": rank}
    if mode == "resume":
        model, wrapped, optimizer, engine, gradients = build(kind, island_size)
        train(model, wrapped, optimizer, engine, gradients, 0, STEPS)
        full = digest(held(model))
        model, wrapped, optimizer, engine, gradients = build(kind, island_size)
        train(model, wrapped, optimizer, engine, gradients, 0, SAVE_AT)
        save_rank_state(f"{out_dir}/checkpoint-{SAVE_AT}", engine, optimizer)
        dist.barrier()
        model, wrapped, optimizer, engine, gradients = build(kind, island_size, seed=1)
        resume_rank_state([f"{out_dir}/checkpoint-{SAVE_AT}"], engine, optimizer)
        position = (engine.num_steps, engine.inner_step, engine.num_syncs)
        train(model, wrapped, optimizer, engine, gradients, SAVE_AT, STEPS)
        return {"full": full, "resumed": digest(held(model)), "position": position}

    model, wrapped, optimizer, engine, gradients = build(kind, island_size)
    counter = count_collectives_by_group()
    log = {"hashes": [], "synced": [], "collectives": [], "global": [], "metrics": [], "counter": counter}
    train(model, wrapped, optimizer, engine, gradients, 0, STEPS, log)
    snapshot = dict(counter)
    expected = reference(world, island_size)
    errors = [(got - this_ranks_part(engine, model, want)).abs().max().item() / want.abs().max().item()
              for got, want in zip(log["global"], expected)]
    assert dict(counter) == snapshot  # (cutting the reference communicated nothing)
    return {
        "hashes": log["hashes"], "synced": log["synced"], "collectives": log["collectives"],
        "reference_errors": errors, "num_syncs": engine.num_syncs, "metrics": log["metrics"],
        "global_numel": engine.global_params.numel(), "model_numel": engine.flat.numel,
        "outer_state_numel": sum(t.numel() for s in engine.outer_optimizer.state.values() for t in s.values()
                                 if torch.is_tensor(t)),
        "bytes_sent": engine.last_metrics["bytes_sent"], "world": world, "rank": rank,
    }


if __name__ == "__main__":
    main(run)

