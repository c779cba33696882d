"""int8 outer gradients (``outer_comm_dtype="int8"``): blockwise absmax quantization, and the all-reduce that
sums quantized buffers without ever adding int8 numbers.

A flat float32 vector is cut into blocks of ``block`` consecutive elements (2048 by default; the last one may
be shorter); each block keeps one float32 scale ``s = absmax / 127`` and its elements ``q = round(x / s)``,
clamped to [-127, 127] (``torch.round``: halves to even). A block of zeros gets the scale 0 and dequantizes to
zeros. Blocks of the flat vector rather than rows of the parameters: the scales cost the same 4/block bytes per
element for every tensor shape, so the wire carries 0.25 + 1/block of float32's bytes (0.2505 at 2048).

`Int8AllReduce` sums such buffers over the replicas as torchft's ``allreduce_quantized`` does: an all-to-all of
the quantized slices (rank j receives every rank's chunk j), a local float32 sum of the dequantized copies, a
second quantization of the summed chunk, and an all-gather of those. Adding int8 numbers, as a plain all-reduce
would, overflows and keeps no common scale; here every sum happens in float32, and every rank dequantizes the
same gathered bytes, so all replicas get bit-identical outer gradients.
"""

from __future__ import annotations

import math
from concurrent.futures import TimeoutError as FutureTimeout
import queue
import threading
from concurrent.futures import Future

import torch
import torch.distributed as dist

from .collectives import GroupReducer, Pending, add_residual, all_gather_, new_group_everywhere
from .metrics import ring_bytes
from .options import INT8_BLOCK_SIZE as BLOCK_SIZE


