"""The collectives of the outer sync: a sum of flat float32 buffers over the replicas' process group.

`AllReduce` is the communication the sync unit (`hf_localsgd.core.sync`) calls once per bucket. It sums
(gloo has no average) in the chosen wire dtype, and says how many bytes a rank sends for it. Without an
initialized `torch.distributed`, or over a group of one, nothing is communicated. `all_gather_` puts an
island's spans of the global model together (`hf_localsgd.core.shard`).
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys

import torch
import torch.distributed as dist

from .metrics import ring_bytes


# The dtypes `AllReduce` sums in; "int8" (options.COMM_DTYPES) is `hf_localsgd.core.quantize.Int8AllReduce`'s,
# which never sums in its wire dtype.
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_residual(buf: torch.Tensor, residual: torch.Tensor) -> None:
    """Error feedback: ``buf += residual``, unless the residual is not finite (left by a replica whose weights
    went NaN, a sync that was then skipped): it is dropped, or it would make every later sum non-finite too."""
    if bool(torch.isfinite(residual.sum())):
        buf.add_(residual)
    else:
        residual.zero_()


class SyncTimeoutError(RuntimeError):
    """The other replicas did not complete an outer sync in time (``sync_timeout_seconds``)."""


def exit_nonzero_at_exit() -> None:
    """Make this process exit with status 1 when it ends: a collective left waiting keeps gloo's threads from
    ever letting it exit otherwise (its ranks would hang after the error instead of stopping). The output is
    flushed first."""

    def stop() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    atexit.register(stop)


def new_group_everywhere(ranks: list[int] | None) -> dist.ProcessGroup:
    """A new process group of ``ranks`` (all of them when None). `dist.new_group` must be entered by every rank
    of the default group for every group, in one order: when ranks differ between callers (the ranks at one
    position of their islands, or groups of your own), they first tell each other theirs and all create all."""
    world = dist.get_world_size()
    if ranks is None or len(ranks) == world:
        return dist.new_group()
    every = [None] * world
    dist.all_gather_object(every, sorted(ranks))
    mine = None
    for members in sorted({tuple(r) for r in every}):
        created = dist.new_group(list(members))
        if list(members) == sorted(ranks):
            mine = created
    return mine


class Pending:
    """A sum in flight: ``wait()`` returns it, once every rank's part has arrived."""

    def __init__(self, result: torch.Tensor, work=None):
        self.result, self.work = result, work

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """The sum; with ``timeout`` (seconds), a `SyncTimeoutError` when it has not arrived by then."""
        if self.work is not None:
            if timeout is None:
                self.work.wait()
            else:
                try:
                    self.work.wait(timeout=datetime.timedelta(seconds=timeout))
                except RuntimeError as error:
                    exit_nonzero_at_exit()
                    raise SyncTimeoutError(f"the other replicas' sums did not arrive within {timeout:g} s "
                                           f"({error})") from error
            self.work = None
        return self.result


