"""hf_localsgd: Local SGD, DiLoCo and schedule-free outer optimization for transformers.Trainer and Accelerate.

The package in four rooms: `core` (the algorithm, torch only), `integrations` (the glue to transformers and
Accelerate), `recipes` (a training application: `python -m hf_localsgd.train`) and `tools` (the `hf-localsgd`
command). The public names are imported on first use (PEP 562), so that tools that need neither torch nor
transformers, such as ``hf-localsgd plot``, start in a fraction of a second.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING


__version__ = "0.2.0.dev0"

# public name: the module that defines it
_EXPORTS = {
    "LocalSGDOptions": ".core.options",
    "RoundEngine": ".core.engine",
    "RoundHook": ".core.hooks",
    "ScheduleFreeSGD": ".core.outer",
    "build_outer_optimizer": ".core.outer",
    "resume_rank_state": ".core.checkpoint",
    "save_rank_state": ".core.checkpoint",
    "LocalSGDArguments": ".integrations.config",
    "LocalSGDConfig": ".integrations.config",
    "LocalSGDCallback": ".integrations.callback",
    "LocalSGDTrainer": ".integrations.trainer",
    "LocalSGDTrainerMixin": ".integrations.trainer",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .core.checkpoint import resume_rank_state, save_rank_state
    from .core.engine import RoundEngine
    from .core.hooks import RoundHook
    from .core.options import LocalSGDOptions
    from .core.outer import ScheduleFreeSGD, build_outer_optimizer
    from .integrations.callback import LocalSGDCallback
    from .integrations.config import LocalSGDArguments, LocalSGDConfig
    from .integrations.trainer import LocalSGDTrainer, LocalSGDTrainerMixin


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a subpackage: hf_localsgd.core, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({"__version__", *_EXPORTS})
