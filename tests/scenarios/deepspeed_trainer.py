"""LocalSGDTrainer under DeepSpeed on CPU processes (gloo), against the same run without DeepSpeed.

One launch runs the reference first (LocalSGDTrainer with Trainer's DDP: the same inner optimizer, Trainer's
torch AdamW, the same data, clipping, warm-up, H and outer optimizer), then each DeepSpeed run the options name
(``NAME`` of `RUNS`, e.g. ``zero0``, ``zero2_offload``), with the example configs of ``recipes/deepspeed/``. Each
records, at every step, this rank's weights (the round's: DeepSpeed's float32 masters where it keeps them), the
collectives per process group (every call that reaches a group: `common.count_process_group_calls`) and, at each
sync, the largest difference of the global model (as the model holds it then) from the reference's at the same
sync, relative to its largest weight. With the option
``resume``: the run, and the same run resumed from its mid-round checkpoint (step 6, H = 3 after 2 warm-up
steps), must end bit-identical.

DeepSpeed on a machine without an accelerator needs two things a GPU launch does not (both in
`deepspeed_state`): Accelerate's state built with gloo before TrainingArguments (on its own, Accelerate finds no
backend for DeepSpeed on CPU and sees one process), and `use_cpu=False` (`use_cpu=True` turns DeepSpeed off
without a word). bfloat16 runs also need TrainingArguments' check for a bf16 GPU answered (`bf16_on_cpu`).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist
from common import common_args, count_process_group_calls, dataset, digest, main, tiny_model
from transformers import TrainerCallback

from hf_localsgd import LocalSGDConfig, LocalSGDTrainer


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, WARMUP, H = 9, 2, 3
# NAME: (example config, island_size, bf16); each run also sets zero_force_ds_cpu_optimizer=false, so that
# ZeRO-Offload steps Trainer's torch AdamW (the reference's optimizer; the CPU Adam op would be compiled first).
RUNS = {
    "zero0": ("zero0.json", 1, False),
    "zero0_bf16": ("zero0.json", 1, True),
    "zero1": ("zero1.json", 1, False),
    "zero2_offload": ("zero2_offload.json", 1, False),
    "zero2_bf16": ("zero2.json", 1, True),
    "zero0_islands": ("zero0.json", 2, False),
    "zero1_islands": ("zero1.json", 2, False),
    "zero2_islands": ("zero2_offload.json", 2, False),
    # Accelerate's DeepSpeed plugin (an accelerate config's deepspeed_config_file), not TrainingArguments' field
    "zero2_plugin": ("zero2.json", 1, False),
}
# DeepSpeed's own optimizers as the inner optimizer (their CPU ops are compiled on first use: minutes): ZeRO-Offload's
# DeepSpeedCPUAdam (what Accelerate maps Trainer's AdamW to by default), and FusedAdam from the config's "optimizer",
# which at stage 0 in bfloat16 runs under DeepSpeed's fused mixed-precision optimizer (FP16_Optimizer).
DS_OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
OWN_OPTIMIZERS = {
    "zero2_cpu_adam": ("zero2_offload.json", 1, False, {"zero_force_ds_cpu_optimizer": True}),
    "zero0_bf16_fused_adam": ("zero0.json", 1, True, {"optimizer": DS_OPTIMIZER}),
    "zero2_fused_adam_islands": ("zero2.json", 2, False, {"optimizer": DS_OPTIMIZER}),
}
RUNS.update(OWN_OPTIMIZERS)
# Gradient accumulation (2 micro-batches a step): the warm-up's hooks average each micro-batch's gradient across
# islands, before ZeRO-2 reduces it into the island's partitions (its reference accumulates too).
RUNS["zero2_accumulation_islands"] = ("zero2.json", 2, False)
TRAINING = {"zero2_accumulation_islands": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}}


def load_example(name: str, overrides: dict | None = None) -> dict:
    with open(os.path.join(ROOT, "recipes", "deepspeed", name), encoding="utf-8") as f:
        config = json.load(f)
    config["zero_force_ds_cpu_optimizer"] = False
    config["zero_allow_untested_optimizer"] = True
    config["steps_per_print"] = 10**9
    return {**config, **(overrides or {})}


def reset_state() -> None:
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()


def deepspeed_state() -> None:
    """Accelerate's state for DeepSpeed over the gloo group the launcher's processes joined."""
    from accelerate import PartialState

    reset_state()
    os.environ.pop("ACCELERATE_USE_CPU", None)  # (the test launcher sets it for the DDP runs)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


@contextlib.contextmanager
def bf16_on_cpu():
    """TrainingArguments(bf16=True) refuses a machine without a bf16 GPU unless use_cpu=True, which would turn
    DeepSpeed off; DeepSpeed's CPU accelerator supports bf16."""
    import transformers.training_args as training_args

    check = training_args.is_torch_bf16_gpu_available
    training_args.is_torch_bf16_gpu_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        training_args.is_torch_bf16_gpu_available = check


