"""Outer steps that overlap their all-reduce with the next round's inner steps (docs/methods.md, "Overlapped
outer steps"; "Eager Updates for Overlapped Communication and Computation in DiLoCo", Kale, Douillard and
Donchev 2025, arXiv:2502.12996).

At the end of round r each replica starts the all-reduce of its outer gradient Δ_k^(r) and goes on with round
r+1 while it travels; the sum S^(r) = Σ_k Δ_k^(r) is applied at the end of round r+1 (one outer step late):

- `DelayedSync` (the paper's delayed baseline, Algorithm 2): x_{r+1} = OuterOpt(x_r, S^(r-1) / K); every replica
  starts round r+1 from x_{r+1}, the same everywhere. The outer gradient is a round stale, which slows training.
- `EagerSync` (Algorithm 3): replica k uses its own fresh outer gradient with the others' one-round-old ones,
  g_k^(r) = (Δ_k^(r) + Σ_{j≠k} Δ_j^(r-1)) / K = S^(r-1)/K + (Δ_k^(r) - Δ_k^(r-1)) / K, and the replicas differ by
  their latest contributions. The outer optimizers are linear in their gradients, so replica k's point is the
  sum of a consensus x^c (the outer optimizer on S^(r-1)/K, the same everywhere: the global model, evaluated
  and saved) and its own eager part x^e_k (the outer optimizer, from zero, on (Δ_k^(r) - Δ_k^(r-1)) / K): both
  step every round, so their lr schedules (and schedule-free's averaging weights) stay in step.

Training ends (``flush``) by waiting for the last sum and applying it to the global model, which every replica
then holds. A checkpoint taken with a sum in flight waits for it and keeps it, to apply at the same step after a
resume. A non-finite sum is skipped as in the blocking sync, a round after the replica diverged (every replica
restarts from the global model at each round's end; an eager replica whose own outer gradient is not finite
drops its eager part, the ranks of its island together).
"""

from __future__ import annotations

import time

import torch

from .sync import InFlight, Outcome, OuterSync


class DelayedSync(OuterSync):
    """``outer_overlap="delayed"``: the sum of round r is applied to the global model at the end of round r+1."""

    carries_payloads = False  # a payload would come back a round late

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_flight: InFlight | None = None
        self._measured = False  # whether the sum in flight carries the statistics

    @torch.no_grad()
    def __call__(self, tail: torch.Tensor | None = None, measure: bool = False) -> Outcome:
        sent = self.send(tail, measure)  # Δ_k against the point this round started from, before it moves
        outcome = self._apply_in_flight()
        outcome.bytes_sent = sent.bytes_sent
        self.in_flight, self._measured = sent, measure
        self.write_model()
        return outcome

    def _receive_in_flight(self) -> tuple[InFlight | None, float]:
        if self.in_flight is None:
            return None, 0.0
        started = time.perf_counter()
        inflight, self.in_flight = self.receive(self.in_flight), None
        return inflight, time.perf_counter() - started

    def _apply_in_flight(self) -> Outcome:
        inflight, waited = self._receive_in_flight()
        outcome = Outcome() if inflight is None else self.apply(inflight, self._measured, has_tail=False)
        outcome.wait_seconds = waited
        return outcome

    def drop_in_flight(self) -> None:
        self._receive_in_flight()

    @torch.no_grad()
    def flush(self) -> Outcome:
        """Apply the last sum in flight; the replicas take the global model."""
        outcome = self._apply_in_flight()
        self.write_model()
        return outcome

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.in_flight is not None:  # the sum in flight, waited for: applied at the same step after a resume
            state["sum_in_flight"] = self.receive(self.in_flight).delta
            state["sum_in_flight_measured"] = self._measured
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.in_flight = None
        if state.get("sum_in_flight") is not None:
            delta = state["sum_in_flight"].to(self.state_device)
            self.in_flight = InFlight(delta, self.flat.numel, received=True)
            self._measured = state["sum_in_flight_measured"]


