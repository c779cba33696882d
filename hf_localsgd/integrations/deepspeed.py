"""DeepSpeed inside islands: ZeRO stages 0, 1 and 2 with DeepSpeed's data-parallel group set to one island.

DeepSpeed reduces gradients over its data-parallel group on every step: stage 0 all-reduces them, stages 1 and
2 reduce them into each rank's partition of the float32 master weights and optimizer state. hf_localsgd hands
DeepSpeed that group through its supported entry point, the ``mpu`` ("model parallelism unit") argument of
``deepspeed.initialize``, whose ``get_data_parallel_group()`` is this rank's island (the rank alone with
``island_size=1``, so that ZeRO-2 with ``offload_optimizer`` keeps each replica's optimizer state in host
memory). Nothing DeepSpeed does then crosses islands; only the outer step does, every H steps. Accelerate does
not pass an mpu of its own (it does only for Ulysses sequence parallelism), so `DeepSpeedIslands` replaces
``deepspeed.initialize`` while the trainer's accelerator prepares the model, and there also

- sets ``train_batch_size`` to what one island trains on per step (micro batch x gradient accumulation x
  island_size), which DeepSpeed checks against its data-parallel world size;
- gives every island its own checkpoint tag, ``global_step{N}_island{k}``: every island is a data-parallel
  world of its own, whose ranks would otherwise write the same file names as the other islands' (each island
  saves and loads its own; ``checkpoint.tag_validation`` is set to ``Ignore``, as the tags differ on purpose).

During ``local_sgd_warmup_steps`` a hook on each parameter, registered before DeepSpeed's own, averages its
gradient across the islands as it is accumulated (`WarmupGradientSync`); DeepSpeed then reduces inside the
island what is already the mean over all ranks, and clips it: the warm-up is data-parallel training over all
ranks. Afterwards the hooks do nothing.

The round reads and writes the float32 master weights the optimizer steps from (`master_weights`), not only
the module's (possibly bfloat16/float16) parameters: ZeRO-1/2's partitions (``param._hp_mapping``, refreshed
into the module with the optimizer's ``update_lp_params``), stage 0's mixed-precision optimizers' float32
copies, or, at stage 0 in float32, the parameters themselves.

Refused, when the config or the trainer is built (`check_deepspeed_config`): ZeRO stage 3 (its parameters are
partitioned, and transformers builds models under ``zero.Init`` over all ranks), DeepSpeed's own
data-parallel/sequence-parallel mesh, AutoTP, and PALSGD and lr scaling (both step or read the inner optimizer
in ways DeepSpeed's engine keeps to itself).
"""

from __future__ import annotations

import glob
import json
import logging
import os

import torch
import torch.distributed as dist

from ..core.data_parallel import AcrossIslands
from ..core.flat import MasterWeights
from ..core.topology import Topology


logger = logging.getLogger(__name__)

SUPPORTED_STAGES = (0, 1, 2)
TAG = "global_step{step}_island{island}"


# ---------------------------------------------------------------------- which configs work
def load_config(config) -> dict | None:
    """A DeepSpeed config given as TrainingArguments' ``deepspeed`` takes it: a dict, a JSON file, or JSON text;
    None when it cannot be read here (TrainingArguments then says why)."""
    if isinstance(config, dict):
        return config
    if isinstance(config, str):
        try:
            if os.path.isfile(config):
                with open(config, encoding="utf-8") as f:
                    return json.load(f)
            return json.loads(config)
        except (OSError, ValueError):
            return None
    return None


def _stage(config: dict):
    return (config.get("zero_optimization") or {}).get("stage", 0)


def config_problem(config: dict) -> str | None:
    """``setting=value: why, and what works instead`` for a DeepSpeed config local SGD cannot run under, or None."""
    stage = _stage(config)
    if str(stage) not in [str(s) for s in SUPPORTED_STAGES]:
        return (f"zero_optimization.stage={stage}: ZeRO stage 3 partitions the parameters themselves (and "
                "transformers builds the model under zero.Init over all ranks), while each island must hold a whole "
                "replica; use stage 2 (gradients and optimizer state partitioned over the island's ranks; "
                "offload_optimizer for memory), stage 1 or stage 0, with island_size ranks per replica")
    for key in ("data_parallel_size", "sequence_parallel_size"):
        if key in config:
            return (f"{key}={config[key]}: builds DeepSpeed's own data-/sequence-parallel mesh over all ranks, "
                    "while local SGD makes DeepSpeed's data-parallel group the island; remove it and set "
                    "island_size (ranks per replica)")
    autotp = (config.get("tensor_parallel") or {}).get("autotp_size", 0)
    if isinstance(autotp, int) and autotp > 1:
        return (f"tensor_parallel.autotp_size={autotp}: AutoTP brings a model-parallel unit of its own, which "
                "local SGD's (the island as DeepSpeed's data-parallel group) replaces; remove it")
    return None


