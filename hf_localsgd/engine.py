"""The round engine: H local steps, then one outer step of the global model (SPEC.md "The round").

It knows nothing about ``transformers.Trainer`` or Accelerate: it holds a module's trainable parameters, a
float32 copy of the global model, the outer optimizer, and a process group. Use it from any training loop:

    engine = RoundEngine(model, sync_every=16, outer_optimizer="nesterov")
    for batch in loader:
        with no_grad_sync(model):            # e.g. accelerator.no_sync(model) / ddp_model.no_sync()
            model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()
        engine.step()                        # every 16th call: one all-reduce and one outer step
    engine.sync()                            # the last, partial round

Communication: one all-reduce of the flattened outer gradient per round (one per ``bucket_size_mb`` bucket of
it), in ``comm_dtype``, over ``process_group`` (the default group when ``None``). With ``state_device="cpu"``
the global copy and the outer-optimizer state live in host memory and the outer gradient crosses the device
bucket by bucket; otherwise the global copy, the outer state and the outer gradient are single flat tensors on
the model's device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .adascale import LR_SCALINGS, GainRatio
from .outer import (
    OUTER_DEFAULTS,
    OUTER_LR_SCHEDULERS,
    ScheduleFreeSGD,
    build_outer_optimizer,
    build_outer_scheduler,
    outer_step,
)


logger = logging.getLogger(__name__)

COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def pseudo_sync_seed(seed: int, rank: int) -> int:
    """The seed of a rank's PALSGD draws: a function of (seed, rank) that differs across ranks."""
    return (seed * 1_000_003 + rank * 7_919 + 17) % 2**63


