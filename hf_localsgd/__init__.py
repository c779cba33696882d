"""hf_localsgd: Local SGD, DiLoCo and schedule-free outer optimization for transformers.Trainer and Accelerate.

The public names are imported on first use (PEP 562), so that tools that need neither torch nor transformers,
such as ``hf-localsgd plot``, start in a fraction of a second.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# public name: the module that defines it
_EXPORTS = {
    "LocalSGDArguments": ".config",
    "LocalSGDCallback": ".callback",
    "LocalSGDConfig": ".config",
    "LocalSGDTrainer": ".trainer",
    "RoundEngine": ".engine",
    "ScheduleFreeSGD": ".outer",
    "build_outer_optimizer": ".outer",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .callback import LocalSGDCallback
    from .config import LocalSGDArguments, LocalSGDConfig
    from .engine import RoundEngine
    from .outer import ScheduleFreeSGD, build_outer_optimizer
    from .trainer import LocalSGDTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: hf_localsgd.engine, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({"__version__", *_EXPORTS})
