"""The harness of the multi-process scenarios, and what they share (tiny models, data, collective counting).

Each scenario is a script in this folder, run on every rank with a launcher's environment (RANK, WORLD_SIZE,
MASTER_ADDR, ...); its `run(out_dir, *options)` returns a JSON-able dict, which `main` writes as
`result_rank{R}.json` for the test to read. By hand, the launcher does it:

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \
        tests/scenarios/rounds.py OUT_DIR

(`tests/conftest.py: run_scenario` starts the ranks directly, with a free port and a timeout;
`run_scenarios` runs several in one launch through `batch.py`.)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist


VOCAB, SEQ = 64, 16


def main(run) -> None:
    """Join the process group the launcher's environment describes (gloo, CPU only), run the scenario, write
    this rank's result, and leave together. (Trainer and Accelerate find the group already initialized.)"""
    out_dir, *options = sys.argv[1:]
    dist.init_process_group("gloo")
    os.makedirs(out_dir, exist_ok=True)
    result = run(out_dir, *options)
    result["world_size"] = dist.get_world_size()
    with open(os.path.join(out_dir, f"result_rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    # A rank that exits while another still talks to it can abort gloo's threads: leave together.
    dist.barrier()
    dist.destroy_process_group()


def tiny_model(dropout: float = 0.0):
    """A 2-layer GPT-Neo (transformers is imported here: engine-only scenarios start without it)."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, set_seed

    set_seed(0)
    config = GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=SEQ,
        attention_types=[[["global", "local"], 1]], window_size=8, bos_token_id=0, eos_token_id=0,
        embed_dropout=dropout, attention_dropout=dropout, resid_dropout=dropout,
    )
    return GPTNeoForCausalLM(config)


def dataset(n: int = 256):
    from datasets import Dataset

    # Learnable sequences: each row counts up from a random start, modulo the vocabulary.
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = ((starts + torch.arange(SEQ)) % VOCAB).tolist()
    # `start` is a label to partition by (data_partition="by_label"); the model never sees it.
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "start": starts[:, 0].tolist()})


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def common_args(out_dir: str, **overrides) -> dict:
    args = dict(
        output_dir=out_dir, per_device_train_batch_size=4, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    args.update(overrides)
    return args


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single",
               "barrier")


def count_collectives() -> dict:
    """Counts torch.distributed collectives: all of them ("total"), and those hf_localsgd issues itself."""
    counts = {"total": 0, "all_reduce": 0, "broadcast": 0}
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            counts["total"] += 1
            if _name in counts and sys._getframe(1).f_globals["__name__"].startswith("hf_localsgd"):
                counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapper)
    return counts


def count_collectives_by_group() -> dict[str, int]:
    """Counts torch.distributed collectives by kind and group: keys like "all_reduce@0,2" (the group's ranks) or
    "all_reduce@world". Only calls through the Python API are seen: DDP's own C++ all-reduce is not (a comm
    hook's is)."""
    counts: dict[str, int] = {}
    for name in COLLECTIVES + ("all_gather_single", "reduce_scatter_single"):
        if not hasattr(dist, name):
            continue
        original = getattr(dist, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            group = kwargs.get("group")
            ranks = dist.get_process_group_ranks(group) if group is not None else None
            where = "world" if ranks is None or len(ranks) == dist.get_world_size() else ",".join(map(str, ranks))
            key = f"{_name}@{where}"
            counts[key] = counts.get(key, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, wrapper)
    return counts


PROCESS_GROUP_METHODS = (
    "allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "allgather_into_tensor_coalesced",
    "_allgather_base", "_reduce_scatter_base", "all_gather_single", "reduce_scatter_single",
    "all_gather_single_coalesced", "reduce_scatter_single_coalesced", "reduce_scatter",
    "reduce_scatter_tensor_coalesced", "all_to_all_single", "alltoall", "alltoall_base", "broadcast", "reduce",
    "gather", "scatter", "barrier", "send", "recv",
)


def count_process_group_calls() -> dict[str, int]:
    """Counts every collective that reaches a process group from Python, whoever issues it (torch.distributed,
    deepspeed.comm, Accelerate), by the group's methods and ranks: keys like "allreduce@0,2", "allreduce@world"
    or "allreduce@1" (a group of rank 1 alone, which communicates nothing). DeepSpeed calls torch.distributed's
    functions through references of its own (and `distributed_c10d` directly), which `count_collectives_by_group`
    would miss; every one of them ends in a method of the group, patched here on the class (once per process: take
differences of the counts)."""
    group_class = torch._C._distributed_c10d.ProcessGroup
    if hasattr(group_class, "_hf_localsgd_counts"):  # (patched once per process; the counts keep growing)
        return group_class._hf_localsgd_counts
    counts: dict[str, int] = {}
    group_class._hf_localsgd_counts = counts
    world = dist.get_world_size()
    for name in PROCESS_GROUP_METHODS:
        original = getattr(group_class, name, None)
        if original is None:
            continue

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            try:
                ranks = dist.get_process_group_ranks(self)
            except (KeyError, ValueError, RuntimeError):
                ranks = list(range(self.size())) if self.size() == world else [f"?{self.size()}"]
            where = "world" if len(ranks) == world else ",".join(map(str, ranks))
            key = f"{_name}@{where}"
            counts[key] = counts.get(key, 0) + 1
            return _original(self, *args, **kwargs)

        setattr(group_class, name, wrapper)
    return counts


class LinearRegression(torch.nn.Module):
    """A small model for reference tests: y = w·x + b with a squared loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, features, labels):
        return {"loss": (self.linear(features).squeeze(-1) - labels).pow(2).mean()}


def regression_data(n: int = 64):
    from datasets import Dataset

    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
    return Dataset.from_dict({"features": x.tolist(), "labels": y.tolist()})
