"""examples/trl_sft_diloco.py on 2 processes (TRL's SFTTrainer, the mixin and `attach`), every collective counted:
after each step, the collectives so far, and TRL's logged metrics."""

from __future__ import annotations

import sys
from pathlib import Path

from common import count_collectives, digest, flat_params, main
from transformers import TrainerCallback


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from trl_sft_diloco import build_trainer  # noqa: E402


class Totals(TrainerCallback):
    def __init__(self, counts):
        self.counts, self.totals = counts, []

    def on_step_end(self, args, state, control, **kwargs):
        self.totals.append(self.counts["total"])


def run(out_dir: str) -> dict:
    trainer = build_trainer(out_dir, max_steps=16, sync_every=4, logging_steps=8)
    counts = count_collectives()
    totals = Totals(counts)
    trainer.add_callback(totals)
    trainer.train()
    return {
        "totals": totals.totals,
        "logs": [log for log in trainer.state.log_history if "loss" in log],
        "num_syncs": next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "engine")).engine.num_syncs,
        "hash": digest(flat_params(trainer.model)),
    }


if __name__ == "__main__":
    main(run)
