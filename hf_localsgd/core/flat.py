"""A model's trainable parameters seen as one flat vector, cut into buckets; or a contiguous part of it.

The global model, the outer gradient and the outer-optimizer state are single flat float32 tensors in this
layout (parameter after parameter, in the model's order), so that an outer step is a few fused vector
operations and a collective moves one contiguous buffer per bucket. Buckets are contiguous runs of
parameters of about `bucket_numel` elements: one collective each, and, with the state offloaded to the host,
the most of the outer gradient that exists on the device at once.

A layout may cover spans of the vector only: a fragment of the model that synchronizes on its own
(`hf_localsgd.core.streaming`), or the part a rank of an island keeps the global model and outer state for,
1/island_size of the parameters (`FlatParams.part`, `hf_localsgd.core.shard`). Parameters may then be cut: a
*piece* is the run of a parameter's flattened elements that the layout covers. Parameters sharded by FSDP2
(DTensors) contribute the shard this rank holds.

The layout may also cover the float32 *master weights* an optimizer steps from instead of the model's parameters
(`MasterWeights`: mixed precision and ZeRO under DeepSpeed), which may live elsewhere (host memory, with ZeRO-Offload)
than the buffers of the outer all-reduce (``device``); after every write, the model's parameters are refreshed
from them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor


logger = logging.getLogger(__name__)


def local_values(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` this rank holds: the local shard of an FSDP2 (DTensor) parameter or gradient, else
    ``t`` itself; detached, sharing its storage (writes land in the parameter)."""
    return (t.to_local() if isinstance(t, DTensor) else t).detach()


@dataclass(frozen=True)
class Piece:
    """Elements ``[lo, hi)`` of ``param`` flattened, at positions ``[start, start + hi - lo)`` of the layout."""

    param: nn.Parameter
    lo: int
    hi: int
    start: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.hi == local_values(self.param).numel()

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """This piece of a tensor shaped like the parameter (the parameter's values, its gradient)."""
        values = local_values(t)
        return values if self.whole else values.view(-1)[self.lo : self.hi]

    def view(self, flat: torch.Tensor, offset: int) -> torch.Tensor:
        """The piece's place in ``flat`` (a tensor of the layout from element ``offset`` on), shaped like it."""
        v = flat[self.start - offset : self.start - offset + self.numel]
        return v.view_as(local_values(self.param)) if self.whole else v


