"""The global model in and out of the model, for evaluation and saving: `RoundEngine`'s methods that put the
global model (schedule-free: its averaged x) into the model between syncs, and this replica's weights back.

An evaluation between syncs sees the global model as of the last sync; this replica's weights are set aside
(``local_params()``) and come back before the next inner step (``restore_local()``, which the engine's
``begin_step`` and ``sync`` call), so evaluating changes nothing in training. Inside a DDP island its ranks
put the global model together from their parts: all of them call these together.
"""

from __future__ import annotations

import contextlib

import torch


class GlobalModelAccess:
    """Mixed into `RoundEngine`: reads its ``outer`` (the sync unit), ``flat`` (the model's layout) and round
    position, and keeps this replica's weights in ``_local_backup`` while the global model is in."""

    _local_backup: torch.Tensor | None = None

    @property
    def model_is_global(self) -> bool:
        """Whether the model's weights are exactly the global model to evaluate/save (no swap needed)."""
        if self._local_backup is not None or self.in_warmup or (self._num_syncs == 0 and self._inner_step == 0):
            return True
        return self._inner_step == 0 and not self.outer.eval_differs

    def global_model_params(self) -> torch.Tensor:
        """The global model to evaluate and save, flat: x_r, or the averaged x for schedule-free. (Inside a DDP
        island its ranks all-gather their parts: all must call it.)"""
        return self.outer.gather_eval()

    def local_params(self) -> torch.Tensor:
        """This replica's current weights, flat float32 on the state device (set aside while the global model is
        in). Not to be modified."""
        if self._local_backup is not None:
            return self._local_backup
        flat = self.flat.empty(self.outer.state_device)
        self.flat.copy_from_model(flat)
        return flat

    def load_params(self, flat: torch.Tensor) -> None:
        """Write a flat tensor (from ``local_params`` or ``global_model_params``) into the model, as this replica's
        weights (what ``swap_in_global`` had set aside is dropped)."""
        self._local_backup = None
        self.flat.copy_to_model(flat)

    def keep_current_weights(self) -> None:
        """The weights now in the model stay (e.g. a best checkpoint a trainer loaded over the global model): what
        ``swap_in_global`` had set aside is dropped."""
        self._local_backup = None

    def swap_in_global(self) -> None:
        """Put the global model (schedule-free: x) into the model until `restore_local` (or the next step),
        keeping this replica's weights aside. Idempotent."""
        if not self.model_is_global:
            self._local_backup = self.local_params()
            self.outer.write_eval()

    def restore_local(self) -> None:
        """This replica's weights back into the model after `swap_in_global`. Idempotent."""
        if self._local_backup is not None:
            self.flat.copy_to_model(self._local_backup)
            self._local_backup = None

    @contextlib.contextmanager
    def global_model(self):
        """The global model in the model for the ``with`` block (e.g. to evaluate between syncs)."""
        swapped_here = self._local_backup is None and not self.model_is_global
        self.swap_in_global()
        try:
            yield
        finally:
            if swapped_here:
                self.restore_local()
