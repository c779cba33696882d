"""A model's trainable parameters seen as one flat vector, cut into buckets.

The global model, the outer gradient and the outer-optimizer state are single flat float32 tensors in this
layout (parameter after parameter, in the model's order), so that an outer step is a few fused vector
operations and a collective moves one contiguous buffer per bucket. Buckets are contiguous runs of whole
parameters of about `bucket_numel` elements: one collective each, and, with the state offloaded to the host,
the most of the outer gradient that exists on the device at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import logging

import torch
from torch import nn


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bucket:
    start: int
    end: int
    params: list[nn.Parameter]

    @property
    def numel(self) -> int:
        return self.end - self.start


class FlatParams:
    """The flat layout of ``params``: views of flat tensors shaped like the parameters, and copies between
    the parameters and a flat tensor. Empty parameters carry nothing and are left out."""

    def __init__(self, params, bucket_numel: float):
        self.params = [p for p in params if p.numel() > 0]
        if not self.params:
            raise ValueError("The model has no trainable parameters")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"All trainable parameters must live on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        self._numels = [p.numel() for p in self.params]
        self.numel = sum(self._numels)
        self.bytes = sum(p.numel() * p.element_size() for p in self.params)  # in the parameters' own dtypes
        self.buckets = self._make_buckets(bucket_numel)

    def _make_buckets(self, bucket_numel: float) -> list[Bucket]:
        buckets, start, members, size = [], 0, [], 0
        for p, n in zip(self.params, self._numels):
            if members and size + n > bucket_numel:
                buckets.append(Bucket(start, start + size, members))
                start, members, size = start + size, [], 0
            members.append(p)
            size += n
        buckets.append(Bucket(start, start + size, members))
        return buckets

    def views(self, flat: torch.Tensor, start: int = 0, end: int | None = None) -> list[torch.Tensor]:
        """Views of ``flat`` (which covers [start, end) of the layout) shaped like the parameters there."""
        end = self.numel if end is None else end
        out, offset = [], 0
        for p, n in zip(self.params, self._numels):
            if offset + n > start and offset < end:
                out.append(flat[offset - start : offset - start + n].view_as(p))
            offset += n
        return out

    def empty(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.empty(self.numel, dtype=torch.float32, device=self.device if device is None else device)

    @torch.no_grad()
    def copy_from_model(self, flat: torch.Tensor) -> None:
        for b in self.buckets:
            torch._foreach_copy_(self.views(flat[b.start : b.end], b.start, b.end), [p.detach() for p in b.params])

    @torch.no_grad()
    def copy_to_model(self, flat: torch.Tensor) -> None:
        for b in self.buckets:
            src = flat[b.start : b.end].to(self.device, non_blocking=True)
            torch._foreach_copy_([p.data for p in b.params], self.views(src, b.start, b.end))

    @torch.no_grad()
    def lerp_model_toward(self, flat: torch.Tensor, weight: float) -> None:
        """p <- p + weight (target - p) for every parameter, the target taken from ``flat`` in p's dtype."""
        for b in self.buckets:
            src = flat[b.start : b.end].to(self.device, non_blocking=True)
            targets = [v.to(p.dtype) for v, p in zip(self.views(src, b.start, b.end), b.params)]
            torch._foreach_lerp_([p.data for p in b.params], targets, weight)

    @torch.no_grad()
    def copy_grads(self, flat: torch.Tensor) -> None:
        """The parameters' gradients into ``flat`` (zeros where a parameter has none)."""
        flat.zero_()
        pairs = [(v, p.grad) for v, p in zip(self.views(flat), self.params) if p.grad is not None]
        if pairs:
            torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])


def unsynchronized_buffers(model: nn.Module) -> list[str]:
    """Names of the floating-point buffers saved with ``model`` (e.g. BatchNorm's running statistics): the
    engine averages parameters only, so these may drift apart across replicas. Non-persistent buffers
    (attention masks, rotary frequencies) are rebuilt identically everywhere and are not listed."""
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name, buffer in module.named_buffers(recurse=False)
        if buffer.is_floating_point() and name not in module._non_persistent_buffers_set
    ]


def warn_about_unsynchronized_buffers(model: nn.Module) -> None:
    drifting = unsynchronized_buffers(model)
    if drifting:
        logger.warning(
            "RoundEngine: the model has %d floating-point buffers that are saved with it (%s%s), e.g. BatchNorm "
            "statistics. Only parameters are averaged: each replica keeps its own buffers, which may drift apart, "
            "and a checkpoint holds rank 0's.", len(drifting), ", ".join(drifting[:3]), ", ..." if len(drifting) > 3 else "",
        )


def keep_buffers_local(ddp) -> None:
    """No buffer broadcast on a `DistributedDataParallel` wrapper's forward passes (each replica's buffers are its
    own between syncs), with the attribute the installed torch has: `forward_sync_buffers` since torch 2.13, whose
    constructor keyword `broadcast_buffers` is deprecated, `broadcast_buffers` before. (DDP still broadcasts
    rank 0's buffers once, when it wraps the model, as it does its parameters.)"""
    if "forward_sync_buffers" in vars(ddp):
        ddp.forward_sync_buffers = False
    else:
        ddp.broadcast_buffers = False