class EagerSync(DelayedSync):
    """``outer_overlap="eager"``: each replica applies its own fresh outer gradient with the others' delayed
    ones; ``global_params`` is the consensus x^c, ``eager_params`` this replica's own part x^e."""

    def __init__(self, shard, reducer, options, state_device, total_rounds, topology=None, timeout=None):
        super().__init__(shard, reducer, options, state_device, total_rounds, topology, timeout)
        self.eager_params = torch.zeros_like(self.global_params)
        self.eager_optimizer, self.eager_scheduler = self._outer_optimizer(self.eager_params, total_rounds)
        self.own_previous = torch.zeros_like(self.global_params)  # Δ_k^(r-1)
        self._own = torch.empty_like(self.global_params)
        self._consensus_lr = self.lr

    def start_point(self, start: int, end: int) -> torch.Tensor:
        return self.global_params[start:end] + self.eager_params[start:end]

    def write_model(self) -> None:
        self.shard.write(self.global_params + self.eager_params)

    @property
    def eval_differs(self) -> bool:
        return True  # the replicas train from x^c + x^e_k; the global model is x^c

    @torch.no_grad()
    def __call__(self, tail: torch.Tensor | None = None, measure: bool = False) -> Outcome:
        own = self._own
        sent = self.send(tail, measure, copy_to=own)  # Δ_k^(r), kept: the collective sums the sent buffer
        inflight, waited = self._receive_in_flight()
        self._consensus_lr = self.lr  # the lr this round's consensus step takes (for the flush, below)
        if inflight is None:  # the first round: nothing has arrived; the consensus takes a zero step
            zero = torch.zeros(self.flat.numel, device=self.state_device)
            outcome = self.apply(InFlight(zero, self.flat.numel, received=True), False, has_tail=False)
        else:
            outcome = self.apply(inflight, self._measured, has_tail=False)
        outcome.wait_seconds, outcome.bytes_sent = waited, sent.bytes_sent
        correction = own - self.own_previous  # (Δ_k^(r) - Δ_k^(r-1)); / K folded into the step
        if outcome.skipped or not self._finite(correction):
            # The replicas restart from the consensus, their eager parts from nothing: what the next round's
            # consensus step brings (this round's sum) was never applied eagerly.
            self._reset_eager()
        else:
            self.step_optimizer(self.eager_optimizer, self.eager_scheduler, self.eager_params, correction,
                                self.reducer.world_size)
            self.own_previous, self._own = own, self.own_previous
        self.in_flight, self._measured = sent, measure
        self.write_model()
        return outcome

    def _finite(self, correction: torch.Tensor) -> bool:
        """Whether this replica's correction is finite, decided alike by the ranks of a DDP island, which hold
        its spans: a replica drops its whole eager part, not one rank's span of it."""
        return bool(torch.isfinite(self.summed_in_island(correction.sum().reshape(1))).all())

    def _reset_eager(self) -> None:
        self.eager_params.zero_()
        self.own_previous.zero_()
        self.eager_optimizer.state.clear()

    @torch.no_grad()
    def flush(self) -> Outcome:
        """Apply the last sum to the consensus, which every replica then holds (their eager parts end), with the
        outer lr of the last round's consensus step: the schedule, one step ahead since the first round's zero
        step, is at its end by now (0 for cosine)."""
        group = self.optimizer.param_groups[0]
        scheduled, group["lr"] = group["lr"], self._consensus_lr
        outcome = self._apply_in_flight()
        if not outcome.applied:
            group["lr"] = scheduled
        self._reset_eager()
        self.write_model()
        return outcome

    def state_dict(self) -> dict:
        return {**super().state_dict(), "eager_params": self.eager_params, "own_previous": self.own_previous,
                "eager_optimizer": self.eager_optimizer.state_dict(),
                "eager_scheduler": self.eager_scheduler.state_dict(), "consensus_lr": self._consensus_lr}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.eager_params.copy_(state["eager_params"])
        self.own_previous.copy_(state["own_previous"])
        self.eager_optimizer.load_state_dict(state["eager_optimizer"])
        self.eager_scheduler.load_state_dict(state["eager_scheduler"])
        self._consensus_lr = state["consensus_lr"]
