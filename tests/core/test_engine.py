"""One process: the round engine's rounds, buckets, state and checkpoints, the global model swap, metrics,
dtypes, and the errors of its arguments."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from toy import flat, local_steps, model

from hf_localsgd import LocalSGDOptions, RoundEngine, RoundHook
from hf_localsgd.core.flat import MasterWeights, unsynchronized_buffers
from hf_localsgd.core.metrics import METRICS


def test_buckets_and_cpu_state_give_identical_results():
    results = []
    # parameter sizes 35, 7, 21, 3: buckets of 40 floats hold [35] [7 21 3]; of 25 floats, [35] [7] [21 3]
    for kwargs in ({}, {"bucket_size_mb": 160 / 2**20}, {"outer_state_device": "cpu", "bucket_size_mb": 100 / 2**20}):
        m, g = model(), torch.Generator().manual_seed(2)
        engine = RoundEngine(m, sync_every=2, outer_optimizer="nesterov", **kwargs)
        for _ in range(6):
            local_steps(m, 1, g)
            engine.step()
        results.append((flat(m), len(engine.flat.buckets)))
    assert [n for _, n in results] == [1, 2, 3]
    assert all(torch.equal(results[0][0], weights) for weights, _ in results)


def test_state_dict_resumes_exactly_mid_round():
    def run(m, engine, g, steps):
        for _ in range(steps):
            local_steps(m, 1, g)
            engine.step()

    m, g = model(), torch.Generator().manual_seed(3)
    engine = RoundEngine(m, sync_every=4, outer_optimizer="schedule_free", local_sgd_warmup_steps=2)
    run(m, engine, g, 9)  # 2 warm-up steps, a round, one step into the next
    # deepcopy: like torch.save, it must not keep referencing tensors that training keeps updating
    saved = copy.deepcopy({"engine": engine.state_dict(), "local": engine.local_params(), "rng": g.get_state()})
    run(m, engine, g, 7)

    m2 = model(seed=7)  # different weights: everything must come from the state
    engine2 = RoundEngine(m2, sync_every=4, outer_optimizer="schedule_free", local_sgd_warmup_steps=2)
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
    engine = RoundEngine(m, sync_every=2, outer_optimizer="average", local_sgd_warmup_steps=3)
    synced = []
    for _ in range(7):
        assert engine.syncs_gradients == engine.in_warmup
        local_steps(m, 1, g)
        synced.append(engine.step())
    assert synced == [False, False, False, False, True, False, True]
    assert engine.sync() is False  # nothing left to synchronize


def test_engine_validates_arguments():
    """The engine's keywords are LocalSGDOptions' fields, validated by it, with its messages."""
    for kwargs, match in (({"sync_every": 0}, "^sync_every: "), ({"sync_every": 2, "outer_optimizer": "sgd"},
                          "^outer_optimizer: "), ({"sync_every": 2, "outer_comm_dtype": "float16"}, "^outer_comm_dtype: "),
                          ({"sync_every": 2, "outer_lr": float("nan")}, "^outer_lr: "),
                          ({"outer_lr_scheduler": "cosine"}, "^outer_lr_scheduler: .*total_steps"),
                          ({"sync_every_schedule": "linear"}, "^sync_every_schedule: .*total_steps"),
                          ({"data_partition": "by_label"}, "^data_partition: .*LabelShardSampler"),
                          ({"bucket_size_mb": 0}, "bucket_size_mb")):
        with pytest.raises(ValueError, match=match):
            RoundEngine(model(), **kwargs)
    with pytest.raises(TypeError, match="not both"):
        RoundEngine(model(), LocalSGDOptions(), sync_every=3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['sync_evry'\]"):
        RoundEngine(model(), sync_evry=3)
    with pytest.raises(TypeError, match="^comm_dtype is now outer_comm_dtype, warmup_steps is now local_sgd_warmup_steps"):
        RoundEngine(model(), warmup_steps=3, comm_dtype="bfloat16")  # hf_localsgd 0.1's keywords
    frozen = model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        RoundEngine(frozen, sync_every=2)


def test_engine_skips_frozen_parameters():
    m = model()
    m[0].weight.requires_grad_(False)
    engine = RoundEngine(m, sync_every=1)
    assert engine.flat.numel == sum(p.numel() for p in m.parameters()) - m[0].weight.numel()
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
    assert set(metrics) <= set(METRICS)  # every name is defined once, in hf_localsgd.core.metrics
    assert metrics["outer_grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
    assert metrics["drift"] == pytest.approx(0.0, abs=1e-9) and "cosine_similarity" not in metrics
    assert metrics["bytes_sent"] == 0 and metrics["round"] == 1 and metrics["sync_seconds"] > 0


def test_unsynchronized_buffers_are_the_saved_floating_point_ones():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM


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


def test_master_weights_are_what_the_round_reads_and_writes():
    """A bfloat16 model whose optimizer steps float32 masters (DeepSpeed's mixed precision, ZeRO): the outer step
    lands in the masters exactly (not rounded to bfloat16), the model gets them rounded after every write, and Δ
    is the masters' move. Split into parts (``sharded``, ZeRO's partitions), the layout covers the parts only."""
    m = torch.nn.Linear(4, 4).to(torch.bfloat16)
    masters = [p.detach().float().clone() for p in m.parameters()]
    refreshed = []

    def refresh():
        refreshed.append(True)
        with torch.no_grad():
            for p, master in zip(m.parameters(), masters):
                p.copy_(master)

    engine = RoundEngine(m, sync_every=2, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9,
                         masters=MasterWeights(masters, refresh, torch.device("cpu")))
    assert engine.flat.numel == 20 and all(t.dtype == torch.float32 for t in engine.flat.params)
    for _ in range(2):  # stand-in for inner steps: the optimizer moves the masters, then refreshes the model
        for master in masters:
            master.add_(1e-3)  # below bfloat16's resolution at these weights
        refresh()
    refreshed.clear()
    assert engine.step() is False and engine.step() is True
    assert refreshed  # the outer step was written through the masters
    x = engine.global_params
    assert torch.equal(torch.cat([t.reshape(-1) for t in masters]), x)
    assert not torch.equal(x, x.bfloat16().float())  # (the masters are not rounded...)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in m.parameters()]), x.bfloat16())  # (...the model is)
    # the layout of parts of the masters, as ZeRO partitions them inside an island
    halves = [t.view(-1)[:2] for t in masters]
    part = RoundEngine(m, sync_every=1, masters=MasterWeights(halves, refresh, torch.device("cpu"), sharded=True))
    assert part.flat.numel == 4 and part.shard.owned is part.flat


def test_empty_parameters_are_left_out():
    m = torch.nn.Module()
    m.empty = torch.nn.Parameter(torch.zeros(0))  # registered first, as a module's own parameters are
    m.linear = torch.nn.Linear(3, 3)
    engine = RoundEngine(m, sync_every=1, bucket_size_mb=4 / 2**20)  # several buckets
    assert engine.flat.numel == 12 and engine.step()


def test_engine_refuses_to_resume_with_a_variant_switched():
    saved = RoundEngine(model(), sync_every=2).state_dict()
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model().parameters(), lr=0.1), lambda s: 1.0)
    with pytest.raises(ValueError, match="lr_scaling off, this run has it on"):
        RoundEngine(model(), sync_every=2, lr_scaling="local_adascale", lr_scheduler=scheduler,
                    optimizer=scheduler.optimizer).load_state_dict(saved)
    with pytest.raises(ValueError, match="lr_scaling on, this run has it off.*delete its local_sgd_rank"):
        RoundEngine(model(), sync_every=2).load_state_dict(
            RoundEngine(model(), sync_every=2, lr_scaling="local_adascale", lr_scheduler=scheduler,
                        optimizer=scheduler.optimizer).state_dict())
    # PALSGD may be switched at a resume (as in hf_localsgd 0.1): switched on, its draws start from the seed
    m = model()
    palsgd = RoundEngine(m, sync_every=2, pseudo_sync_prob=0.5, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    RoundEngine(model(), sync_every=2).load_state_dict(palsgd.state_dict())
    m = model()
    RoundEngine(m, sync_every=2, pseudo_sync_prob=0.5, optimizer=torch.optim.SGD(m.parameters(), lr=0.1)).load_state_dict(saved)


def test_counters_are_read_only():
    engine = RoundEngine(model(), sync_every=2)
    for name in ("num_steps", "inner_step", "num_syncs", "sync_every"):
        with pytest.raises(AttributeError):
            setattr(engine, name, 1)


def test_fast_forward_starts_a_round_with_the_schedules_h_at_that_step():
    """A resume without the engine's state (e.g. from a plain Trainer checkpoint) starts a new round at the step
    it resumes from, so a ramped schedule gives that step's H, not step 0's."""
    m, g = model(), torch.Generator().manual_seed(8)
    engine = RoundEngine(m, sync_every=8, sync_every_min=2, sync_every_schedule="linear", total_steps=20)
    assert engine.sync_every == 2  # step 0 of the ramp
    local_steps(m, 3, g)  # weights trained elsewhere
    engine.fast_forward(10)
    assert (engine.num_steps, engine.inner_step, engine.sync_every) == (10, 0, 5)  # round(2 + 10/20 * 6)
    assert torch.equal(engine.global_params.double(), flat(m))  # the loaded weights are the global model
    syncs = [step for step in range(11, 21) if engine.step()]
    assert syncs == [15] and engine.sync_every == 6  # round(2 + 15/20 * 6): the ramp goes on from there


class Recording(RoundHook):
    """Records the engine's calls; sends a payload of its own with each sync."""

    name, option = "recording", "a recording hook"

    def __init__(self):
        self.calls = []

    def begin_step(self):
        self.calls.append("begin_step")

    def before_optimizer_step(self):
        self.calls.append("before_optimizer_step")

    def end_step(self):
        self.calls.append("end_step")

    def sync_payload(self):
        self.calls.append("sync_payload")
        return torch.tensor([1.5, -2.0])

    def after_sync(self, summed, sync_every):
        self.calls.append(("after_sync", summed.tolist(), sync_every))
        return {"recorded": 7.0}

    def state_dict(self):
        return {"recording_calls": len(self.calls)}


