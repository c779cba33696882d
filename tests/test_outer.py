"""One process: the outer step of every optimizer against references written here, the engine's state, and
option validation."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_localsgd import LocalSGDArguments, LocalSGDConfig, RoundEngine, ScheduleFreeSGD
from hf_localsgd.outer import build_outer_optimizer, outer_lr_lambda, outer_step


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).double()


def local_steps(m: torch.nn.Module, n: int, generator: torch.Generator) -> None:
    """Stand-in for n inner optimizer steps: deterministic pseudo-random moves."""
    with torch.no_grad():
        for _ in range(n):
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))


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
        else:  # seed 000 A.1.4 / Defazio et al.: z SGD on gradients at y, x uniform average of z, y mixes them
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
                         outer_lr_scheduler=scheduler, total_rounds=rounds)
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


def test_buckets_and_cpu_state_give_identical_results():
    results = []
    # parameter sizes 35, 7, 21, 3: buckets of 40 floats hold [35] [7 21 3]; of 25 floats, [35] [7] [21 3]
    for kwargs in ({}, {"bucket_size_mb": 160 / 2**20}, {"state_device": "cpu", "bucket_size_mb": 100 / 2**20}):
        m, g = model(), torch.Generator().manual_seed(2)
        engine = RoundEngine(m, sync_every=2, outer_optimizer="nesterov", **kwargs)
        for _ in range(6):
            local_steps(m, 1, g)
            engine.step()
        results.append((flat(m), len(engine._buckets)))
    assert [n for _, n in results] == [1, 2, 3]
    assert all(torch.equal(results[0][0], weights) for weights, _ in results)


def test_state_dict_resumes_exactly_mid_round():
    def run(m, engine, g, steps):
        for _ in range(steps):
            local_steps(m, 1, g)
            engine.step()

    m, g = model(), torch.Generator().manual_seed(3)
    engine = RoundEngine(m, sync_every=4, outer_optimizer="schedule_free", warmup_steps=2)
    run(m, engine, g, 9)  # 2 warm-up steps, a round, one step into the next
    # deepcopy: like torch.save, it must not keep referencing tensors that training keeps updating
    saved = copy.deepcopy({"engine": engine.state_dict(), "local": engine.local_params(), "rng": g.get_state()})
    run(m, engine, g, 7)

    m2 = model(seed=7)  # different weights: everything must come from the state
    engine2 = RoundEngine(m2, sync_every=4, outer_optimizer="schedule_free", warmup_steps=2)
    engine2.load_state_dict(saved["engine"])
    engine2.load_params(saved["local"])
    g2 = torch.Generator()
    g2.set_state(saved["rng"])
    run(m2, engine2, g2, 7)
    assert torch.equal(flat(m), flat(m2))
    assert torch.equal(engine.global_model_params(), engine2.global_model_params())
    assert (engine2.num_steps, engine2.inner_step, engine2.num_syncs) == (16, 2, 3)

    with pytest.raises(ValueError, match="outer_optimizer"):
        RoundEngine(model(), sync_every=4, outer_optimizer="nesterov").load_state_dict(saved["engine"])
    with pytest.raises(ValueError, match="written by 2 replicas, this run has 1"):
        RoundEngine(model(), sync_every=4, outer_optimizer="schedule_free").load_state_dict(
            {**saved["engine"], "world_size": 2})


def test_a_resumed_run_takes_its_own_sync_every_from_the_next_round():
    m, g = model(), torch.Generator().manual_seed(3)
    engine = RoundEngine(m, sync_every=4, outer_optimizer="nesterov")
    for _ in range(6):  # a round of 4, two steps into the next
        local_steps(m, 1, g)
        engine.step()
    resumed = RoundEngine(model(), sync_every=3, outer_optimizer="nesterov")
    resumed.load_state_dict(engine.state_dict())
    syncs = [step for step in range(7, 14) if resumed.step()]
    assert syncs == [8, 11]  # the round in progress keeps H = 4; the next ones have H = 3
    at_boundary = RoundEngine(model(), sync_every=3, outer_optimizer="nesterov")
    for _ in range(2):
        local_steps(m, 1, g)
        engine.step()  # the sync at step 8: the next round has not started
    at_boundary.load_state_dict(engine.state_dict())
    assert at_boundary.sync_every == 3


def test_global_model_context_swaps_and_restores():
    m, g = model(), torch.Generator().manual_seed(4)
    engine = RoundEngine(m, sync_every=3, outer_optimizer="schedule_free")
    for _ in range(4):  # one sync, then one local step
        local_steps(m, 1, g)
        engine.step()
    local = flat(m)
    with engine.global_model():
        torch.testing.assert_close(flat(m), engine.global_model_params().double())
        assert not torch.equal(flat(m), local)
    assert torch.equal(flat(m), local)


def test_warmup_then_rounds():
    m, g = model(), torch.Generator().manual_seed(5)
    engine = RoundEngine(m, sync_every=2, outer_optimizer="average", warmup_steps=3)
    synced = []
    for _ in range(7):
        assert engine.syncs_gradients == engine.in_warmup
        local_steps(m, 1, g)
        synced.append(engine.step())
    assert synced == [False, False, False, False, True, False, True]
    assert engine.sync() is False  # nothing left to synchronize


def test_outer_lr_schedules():
    cosine = outer_lr_lambda("cosine", 10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    plateau = outer_lr_lambda("linear_after_plateau", 10, 0.25)
    assert [plateau(r) for r in (0, 1, 2)] == [1.0, 1.0, 1.0]
    assert plateau(6) == pytest.approx(0.5) and plateau(10) == 0.0
    with pytest.raises(ValueError, match="total number of rounds"):
        outer_lr_lambda("cosine", None)


@pytest.mark.parametrize(
    "field,value",
    [("sync_every", 0), ("outer_optimizer", "adam"), ("outer_lr", -0.1), ("outer_momentum", 1.0),
     ("outer_lr_scheduler", "step"), ("outer_lr_plateau_fraction", 1.0), ("local_sgd_warmup_steps", 100),
     ("local_sgd_warmup_steps", -1), ("outer_state_device", "cuda"), ("outer_comm_dtype", "float16"),
     ("deepspeed", "ds_config.json"), ("fsdp", "full_shard"), ("pseudo_sync_prob", 1.0),
     ("pseudo_sync_rate", 0.0), ("pseudo_sync_rate", float("inf")), ("outer_lr", float("nan")),
     ("data_partition", "by_class")],
)
def test_invalid_options_name_the_field(field, value, tmp_path):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        LocalSGDConfig(output_dir=str(tmp_path), max_steps=100, report_to=[], **{field: value})


def test_average_requires_lr_one_and_no_momentum(tmp_path):
    with pytest.raises(ValueError, match="^outer_lr: .*plain averaging"):
        LocalSGDConfig(output_dir=str(tmp_path), outer_optimizer="average", outer_lr=0.5, report_to=[])
    config = LocalSGDConfig(output_dir=str(tmp_path), outer_optimizer="schedule_free", report_to=[])
    assert (config.resolved_outer_lr, config.resolved_outer_momentum) == (2.0, 0.2)
    assert config.ddp_broadcast_buffers is False


def test_mixin_next_to_another_trainer_config(tmp_path):
    """The way to put the options next to e.g. TRL's SFTConfig: a dataclass mixing both."""

    @dataclass
    class OtherConfig(TrainingArguments):  # stands in for SFTConfig
        max_length: int = 1024

    @dataclass
    class OtherLocalSGDConfig(LocalSGDArguments, OtherConfig):
        pass

    config = OtherLocalSGDConfig(output_dir=str(tmp_path), sync_every=8, max_length=64, report_to=[])
    assert (config.sync_every, config.max_length, config.ddp_broadcast_buffers) == (8, 64, False)
    with pytest.raises(ValueError, match="^sync_every"):
        OtherLocalSGDConfig(output_dir=str(tmp_path), sync_every=0, report_to=[])
    # The parser shows the field metadata: one source of truth for help and choices.
    (parsed,) = HfArgumentParser(OtherLocalSGDConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--outer_optimizer", "schedule_free", "--report_to", "none"]
    )
    assert parsed.outer_optimizer == "schedule_free"
    with pytest.raises(SystemExit):
        HfArgumentParser(OtherLocalSGDConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--outer_optimizer", "adam"]
        )