class RoundEngine:
    """Local SGD / DiLoCo / schedule-free outer optimization over the trainable parameters of ``model``.

    Args:
        model: the (unwrapped) module, or an iterable of its parameters. Only parameters with
            ``requires_grad`` take part; buffers stay local (language models' buffers are constants).
        sync_every: H, the number of inner steps per round; or a function of the number of steps taken that
            gives the H of the round starting there (``hf_localsgd.schedules``), the same on every rank.
        outer_optimizer: ``"average"``, ``"nesterov"`` or ``"schedule_free"``.
        outer_lr, outer_momentum: ``None`` picks the defaults of ``hf_localsgd.outer.OUTER_DEFAULTS``.
        outer_lr_scheduler: ``"constant"``, ``"cosine"`` or ``"linear_after_plateau"``; the last two need
            ``total_rounds``.
        warmup_steps: calls of ``step()`` during which the caller runs ordinary synchronous data-parallel
            training (see ``syncs_gradients``); local rounds start from the model reached at their end.
        state_device: ``"model"`` (default) or ``"cpu"`` for the global copy and outer-optimizer state.
        comm_dtype: ``"float32"`` or ``"bfloat16"`` (or a ``torch.dtype``) for the outer all-reduce.
        process_group: the group the replicas average over; ``None`` is the default group (or no
            communication at all when ``torch.distributed`` is not initialized).
        pseudo_sync_prob: PALSGD's p (seed 001 Alg. 1): the probability that a step is a pseudo-synchronization
            toward this rank's copy of the global model instead of a gradient step (0 disables PALSGD).
        pseudo_sync_rate: PALSGD's mixing rate η.
        seed: seeds each rank's pseudo-synchronization draws (with the rank: reproducible, different per rank).
        lr_scaling: ``"none"``, ``"adascale"`` or ``"local_adascale"`` (seed 004): estimate the gradient noise
            from each round's first gradients (``cache_gradients``, all-reduced with the next outer step) and
            keep the gain ratio ``gain.rho`` and the scale-invariant step for the caller to scale the inner lr.
        lr_scaling_c: the interpolation constant c of Eq. 49 (default 1 for local_adascale, 0 for adascale).
        lr_scaling_ema: smoothing of the σ² and G estimates (0: no smoothing).
        track_metrics: measure each sync (``last_metrics``): outer-gradient norm, replica drift, cosine
            similarity of the replicas' outer gradients, time and bytes. It adds one float to the outer
            all-reduce (no extra collective) and two reductions over the flat buffer; off, it costs nothing.
    """

    def __init__(
        self,
        model: nn.Module | Iterable[nn.Parameter],
        *,
        sync_every: int | Callable[[int], int],
        outer_optimizer: str = "nesterov",
        outer_lr: float | None = None,
        outer_momentum: float | None = None,
        outer_lr_scheduler: str = "constant",
        outer_lr_plateau_fraction: float = 0.1,
        total_rounds: int | None = None,
        warmup_steps: int = 0,
        state_device: str | torch.device = "model",
        comm_dtype: str | torch.dtype = "float32",
        process_group: dist.ProcessGroup | None = None,
        bucket_size_mb: float = 256,
        pseudo_sync_prob: float = 0.0,
        pseudo_sync_rate: float = 1.0,
        seed: int = 0,
        lr_scaling: str = "none",
        lr_scaling_c: float | None = None,
        lr_scaling_ema: float = 0.9,
        track_metrics: bool = False,
    ):
        if not callable(sync_every) and sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        if outer_optimizer not in OUTER_DEFAULTS:
            raise ValueError(f"outer_optimizer must be one of {tuple(OUTER_DEFAULTS)}, got {outer_optimizer!r}")
        if outer_lr_scheduler not in OUTER_LR_SCHEDULERS:
            raise ValueError(f"outer_lr_scheduler must be one of {OUTER_LR_SCHEDULERS}, got {outer_lr_scheduler!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if isinstance(comm_dtype, str):
            if comm_dtype not in COMM_DTYPES:
                raise ValueError(f"comm_dtype must be one of {tuple(COMM_DTYPES)}, got {comm_dtype!r}")
            comm_dtype = COMM_DTYPES[comm_dtype]
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be > 0, got {bucket_size_mb}")
        if not 0 <= pseudo_sync_prob < 1:
            raise ValueError(f"pseudo_sync_prob must be in [0, 1), got {pseudo_sync_prob}")
        if not (math.isfinite(pseudo_sync_rate) and pseudo_sync_rate > 0):
            raise ValueError(f"pseudo_sync_rate must be a finite number > 0, got {pseudo_sync_rate}")
        if outer_lr is not None and not (math.isfinite(outer_lr) and outer_lr >= 0):
            raise ValueError(f"outer_lr must be a finite number >= 0, got {outer_lr}")
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling must be one of {LR_SCALINGS}, got {lr_scaling!r}")

        params = model.parameters() if isinstance(model, nn.Module) else model
        self.params = [p for p in params if p.requires_grad and p.numel() > 0]  # (empty ones carry nothing)
        if not self.params:
            raise ValueError("The model has no trainable parameters")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"All trainable parameters must live on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.state_device = self.device if state_device == "model" else torch.device(state_device)

        # H of each round, asked when the round starts: a resumed run keeps the H of the round in progress (from
        # its checkpoint) and takes this run's H from the next round on.
        self._sync_every_schedule = sync_every if callable(sync_every) else (lambda step: sync_every)
        self.sync_every = 0  # H of the current round
        self.outer_optimizer_name = outer_optimizer
        self.warmup_steps = warmup_steps
        self.comm_dtype = comm_dtype
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.track_metrics = track_metrics
        self.pseudo_sync_prob = pseudo_sync_prob
        self.pseudo_sync_rate = pseudo_sync_rate
        rank = dist.get_rank() if dist.is_initialized() else 0
        self._draws = torch.Generator().manual_seed(pseudo_sync_seed(seed, rank))
        self.pseudo_syncs_in_round = 0
        self.gain: GainRatio | None = None
        if lr_scaling != "none":
            c = (1.0 if lr_scaling == "local_adascale" else 0.0) if lr_scaling_c is None else lr_scaling_c
            self.gain = GainRatio(self.world_size, c, lr_scaling_ema)
        self._grad_cache: torch.Tensor | None = None  # this round's first gradients, then ‖g_k‖²
        self.last_metrics: dict[str, float] = {}
        self.bytes_sent = 0.0  # by this rank, outer syncs and warm-up gradient all-reduces
        self.seconds_in_sync = 0.0  # host wall-clock time inside sync(), every round (see sync())

        # Position in training: calls of step(), inner steps since the last sync, and syncs done.
        self.num_steps = 0
        self.inner_step = 0
        self.num_syncs = 0

        self._numels = [p.numel() for p in self.params]
        self.numel = sum(self._numels)
        self._gradient_bytes = sum(p.numel() * p.element_size() for p in self.params)  # one DDP all-reduce
        self._sync_payload_bytes = (self.numel + int(track_metrics)) * comm_dtype.itemsize  # one outer all-reduce
        # Buckets: contiguous runs of parameters of about bucket_size_mb, one collective each. When the
        # state is offloaded, a bucket is also the most outer gradient that exists on the device at once.
        self._buckets = self._make_buckets(bucket_size_mb * 2**20 / 4)

        # The global model x (y for schedule-free), float32 and flat: the outer optimizer sees one tensor.
        self.global_params = torch.empty(self.numel, dtype=torch.float32, device=self.state_device)
        self.outer_optimizer = build_outer_optimizer(outer_optimizer, [self.global_params], outer_lr, outer_momentum)
        self.outer_scheduler = build_outer_scheduler(
            self.outer_optimizer, outer_lr_scheduler, total_rounds, outer_lr_plateau_fraction
        )
        self._copy_from_model(self.global_params)
        self._start_round()
        if self.world_size > 1:
            self._broadcast_global()
            drifting = unsynchronized_buffers(model) if isinstance(model, nn.Module) else []
            if drifting and rank == 0:
                logger.warning(
                    "RoundEngine: the model has %d floating-point buffers that are saved with it (%s%s), e.g. "
                    "BatchNorm statistics. Only parameters are averaged: each replica keeps its own buffers, "
                    "which may drift apart, and a checkpoint holds rank 0's.", len(drifting),
                    ", ".join(drifting[:3]), ", ..." if len(drifting) > 3 else "",
                )
        else:
            # A warning, so that it shows: one process is often a launch that did not start the others
            # (e.g. `accelerate launch --cpu --num_processes 2` starts one).
            logger.warning(
                "RoundEngine: world size 1, the outer step applies %s to the single replica's update and "
                "nothing is communicated.",
                outer_optimizer,
            )

    # ------------------------------------------------------------------ the round
    @property
    def in_warmup(self) -> bool:
        return self.num_steps < self.warmup_steps

    @property
    def syncs_gradients(self) -> bool:
        """Whether the *next* inner step must all-reduce its gradients (warm-up), i.e. run as plain DDP."""
        return self.in_warmup

    @property
    def outer_lr(self) -> float:
        return self.outer_optimizer.param_groups[0]["lr"]

    def step(self) -> bool:
        """Count one inner optimizer step; run the outer step when the round is complete. Returns whether
        a synchronization happened."""
        if self.gain is not None:  # the step just taken counted for ρ base steps (1 while synchronous)
            self.gain.scale_invariant_step += 1.0 if self.in_warmup else self.gain.rho
        self.num_steps += 1
        if self.num_steps <= self.warmup_steps:
            self.bytes_sent += self._ring_bytes(self._gradient_bytes)  # DDP's gradient all-reduce
            if self.num_steps == self.warmup_steps:
                # Local rounds start from the warmed-up model, which DDP kept identical on every rank.
                self._copy_from_model(self.global_params)
                self._start_round()
            return False
        self.inner_step += 1
        if self.inner_step >= self.sync_every:
            self.sync()
            return True
        return False

    @torch.no_grad()
    def sync(self) -> bool:
        """Run the outer step now (also for a final, partial round). A no-op right after a sync and during
        warm-up. Returns whether a synchronization happened."""
        if self.inner_step == 0 or self.in_warmup:
            return False
        started, outer_lr = time.perf_counter(), self.outer_lr
        cached = 0 if self._grad_cache is None else self._grad_cache.numel()
        payload = self._sync_payload_bytes + cached * self.comm_dtype.itemsize  # the cache travels in comm_dtype
        # The all-reduce leaves sums over the K replicas: the outer step divides by k in its own pass.
        delta, tail = self._outer_gradient()  # K·Δ
        k = self.world_size
        # Metrics: the norms are taken now, before the step (which may divide `delta` in place), and read
        # (.tolist()) only after the copy back, so the host does not wait for the device mid-sync.
        if self.track_metrics:
            norms = torch.stack([tail[0] / k, delta.dot(delta) / k**2])  # mean_k ‖Δ_k‖², ‖Δ‖²
        if self._grad_cache is not None:  # last round's first gradients, averaged by the same all-reduce
            grad_sum, mean_sq_grad = tail[int(self.track_metrics) : -1], tail[-1].item() / k
            self.gain.update(mean_sq_grad, grad_sum.dot(grad_sum).item() / k**2, self.sync_every)
            self._grad_cache = None
        self.global_params.grad = delta
        outer_step(self.outer_optimizer, grad_divisor=k)
        self.outer_scheduler.step()
        self.global_params.grad = None
        self._copy_to_model(self.global_params)
        self.bytes_sent += self._ring_bytes(payload)
        self.inner_step = 0
        self.num_syncs += 1
        if self.track_metrics:  # .tolist() waits for the device, so both timings include the device's work
            self.last_metrics = self._round_metrics(*norms.tolist(), outer_lr, started, payload)
        # Host wall-clock time; on an accelerator without metrics, work still queued is not in it.
        self.seconds_in_sync += time.perf_counter() - started
        self.pseudo_syncs_in_round = 0
        self._start_round()
        return True

    def _start_round(self) -> None:
        """Fix the H of the round that starts now (a communication schedule is asked once per round)."""
        h = int(self._sync_every_schedule(self.num_steps))
        if h < 1:
            raise ValueError(f"the sync_every schedule gave H={h} at step {self.num_steps}")
        self.sync_every = h

    # ------------------------------------------------------------------ PALSGD
    def draw_pseudo_sync(self) -> bool:
        """Draw b ~ U[0, 1] for the coming step: True (b <= p) means a pseudo-synchronization instead of a
        gradient step. Only local steps draw (never during warm-up), one draw per step, so the sequence is
        a function of the seed, the rank and the step."""
        if self.pseudo_sync_prob == 0 or self.in_warmup:
            return False
        return torch.rand((), generator=self._draws).item() <= self.pseudo_sync_prob

    @property
    def inner_lr_scale(self) -> float:
        """PALSGD's gradient steps use α_t / (1 - p), so that in expectation they move as far as plain SGD."""
        return 1.0 / (1.0 - self.pseudo_sync_prob) if not self.in_warmup else 1.0

    @torch.no_grad()
    def pseudo_sync(self, lr: float) -> None:
        """x_k <- x_k - (α η / p) (x_k - x): pull this replica toward its copy of the global model, with no
        data, gradient or communication (seed 001 Alg. 1)."""
        if self.pseudo_sync_prob == 0:
            raise RuntimeError("pseudo_sync() is PALSGD's step and needs pseudo_sync_prob > 0")
        weight = lr * self.pseudo_sync_rate / self.pseudo_sync_prob
        for start, end, params in self._buckets:
            src = self.global_params[start:end].to(self.device, non_blocking=True)
            targets = [v.to(p.dtype) for v, p in zip(self._views(src, start, end), params)]
            torch._foreach_lerp_([p.data for p in params], targets, weight)
        self.pseudo_syncs_in_round += 1

    def _outer_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K·Δ = Σ_k (x_r - x_k) as one flat float32 tensor on the state device (one collective per bucket),
        and the tail the last bucket carried through the same all-reduce (with metrics on, Σ_k ‖Δ_k‖²; with
        lr scaling, the sums of the cached gradients and of ‖g_k‖²)."""
        extra = int(self.track_metrics)
        cache = self._grad_cache
        tail = extra + (0 if cache is None else cache.numel())
        delta = torch.empty(self.numel + tail, dtype=torch.float32, device=self.state_device)
        on_model_device = self.state_device == self.device
        # A narrower comm_dtype travels as a copy of each bucket, made in one conversion pass: torch.sub
        # straight into a bfloat16 output takes a casting path that is ~3x slower on CPU than the float32
        # sub and the conversion together (8M elements, one thread: 19.5 ms against 4.3 + 2.2 ms).
        narrow = self.comm_dtype != torch.float32 and self.world_size > 1
        sq_norm = None
        for start, end, params in self._buckets:
            last = end == self.numel
            stop = end + (tail if last else 0)
            buf = delta[start:stop] if on_model_device else torch.empty(stop - start, device=self.device)
            body = buf[: end - start]
            global_ = self.global_params[start:end].to(self.device, non_blocking=True)
            # x_r - x_k straight into the flat buffer: one pass per parameter, no flat copy of x_k first.
            for g, p, d in zip(self._views(global_, start, end), params, self._views(body, start, end)):
                if p.dtype == torch.float32:
                    torch.sub(g, p.detach(), out=d)
                else:
                    # A bfloat16/float16 replica started from x_r rounded to its dtype: Δ_k is its move from
                    # there. (x_r - x_k would also hand the rounding residual to the outer optimizer every round,
                    # where momentum accumulates it.) The float32 x_r keeps what the replicas cannot represent.
                    d.copy_(g.to(p.dtype)).sub_(p.detach())
            if extra:
                sq_norm = body.dot(body) if sq_norm is None else sq_norm + body.dot(body)
            if last and extra:
                buf[end - start] = sq_norm
            if last and cache is not None:
                buf[end - start + extra :].copy_(cache)
            wire = buf.to(self.comm_dtype) if narrow else buf
            if self.world_size > 1:
                # A SUM (gloo has no AVG) that the outer step divides by K. bfloat16 has float32's range: the
                # sum of K outer gradients overflows no sooner than their mean.
                dist.all_reduce(wire, group=self.process_group)
            if narrow or not on_model_device:
                delta[start:stop].copy_(wire)
        return delta[: self.numel], delta[self.numel :]

    @property
    def wants_gradients(self) -> bool:
        """Whether the gradients of the step in progress are the first of a round, for lr scaling."""
        return (self.gain is not None and self.world_size > 1 and not self.in_warmup and self.inner_step == 0
                and self._grad_cache is None)

    @torch.no_grad()
    def cache_gradients(self) -> None:
        """Keep this replica's gradients (and ‖g_k‖²) until the next outer all-reduce carries them."""
        cache = torch.zeros(self.numel + 1, dtype=torch.float32, device=self.device)
        grads = [(v, p.grad) for v, p in zip(self._views(cache, 0, self.numel), self.params) if p.grad is not None]
        torch._foreach_copy_([v for v, _ in grads], [g for _, g in grads])
        cache[-1] = cache[:-1].dot(cache[:-1])
        self._grad_cache = cache

    @property
    def data_parallel_bytes(self) -> float:
        """What this rank would have sent so far under data-parallel training: one gradient all-reduce a step."""
        return self.num_steps * self._ring_bytes(self._gradient_bytes)

    def _ring_bytes(self, payload_bytes: float) -> float:
        """Bytes one rank sends in a ring all-reduce of ``payload_bytes`` (reduce-scatter + all-gather)."""
        return 2 * (self.world_size - 1) / self.world_size * payload_bytes

    def _round_metrics(
        self, mean_sq_norm: float, sq_norm_of_mean: float, outer_lr: float, started: float, payload: float
    ) -> dict:
        seconds = time.perf_counter() - started
        k = self.world_size
        ddp_bytes = self.data_parallel_bytes
        metrics = {
            "round": self.num_syncs,
            "sync_every": self.sync_every,
            "outer_lr": outer_lr,
            "outer_grad_norm": math.sqrt(sq_norm_of_mean),
            # mean_k ‖x_k - x̄‖² = mean_k ‖Δ_k - Δ‖² = mean_k ‖Δ_k‖² - ‖Δ‖²
            "drift": max(mean_sq_norm - sq_norm_of_mean, 0.0),
            "sync_seconds": seconds,
            "bytes_sent": self._ring_bytes(payload),
            "bytes_total": self.bytes_sent,
            "ddp_bytes_total": ddp_bytes,
        }
        if self.gain is not None:
            metrics["gain_ratio"] = self.gain.rho
            metrics["scale_invariant_step"] = self.gain.scale_invariant_step
            if self.gain.sigma2 is not None:
                metrics["sigma2"], metrics["G"] = self.gain.sigma2, self.gain.G
        if self.pseudo_sync_prob > 0:
            metrics["pseudo_syncs"] = self.pseudo_syncs_in_round  # this rank's, in the round just ended
        if ddp_bytes > 0:
            metrics["bytes_vs_ddp"] = self.bytes_sent / ddp_bytes
        if k > 1 and mean_sq_norm > 0:
            # Σ_{k≠l} <Δ_k, Δ_l> = ‖Σ_k Δ_k‖² - Σ_k ‖Δ_k‖², over k(k-1) ordered pairs, divided by the mean ‖Δ_k‖²:
            # the mean pairwise cosine, exact when the replicas' outer gradients have equal norms.
            metrics["cosine_similarity"] = (k * sq_norm_of_mean - mean_sq_norm) / ((k - 1) * mean_sq_norm)
        return metrics

    @torch.no_grad()
    def _broadcast_global(self) -> None:
        """Make the global copy and the model start identical on every rank (once, at creation), so that
        a loop without DDP's initial broadcast cannot drift silently."""
        src = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        for start, end, _ in self._buckets:
            buf = self.global_params[start:end].to(self.device)
            dist.broadcast(buf, src=src, group=self.process_group)
            self.global_params[start:end].copy_(buf)
        self._copy_to_model(self.global_params)

    # ------------------------------------------------------------------ model <-> flat copies
    def _make_buckets(self, bucket_numel: float):
        buckets, start, members, size = [], 0, [], 0
        for p, n in zip(self.params, self._numels):
            if members and size + n > bucket_numel:
                buckets.append((start, start + size, members))
                start, members, size = start + size, [], 0
            members.append(p)
            size += n
        buckets.append((start, start + size, members))
        return buckets

    def _views(self, flat: torch.Tensor, start: int, end: int) -> list[torch.Tensor]:
        """Views of ``flat`` (which covers [start, end) of the flat layout) shaped like the parameters there."""
        out, offset = [], 0
        for p in self.params:
            n = p.numel()
            if offset + n > start and offset < end:
                out.append(flat[offset - start : offset - start + n].view_as(p))
            offset += n
        return out

    @torch.no_grad()
    def _copy_from_model(self, flat: torch.Tensor) -> None:
        for start, end, params in self._buckets:
            torch._foreach_copy_(self._views(flat[start:end], start, end), [p.detach() for p in params])

    @torch.no_grad()
    def _copy_to_model(self, flat: torch.Tensor) -> None:
        for start, end, params in self._buckets:
            src = flat[start:end].to(self.device, non_blocking=True)
            torch._foreach_copy_([p.data for p in params], self._views(src, start, end))

    # ------------------------------------------------------------------ the global model, for eval and saving
    @property
    def model_is_global(self) -> bool:
        """Whether the model's weights are exactly the global model to evaluate/save (no swap needed)."""
        if self.in_warmup or (self.num_syncs == 0 and self.inner_step == 0):
            return True
        return self.inner_step == 0 and not isinstance(self.outer_optimizer, ScheduleFreeSGD)

    @torch.no_grad()
    def global_model_params(self) -> torch.Tensor:
        """The global model to evaluate and save, flat: x_r, or the averaged x for schedule-free."""
        if isinstance(self.outer_optimizer, ScheduleFreeSGD):
            return self.outer_optimizer.averaged(self.global_params)
        return self.global_params

    @torch.no_grad()
    def local_params(self) -> torch.Tensor:
        """A flat float32 copy of this replica's current weights (on the state device)."""
        flat = torch.empty_like(self.global_params)
        self._copy_from_model(flat)
        return flat

    @torch.no_grad()
    def load_params(self, flat: torch.Tensor) -> None:
        """Write a flat tensor (from ``local_params`` or ``global_model_params``) into the model."""
        self._copy_to_model(flat)

    @contextlib.contextmanager
    def global_model(self):
        """Temporarily put the global model (x for schedule-free) into the model, e.g. to evaluate it
        between syncs; this replica's weights are restored on exit."""
        if self.model_is_global:
            yield
            return
        local = self.local_params()
        self.load_params(self.global_model_params())
        try:
            yield
        finally:
            self.load_params(local)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "outer_optimizer_name": self.outer_optimizer_name,
            "sync_every": self.sync_every,  # of the round in progress
            "world_size": self.world_size,
            "num_steps": self.num_steps,
            "inner_step": self.inner_step,
            "num_syncs": self.num_syncs,
            "bytes_sent": self.bytes_sent,
            "seconds_in_sync": self.seconds_in_sync,
            "pseudo_syncs_in_round": self.pseudo_syncs_in_round,
            "pseudo_sync_draws": self._draws.get_state(),
            "gain": None if self.gain is None else self.gain.state_dict(),
            "grad_cache": self._grad_cache,
            "global_params": self.global_params,
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "outer_scheduler": self.outer_scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"Checkpoint was written by {state['world_size']} replicas, this run has {self.world_size}: each "
                "replica resumes its own weights and inner-optimizer state, so resume with as many processes"
            )
        if (state["gain"] is None) != (self.gain is None):
            raise ValueError(
                f"Checkpoint was trained with lr_scaling {'off' if state['gain'] is None else 'on'}, this run has it "
                f"{'off' if self.gain is None else 'on'}: the gain ratio's state cannot be made up or dropped exactly"
            )
        if state["outer_optimizer_name"] != self.outer_optimizer_name:
            raise ValueError(
                f"Checkpoint was trained with outer_optimizer={state['outer_optimizer_name']!r}, "
                f"this run uses {self.outer_optimizer_name!r}"
            )
        if state["global_params"].numel() != self.numel:
            raise ValueError(
                f"Checkpoint holds {state['global_params'].numel()} global parameters, the model has {self.numel}"
            )
        self.num_steps = state["num_steps"]
        self.inner_step = state["inner_step"]
        self.num_syncs = state["num_syncs"]
        # The round in progress keeps the H it started with; one that has not started asks this run's H.
        self.sync_every = state["sync_every"]
        if self.inner_step == 0:
            self._start_round()
        self.bytes_sent = state["bytes_sent"]
        self.seconds_in_sync = state["seconds_in_sync"]
        self.pseudo_syncs_in_round = state["pseudo_syncs_in_round"]
        self._draws.set_state(state["pseudo_sync_draws"])
        if self.gain is not None:
            self.gain.load_state_dict(state["gain"])
        cache = state["grad_cache"]
        self._grad_cache = None if cache is None else cache.to(self.device)
        self.global_params.copy_(state["global_params"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.outer_scheduler.load_state_dict(state["outer_scheduler"])