class GroupReducer:
    """What the outer gradients' reducers share: ``group`` (the default group when ``None``), its size and this
    rank's place in it, the broadcast that makes the global model the same everywhere, and the process groups the
    reducer owns (made for it alone: ``owns_group`` for ``group``), which `close` destroys."""

    def __init__(self, group: dist.ProcessGroup | None, owns_group: bool = False):
        self.group, self.closed = group, False
        self._owned = [group] if owns_group and group is not None else []
        distributed = dist.is_initialized()
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("outer sync: this engine was closed (RoundEngine.close, which LocalSGDCallback and so "
                               "LocalSGDTrainer call at the end of train()) and has no process group to sum in any "
                               "more; build a new RoundEngine")

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Overwrite ``tensor`` with the group's first rank's, in place (in its own dtype)."""
        self._check_open()
        if self.world_size > 1:
            src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            dist.broadcast(tensor, src=src, group=self.group)

    def close(self) -> None:
        """Destroy the process groups this reducer owns (sockets and buffers a process keeps until it ends
        otherwise); every rank of them calls it, with nothing in flight. The reducer sums no more."""
        for group in self._owned:  # (this rank's: a group of ranks it is not in is a placeholder)
            if group != dist.GroupMember.NON_GROUP_MEMBER and dist.is_initialized():
                dist.destroy_process_group(group)
        if self.group in self._owned:  # (a destroyed group's sockets close when its last reference goes)
            self.group = None
        self._owned, self.closed = [], True


class AllReduce(GroupReducer):
    """Sums float32 buffers over ``group`` (the default group when ``None``), ``comm_dtype`` on the wire.

    Error feedback (a ``residual`` given to `sum_` / `start`; float32, as long as the buffer, owned by the caller
    and kept from one sync to the next): the rank adds it to its outer gradient, then keeps what the bfloat16
    rounding of that lost, ``residual <- (buf + residual) - bfloat16(buf + residual)``, for its next one. It is
    training state that a checkpoint must keep. With a float32 wire nothing is rounded: the residual is added
    and comes back zero."""

    def __init__(self, group: dist.ProcessGroup | None = None, comm_dtype: str = "float32", owns_group: bool = False):
        if comm_dtype not in WIRE_DTYPES:
            raise ValueError(f"outer_comm_dtype: AllReduce sums in {sorted(WIRE_DTYPES)}, not {comm_dtype!r} (int8 "
                             "is hf_localsgd.core.quantize.Int8AllReduce's; build_reducer picks it)")
        super().__init__(group, owns_group)
        self.dtype = WIRE_DTYPES[comm_dtype]

    @property
    def exact(self) -> bool:
        """Whether the wire dtype is float32, so that floats which must stay exact can share a collective."""
        return self.dtype == torch.float32

    def sum_(self, buf: torch.Tensor, exact: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of ``buf`` over the replicas: ``buf`` itself, summed in place, or, for a narrower wire dtype,
        a summed copy in that dtype (made in one conversion pass) that the caller reads back. ``exact`` sums in
        float32 whatever the wire dtype (statistics that are differences of near-equal numbers). ``residual``:
        error feedback (the class's docstring)."""
        return self.start(buf, exact, residual).wait()

    def start(self, buf: torch.Tensor, exact: bool = False, residual: torch.Tensor | None = None) -> Pending:
        """`sum_` without waiting: the collective runs in the background (``async_op``) until ``wait()``. Nothing
        else may use ``buf`` until then."""
        self._check_open()
        if exact and residual is not None:
            raise ValueError("residual: error feedback is for the bfloat16 sum; an exact sum rounds nothing")
        if residual is not None:
            add_residual(buf, residual)
        if self.world_size == 1:
            if residual is not None:
                residual.zero_()
            return Pending(buf)
        dtype = torch.float32 if exact else self.dtype
        wire = buf if dtype == buf.dtype else buf.to(dtype)
        if residual is not None and wire is buf:
            residual.zero_()
        elif residual is not None:  # buf - wire, without a float32 copy of the wire
            residual.copy_(wire).neg_().add_(buf)
        # bfloat16 has float32's range: the sum of K outer gradients overflows no sooner than their mean.
        return Pending(wire, dist.all_reduce(wire, group=self.group, async_op=True))

    def wire_bytes(self, numel: int) -> int:
        """Bytes of a buffer of ``numel`` elements in the wire dtype."""
        return numel * self.dtype.itemsize

    def bytes_sent(self, numel: int, exact_numel: int = 0) -> float:
        """Bytes this rank sends to sum ``numel`` elements in the wire dtype and ``exact_numel`` in float32
        (ring all-reduces)."""
        return ring_bytes(numel * self.dtype.itemsize + exact_numel * 4, self.world_size)


def all_gather_(out: torch.Tensor, part: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """``out`` <- every rank's ``part`` of ``group``, one after the other (equal sizes)."""
    # all_gather_single since torch 2.13, whose all_gather_into_tensor is deprecated.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, part, group=group)


MISLAUNCH_FIX = ("On a machine without a GPU, accelerate's multi-GPU launcher does not pass the config's use_cpu on to "
                 "the processes: pass use_cpu=True to TrainingArguments (--use_cpu true in a recipe), or set "
                 "ACCELERATE_USE_CPU=true in the launch's environment.")


def check_launch() -> None:
    """Stop a run whose processes do not agree on how many they are, before it trains K copies of one replica.

    The launcher says how many it started (``WORLD_SIZE``); torch.distributed how many joined; and a program
    that runs under Accelerate (already imported by it: this module never imports it) how many Accelerate
    shards data and writes files for. A CPU run launched without ``use_cpu`` joins every process in a gloo
    group while Accelerate sees one, so every rank reads the same data and writes the same files.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    joined = dist.get_world_size() if dist.is_initialized() else 1
    if launched > 1 and joined != launched:
        raise RuntimeError(f"The launcher started {launched} processes (WORLD_SIZE), but torch.distributed "
                           f"{'is not initialized' if joined == 1 else f'joined {joined}'}. " + MISLAUNCH_FIX)
    state = sys.modules.get("accelerate.state")
    if state is not None and state.is_initialized():
        seen = state.AcceleratorState().num_processes
        if seen != joined:
            raise RuntimeError(f"torch.distributed joined {joined} processes, but Accelerate sees {seen}: every "
                               "rank would read the same data and write the same files. " + MISLAUNCH_FIX)