class Recorder(TrainerCallback):
    """After LocalSGDCallback: per step, the round's weights and the collectives; per sync, the global model."""

    def __init__(self, trainer, counts, reference=None):
        self.trainer, self.counts, self.reference = trainer, counts, reference
        self.hashes, self.synced, self.collectives, self.globals, self.errors = [], [], [], [], []
        self.masters = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.collectives.append(dict(self.counts))  # after DeepSpeed's and the engine's setup

    def on_step_end(self, args, state, control, model=None, **kwargs):
        engine = self.trainer.local_sgd.engine
        synced = engine.num_syncs > sum(self.synced)
        self.hashes.append(digest(engine.local_params()))
        self.synced.append(synced)
        self.collectives.append(dict(self.counts))
        if synced:
            # The whole global model, as the model holds it right after a sync (rounded to its dtype; with ZeRO
            # inside islands each rank keeps the global copy of its partition only, in ZeRO's layout).
            x = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
            self.globals.append(x)
            if self.reference is not None:
                want = self.reference[len(self.globals) - 1]
                self.errors.append(((x - want).abs().max() / want.abs().max()).item())
            # The round's weights are the global model exactly (DeepSpeed's float32 masters, not rounded), the
            # module's its rounding to the model's dtype.
            module = module_part(model, engine)
            self.masters.append({"masters_are_global": torch.equal(round_weights(engine), engine.global_params),
                                 "module_is_global_rounded": torch.equal(module, engine.global_params.to(module.dtype)),
                                 "masters_not_rounded": not torch.equal(engine.global_params,
                                                                        engine.global_params.to(module.dtype).float()),
                                 "module_dtype": str(module.dtype)})


def module_part(model, engine) -> torch.Tensor:
    """The model's values of what this rank's global copy covers: all of it; with ZeRO the fragments of the
    partition its float32 masters hold (``param._hp_mapping``), in the masters' order; with stage 0 inside an
    island, the span of the flat model the rank keeps (`hf_localsgd.core.shard.IslandShard`)."""
    mapped = [p._hp_mapping.lp_fragment for p in model.parameters() if getattr(p, "_hp_mapping", None)]
    flat = torch.cat([t.detach().reshape(-1) for t in (mapped or list(model.parameters()))])
    owned = engine.shard.owned
    return flat if owned is engine.flat else owned.select(flat)


def round_weights(engine) -> torch.Tensor:
    """What the round reads of the part of the replica this rank keeps the global copy of."""
    flat = engine.shard.owned.empty()
    engine.shard.owned.copy_from_model(flat)
    return flat


def saved_is_global(trainer, directory: str) -> bool:
    """The model Trainer saves after training (rank 0 writes it) is the global model: the model holds it in its
    dtype, and what it holds is the engine's global copy (rounded to that dtype)."""
    from safetensors.torch import load_file

    trainer.save_model(directory)
    dist.barrier()
    saved = load_file(os.path.join(directory, "model.safetensors"))
    model, engine = trainer.model, trainer.local_sgd.engine
    same = all(torch.equal(saved[n], p.detach()) for n, p in model.named_parameters() if n in saved)
    part = module_part(model, engine)
    return same and len(saved) > 0 and torch.equal(part, engine.global_params.to(part.dtype))


