"""Shared helpers: launching scenarios on several CPU processes, and the environment tests run in.

Tests are laid out like the package (`core/`, `integrations/`, `recipes/`, `tools/`); the multi-process tests
run the scripts of `scenarios/` on real processes (gloo), each with a timeout: started directly with a
launcher's environment (`spawn_ranks`), or under `accelerate launch` where the launcher itself is under test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "accelerate_configs" / "cpu_2proc.yaml"
SCENARIOS = Path(__file__).with_name("scenarios")
sys.path.insert(0, str(Path(__file__).parent / "support"))

# Tests never reach the Hub; one thread per rank so two ranks share 2 cores without oversubscription.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: the tests run on CPU processes


def launch_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # The checkout's package, not whatever hf_localsgd is installed (a script's own folder comes first on its path).
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    # The multi_gpu launcher does not export the config's `use_cpu`; without a GPU, Accelerate then sees
    # no distributed setup unless told (TrainingArguments(use_cpu=True) also tells it).
    env["ACCELERATE_USE_CPU"] = "true"
    env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would look for a GPU (tests/scenarios/deepspeed_trainer.py)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_process_group(cmd: list[str], timeout: float, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a process group of its own; on a time-out (or the test's own) kill the whole group, the
    launcher's workers included, and fail with the output."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n--- stderr\n{stderr[-4000:]}")
    finally:
        if proc.poll() is None:  # the test itself was interrupted (pytest-timeout, Ctrl-C)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n--- stdout\n{stdout[-3000:]}\n"
                    f"--- stderr\n{stderr[-6000:]}")
    return result


def accelerate_launch(script_args: list[str], timeout: float = 240, num_processes: int = 2, check: bool = True,
                      **env) -> subprocess.CompletedProcess:
    """`accelerate launch` CPU processes (gloo); fails the test with the output on error or hang."""
    # A free port for every launch: the default 29500 clashes with any other run on the machine.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--num_processes", str(num_processes), "--main_process_port", str(free_port()), *script_args]
    return run_process_group(cmd, timeout, launch_env(**env), check=check)


def start_ranks(script_args: list[str], num_processes: int = 2, **env) -> tuple[list[subprocess.Popen], list]:
    """Start ``num_processes`` ranks of ``python SCRIPT ARGS`` directly, with the environment a launcher gives
    them (RANK, WORLD_SIZE, MASTER_ADDR, ...), each in a session of its own, its output in a temporary file."""
    base = launch_env(**env)
    base.update(WORLD_SIZE=str(num_processes), LOCAL_WORLD_SIZE=str(num_processes), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))
    logs = [tempfile.TemporaryFile("w+") for _ in range(num_processes)]
    procs = [subprocess.Popen([sys.executable, *script_args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}, start_new_session=True)
             for rank, log in enumerate(logs)]
    return procs, logs


def wait_ranks(procs: list[subprocess.Popen], logs: list, timeout: float,
               first_failure_ends_all: bool = True) -> tuple[list[int | None], list[str], bool]:
    """Wait for the ranks to exit; as `accelerate launch` does, the first to fail ends the others (unless
    ``first_failure_ends_all`` is False: then each must exit by itself). Whatever still runs at ``timeout`` is
    killed. Returns each rank's exit code (None: killed here), its output, and whether the time ran out."""
    deadline, failed, timed_out = time.monotonic() + timeout, None, False
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
            if all(code is not None for code in codes) or (failed is not None and first_failure_ends_all):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:  # also when the test itself is interrupted (pytest-timeout, Ctrl-C)
        if failed is not None:
            time.sleep(0.5)  # a moment for the others to report their side of the error
        codes = [p.poll() for p in procs]
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return codes, outputs, timed_out


def spawn_ranks(script_args: list[str], num_processes: int = 2, timeout: float = 240, **env) -> list[str]:
    """`start_ranks`, then `wait_ranks`: real processes and a real gloo group, without the seconds a launcher
    spends importing torch and accelerate itself. Returns each rank's output; fails the test with it on an
    error or a time-out."""
    procs, logs = start_ranks(script_args, num_processes, **env)
    codes, outputs, timed_out = wait_ranks(procs, logs, timeout)
    failed = next((rank for rank, code in enumerate(codes) if code != 0), None)
    if timed_out or failed is not None:
        report = "\n".join(f"--- rank {rank} (exit {code})\n{out[-4000:]}"
                           for rank, (code, out) in enumerate(zip(codes, outputs)))
        what = f"timed out after {timeout}s" if timed_out else f"rank {failed} failed"
        pytest.fail(f"{what}: {' '.join(script_args)}\n{report}")
    return outputs


def run_scenario(name: str, out_dir: Path, *options: str, timeout: float = 240, num_processes: int = 2,
                 **env) -> list[dict]:
    """Run ``tests/scenarios/{name}.py`` on ``num_processes`` ranks; returns the per-rank JSON results."""
    spawn_ranks([str(SCENARIOS / f"{name}.py"), str(out_dir), *options], num_processes, timeout, **env)
    return [json.loads((out_dir / f"result_rank{rank}.json").read_text()) for rank in range(num_processes)]


def run_scenarios(out_dir: Path, specs: list[str], timeout: float = 480, num_processes: int = 2,
                  **env) -> dict[str, list[dict]]:
    """Run several scenarios (``NAME[:OPTION,...]``) one after another in the same ``num_processes`` ranks
    (`scenarios/batch.py`); returns each one's per-rank JSON results, by its spec."""
    spawn_ranks([str(SCENARIOS / "batch.py"), str(out_dir), *specs], num_processes, timeout, **env)
    folder = lambda spec: spec.replace(":", "-").replace(",", "-")  # noqa: E731 (as batch.py names them)
    return {spec: [json.loads((out_dir / folder(spec) / f"result_rank{rank}.json").read_text())
                   for rank in range(num_processes)] for spec in specs}


DEMO = ROOT / "recipes" / "gptneo-tinystories" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """One real 2-process run of the demo recipe, shortened by command-line overrides that must win over the
    recipe (it says 160 steps, H = 16 after 32 warm-up steps); shared by the tests that read its outputs.
    Returns the output directory and what the run printed (stdout, then stderr)."""
    out = tmp_path_factory.mktemp("demo") / "diloco"
    proc = accelerate_launch(
        ["-m", "hf_localsgd.train", str(DEMO), "--output_dir", str(out),
         "--max_steps", "6", "--sync_every", "3", "--local_sgd_warmup_steps", "2",
         "--eval_steps", "3", "--logging_steps", "1", "--max_eval_samples", "64"],
        timeout=180,
    )
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def core_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """The core's multi-process scenarios (PALSGD, lr scaling, the label partition, int8 outer gradients), in one
    launch of two ranks, for tests/core/test_palsgd.py, test_adascale.py, test_partition.py and test_quantize.py."""
    return run_scenarios(tmp_path_factory.mktemp("core"), ["palsgd", "adascale", "partition", "int8"])
