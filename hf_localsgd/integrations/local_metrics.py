"""Metric gathers that stay on the rank during local rounds.

Trainers log metrics of every micro-batch gathered across ranks: TRL's `SFTTrainer.compute_loss`, for example,
calls `accelerator.gather_for_metrics` four times per micro-batch (token counts, entropy, token accuracy). Each
is a collective, which local rounds must not make. Between the start and the end of an inner step,
`LocalGathers` answers `gather_for_metrics` from this rank alone, with what the gather would return if every
rank held this rank's value: K copies, concatenated. So a ratio (entropy per token, token accuracy) is this
rank's own, and a sum (tokens seen) is K times this rank's, the estimate of the total under an i.i.d. split.
Evaluations, logging steps and the data-parallel warm-up gather for real.
"""

from __future__ import annotations

import torch


class LocalGathers:
    """Puts a local stand-in for ``accelerator.gather_for_metrics`` in place while ``active``."""

    def __init__(self, accelerator, world_size: int):
        self.accelerator, self.world_size = accelerator, world_size
        self.active = False

    def activate(self) -> None:
        if not self.active:
            # An instance attribute shadows the method; deleting it restores Accelerate's own.
            self.accelerator.gather_for_metrics = self._gather_for_metrics
            self.active = True

    def deactivate(self) -> None:
        if self.active:
            del self.accelerator.gather_for_metrics
            self.active = False

    def _gather_for_metrics(self, input_data, use_gather_object: bool = False):
        if use_gather_object or not _only_tensors(input_data):
            return type(self.accelerator).gather_for_metrics(self.accelerator, input_data, use_gather_object)
        return _map_tensors(input_data, self._replicate)

    def _replicate(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor  # as Accelerate's gather does with a scalar
        return torch.cat([tensor] * self.world_size)


def _only_tensors(data) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, (list, tuple)):
        return all(_only_tensors(d) for d in data)
    if isinstance(data, dict):
        return all(_only_tensors(d) for d in data.values())
    return False


def _map_tensors(data, fn):
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, (list, tuple)):
        return type(data)(_map_tensors(d, fn) for d in data)
    return type(data)({k: _map_tensors(v, fn) for k, v in data.items()})