QMAX = 127  # symmetric: -128 is never used, so that q and -q are both representable


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` as rows of ``block`` elements, the last row padded with zeros (a view when nothing is padded)."""
    pad = -x.numel() % block
    return (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(-1, block)


def quantize_blockwise(x: torch.Tensor, block: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales) of the 1-D float32 ``x``: ``ceil(numel / block)`` scales ``absmax / 127``
    and ``q = clamp(round(x / scale), -127, 127)``; a block of zeros has the scale 0 (and zeros)."""
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(f"quantize_blockwise takes a 1-D float32 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    rows = _blocks(x, block)
    scales = rows.abs().amax(dim=1) / QMAX
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # 0 / 1 = 0 in a zero block
    q = torch.round(rows / divisor[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.view(-1)[: x.numel()], scales


def dequantize_blockwise(q: torch.Tensor, scales: torch.Tensor, block: int = BLOCK_SIZE) -> torch.Tensor:
    """The float32 values ``q · scale`` of `quantize_blockwise`'s output."""
    rows = _blocks(q, block).to(torch.float32) * scales[:, None]
    return rows.view(-1)[: q.numel()]


def chunk_numel(numel: int, world_size: int, block: int = BLOCK_SIZE) -> int:
    """Elements of each rank's chunk of a buffer of ``numel``: whole blocks, ``world_size`` chunks covering it."""
    return math.ceil(numel / (world_size * block)) * block


def int8_bytes_sent(numel: int, world_size: int, block: int = BLOCK_SIZE) -> float:
    """Bytes one rank sends in `Int8AllReduce`'s sum of ``numel`` float32 elements over ``world_size`` ranks: the
    buffer is padded to ``world_size`` chunks of whole blocks, P elements and 4 P / block bytes of scales; the
    all-to-all sends (K-1)/K of it, the all-gather this rank's summed chunk (1/K of it) to the K-1 others:
    2 (K-1)/K (P + 4 P / block), against 2 (K-1)/K · 4 numel for a float32 ring all-reduce."""
    if world_size == 1 or numel == 0:
        return 0.0
    padded = world_size * chunk_numel(numel, world_size, block)
    return 2 * (world_size - 1) / world_size * (padded + 4 * padded // block)


class _Worker:
    """One daemon thread that runs the calls submitted to it, in order. (A `ThreadPoolExecutor`'s thread is
    joined when the interpreter exits: a collective stuck in it would keep a timed-out rank from exiting.)"""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread once the calls submitted before have run, and wait for it."""
        self._calls.put(None)
        self._thread.join()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:  # handed to whoever waits for the sum
                    future.set_exception(error)


class _Done:
    """The `work` of a `Pending` whose sum runs on the reducer's thread: waits for it, re-raising its error."""

    def __init__(self, future: Future):
        self.future = future

    def wait(self, timeout=None) -> None:
        """``timeout``: a `datetime.timedelta`, as `torch.distributed` work takes; its lapse raises RuntimeError."""
        try:
            self.future.result(None if timeout is None else timeout.total_seconds())
        except FutureTimeout as error:
            raise RuntimeError("the int8 sum did not complete in time") from error


class Int8AllReduce(GroupReducer):
    """Sums float32 buffers over ``group`` (the default group when ``None``) with int8 on the wire.

    The same interface as `hf_localsgd.core.collectives.AllReduce`, plus error feedback: given a ``residual``
    (float32, as long as the buffer, owned by the caller and kept from one sync to the next), a rank first adds
    it to its outer gradient and then keeps what the quantization of its own contribution lost,
    ``residual <- (buf + residual) - dequantize(quantize(buf + residual))``, so that no part of any rank's
    outer gradient is lost for good, only delayed (the second quantization, of the sum, is not fed back: it is
    the same on every rank). The residual is training state: a checkpoint must keep it for an exact resume.

    The pipeline has dependent stages (all-to-all, local sum, all-gather); `start` runs them on one background
    thread over a process group of the reducer's own, so that they never interleave with the collectives the
    training loop issues meanwhile. Every rank of the default group must construct the reducer (the group is
    created then), in the same order as its other groups.
    """

    exact = False  # nothing shares the int8 collective: floats that must stay exact go in their own

    def __init__(self, group: dist.ProcessGroup | None = None, block_size: int = BLOCK_SIZE, owns_group: bool = False):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: must be an integer >= 1, got {block_size!r}")
        super().__init__(group, owns_group)
        self.block = block_size
        self._own_group = None
        if dist.is_initialized():
            self._own_group = new_group_everywhere(None if group is None else dist.get_process_group_ranks(group))
            self._owned.append(self._own_group)
        self._thread = _Worker("int8-allreduce") if self.world_size > 1 else None

    def close(self) -> None:
        """End the pipeline's thread (after the sums submitted to it), then `GroupReducer.close`."""
        if self._thread is not None:
            self._thread.stop()
        self._thread = self._own_group = None
        super().close()

    # ------------------------------------------------------------------ the sum
    def sum_(self, buf: torch.Tensor, exact: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of ``buf`` over the replicas: a new float32 tensor (``buf`` itself with one replica), which
        the caller reads back. ``exact`` sums in float32 (statistics), in place, with a plain all-reduce."""
        return self.start(buf, exact, residual).wait()

    def start(self, buf: torch.Tensor, exact: bool = False, residual: torch.Tensor | None = None) -> Pending:
        """`sum_` without waiting: the int8 pipeline runs on the reducer's thread until ``wait()``. Nothing else
        may use ``buf`` or ``residual`` until then (``buf`` is changed: it receives the residual)."""
        self._check_open()
        if exact and residual is not None:
            raise ValueError("residual: error feedback is for the quantized sum; an exact sum rounds nothing")
        if residual is not None and (residual.shape != buf.shape or residual.dtype != torch.float32):
            raise ValueError(f"residual: must be float32 and shaped like the buffer {tuple(buf.shape)}, got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        if self.world_size == 1:
            if residual is not None:  # nothing is quantized: the residual is handed back in full
                buf.add_(residual)
                residual.zero_()
            return Pending(buf)
        if exact:
            return Pending(buf, dist.all_reduce(buf, group=self.group, async_op=True))
        out = torch.empty(buf.numel(), dtype=torch.float32, device=buf.device)
        stream = torch.cuda.current_stream(buf.device) if buf.device.type == "cuda" else None
        return Pending(out, _Done(self._thread.submit(self._pipeline, buf.view(-1), out, residual, stream)))

    def _pipeline(self, buf: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None, stream=None) -> None:
        """On a GPU, on the caller's device and stream (a thread starts on the default ones): after what the
        caller queued before `start`, before what it queues after `wait`."""
        if stream is not None:
            with torch.cuda.device(buf.device), torch.cuda.stream(stream):
                return self._pipeline(buf, out, residual)
        k, block, group = self.world_size, self.block, self._own_group
        if residual is not None:
            add_residual(buf, residual.view(-1))
        n, chunk = buf.numel(), chunk_numel(buf.numel(), k, block)
        padded = buf if n == k * chunk else torch.nn.functional.pad(buf, (0, k * chunk - n))
        q, scales = quantize_blockwise(padded, block)
        if residual is not None:  # what this rank's quantization lost, added to its next outer gradient
            torch.sub(buf, dequantize_blockwise(q, scales, block)[:n], out=residual.view(-1))
        # Rank j receives every rank's chunk j, in rank order.
        q_in, scales_in = torch.empty_like(q), torch.empty_like(scales)
        dist.all_to_all_single(q_in, q, group=group)
        dist.all_to_all_single(scales_in, scales, group=group)
        del q, scales, padded
        per_chunk = chunk // block
        total = torch.zeros(chunk, dtype=torch.float32, device=buf.device)
        for j in range(k):  # in float32, in rank order
            total += dequantize_blockwise(q_in[j * chunk : (j + 1) * chunk],
                                          scales_in[j * per_chunk : (j + 1) * per_chunk], block)
        q_sum, scales_sum = quantize_blockwise(total, block)
        all_gather_(q_in, q_sum, group)
        all_gather_(scales_in, scales_sum, group)
        out.copy_(dequantize_blockwise(q_in, scales_in, block)[:n])

    # ------------------------------------------------------------------ bytes
    def wire_bytes(self, numel: int) -> int:
        """Bytes of the quantized buffer (values and scales) of ``numel`` float32 elements, padded for K ranks."""
        padded = self.world_size * chunk_numel(numel, self.world_size, self.block)
        return padded + 4 * (padded // self.block)

    def bytes_sent(self, numel: int, exact_numel: int = 0) -> float:
        """Bytes this rank sends to sum one buffer of ``numel`` elements in int8 (`int8_bytes_sent`, padding
        included) and ``exact_numel`` in float32 (a ring all-reduce)."""
        return int8_bytes_sent(numel, self.world_size, self.block) + ring_bytes(exact_numel * 4, self.world_size)
