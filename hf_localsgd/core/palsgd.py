"""PALSGD's pseudo-synchronization as a round hook ("Pseudo-Asynchronous Local SGD: Robust and Efficient
Data-Parallel Training", Naganuma et al. 2025, arXiv:2504.18454, Algorithm 1; docs/methods.md, "PALSGD").

At every local step each replica draws b ~ U[0, 1] from its own generator (seeded by the seed and the
replica's index, so the draws are reproducible and differ across replicas):

- b <= p: a pseudo-synchronization, x_k <- x_k - (α_t η_t / p)(x_k - x), toward this replica's copy of the
  global model x as of the last sync: no data, no gradient, no communication;
- otherwise a gradient step with inner lr α_t / (1 - p), so that in expectation it moves as far as plain SGD.

The outer step still comes every H steps. During the data-parallel warm-up no step draws.

The mixing rate η_t: ``constant`` (η), ``inverse_lr`` (η · peak lr / α_t: a pull as strong while α_t decays), or
``theorem_2``: η_t = p / (2 H α_t), the choice of the paper's Theorem 2, so each pull moves x_k by 1/(2H) of the
way to x (H: the round's). The theorem proves convergence with it for SGD inner steps, averaging outer steps
(SGD with lr 1), a constant α <= p / (48 L H), p <= 1/2 and 12 L² <= η² / p, on an L-smooth, μ-strongly convex
objective with identically distributed data of bounded gradient variance; outside that it is a heuristic.

The pull weight α_t η_t / p is what a pseudo-synchronization moves x_k by, as a fraction of x - x_k: above 1 the
step overshoots past the global model, above 2 it lands farther away than it started and the replica diverges.
"""

from __future__ import annotations

import logging

import torch

from .hooks import RoundHook


logger = logging.getLogger(__name__)


def pseudo_sync_seed(seed: int, replica: int) -> int:
    """The seed of a replica's draws: a function of (seed, replica) that differs across replicas."""
    return (seed * 1_000_003 + replica * 7_919 + 17) % 2**63


class PseudoSync(RoundHook):
    """PALSGD with probability ``prob`` (p) and mixing rate ``rate`` (η); ``rate_schedule="inverse_lr"`` makes
    η_t = η · peak lr / α_t, so that a pull stays as strong while the inner lr decays; ``"theorem_2"`` makes
    η_t = p / (2 H α_t) (``rate`` unused)."""

    name = "palsgd"
    option = "PALSGD (pseudo_sync_prob > 0)"
    sets_inner_lr = True
    strict_resume = False  # switched on at a resume, the draws start from the seed

    def __init__(self, prob: float, rate: float = 1.0, rate_schedule: str = "constant", seed: int = 0):
        self.prob, self.rate, self.rate_schedule, self.seed = prob, rate, rate_schedule, seed
        self.pseudo_step = False  # whether the step in progress is a pseudo-synchronization
        self.alpha = 0.0  # the inner lr α_t of the step in progress (the schedule's)
        self.pseudo_syncs_in_round = 0
        self._warned_pull = False

    def attach(self, engine) -> None:
        super().attach(engine)
        if engine.optimizer is None:
            raise ValueError("pseudo_sync_prob: PALSGD sets the inner lr of each step: give the engine the "
                             "inner optimizer (RoundEngine(..., optimizer=optimizer))")
        self._draws = torch.Generator().manual_seed(pseudo_sync_seed(self.seed, engine.replica_index))

    def begin_step(self) -> None:
        engine = self.engine
        self.pseudo_step = not engine.in_warmup and torch.rand((), generator=self._draws).item() <= self.prob
        self.alpha = engine.optimizer.param_groups[0]["lr"]

    @property
    def skips_gradient_step(self) -> bool:
        return self.pseudo_step

    def step_lrs(self, optimizer) -> list[float] | None:
        if self.pseudo_step or self.engine.in_warmup:
            return None
        return [group["lr"] / (1.0 - self.prob) for group in optimizer.param_groups]

    def before_optimizer_step(self) -> None:
        if self.pseudo_step:
            # No gradient step: torch optimizers skip parameters without a gradient (no moment update, no weight
            # decay). Whoever computed the gradients anyway (a trainer that cannot skip them) loses them here.
            for p in self.engine.flat.params:
                p.grad = None

    def pull_weight(self) -> float:
        """α_t η_t / p of the step in progress: the fraction of x - x_k a pseudo-synchronization moves x_k by."""
        if self.rate_schedule == "theorem_2":  # α_t η_t = p / (2H)
            return 1.0 / (2 * self.engine.sync_every)
        # α_t η_t: with η_t = η · peak lr / α_t (inverse_lr), that is peak lr · η.
        alpha_eta = (self.engine.peak_lr if self.rate_schedule == "inverse_lr" else self.alpha) * self.rate
        return alpha_eta / self.prob

    def end_step(self) -> None:
        if not self.pseudo_step:
            return
        weight = self.pull_weight()
        if weight > 1 and not self._warned_pull:
            self._warned_pull = True
            logger.warning(
                "pseudo_sync_rate: the pull weight lr · η / p = %.3g of a pseudo-synchronization exceeds 1, so it "
                "overshoots past the global model%s; lower pseudo_sync_rate (η), raise pseudo_sync_prob (p), or use "
                "pseudo_sync_rate_schedule='theorem_2' (a weight of 1/(2H))", weight,
                " and, above 2, moves the replica farther away each time (it diverges)" if weight > 2 else "",
            )
        self.engine.shard.pull_toward(self.engine.global_params, weight)
        self.pseudo_syncs_in_round += 1

    def after_sync(self, summed, sync_every: int) -> dict[str, float]:
        count, self.pseudo_syncs_in_round = self.pseudo_syncs_in_round, 0
        return {"pseudo_syncs": count}  # this replica's, in the round just ended

    def state_dict(self) -> dict:
        return {"pseudo_syncs_in_round": self.pseudo_syncs_in_round, "pseudo_sync_draws": self._draws.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.pseudo_syncs_in_round = state["pseudo_syncs_in_round"]
        self._draws.set_state(state["pseudo_sync_draws"])
