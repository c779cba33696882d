"""The sync unit: the global model, its outer optimizer, and the blocking outer synchronization.

`OuterSync` holds the global model x as one flat float32 tensor (y for schedule-free), the outer optimizer
and its lr schedule over it, and the collective that sums the replicas' outer gradients. One call is one
outer step (docs/methods.md, "The round", steps 3-5):

    Δ_k = x_r - x_k          into a flat buffer, bucket by bucket, straight from the parameters
    K·Δ = Σ_k Δ_k            one all-reduce per bucket; the last also carries a tail of extra floats
                             (under a bfloat16 wire, the tail goes alone in float32: it holds statistics)
    x_{r+1} = OuterOpt(x_r, Δ)   the 1/K folded into the optimizer's own pass
    x_k <- x_{r+1}           on every replica

With the state on the host (``state_device="cpu"``) the outer gradient crosses the device bucket by bucket.
"""

from __future__ import annotations

import torch

from .collectives import AllReduce
from .options import LocalSGDOptions
from .outer import ScheduleFreeSGD, build_outer_optimizer, build_outer_scheduler, outer_step
from .shard import IslandShard, Replica
from .topology import Topology


class OuterSync:
    """The global model of ``shard.owned``'s parameters and the blocking outer step over ``reducer``'s replicas.

    ``shard`` (`hf_localsgd.core.shard`) says what this rank keeps: the whole replica, or its span of an island's
    replica, which the island's ranks put together after the step. ``topology`` sums the statistics of those
    spans inside the island."""

    def __init__(self, shard: Replica | IslandShard, reducer: AllReduce, options: LocalSGDOptions,
                 state_device: torch.device, total_rounds: int | None, topology: Topology | None = None):
        self.shard, self.flat, self.reducer = shard, shard.owned, reducer
        self.topology = topology
        self.state_device = state_device
        self.global_params = self.flat.empty(state_device)
        self.optimizer = build_outer_optimizer(options.outer_optimizer, [self.global_params],
                                               options.outer_lr, options.outer_momentum)
        self.scheduler = build_outer_scheduler(self.optimizer, options.outer_lr_scheduler, total_rounds,
                                               options.outer_lr_plateau_fraction)
        self.flat.copy_from_model(self.global_params)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ the global model
    @torch.no_grad()
    def broadcast(self) -> None:
        """Make the global copy and the model identical on every replica (the group's first rank's), so that
        a loop without DDP's initial broadcast cannot drift silently."""
        for b in self.flat.buckets:
            span = self.global_params[b.start - self.flat.start : b.end - self.flat.start]
            buf = span.to(self.flat.device)
            self.reducer.broadcast_(buf)
            span.copy_(buf)
        self.shard.write(self.global_params)

    def reset_from_model(self) -> None:
        """The model's weights become the global model (after the warm-up: DDP kept them identical)."""
        self.flat.copy_from_model(self.global_params)

    @torch.no_grad()
    def eval_params(self) -> torch.Tensor:
        """The global model to evaluate and save, flat, this rank's part: x_r, or the averaged x for
        schedule-free."""
        if isinstance(self.optimizer, ScheduleFreeSGD):
            return self.optimizer.averaged(self.global_params)
        return self.global_params

    @property
    def eval_differs(self) -> bool:
        """Whether the model to evaluate differs from the one the replicas train from (schedule-free)."""
        return isinstance(self.optimizer, ScheduleFreeSGD)

    # ------------------------------------------------------------------ one outer step
    @torch.no_grad()
    def __call__(self, tail: torch.Tensor | None = None, measure: bool = False):
        """One outer step. ``tail`` (float32 on the model's device) is summed over the replicas with the outer
        gradient, in the same collective. Returns the summed tail and, when ``measure``, the 2-element tensor
        [mean_k ‖Δ_k‖², ‖Δ‖²] (not read here, so the host does not wait for the device mid-sync)."""
        delta, tail_sum = self._outer_gradient(tail, measure)  # K·Δ
        k = self.reducer.world_size
        norms = None
        if measure:  # taken before the step, which may divide `delta` in place
            norms = torch.stack([tail_sum[0] / k, delta.dot(delta) / k**2])
            if self.topology is not None:  # this rank's span's share: the island's ranks add theirs
                norms = self.topology.sum_within(norms.to(self.flat.device))
            tail_sum = tail_sum[1:]
        self.global_params.grad = delta
        outer_step(self.optimizer, grad_divisor=k)
        self.scheduler.step()
        self.global_params.grad = None
        self.shard.write(self.global_params)
        return (tail_sum if tail is not None else None), norms

    def _outer_gradient(self, tail: torch.Tensor | None, measure: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K·Δ = Σ_k (x_r - x_k) as one flat float32 tensor on the state device, and the summed tail: [Σ_k ‖Δ_k‖²
        when measuring, then ``tail``]. The tail rides in the last bucket's collective when the wire is
        float32; under bfloat16 it is summed on its own in float32, one more (small) collective: its floats are
        statistics whose differences (σ², drift) would drown in bfloat16's 8 bits of mantissa."""
        flat, numel, extra = self.flat, self.flat.numel, int(measure)
        tail_numel = extra + (0 if tail is None else tail.numel())
        fused = self.reducer.exact
        delta = torch.empty(numel + tail_numel, dtype=torch.float32, device=self.state_device)
        on_model_device = self.state_device == flat.device
        sq_norm = None
        for b in flat.buckets:
            start, end = b.start - flat.start, b.end - flat.start  # (the layout may be a span: IslandShard)
            last = end == numel
            stop = end + (tail_numel if last and fused else 0)
            buf = delta[start:stop] if on_model_device else torch.empty(stop - start, device=flat.device)
            body = buf[: b.numel]
            global_ = self.global_params[start:end].to(flat.device, non_blocking=True)
            # x_r - x_k straight into the flat buffer: one pass per parameter, no flat copy of x_k first.
            for g, p, d in zip(b.views(global_), b.tensors(), b.views(body)):
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
            if last and fused:
                self._fill_tail(buf[b.numel :], sq_norm, tail)
            summed = self.reducer.sum_(buf)
            if summed is not buf or not on_model_device:
                delta[start:stop].copy_(summed)
        if tail_numel and not fused:
            buf = delta[numel:] if on_model_device else torch.empty(tail_numel, device=flat.device)
            self._fill_tail(buf, sq_norm, tail)
            summed = self.reducer.sum_(buf, exact=True)
            if summed is not buf or not on_model_device:
                delta[numel:].copy_(summed)
        return delta[:numel], delta[numel:]

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
                "outer_scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["global_params"].numel() != self.flat.numel:
            raise ValueError(f"Checkpoint holds {state['global_params'].numel()} global parameters for this rank, "
                             f"which keeps {self.flat.numel}")
        self.global_params.copy_(state["global_params"])
        self.optimizer.load_state_dict(state["outer_optimizer"])
        self.scheduler.load_state_dict(state["outer_scheduler"])
