"""The data parallelism Trainer put around the model, and the setups local SGD refuses.

Trainer (through Accelerate) wraps the model in `DistributedDataParallel` in a multi-process run; the switch
of its gradient all-reduce (over all ranks in the warm-up, then over the island or nowhere) is
`hf_localsgd.core.data_parallel.gradient_sync`, made once the engine knows the islands. Under DeepSpeed the
wrapper is its engine, whose data-parallel group is the island (`hf_localsgd.integrations.deepspeed`).

FSDP2 inside islands: `shard_inside_islands` shards the model over each island's ranks before Accelerate
prepares it (Accelerate takes an FSDP2 module as it is). Left to itself, Accelerate would shard over all ranks,
or, with ``ParallelismConfig(dp_replicate_size=K, dp_shard_size=S)``, use hybrid sharding, whose all-reduce
across replicas cannot be left out of a step: FSDP2's ``set_requires_all_reduce(False)`` holds the gradients
back (``.grad`` stays None) until a step that all-reduces.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..core.data_parallel import fsdp_modules
from ..core.topology import Topology


UNATTACHED = ("LocalSGDCallback cannot switch off DDP's gradient all-reduce from a `callbacks=[...]` list: "
              "Trainer never hands callbacks its DDP wrapper. Use LocalSGDTrainer, or attach the callback "
              "to your trainer instead: `LocalSGDCallback.attach(trainer, local_sgd_args)`.")
# Setups in which something other than a replica per rank (or per island) holds the parameters. (DeepSpeed's
# ZeRO 0-2 run with its data-parallel group the island: integrations/deepspeed.py, which refuses the rest.)
UNSUPPORTED = ("XLA", "MEGATRON_LM")


def check_supported(trainer, args) -> None:
    """Refuse, before Trainer prepares the model, the parallel setups local SGD cannot run under."""
    accelerator = getattr(trainer, "accelerator", None)
    distributed_type = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
    if distributed_type in UNSUPPORTED:
        raise RuntimeError(
            f"Local SGD does not support distributed_type={distributed_type} (set in your accelerate config): "
            "it needs one full model replica per rank under plain DDP (MULTI_GPU / MULTI_CPU), or FSDP2 or "
            "DeepSpeed ZeRO 0-2 inside islands (island_size)."
        )
    if distributed_type == "FSDP":
        if getattr(args, "island_size", 1) == 1:
            raise RuntimeError(
                "island_size: FSDP (distributed_type=FSDP in your accelerate config) would shard the model over all "
                "ranks, while local SGD keeps one replica per worker: set island_size to the ranks per node (FSDP2 "
                "inside each island, the round across islands), or launch with plain DDP (MULTI_GPU / MULTI_CPU)"
            )
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise RuntimeError(f"fsdp_version: islands shard with FSDP2, the accelerate config asks for FSDP "
                               f"{version}: set fsdp_version: 2")
    if getattr(args, "n_gpu", 1) > 1:
        raise RuntimeError(
            f"Local SGD does not support torch.nn.DataParallel over {args.n_gpu} GPUs in one process: "
            "launch one process per GPU with `accelerate launch`."
        )


def shard_inside_islands(trainer, island_size: int) -> Topology:
    """Shard ``trainer.model`` with FSDP2 over the ranks of its island, as Accelerate would over all of them
    (its auto-wrap policy and plugin settings); returns the islands. The islands are Accelerate's mesh when it
    has one (``dp_replicate`` across, ``dp_shard`` within)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.other import get_module_children_bottom_up
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    accelerator = trainer.accelerator
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None and {"dp_replicate", "dp_shard"} <= set(mesh.mesh_dim_names or ()):
        topology = Topology.from_mesh(mesh, "dp_replicate", "dp_shard")
        if topology.island_size != island_size:
            raise ValueError(f"island_size ({island_size}) must be the parallelism_config's dp_shard_size "
                             f"({topology.island_size}): make them agree")
    else:
        topology = Topology.build(island_size, device_type=accelerator.device.type)
    plugin, model = accelerator.state.fsdp_plugin, trainer.model
    kwargs = dict(mesh=topology.island_mesh, reshard_after_forward=plugin.reshard_after_forward,
                  offload_policy=plugin.cpu_offload, mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    if policy is not None:
        for module in get_module_children_bottom_up(model)[:-1]:
            if policy(module) and not isinstance(module, FSDPModule):
                fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return topology


def find_wrapper(trainer, model, world_size: int) -> nn.Module | None:
    """The data-parallel wrapper of ``model``: Trainer's DDP wrapper, the model itself when FSDP2 shards it, or
    None when nothing wraps it (one process). A multi-process run needs the trainer to find it: Trainer never
    hands callbacks its wrapper."""
    if world_size == 1:
        return None
    if trainer is None:
        raise RuntimeError(UNATTACHED)
    wrapped = trainer.model_wrapped
    if isinstance(wrapped, DistributedDataParallel) or fsdp_modules(wrapped):
        return wrapped
    if getattr(trainer, "is_deepspeed_enabled", False) and wrapped is not model:
        return wrapped  # DeepSpeed's engine, whose data-parallel group is the island (integrations/deepspeed.py)
    if wrapped is model:
        return None
    raise RuntimeError(f"Local SGD supports DDP, FSDP2 or DeepSpeed inside islands or an unwrapped model, not "
                       f"{type(wrapped).__name__}")
