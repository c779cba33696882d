"""PALSGD ("Pseudo-Asynchronous Local SGD", Algorithm 1): a 2-process LocalSGDTrainer run against a single-process simulation of the
algorithm, step for step."""

from __future__ import annotations

import pytest
import torch

from hf_localsgd.core.palsgd import pseudo_sync_seed


P, ETA, H, STEPS, LR, OUTER_LR, MOMENTUM = 0.3, 2.0, 4, 12, 0.05, 0.7, 0.9


def loss_gradient(w: torch.Tensor, batch: dict) -> torch.Tensor:
    """Gradient of mean((x·weight + bias - y)²) at the flat weights w = [weight (4), bias]."""
    w = w.clone().requires_grad_(True)
    x, y = torch.tensor(batch["features"]), torch.tensor(batch["labels"])
    ((x @ w[:4] + w[4] - y) ** 2).mean().backward()
    return w.grad


def simulate(batches: list[list[dict]], draws: list[list[bool]], x0: torch.Tensor) -> list[list[torch.Tensor]]:
    """Algorithm 1 for K workers: returns every worker's weights after every step."""
    k_workers = len(batches)
    x, momentum = x0.clone(), torch.zeros_like(x0)
    local = [x0.clone() for _ in range(k_workers)]
    history = [[] for _ in range(k_workers)]
    for t in range(STEPS):
        alpha = LR * (STEPS - t) / STEPS  # Trainer's linear schedule, no warm-up
        for k in range(k_workers):
            if draws[k][t]:  # pseudo-synchronization: no data, no gradient
                local[k] = local[k] - (alpha * ETA / P) * (local[k] - x)
            else:
                local[k] = local[k] - alpha / (1 - P) * loss_gradient(local[k], batches[k][t])
        if (t + 1) % H == 0:
            delta = torch.stack([x - xk for xk in local]).mean(0)
            momentum = MOMENTUM * momentum + delta
            x = x - OUTER_LR * (delta + MOMENTUM * momentum)
            local = [x.clone() for _ in range(k_workers)]
        for k in range(k_workers):
            history[k].append(local[k].clone())
    return history


def test_palsgd_matches_algorithm_1(core_runs):
    ranks = core_runs["palsgd"]
    draws = [[step["pseudo_sync"] for step in r["steps"]] for r in ranks]

    # The draws: reproducible from the seed (each rank's generator), different across ranks, and some of each.
    for rank, rank_draws in enumerate(draws):
        generator = torch.Generator().manual_seed(pseudo_sync_seed(0, rank))
        assert rank_draws == [torch.rand((), generator=generator).item() <= P for _ in range(STEPS)]
    assert draws[0] != draws[1] and any(draws[0] + draws[1]) and not all(draws[0] + draws[1])

    # Every rank took all 12 steps in lock-step (each drew a batch on every step, used or not).
    assert all(len(r["steps"]) == STEPS and len(r["batches"]) == STEPS for r in ranks)
    for r in ranks:
        assert [s["lr"] for s in r["steps"]] == pytest.approx([LR * (STEPS - t) / STEPS for t in range(STEPS)])

    torch.manual_seed(0)
    x0 = torch.cat([p.detach().reshape(-1) for p in torch.nn.Linear(4, 1).parameters()]).double()
    expected = simulate([r["batches"] for r in ranks], draws, x0.float())
    for rank, r in enumerate(ranks):
        for t, step in enumerate(r["steps"]):
            torch.testing.assert_close(torch.tensor(step["weights"]), expected[rank][t], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank}, step {t + 1}")
    # Ranks agree right after each outer step, and only then.
    for t in range(STEPS):
        same = ranks[0]["steps"][t]["weights"] == ranks[1]["steps"][t]["weights"]
        assert same == ((t + 1) % H == 0), t


def run_pseudo_syncs(steps: int, H: int, **options) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One process, SGD at a constant lr 0.1 with a unit gradient: (before, global, after) of each pseudo-sync
    step that did not end a round."""
    from toy import flat, model

    from hf_localsgd import RoundEngine

    m = model()
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine = RoundEngine(m, sync_every=H, optimizer=optimizer, lr_scheduler=scheduler, **options)
    seen = []
    for _ in range(steps):
        engine.begin_step()
        before, pseudo = flat(m), engine.skips_gradient_step
        if not pseudo:
            for p in m.parameters():
                p.grad = torch.ones_like(p)
        engine.before_optimizer_step()
        optimizer.step()
        engine.after_optimizer_step()
        scheduler.step()
        optimizer.zero_grad()
        global_ = engine.global_params.double().clone()
        if not engine.step() and pseudo:
            seen.append((before, global_, flat(m)))
    return seen


def test_theorem_2_mixing_rate_pulls_a_fixed_fraction_of_the_way():
    # η_t = p / (2 H α_t): the pull α_t η_t / p is 1/(2H) = 1/16 whatever p and the lr.
    seen = run_pseudo_syncs(24, H=8, pseudo_sync_prob=0.5, pseudo_sync_rate_schedule="theorem_2")
    moved = [(b, g, a) for b, g, a in seen if not torch.equal(b, g)]  # (not the first step of a round)
    assert len(moved) >= 3
    for before, global_, after in moved:
        torch.testing.assert_close(after, before + (global_ - before) / 16, rtol=0, atol=1e-6)


def test_theorem_2_sets_the_rate_itself():
    from hf_localsgd import LocalSGDOptions

    with pytest.raises(ValueError, match="^pseudo_sync_rate: .*theorem_2"):
        LocalSGDOptions(pseudo_sync_prob=0.1, pseudo_sync_rate=4.0, pseudo_sync_rate_schedule="theorem_2")


@pytest.mark.parametrize("rate, expected", [(0.5, None), (6.0, "overshoots"), (12.0, "diverges")])
def test_a_pull_weight_above_one_is_warned_about(caplog, rate, expected):
    # lr · η / p = 0.1 · η / 0.5: 0.1, 1.2 (past the global model), 2.4 (farther away each time).
    with caplog.at_level("WARNING", logger="hf_localsgd.core.palsgd"):
        seen = run_pseudo_syncs(12, H=4, pseudo_sync_prob=0.5, pseudo_sync_rate=rate)
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_localsgd.core.palsgd"]
    assert any(not torch.equal(b, g) for b, g, _ in seen)
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected in warnings[0] and f"{0.2 * rate:.3g}" in warnings[0]
        assert ("diverges" in warnings[0]) == (rate * 0.2 > 2)