def test_hooks_are_called_at_their_points_and_carry_a_payload_through_the_sync():
    m = model()
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    hook = Recording()
    engine = RoundEngine(m, sync_every=2, optimizer=optimizer, hooks=[hook], track_metrics=True, pseudo_sync_prob=0.5)
    assert [h.name for h in engine.hooks] == ["palsgd", "recording"]  # the options' hooks, then one's own
    for _ in range(2):
        engine.begin_step()
        engine.before_optimizer_step()
        optimizer.step()
        engine.after_optimizer_step()
        engine.step()
    step = ["begin_step", "before_optimizer_step", "end_step"]
    assert hook.calls == step + step + ["sync_payload", ("after_sync", [1.5, -2.0], 2)]
    assert engine.last_metrics["recorded"] == 7.0 and "pseudo_syncs" in engine.last_metrics
    state = engine.state_dict()
    assert state["round_hooks"]["recording"] == {"option": "a recording hook", "strict": True}
    assert state["hook_state"]["recording"] == {"recording_calls": 8}
    assert set(state["hook_state"]["palsgd"]) == {"pseudo_syncs_in_round", "pseudo_sync_draws"}


def test_hooks_need_names_of_their_own_and_one_sets_the_lr():
    with pytest.raises(ValueError, match="^hooks: every round hook needs a name"):
        RoundEngine(model(), sync_every=2, hooks=[RoundHook()])
    with pytest.raises(ValueError, match="^hooks: every round hook needs a name"):
        RoundEngine(model(), sync_every=2, hooks=[Recording(), Recording()])
    setter = type("Setter", (RoundHook,), {"name": "setter", "sets_inner_lr": True})()
    m = model()
    with pytest.raises(ValueError, match=r"^hooks: \['palsgd', 'setter'\] all set the inner lr"):
        RoundEngine(m, sync_every=2, pseudo_sync_prob=0.5, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                    hooks=[setter])


def test_palsgd_needs_the_inner_optimizer():
    with pytest.raises(ValueError, match="^pseudo_sync_prob: .*optimizer=optimizer"):
        RoundEngine(model(), sync_every=2, pseudo_sync_prob=0.5)


def test_lr_scaling_needs_the_optimizer_and_a_lambda_schedule():
    m = model()
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(m.parameters(), lr=0.1), step_size=2)
    with pytest.raises(ValueError, match="^lr_scaling: .*optimizer=optimizer, lr_scheduler=scheduler"):
        RoundEngine(m, sync_every=2, lr_scaling="local_adascale", lr_scheduler=scheduler)
    with pytest.raises(ValueError, match="^lr_scaling: .*LambdaLR.*StepLR"):
        RoundEngine(m, sync_every=2, lr_scaling="local_adascale", lr_scheduler=scheduler, optimizer=scheduler.optimizer)