def options_problem(options) -> str | None:
    """``option: why`` for a local-SGD option that DeepSpeed's engine cannot run, or None."""
    if getattr(options, "pseudo_sync_prob", 0) > 0:
        return ("pseudo_sync_prob: PALSGD skips whole inner steps, while DeepSpeed's engine takes its optimizer step "
                "inside the backward pass; use pseudo_sync_prob=0 with DeepSpeed")
    if getattr(options, "lr_scaling", "none") != "none":
        return ("lr_scaling: reads and rescales each step's gradients, which DeepSpeed reduces into partitions of "
                "its own; use lr_scaling='none' with DeepSpeed")
    return None


def check_deepspeed_config(config: dict | None, options, source: str) -> None:
    """Raise a `ValueError` naming the setting when ``config`` (from ``source``: ``deepspeed``, TrainingArguments'
    field, or the accelerate config's ``deepspeed_config``) or an option cannot run under DeepSpeed."""
    problem = options_problem(options)
    if problem is None and config is not None:
        problem = config_problem(config)
        problem = None if problem is None else f"{source}: {problem}"
    if problem is not None:
        raise ValueError(problem)


# ---------------------------------------------------------------------- the data-parallel group
class IslandMPU:
    """What ``deepspeed.initialize(mpu=...)`` asks of a model-parallelism unit: the data-parallel group is this
    rank's island; there is no model parallelism (a group of the rank alone, over which DeepSpeed's per-step
    norm and overflow all-reduces then communicate nothing)."""

    def __init__(self, island: dist.ProcessGroup, island_ranks: list[int], member: int, alone: dist.ProcessGroup):
        self.island, self.island_ranks, self.member, self.alone = island, island_ranks, member, alone

    def get_data_parallel_group(self):
        return self.island

    def get_data_parallel_world_size(self) -> int:
        return len(self.island_ranks)

    def get_data_parallel_rank(self) -> int:
        return self.member

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.island_ranks)

    def get_model_parallel_group(self):
        return self.alone

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def group_of_rank_alone() -> dist.ProcessGroup:
    """A process group of this rank alone (made by this rank only)."""
    return dist.new_group([dist.get_rank()], use_local_synchronization=True)


class WarmupGradientSync(AcrossIslands):
    """During the warm-up, each parameter's gradient is averaged across the islands as soon as it is accumulated
    (a hook registered before DeepSpeed's own, so it runs first); DeepSpeed's reduction inside the island then
    completes the mean over all ranks. ``set(False)`` after the warm-up: the hooks do nothing."""

    def __init__(self, params, topology: Topology):
        super().__init__(topology)
        for p in params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._accumulated)

    def _accumulated(self, param) -> None:
        if param.grad is not None:
            self.average(param.grad)