@dataclass(frozen=True)
class Bucket:
    start: int
    end: int
    pieces: list[Piece]

    @property
    def numel(self) -> int:
        return self.end - self.start

    def tensors(self) -> list[torch.Tensor]:
        """The model's values of the bucket's pieces (write into them to change the model)."""
        return [piece.of(piece.param) for piece in self.pieces]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (the bucket's span of a layout tensor) shaped like the pieces."""
        return [piece.view(flat, self.start) for piece in self.pieces]


@dataclass
class MasterWeights:
    """The float32 weights an inner optimizer steps from when they are not the model's parameters: mixed precision
    (a bfloat16/float16 model, float32 masters) and ZeRO's partitions, under DeepSpeed. The engine then reads and
    writes these (a round starts from the global model in them, exactly), and ``refresh`` copies them into the
    model's parameters after every write (rounded to the model's dtype), as the optimizer does after its steps.

    ``tensors``: the masters, one per parameter or per part of one (``sharded``: each rank of an island holds
    other parts, as ZeRO-1/2 partition them over the island); all on one device, possibly the host.
    ``device``: where the outer all-reduce's buffers are made (the model's device)."""

    tensors: list[torch.Tensor]
    refresh: Callable[[], None]
    device: torch.device
    sharded: bool = False


class FlatParams:
    """The flat layout of ``params`` (or of the ``spans`` of their concatenation, in order): views of flat
    tensors shaped like the parameters, and copies between the parameters and a flat tensor. Positions in a flat
    tensor of the layout count from 0 over its spans. Empty parameters carry nothing and are left out.

    ``params`` may be any tensors that hold the replica's weights (the model's parameters, or its float32
    masters: `MasterWeights`); ``device`` is where flat buffers are made (default: where the tensors live);
    ``before_write`` / ``after_write`` are called around every write into them."""

    def __init__(self, params, bucket_numel: float, spans: list[tuple[int, int]] | None = None, before_write=None,
                 after_write=None, device: torch.device | None = None):
        self.before_write = before_write  # called before the model's values are written (FSDP2: reshard first)
        self.after_write = after_write  # called after (masters: refresh the model's parameters from them)
        self.params = [p for p in params if local_values(p).numel() > 0]
        if not self.params:
            raise ValueError("The model has no trainable parameters (on this rank)")
        devices = {local_values(p).device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"All trainable parameters must live on one device, found {sorted(map(str, devices))}")
        self.values_device = devices.pop()  # where the tensors live
        self.device = self.values_device if device is None else torch.device(device)  # where buffers are made
        self.bucket_numel = bucket_numel
        self.total_numel = sum(local_values(p).numel() for p in self.params)  # of the whole vector
        self.spans = [(0, self.total_numel)] if spans is None else [(a, b) for a, b in spans if a < b]
        self.numel = sum(b - a for a, b in self.spans)
        self.pieces = self._cut()
        self.bytes = sum(piece.numel * piece.param.element_size() for piece in self.pieces)  # in their own dtypes
        self.buckets = self._make_buckets(bucket_numel)

    def _cut(self) -> list[Piece]:
        pieces, position = [], 0
        for first, last in self.spans:
            offset = 0
            for p in self.params:
                n = local_values(p).numel()
                lo, hi = max(first - offset, 0), min(last - offset, n)
                if lo < hi:
                    if (lo, hi) != (0, n) and not local_values(p).is_contiguous():
                        raise ValueError("A layout that cuts a parameter needs it contiguous")
                    pieces.append(Piece(p, lo, hi, position))
                    position += hi - lo
                offset += n
        return pieces

    def _make_buckets(self, bucket_numel: float) -> list[Bucket]:
        buckets, start, members, size = [], 0, [], 0
        for piece in self.pieces:
            if members and size + piece.numel > bucket_numel:
                buckets.append(Bucket(start, start + size, members))
                start, members, size = start + size, [], 0
            members.append(piece)
            size += piece.numel
        buckets.append(Bucket(start, start + size, members))
        return buckets

    def subspans(self, start: int, end: int) -> list[tuple[int, int]]:
        """The spans of the whole vector that positions ``[start, end)`` of this layout cover."""
        out, position = [], 0
        for a, b in self.spans:
            lo, hi = max(start - position, 0), min(end - position, b - a)
            if lo < hi:
                out.append((a + lo, a + hi))
            position += b - a
        return out

    def part(self, index: int, count: int) -> FlatParams:
        """The layout of the ``index``-th of ``count`` equal runs of this one's positions (the last ones may be
        shorter, even empty), with the same bucket size."""
        chunk = self.chunk(count)
        return self.with_spans(self.subspans(index * chunk, (index + 1) * chunk))

    def with_spans(self, spans: list[tuple[int, int]]) -> FlatParams:
        """The layout of ``spans`` of the same vector, with the same buckets' size, devices and write hooks."""
        return FlatParams(self.params, self.bucket_numel, spans, self.before_write, self.after_write, self.device)

    def chunk(self, count: int) -> int:
        """The length of each of ``count`` equal runs of the layout's positions (the last padded)."""
        return math.ceil(self.numel / count)

    def select(self, whole: torch.Tensor) -> torch.Tensor:
        """This layout's elements of ``whole``, a flat tensor of the whole vector (a new tensor)."""
        return torch.cat([whole[a:b] for a, b in self.spans]) if self.spans else whole[:0].clone()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (a tensor of the whole layout) shaped like the pieces."""
        return [piece.view(flat, 0) for piece in self.pieces]

    def empty(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.empty(self.numel, dtype=torch.float32, device=self.device if device is None else device)

    @torch.no_grad()
    def copy_from_model(self, flat: torch.Tensor) -> None:
        for b in self.buckets:
            torch._foreach_copy_(b.views(flat[b.start : b.end]), b.tensors())

    def _writing(self) -> None:
        if self.before_write is not None:
            self.before_write()

    def _written(self) -> None:
        if self.after_write is not None:
            self.after_write()

    @torch.no_grad()
    def copy_to_model(self, flat: torch.Tensor) -> None:
        self._writing()
        for b in self.buckets:
            src = flat[b.start : b.end].to(self.values_device, non_blocking=True)
            torch._foreach_copy_(b.tensors(), b.views(src))
        self._written()

    @torch.no_grad()
    def lerp_model_toward(self, flat: torch.Tensor, weight: float) -> None:
        """p <- p + weight (target - p) for every parameter, the target taken from ``flat`` in p's dtype."""
        self._writing()
        for b in self.buckets:
            src = flat[b.start : b.end].to(self.values_device, non_blocking=True)
            tensors = b.tensors()
            targets = [v.to(t.dtype) for v, t in zip(b.views(src), tensors)]
            torch._foreach_lerp_(tensors, targets, weight)
        self._written()

    @torch.no_grad()
    def copy_grads(self, flat: torch.Tensor) -> None:
        """The parameters' gradients into ``flat`` (zeros where a parameter has none)."""
        flat.zero_()
        pairs = [(piece.view(flat, 0), piece.of(piece.param.grad)) for piece in self.pieces
                 if piece.param.grad is not None]
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