def test_engine_validates_arguments():
    for kwargs, match in (({"sync_every": 0}, "sync_every"), ({"sync_every": 2, "outer_optimizer": "sgd"},
                          "outer_optimizer"), ({"sync_every": 2, "comm_dtype": "int8"}, "comm_dtype"),
                          ({"sync_every": 2, "outer_lr": float("nan")}, "outer_lr")):
        with pytest.raises(ValueError, match=match):
            RoundEngine(model(), **kwargs)
    frozen = model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        RoundEngine(frozen, sync_every=2)


def test_engine_skips_frozen_parameters():
    m = model()
    m[0].weight.requires_grad_(False)
    engine = RoundEngine(m, sync_every=1)
    assert engine.numel == sum(p.numel() for p in m.parameters()) - m[0].weight.numel()
    assert not math.isnan(engine.global_params.sum().item())


def test_metrics_one_replica_and_no_effect_on_training():
    weights = []
    for track in (False, True):
        m, g = model(), torch.Generator().manual_seed(6)
        engine = RoundEngine(m, sync_every=2, outer_optimizer="nesterov", track_metrics=track)
        start = flat(m)
        local_steps(m, 2, g)
        expected_norm = (start - flat(m)).norm().item()
        assert engine.step() is False and engine.step() is True
        weights.append(flat(m))
    assert torch.equal(*weights)  # measuring changes nothing
    metrics = engine.last_metrics
    assert metrics["outer_grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
    assert metrics["drift"] == pytest.approx(0.0, abs=1e-9) and "cosine_similarity" not in metrics
    assert metrics["bytes_sent"] == 0 and metrics["round"] == 1 and metrics["sync_seconds"] > 0


def test_unsynchronized_buffers_are_the_saved_floating_point_ones():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from hf_localsgd.engine import unsynchronized_buffers

    batchnorm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    assert unsynchronized_buffers(batchnorm) == ["1.running_mean", "1.running_var"]  # not num_batches_tracked
    gpt_neo = GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=16,
        attention_types=[[["global", "local"], 1]], window_size=8, bos_token_id=0, eos_token_id=0))
    assert list(gpt_neo.buffers()) and unsynchronized_buffers(gpt_neo) == []  # masks are not saved