# ---------------------------------------------------------------------- the trainer's DeepSpeed
class DeepSpeedIslands:
    """DeepSpeed's data-parallel group = this rank's island, for a trainer whose accelerator prepares DeepSpeed
    (`LocalSGDCallback.attach` makes it, before Trainer prepares the model). ``topology`` goes to the round
    engine, ``gradient_sync`` switches the warm-up's averaging, ``master_weights()`` is what the round reads and
    writes, ``engine`` the DeepSpeed engine once prepared."""

    def __init__(self, trainer, options):
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeed with local SGD needs torch.distributed initialized before the trainer is "
                               "built (a launcher: accelerate launch, torchrun or deepspeed)")
        self.options, self.engine = options, None
        self.topology = Topology.build(options.island_size, device_type=trainer.accelerator.device.type)
        rank = dist.get_rank()
        self.alone = group_of_rank_alone()
        if self.topology.island_size > 1:
            island = self.topology.within
            ranks = dist.get_process_group_ranks(island)
        else:
            island, ranks = self.alone, [rank]
        self.mpu = IslandMPU(island, ranks, self.topology.member, self.alone)
        params = [p for p in trainer.model.parameters()]
        # (without a warm-up nothing to switch: DeepSpeed reduces over the island, its data-parallel group)
        self.gradient_sync = WarmupGradientSync(params, self.topology) if options.local_sgd_warmup_steps > 0 else None
        self._wrap_prepare(trainer.accelerator)

    def _wrap_prepare(self, accelerator) -> None:
        """``deepspeed.initialize`` is replaced while this accelerator prepares (Accelerate looks it up then)."""
        prepare = accelerator.prepare

        def prepare_in_islands(*args, **kwargs):
            import deepspeed

            initialize = deepspeed.initialize
            deepspeed.initialize = lambda *a, **k: self._initialize(initialize, *a, **k)
            try:
                return prepare(*args, **kwargs)
            finally:
                deepspeed.initialize = initialize

        accelerator.prepare = prepare_in_islands

    def _initialize(self, initialize, *args, **kwargs):
        if kwargs.get("mpu") is not None:
            raise ValueError("island_size: DeepSpeed was given a model-parallelism unit already (sequence "
                             "parallelism?), while local SGD sets DeepSpeed's data-parallel group to the island")
        key = "config_params" if "config_params" in kwargs else "config"
        config = dict(load_config(kwargs.get(key)) or {})
        check_deepspeed_config(config, self.options, "the DeepSpeed config")
        micro, accumulation = config.get("train_micro_batch_size_per_gpu"), config.get("gradient_accumulation_steps", 1)
        if isinstance(micro, int) and isinstance(accumulation, int):
            config["train_batch_size"] = micro * accumulation * self.topology.island_size
        config["checkpoint"] = {**(config.get("checkpoint") or {}), "tag_validation": "Ignore"}
        kwargs[key], kwargs["mpu"] = config, self.mpu
        result = initialize(*args, **kwargs)
        self.engine = result[0]
        self._per_island_checkpoints(self.engine)
        logger.info("DeepSpeed ZeRO stage %s: data-parallel group of %d rank(s), island %d", _stage(config),
                    self.topology.island_size, self.topology.island)
        return result

    def _per_island_checkpoints(self, engine) -> None:
        """Each island saves and loads its own DeepSpeed checkpoint, tagged ``global_step{N}_island{k}``."""
        save, load, island = engine.save_checkpoint, engine.load_checkpoint, self.topology.island

        def save_checkpoint(save_dir, tag=None, *args, **kwargs):
            tag = TAG.format(step=engine.global_steps, island=island) if tag is None else tag
            return save(save_dir, tag, *args, **kwargs)

        def load_checkpoint(load_dir, tag=None, *args, **kwargs):
            if tag is None:
                found = sorted(glob.glob(os.path.join(load_dir, TAG.format(step="*", island=island))))
                if len(found) != 1:
                    raise ValueError(f"{load_dir}: expected one DeepSpeed checkpoint of island {island} "
                                     f"({TAG.format(step='*', island=island)}), found {len(found)}: resume with the "
                                     "island_size and number of processes that wrote it")
                tag = os.path.basename(found[0])
            return load(load_dir, tag, *args, **kwargs)

        engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint

    def master_weights(self) -> MasterWeights | None:
        if self.engine is None:
            raise RuntimeError("DeepSpeed's engine was not prepared through this trainer's accelerator")
        return master_weights(self.engine)


# ---------------------------------------------------------------------- the float32 master weights
def master_weights(engine) -> MasterWeights | None:
    """The float32 weights ``engine``'s optimizer steps from, when they are not the module's parameters (None:
    stage 0 in float32, whose optimizer steps the parameters themselves). In the module's parameter order."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    params = [p for p in engine.module.parameters() if p.requires_grad]
    device = params[0].device
    if any(hasattr(p, "_hp_mapping") for p in params):  # ZeRO-1/2 (DeepSpeedZeroOptimizer) and BF16_Optimizer
        # this rank's fragment of each parameter in its partition: views of the flat float32 partition
        tensors = [p._hp_mapping.hp_fragment for p in params if getattr(p, "_hp_mapping", None) is not None]
        return MasterWeights(tensors, optimizer.update_lp_params, device, sharded=engine.dp_world_size > 1)
    if isinstance(optimizer, FP16_UnfusedOptimizer):  # stage 0, bfloat16/float16: a float32 copy per parameter
        pairs = dict(zip(map(id, _flat(optimizer.fp16_groups)), _flat(optimizer.fp32_groups)))
        return _per_parameter(params, pairs, device)
    if isinstance(optimizer, FP16_Optimizer):  # stage 0 with a fused optimizer: one flat float32 copy per group
        pairs = {}
        for group, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            offset = 0
            for p in group:
                pairs[id(p)] = flat.detach()[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        return _per_parameter(params, pairs, device)
    if all(p.dtype == torch.float32 for p in params) and not hasattr(optimizer, "fp32_groups"):
        return None
    raise RuntimeError(f"Local SGD does not know where {type(optimizer).__name__} keeps its float32 master weights "
                       "(ZeRO stages 0-2 with DeepSpeed's own or a torch optimizer are supported)")


def _flat(groups) -> list:
    return [t for group in groups for t in group]


def _per_parameter(params, pairs: dict, device) -> MasterWeights:
    missing = [i for i, p in enumerate(params) if id(p) not in pairs]
    if missing:
        raise RuntimeError(f"DeepSpeed's optimizer holds no float32 master for {len(missing)} trainable parameter(s)")
    masters = [pairs[id(p)] for p in params]

    @torch.no_grad()
    def refresh() -> None:
        for p, master in zip(params, masters):
            p.data.copy_(master.view_as(p))

    return MasterWeights(masters, refresh, device)
