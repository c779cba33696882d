"""The data-parallel wrapper inside a replica, and the switch that keeps inner steps free of communication.

Trainer (through Accelerate) wraps the model in `DistributedDataParallel` in a multi-process run. Local SGD
lets DDP all-reduce gradients only during the warm-up (`local_sgd_warmup_steps`); afterwards each replica
steps on its own gradients until the outer sync. DDP's `no_sync` for gradient-accumulation micro-batches
restores whatever flag is set here, so one flag covers every micro-batch.
"""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from ..core.flat import keep_buffers_local


UNATTACHED = ("LocalSGDCallback cannot switch off DDP's gradient all-reduce from a `callbacks=[...]` list: "
              "Trainer never hands callbacks its DDP wrapper. Use LocalSGDTrainer, or attach the callback "
              "to your trainer instead: `LocalSGDCallback.attach(trainer, local_sgd_args)`.")
# Setups in which something other than one full replica per rank under DDP holds the parameters.
UNSUPPORTED = ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM")


def check_supported(trainer, args) -> None:
    """Refuse, before Trainer prepares the model, the parallel setups local SGD cannot run under."""
    accelerator = getattr(trainer, "accelerator", None)
    distributed_type = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
    if distributed_type in UNSUPPORTED:
        raise RuntimeError(
            f"Local SGD does not support distributed_type={distributed_type} (set in your accelerate config): "
            "it needs one full model replica per rank under plain DDP (MULTI_GPU / MULTI_CPU)."
        )
    if getattr(args, "n_gpu", 1) > 1:
        raise RuntimeError(
            f"Local SGD does not support torch.nn.DataParallel over {args.n_gpu} GPUs in one process: "
            "launch one process per GPU with `accelerate launch`."
        )


class DDPGradientSync:
    """Switches a `DistributedDataParallel` wrapper's per-step gradient all-reduce on and off. Buffers are never
    broadcast on forward passes: each replica's are its own."""

    def __init__(self, ddp: DistributedDataParallel):
        self.ddp = ddp
        keep_buffers_local(ddp)

    def set(self, enabled: bool) -> None:
        self.ddp.require_backward_grad_sync = enabled


def find_gradient_sync(trainer, model, world_size: int) -> DDPGradientSync | None:
    """The switch of the wrapper Trainer put around ``model``, or None when nothing wraps it (one process)."""
    if world_size == 1:
        return None
    if trainer is None:
        raise RuntimeError(UNATTACHED)
    wrapped = trainer.model_wrapped
    if isinstance(wrapped, DistributedDataParallel):
        return DDPGradientSync(wrapped)
    if wrapped is model:
        return None
    raise RuntimeError(f"Local SGD supports DDP or an unwrapped model, not {type(wrapped).__name__}")