@pytest.mark.parametrize("name, lr, momentum", [("nesterov", None, None), ("schedule_free", 0.7, 0.3)])
def test_bfloat16_replicas_follow_the_float32_run(name, lr, momentum):
    """A bfloat16 model starts each round from x_r rounded to bfloat16: its outer gradient is its move from
    there, so a round without local change hands the outer optimizer nothing, as it does in float32. (Against
    x_r itself, the rounding residual would feed the outer optimizer, and momentum, every round.) The moves of
    the first round are exact in both dtypes, so both runs must keep identical float32 global copies. (Not for
    average: its global model is the replicas' mean, which a bfloat16 replica holds exactly.)"""
    engines = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = torch.nn.Linear(4, 4).to(dtype)
        with torch.no_grad():
            for i, p in enumerate(m.parameters()):
                p.copy_(torch.arange(p.numel(), dtype=dtype).reshape(p.shape) / 8 - i)  # exact in bfloat16
        engine = RoundEngine(m, sync_every=1, outer_optimizer=name, outer_lr=lr, outer_momentum=momentum)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.25)  # exact too
        engine.step()  # round 1: a real move
        for _ in range(10):
            engine.step()  # rounds without local change: the model holds x_r (rounded to its dtype)
        engines[dtype] = engine
    float32, bfloat16 = engines[torch.float32], engines[torch.bfloat16]
    assert not torch.equal(float32.global_params, float32.global_params.bfloat16().float())  # (a test with teeth)
    assert torch.equal(float32.global_params, bfloat16.global_params)


def test_empty_parameters_are_left_out():
    m = torch.nn.Module()
    m.empty = torch.nn.Parameter(torch.zeros(0))  # registered first, as a module's own parameters are
    m.linear = torch.nn.Linear(3, 3)
    engine = RoundEngine(m, sync_every=1, bucket_size_mb=4 / 2**20)  # several buckets
    assert engine.numel == 12 and engine.step()


def test_engine_refuses_to_resume_with_lr_scaling_switched(tmp_path):
    saved = RoundEngine(model(), sync_every=2).state_dict()
    with pytest.raises(ValueError, match="lr_scaling off, this run has it on"):
        RoundEngine(model(), sync_every=2, lr_scaling="local_adascale").load_state_dict(saved)


def test_pseudo_sync_needs_palsgd():
    with pytest.raises(RuntimeError, match="pseudo_sync_prob > 0"):
        RoundEngine(model(), sync_every=2).pseudo_sync(0.1)
