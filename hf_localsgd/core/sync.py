"""The sync unit: the global model, its outer optimizer, and the outer synchronization in three phases.

`OuterSync` holds the global model x as one flat float32 tensor (y for schedule-free), the outer optimizer
and its lr schedule over it, and the collective that sums the replicas' outer gradients. A blocking call is
one outer step (docs/methods.md, "The round", steps 3-5):

    Δ_k = x_r - x_k          send: into a flat buffer, bucket by bucket, straight from the parameters; each
                             bucket's sum starts as soon as it is written (the last also carries a tail of
                             extra floats; under a bfloat16 wire the tail goes alone in float32: statistics)
    K·Δ = Σ_k Δ_k            receive: wait for the sums
    x_{r+1} = OuterOpt(x_r, Δ)   apply: the 1/K folded into the optimizer's own pass; skipped, with the replicas
                             reset to x_r, when the sum is not finite (one replica diverged)
    x_k <- x_{r+1}           write: on every replica

The overlapped variants (`hf_localsgd.core.overlap`, `hf_localsgd.core.streaming`) run the same phases at other
times. With the state on the host (``state_device="cpu"``) the blocking sync's outer gradient crosses the device
bucket by bucket; a sum left in flight keeps its buffers (a model's size of float32) on the device for its round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .collectives import AllReduce, Pending
from .options import LocalSGDOptions
from .outer import ScheduleFreeSGD, build_outer_optimizer, build_outer_scheduler, outer_step
from .shard import IslandShard, Replica
from .topology import Topology


logger = logging.getLogger(__name__)


@dataclass
class InFlight:
    """Outer-gradient sums on their way: ``delta`` (K·Δ once received, then the tail) and, per collective, the
    span of ``delta`` it fills, the buffer it was sent from and its `Pending` sum."""

    delta: torch.Tensor
    numel: int
    sums: list[tuple[int, int, torch.Tensor, Pending]] = field(default_factory=list)
    received: bool = False
    bytes_sent: float = 0.0  # by this rank, for these sums


@dataclass
class Outcome:
    """What one synchronization did."""

    applied: bool = False  # an outer step was taken
    skipped: bool = False  # the summed outer gradient was not finite: no outer step, the replicas reset
    tail: torch.Tensor | None = None  # the summed tail floats (the hooks' payloads)
    norms: torch.Tensor | None = None  # [mean_k ‖Δ_k‖², ‖Δ‖²] when measured
    wait_seconds: float = 0.0  # how long the inner loop waited for sums in flight
    bytes_sent: float = 0.0  # by this rank, in the sums this sync started

    def merge(self, other: Outcome) -> None:
        """Add a fragment's sync to the round's (the statistics of disjoint fragments add up)."""
        self.applied |= other.applied
        self.skipped |= other.skipped
        self.wait_seconds += other.wait_seconds
        if other.norms is not None:
            self.norms = other.norms if self.norms is None else self.norms + other.norms


class OuterSync:
    """The global model of ``shard.owned``'s parameters and the outer step over ``reducer``'s replicas.

    ``shard`` (`hf_localsgd.core.shard`) says what this rank keeps: the whole replica, or its span of an island's
    replica, which the island's ranks put together after the step. ``topology`` sums the statistics of those
    spans inside the island. ``max_skipped`` non-finite syncs in a row stop training with an error."""

    carries_payloads = True  # whether the hooks' sync payloads come back summed at the same sync

    def __init__(self, shard: Replica | IslandShard, reducer: AllReduce, options: LocalSGDOptions,
                 state_device: torch.device, total_rounds: int | None, topology: Topology | None = None,
                 timeout: float | None = None):
        self.shard, self.flat, self.reducer = shard, shard.owned, reducer
        self.topology = topology
        self.state_device = state_device
        self.options = options
        self.global_params = self.flat.empty(state_device)
        self.optimizer, self.scheduler = self._outer_optimizer(self.global_params, total_rounds)
        # Error feedback: what rounding this rank's outer gradient for a lossy wire lost, added to the next one
        # (on the model's device, where the buckets are rounded).
        self.residual = torch.zeros(self.flat.numel, device=self.flat.device) if options.outer_error_feedback else None
        self.flat.copy_from_model(self.global_params)
        self.max_skipped = options.max_skipped_syncs
        self.skipped_in_a_row = self.skipped = 0
        self.timeout = timeout  # seconds a sum in flight may take to arrive (None: the process group's limit)

    def _outer_optimizer(self, params: torch.Tensor, total_rounds: int | None):
        options = self.options
        optimizer = build_outer_optimizer(options.outer_optimizer, [params], options.outer_lr, options.outer_momentum)
        return optimizer, build_outer_scheduler(optimizer, options.outer_lr_scheduler, total_rounds,
                                                options.outer_lr_plateau_fraction)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ the global model
    @torch.no_grad()
    def broadcast(self) -> None:
        """Make the global copy and the model identical on every replica (the group's first rank's), so that
        a loop without DDP's initial broadcast cannot drift silently."""
        for b in self.flat.buckets:
            span = self.global_params[b.start : b.end]
            buf = span.to(self.flat.device)
            self.reducer.broadcast_(buf)
            span.copy_(buf)
        self.write_model()

    def drop_in_flight(self) -> None:
        """Wait for the sums still in flight and drop them (a blocking sync has none)."""

    def reset_from_model(self) -> None:
        """The model's weights become this replica's global model (`broadcast` then makes it everyone's)."""
        self.flat.copy_from_model(self.global_params)

    def start_point(self, start: int, end: int) -> torch.Tensor:
        """Positions ``[start, end)`` of the point the replicas start a round from (the global model)."""
        return self.global_params[start:end]

    def write_model(self) -> None:
        """The replicas restart from the global model."""
        self.shard.write(self.global_params)

    @torch.no_grad()
    def eval_params(self) -> torch.Tensor:
        """The global model to evaluate and save, flat, this rank's part: x_r, or the averaged x for
        schedule-free."""
        if isinstance(self.optimizer, ScheduleFreeSGD):
            return self.optimizer.averaged(self.global_params)
        return self.global_params

    def write_eval(self) -> None:
        """The global model to evaluate and save into the model."""
        self.shard.write(self.eval_params())

    def gather_eval(self) -> torch.Tensor:
        """The whole global model to evaluate and save, flat (an island's ranks all-gather their parts)."""
        return self.shard.gather(self.eval_params())

    @property
    def eval_differs(self) -> bool:
        """Whether the model to evaluate differs from the one the replicas train from (schedule-free)."""
        return isinstance(self.optimizer, ScheduleFreeSGD)

    def flush(self) -> Outcome | None:
        """Apply what is still in flight (nothing, for the blocking sync)."""
        return None

    # ------------------------------------------------------------------ one blocking outer step
    @torch.no_grad()
    def __call__(self, tail: torch.Tensor | None = None, measure: bool = False) -> Outcome:
        """One outer step. ``tail`` (float32 on the model's device) is summed over the replicas with the outer
        gradient, in the same collective; with ``measure``, the outcome's norms (not read here, so the host does
        not wait for the device mid-sync)."""
        # With the state on the host, each bucket's sum is landed before the next is sent: one bucket at a time on
        # the device, the point of keeping the state there.
        inflight = self.send(tail, measure, one_at_a_time=self.state_device != self.flat.device)
        outcome = self.apply(self.receive(inflight), measure, has_tail=tail is not None)
        outcome.bytes_sent = inflight.bytes_sent
        self.write_model()
        return outcome

    def at_step(self, inner_step: int, sync_every: int, measure: bool) -> None:
        """Called after every inner step of a round (the streaming fragments sync there; nothing here)."""

    # ------------------------------------------------------------------ the phases
    @torch.no_grad()
    def send(self, tail: torch.Tensor | None = None, measure: bool = False,
             copy_to: torch.Tensor | None = None, one_at_a_time: bool = False) -> InFlight:
        """Start summing K·Δ = Σ_k (start point - x_k), and the tail: [Σ_k ‖Δ_k‖² when measuring, then
        ``tail``]; ``copy_to`` keeps this replica's own Δ_k; ``one_at_a_time`` waits for each bucket's sum
        before the next is written (a blocking sync with its state on the host). The tail rides in the last
        bucket's collective when the wire is float32; under bfloat16 it is summed on its own in float32, one more
        (small) collective: its floats are statistics whose differences (σ², drift) would drown in bfloat16's 8
        bits of mantissa."""
        flat, numel = self.flat, self.flat.numel
        tail_numel = int(measure) + (0 if tail is None else tail.numel())
        fused = self.reducer.exact
        inflight = InFlight(torch.empty(numel + tail_numel, dtype=torch.float32, device=self.state_device), numel)
        on_model_device = self.state_device == flat.device
        sq_norm = None
        for b in flat.buckets:
            start, end = b.start, b.end
            last = end == numel
            stop = end + (tail_numel if last and fused else 0)
            buf = inflight.delta[start:stop] if on_model_device else torch.empty(stop - start, device=flat.device)
            body = buf[: b.numel]
            reference = self.start_point(start, end).to(flat.device, non_blocking=True)
            # x_r - x_k straight into the flat buffer: one pass per parameter, no flat copy of x_k first.
            for g, p, d in zip(b.views(reference), b.tensors(), b.views(body)):
                if p.device != d.device:  # float32 masters in host memory (ZeRO-Offload)
                    p = p.to(d.device, non_blocking=True)
                if p.dtype == torch.float32:
                    torch.sub(g, p, out=d)
                else:
                    # A bfloat16/float16 replica started from x_r rounded to its dtype: Δ_k is its move from
                    # there. (x_r - x_k would also hand the rounding residual to the outer optimizer every round,
                    # where momentum accumulates it.) The float32 x_r keeps what the replicas cannot represent.
                    d.copy_(g.to(p.dtype)).sub_(p)
            if measure:
                sq_norm = body.dot(body) if sq_norm is None else sq_norm + body.dot(body)
            if copy_to is not None:
                copy_to[start:end].copy_(body)
            if last and fused:
                self._fill_tail(buf[b.numel :], sq_norm, tail)
            # (a lossy wire never carries the tail: the residual covers the bucket exactly)
            residual = None if self.residual is None else self.residual[start:end]
            inflight.sums.append((start, stop, buf, self.reducer.start(buf, residual=residual)))
            inflight.bytes_sent += self.reducer.bytes_sent(b.numel, stop - end)
            if one_at_a_time:
                self._land(inflight, inflight.sums.pop())
        if tail_numel and not fused:
            buf = torch.empty(tail_numel, device=flat.device)
            self._fill_tail(buf, sq_norm, tail)
            inflight.sums.append((numel, numel + tail_numel, buf, self.reducer.start(buf, exact=True)))
            inflight.bytes_sent += self.reducer.bytes_sent(0, tail_numel)
        return inflight

    def receive(self, inflight: InFlight) -> InFlight:
        """Wait for the sums (at most ``sync_timeout_seconds``) and put them in ``inflight.delta``."""
        if not inflight.received:
            for entry in inflight.sums:
                self._land(inflight, entry)
            inflight.sums, inflight.received = [], True
        return inflight

    def _land(self, inflight: InFlight, entry: tuple[int, int, torch.Tensor, Pending]) -> None:
        start, stop, _, pending = entry
        summed = pending.wait(self.timeout)
        if summed.data_ptr() != inflight.delta[start:stop].data_ptr():
            inflight.delta[start:stop].copy_(summed)

    @torch.no_grad()
    def apply(self, inflight: InFlight, measure: bool, has_tail: bool) -> Outcome:
        """The outer step with the received K·Δ, unless it is not finite (see `guard`)."""
        delta, tail_sum = inflight.delta[: inflight.numel], inflight.delta[inflight.numel :]
        k = self.reducer.world_size
        # One reduction tells a non-finite sum (NaN or inf anywhere makes it NaN or inf); measuring computes it
        # anyway. An island's ranks add their spans' shares, so they all decide alike, as all islands do.
        check = self.summed_in_island(
            torch.stack([tail_sum[0] / k, delta.dot(delta) / k**2]) if measure else delta.sum().reshape(1))
        outcome = Outcome(tail=tail_sum[int(measure):] if has_tail else None, norms=check if measure else None)
        if not self.guard(check):
            outcome.skipped = True
            return outcome
        self.step_optimizer(self.optimizer, self.scheduler, self.global_params, delta, k)
        outcome.applied = True
        return outcome

    def summed_in_island(self, t: torch.Tensor) -> torch.Tensor:
        """``t``, a statistic of this rank's span, summed over its island (whose ranks hold spans of one replica)."""
        return t if self.topology is None else self.topology.sum_within(t.to(self.flat.device))

    @staticmethod
    def step_optimizer(optimizer, scheduler, params: torch.Tensor, grad: torch.Tensor, k: int) -> None:
        params.grad = grad
        outer_step(optimizer, grad_divisor=k)
        scheduler.step()
        params.grad = None

    def guard(self, check: torch.Tensor) -> bool:
        """Whether the summed outer gradient is finite; counts non-finite ones and stops after ``max_skipped``
        in a row (every rank sees the same sum, so every rank decides the same, with no collective)."""
        if bool(torch.isfinite(check).all()):
            self.skipped_in_a_row = 0
            return True
        self.skipped += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.max_skipped:
            raise FloatingPointError(
                f"max_skipped_syncs: the summed outer gradient was not finite at {self.skipped_in_a_row} syncs in a "
                "row (a replica's weights became NaN or inf: a diverged worker, a bad batch, a flipped bit); the "
                "global model is the last finite one. Lower the learning rate, clip gradients (max_grad_norm), "
                "use bf16 rather than fp16, or resume from the last checkpoint."
            )
        return False

    @staticmethod
    def _fill_tail(buf: torch.Tensor, sq_norm: torch.Tensor | None, tail: torch.Tensor | None) -> None:
        extra = int(sq_norm is not None)
        if sq_norm is not None:
            buf[0] = sq_norm
        if tail is not None:
            buf[extra:].copy_(tail)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"global_params": self.global_params, "outer_optimizer": self.optimizer.state_dict(),
                "outer_scheduler": self.scheduler.state_dict(), "skipped_syncs": self.skipped,
                "skipped_in_a_row": self.skipped_in_a_row, "error_feedback_residual": self.residual}

    def load_state_dict(self, state: dict) -> None:
        if state["global_params"].numel() != self.flat.numel:
            raise ValueError(f"Checkpoint holds {state['global_params'].numel()} global parameters for this rank, "
                             f"which keeps {self.flat.numel}")
        self.global_params.copy_(state["global_params"])
        self.optimizer.load_state_dict(state["outer_optimizer"])
        self.scheduler.load_state_dict(state["outer_scheduler"])
        self.skipped, self.skipped_in_a_row = state.get("skipped_syncs", 0), state.get("skipped_in_a_row", 0)
        if self.residual is not None:  # (switched on at a resume: it starts from nothing)
            saved = state.get("error_feedback_residual")
            self.residual.copy_(saved) if saved is not None else self.residual.zero_()