def train(out_dir: str, name: str | None, reference=None, resume_from=None, **overrides):
    counts = count_process_group_calls()
    extra = {}
    island_size, bf16 = 1, False
    plugin = name is not None and name.endswith("_plugin")
    if name is not None:
        example, island_size, bf16, *overrides_of_config = RUNS[name]
        deepspeed_state()
        extra = dict(deepspeed=load_example(example, *overrides_of_config), use_cpu=False, bf16=bf16,
                     accelerator_config={"use_configured_state": True})
    if plugin:  # what `accelerate launch` with deepspeed_config_file in its config exports to the processes
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"ds_config_rank{dist.get_rank()}.json")  # (one rank truncating it while
        # another reads it fails the reader; `accelerate launch` writes it once, before starting the processes)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(extra.pop("deepspeed"), f)
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=path)
    try:
        with bf16_on_cpu() if bf16 else contextlib.nullcontext():
            args = LocalSGDConfig(
                **common_args(out_dir, max_steps=STEPS, logging_steps=100, max_grad_norm=1.0, **extra, **overrides),
                sync_every=H, outer_optimizer="nesterov", local_sgd_warmup_steps=WARMUP, island_size=island_size,
            )
    finally:
        if plugin:
            del os.environ["ACCELERATE_USE_DEEPSPEED"], os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    recorder = Recorder(trainer, counts, reference)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, recorder


def described(trainer) -> dict:
    engine = trainer.local_sgd.engine
    ds = trainer.deepspeed
    return {
        "engine": type(ds).__name__, "optimizer": type(ds.optimizer).__name__,
        "base_optimizer": type(getattr(ds.optimizer, "optimizer", ds.optimizer)).__name__,
        "dp_world_size": ds.dp_world_size, "stage": ds.zero_optimization_stage(),
        "offload": bool(ds.zero_cpu_offload()), "workers": engine.world_size,
        "global_numel": engine.global_params.numel(), "model_numel": sum(p.numel() for p in trainer.model.parameters()),
        "master_device": str(engine.flat.values_device), "from_training_arguments": trainer.args.deepspeed is not None,
    }


def run(out_dir: str, *names: str) -> dict:
    resume = "resume" in names
    names = [n for n in names if n != "resume"]
    result = {"rank": dist.get_rank()}
    if not resume:
        kinds = {(RUNS[n][1], tuple(sorted(TRAINING.get(n, {}).items()))) for n in names}
        references = {}
        for kind in sorted(kinds):  # the same run through Trainer's DDP
            reset_state()
            os.environ["ACCELERATE_USE_CPU"] = "true"
            _, references[kind] = _reference(out_dir, *kind)
        for name in names:
            kind = (RUNS[name][1], tuple(sorted(TRAINING.get(name, {}).items())))
            trainer, recorder = train(os.path.join(out_dir, name), name, references[kind].globals,
                                      **TRAINING.get(name, {}))
            result[name] = {"hashes": recorder.hashes, "synced": recorder.synced, "errors": recorder.errors,
                            "collectives": recorder.collectives, "masters": recorder.masters, **described(trainer),
                            "saved_is_global": saved_is_global(trainer, os.path.join(out_dir, name, "final"))}
        reset_state()
        return result
    for name in names:
        full, before = train(os.path.join(out_dir, name, "full"), name, save_strategy="steps", save_steps=3)
        checkpoint = os.path.join(out_dir, name, "full", "checkpoint-6")
        files = sorted(os.listdir(checkpoint))
        tags = {f: sorted(os.listdir(os.path.join(checkpoint, f))) for f in files if f.startswith("global_step")}
        resumed, recorder = train(os.path.join(out_dir, name, "resumed"), name, resume_from=checkpoint,
                                  save_strategy="steps", save_steps=3)
        result[name] = {"full": _final(full), "resumed": _final(resumed), "checkpoint_files": files, "tags": tags,
                        "full_hashes": before.hashes, "resumed_hashes": recorder.hashes}
    reset_state()
    return result


def _reference(out_dir: str, island_size: int, training: tuple = ()):
    counts = count_process_group_calls()
    folder = "-".join([f"reference{island_size}", *(f"{k}{v}" for k, v in training)])
    args = LocalSGDConfig(
        **common_args(os.path.join(out_dir, folder), max_steps=STEPS, logging_steps=100, max_grad_norm=1.0,
                      **dict(training)),
        sync_every=H, outer_optimizer="nesterov", local_sgd_warmup_steps=WARMUP, island_size=island_size,
    )
    trainer = LocalSGDTrainer(model=tiny_model(), args=args, train_dataset=dataset())
    recorder = Recorder(trainer, counts)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder


def _final(trainer) -> list:
    engine = trainer.local_sgd.engine
    module = torch.cat([p.detach().reshape(-1).float() for p in trainer.model.parameters()])
    return [digest(module), digest(engine.global_params), digest(engine.local_params()), engine.num_syncs]


if __name__ == "__main__":
    main(run)
