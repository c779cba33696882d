"""The outer optimizers against references written here in float64, the folded 1/K, and outer-lr schedules."""

from __future__ import annotations

import pytest
import torch
from toy import flat, local_steps, model

from hf_localsgd import RoundEngine, ScheduleFreeSGD
from hf_localsgd.core.outer import build_outer_optimizer, outer_lr_lambda, outer_step


class Reference:
    """The outer optimizers written from their equations, in float64, on the flat global model."""

    def __init__(self, name: str, x0: torch.Tensor, lr: float, momentum: float):
        self.name, self.lr, self.momentum = name, lr, momentum
        self.x = x0.clone()  # the global model the replicas start each round from (y for schedule-free)
        self.buf = torch.zeros_like(x0)
        self.z, self.avg, self.t = x0.clone(), x0.clone(), 0  # schedule-free: z and the averaged x

    def step(self, local: torch.Tensor, lr: float) -> None:
        delta = self.x - local
        if self.name == "average":
            self.x = local.clone()  # x_{r+1} = mean_k x_k, with one replica
        elif self.name == "nesterov":
            self.buf = self.momentum * self.buf + delta
            self.x = self.x - lr * (delta + self.momentum * self.buf)
        else:  # Defazio et al. (arXiv:2405.15682): z SGD on gradients at y, x uniform average of z, y mixes them
            self.t += 1
            self.z = self.z - lr * delta
            c = 1.0 / self.t
            self.avg = (1 - c) * self.avg + c * self.z
            self.x = (1 - self.momentum) * self.z + self.momentum * self.avg

    @property
    def eval_point(self) -> torch.Tensor:
        return self.avg if self.name == "schedule_free" else self.x


@pytest.mark.parametrize(
    "name,lr,momentum,scheduler",
    [("average", 1.0, 0.0, "constant"), ("nesterov", 0.7, 0.9, "constant"), ("nesterov", 0.5, 0.8, "cosine"),
     ("schedule_free", 2.0, 0.2, "constant")],
)
def test_outer_step_matches_reference(name, lr, momentum, scheduler):
    m, g = model(), torch.Generator().manual_seed(1)
    rounds, sync_every = 5, 3
    engine = RoundEngine(m, sync_every=sync_every, outer_optimizer=name, outer_lr=lr, outer_momentum=momentum,
                         outer_lr_scheduler=scheduler, total_steps=rounds * sync_every)
    ref = Reference(name, flat(m), lr, momentum)
    factor = outer_lr_lambda(scheduler, rounds)
    for r in range(rounds):
        for i in range(sync_every):
            local_steps(m, 1, g)
            assert engine.step() == (i == sync_every - 1)
        assert engine.num_syncs == r + 1
    # Replay with the reference on an identical model and identical moves.
    m2, g2 = model(), torch.Generator().manual_seed(1)
    for r in range(rounds):
        local_steps(m2, sync_every, g2)
        ref.step(flat(m2), lr * factor(r))
        with torch.no_grad():  # the replica restarts from the new global model
            torch.nn.utils.vector_to_parameters(ref.x.float(), m2.parameters())
    torch.testing.assert_close(flat(m), ref.x, rtol=0, atol=1e-6)
    torch.testing.assert_close(engine.global_params.double(), ref.x, rtol=0, atol=1e-6)
    torch.testing.assert_close(engine.global_model_params().double(), ref.eval_point, rtol=0, atol=1e-5)
    assert engine.outer_lr == pytest.approx(lr * factor(rounds))


def test_schedule_free_matches_the_schedulefree_package():
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    ours_p = torch.randn(50)
    theirs_p = ours_p.clone()
    ours = ScheduleFreeSGD([ours_p], lr=2.0, momentum=0.2)
    theirs = schedulefree.SGDScheduleFree([theirs_p], lr=2.0, momentum=0.2, warmup_steps=0, weight_decay=0.0)
    theirs.train()
    for _ in range(6):
        grad = torch.randn(50)
        ours_p.grad, theirs_p.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(ours_p, theirs_p, rtol=1e-6, atol=1e-6)
    x = ours.averaged(ours_p)
    theirs.eval()  # moves the package's parameters to x in place
    torch.testing.assert_close(x, theirs_p, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["average", "nesterov", "schedule_free", "nesterov-foreach"])
def test_outer_step_divides_the_summed_gradient(name):
    """The engine hands the outer optimizer Σ_k Δ_k and the divisor K; fused SGD (grad_scale) and
    ScheduleFreeSGD (step sizes) fold the division in, other optimizers divide first. All must match a step
    on Δ (to rounding: K = 3 is not a power of two)."""
    torch.manual_seed(0)
    x0 = torch.randn(1000)
    folded, plain = x0.clone(), x0.clone()
    if name == "nesterov-foreach":  # an optimizer without grad_scale support (the non-fused fallback)
        opt_folded = torch.optim.SGD([folded], lr=0.7, momentum=0.9, nesterov=True, foreach=True)
        opt_plain = torch.optim.SGD([plain], lr=0.7, momentum=0.9, nesterov=True, foreach=True)
    else:
        opt_folded, opt_plain = build_outer_optimizer(name, [folded]), build_outer_optimizer(name, [plain])
        # the path under test: the division inside fused SGD's own pass (grad_scale), not a fallback
        assert name == "schedule_free" or opt_folded.defaults["fused"]
    for _ in range(4):
        summed = torch.randn(1000)
        folded.grad, plain.grad = summed.clone(), summed / 3
        outer_step(opt_folded, grad_divisor=3)
        opt_plain.step()
        torch.testing.assert_close(folded, plain, rtol=1e-6, atol=1e-6)
        assert not hasattr(opt_folded, "grad_scale")
    assert not torch.equal(folded, x0)


def test_outer_step_under_a_float64_default_dtype():
    """Fused SGD reads grad_scale as float32, whatever torch's default dtype is."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = torch.ones(8, dtype=torch.float32)
        x.grad = torch.full((8,), 3.0, dtype=torch.float32)
        outer_step(build_outer_optimizer("average", [x]), grad_divisor=3)
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(x, torch.zeros(8))


def test_outer_lr_schedules():
    cosine = outer_lr_lambda("cosine", 10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    plateau = outer_lr_lambda("linear_after_plateau", 10, 0.25)
    assert [plateau(r) for r in (0, 1, 2)] == [1.0, 1.0, 1.0]
    assert plateau(6) == pytest.approx(0.5) and plateau(10) == 0.0
    with pytest.raises(ValueError, match="total number of rounds"):
        outer_lr_lambda("cosine", None)
