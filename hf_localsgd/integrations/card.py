"""The model-card section that records how a model was trained with hf_localsgd."""

from __future__ import annotations

from .config import LocalSGDArguments


def method_card_section(config: LocalSGDArguments, workers: int) -> str:
    """Markdown describing the outer optimization, appended to the Trainer's model card."""
    names = {"average": "Local SGD (parameter averaging)", "nesterov": "DiLoCo (Nesterov outer momentum)",
             "schedule_free": "schedule-free SGD outer optimizer"}
    rows = [
        ("method", names[config.outer_optimizer]),
        ("outer_optimizer", config.outer_optimizer),
        ("outer_lr", config.resolved_outer_lr),
        ("outer_momentum", config.resolved_outer_momentum),
        ("outer_lr_scheduler", config.outer_lr_scheduler),
        ("sync_every (H)", config.sync_every),
        ("workers", workers),
        ("island_size", config.island_size),
        ("local_sgd_warmup_steps", config.local_sgd_warmup_steps),
        ("outer_comm_dtype", config.outer_comm_dtype),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return (
        "\n## Low-communication training\n\n"
        "Trained with [hf_localsgd](https://github.com/hf-localsgd/hf_localsgd): each worker took `sync_every` "
        "local optimizer steps without gradient all-reduce, then one outer step updated the global model, "
        "which is what this repository holds.\n\n"
        f"| setting | value |\n|---|---|\n{table}\n"
    )
