"""LocalSGDTrainer with FSDP2 inside islands of 2 ranks, on 4 CPU processes: every rank's shards after every step,
the collectives per process group, and the model Trainer saves at the end against the engine's global model.

Accelerate 1.16 never enables FSDP without an accelerator: it refuses a ParallelismConfig on CPU ("ParallelismConfig
is only compatible DistributedType.FSDP (version 2) ... but got DistributedType.MULTI_CPU") and leaves
TrainingArguments' fsdp unused (plain DDP). To run the FSDP2 glue here, this scenario sets Accelerate's
distributed type to FSDP, as a launch on GPUs does (`force_fsdp_on_cpu`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from common import common_args, count_collectives_by_group, dataset, digest, main, tiny_model
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


def force_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if kwargs.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs["fsdp_plugin"]
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = __init__


class Recorder(TrainerCallback):
    """Runs after LocalSGDCallback: this rank's shards (its replica's part) and the collectives, per step."""

    def __init__(self, trainer, counts):
        self.trainer, self.counts = trainer, counts
        self.hashes, self.syncs, self.collectives = [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.local_sgd.engine
        self.hashes.append(digest(engine.local_params()))
        self.syncs.append(engine.num_syncs)
        self.collectives.append(dict(self.counts))


def unforced(out_dir: str) -> dict:
    """What Accelerate does with FSDP on CPU when left alone: refuses hybrid sharding, ignores fsdp."""
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import AcceleratorState

    try:
        Accelerator(parallelism_config=ParallelismConfig(dp_replicate_size=2, dp_shard_size=2))
        refused = None
    except ValueError as error:
        refused = str(error)
    AcceleratorState._reset_state(reset_partial_state=True)
    args = LocalSGDConfig(**common_args(out_dir, max_steps=1, fsdp="full_shard", fsdp_config={"version": 2}),
                          island_size=2)
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    fsdp_used = trainer.is_fsdp_enabled
    AcceleratorState._reset_state(reset_partial_state=True)
    return {"hybrid_sharding_refused": refused, "fsdp_used": fsdp_used}


def run(out_dir: str) -> dict:
    left_alone = unforced(os.path.join(out_dir, "unforced"))
    force_fsdp_on_cpu()
    args = LocalSGDConfig(
        **common_args(out_dir, max_steps=9, logging_steps=100, fsdp="full_shard",
                      fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPTNeoBlock"]}),
        sync_every=3, outer_optimizer="nesterov", local_sgd_warmup_steps=2, island_size=2,
    )
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    counts = count_collectives_by_group()
    recorder = Recorder(trainer, counts)
    trainer.add_callback(recorder)
    trainer.train()
    engine = trainer.local_sgd.engine
    trainer.save_model(os.path.join(out_dir, "final"))
    dist.barrier()
    from torch.distributed.tensor import distribute_tensor

    saved = load_file(os.path.join(out_dir, "final", "model.safetensors"))
    model = trainer.model
    names = [n for n, p in model.named_parameters()]
    # the saved whole tensors, cut as FSDP2 cuts them, against this rank's part of the global model
    parts = [distribute_tensor(saved[n].float(), p.device_mesh, p.placements, src_data_rank=None).to_local().reshape(-1)
             for n, p in zip(names, model.parameters()) if n in saved]
    saved_is_global = torch.equal(torch.cat(parts), engine.global_params) and len(parts) == len(names)
    return {"hashes": recorder.hashes, "syncs": recorder.syncs, "collectives": recorder.collectives,
            "rank": dist.get_rank(), "saved_is_global": saved_is_global, "workers": engine.world_size,
            "sharded": type(trainer.model_wrapped).__name__, **left_alone}


if __name__ == "__main__":
    main(run)
