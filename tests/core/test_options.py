"""The options' single source of truth: every invalid value raises a ValueError starting with its field's name."""

from __future__ import annotations

import pytest

from hf_localsgd import LocalSGDOptions


@pytest.mark.parametrize(
    "field,value",
    [("sync_every", 0), ("sync_every", 2.5), ("sync_every", True), ("outer_optimizer", "adam"),
     ("outer_lr", -0.1), ("outer_lr", float("nan")), ("outer_momentum", 1.0), ("outer_lr_scheduler", "step"),
     ("outer_lr_plateau_fraction", 1.0), ("local_sgd_warmup_steps", -1), ("outer_state_device", "cuda"),
     ("outer_comm_dtype", "float16"), ("pseudo_sync_prob", 1.0), ("pseudo_sync_rate", 0.0),
     ("pseudo_sync_rate", float("inf")), ("pseudo_sync_rate_schedule", "cosine"), ("lr_scaling", "linear"),
     ("lr_scaling_c", 1.5), ("lr_scaling_ema", 1.0), ("data_partition", "by_class")],
)
def test_invalid_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        LocalSGDOptions(**{field: value})


@pytest.mark.parametrize(
    "kwargs,field",
    [({"sync_every_min": 9}, "sync_every_min"), ({"sync_every_min": 0}, "sync_every_min"),
     ({"sync_every_stages": 0}, "sync_every_stages"), ({"sync_every_schedule": "cubic"}, "sync_every_schedule"),
     ({"sync_every_schedule": "inverse_lr", "outer_lr_scheduler": "cosine"}, "outer_lr_scheduler"),
     ({"lr_scaling": "adascale", "pseudo_sync_prob": 0.1}, "lr_scaling")],
)
def test_combinations_name_the_field(kwargs, field):
    kwargs.setdefault("sync_every_schedule", "linear")
    with pytest.raises(ValueError, match=f"^{field}: "):
        LocalSGDOptions(sync_every=8, **kwargs)


def test_defaults_per_outer_optimizer():
    with pytest.raises(ValueError, match="^outer_lr: .*plain averaging"):
        LocalSGDOptions(outer_optimizer="average", outer_lr=0.5)
    with pytest.raises(ValueError, match="^outer_momentum: schedule_free needs"):
        LocalSGDOptions(outer_optimizer="schedule_free", outer_momentum=0.0)
    options = LocalSGDOptions(outer_optimizer="schedule_free")
    assert (options.resolved_outer_lr, options.resolved_outer_momentum) == (2.0, 0.2)
    assert LocalSGDOptions(lr_scaling="local_adascale").resolved_lr_scaling_c == 1.0
    assert LocalSGDOptions(lr_scaling="adascale").resolved_lr_scaling_c == 0.0


def test_the_options_need_no_torch():
    """The options (and the metric names) import with the standard library alone, for tools and parsers."""
    import subprocess
    import sys

    code = ("import sys; import hf_localsgd.core.options, hf_localsgd.core.metrics; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
