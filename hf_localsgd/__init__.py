"""hf_localsgd: Local SGD, DiLoCo and schedule-free outer optimization for transformers.Trainer and Accelerate."""

from .callback import LocalSGDCallback
from .config import LocalSGDArguments, LocalSGDConfig
from .engine import RoundEngine
from .outer import ScheduleFreeSGD, build_outer_optimizer
from .trainer import LocalSGDTrainer


__version__ = "0.1.0"
__all__ = [
    "LocalSGDArguments",
    "LocalSGDCallback",
    "LocalSGDConfig",
    "LocalSGDTrainer",
    "RoundEngine",
    "ScheduleFreeSGD",
    "build_outer_optimizer",
]
