"""Faults on real processes (gloo): a rank killed while writing its checkpoint, a damaged state file, a worker
SIGKILLed mid-round under `accelerate launch`. Each launch has a timeout that kills every process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import CPU_2PROC, ROOT, SCENARIOS, free_port, launch_env, run_scenarios, start_ranks, wait_ranks


SCENARIO = str(SCENARIOS / "faults.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch whose rank 1 dies writing its 2nd state file, then one that resumes after it."""
    out = tmp_path_factory.mktemp("faults")
    started = time.monotonic()
    codes, outputs, timed_out = wait_ranks(*start_ranks([SCENARIO, str(out), "crash"]), timeout=180)
    crash = {"codes": codes, "outputs": outputs, "timed_out": timed_out, "seconds": time.monotonic() - started}
    codes, outputs, timed_out = wait_ranks(*start_ranks([SCENARIO, str(out), "resume"]), timeout=300)
    assert codes == [0, 0] and not timed_out, "\n".join(o[-4000:] for o in outputs)
    results = [json.loads((out / f"result_rank{rank}.json").read_text()) for rank in range(2)]
    return crash, results


def test_a_rank_killed_while_writing_its_state_leaves_the_last_complete_checkpoint_to_resume_from_exactly(runs):
    crash, (r0, r1) = runs
    assert crash["codes"][1] == -signal.SIGKILL and not crash["timed_out"]  # rank 1 died where intended...
    assert "rank 1 was not killed" not in crash["outputs"][0]
    # ...half-way through its file of checkpoint-6, after rank 0 had written its own and before Trainer's save.
    assert r0["crashed_checkpoints"]["checkpoint-6"] == ["local_sgd_rank0.pt", "local_sgd_rank1.pt.tmp"]
    assert "local_sgd_rank1.pt" in r0["crashed_checkpoints"]["checkpoint-3"]
    for r in (r0, r1):
        assert r["resumed_from"] == "checkpoint-3"  # not the newer, incomplete checkpoint-6
        assert r["resumed"] == r["full"]  # bit-exact: weights, global model, number of syncs
    assert r0["checkpoints_after"] == ["checkpoint-12"]  # the resumed run rotated (save_total_limit=1) past it


def test_a_truncated_state_file_stops_every_rank_with_an_error_naming_it_and_its_rank(runs):
    _, (r0, r1) = runs
    damaged = os.path.join(r0["damaged"], "local_sgd_rank1.pt")
    for r in (r0, r1):
        # Trainer: checked on every rank before Trainer loads the checkpoint.
        assert r["trainer_error"].startswith(f"resume_from_checkpoint: {r0['damaged']} cannot be resumed from: "
                                             "local_sgd_rank1.pt (the state of rank 1) is truncated")
        # A plain loop: resume_rank_state's agreement; the newest complete checkpoint offered is named.
        assert r["engine_error"].startswith(f"{damaged}: the state file of rank 1 is truncated")
        assert r["engine_error"].endswith("checkpoint-12: resume from it.") and "crashed" in r["engine_error"]
        # A plain loop resuming a checkpoint that only rank 0 wrote its file into: both stop.
        assert r["missing_error"].startswith("1 of 2 ranks found their local_sgd_rank*.pt file in the checkpoint")


@pytest.mark.slow
def test_a_truncated_state_file_ends_every_rank_non_zero_without_a_hang(runs):
    """Nothing catches the error: each rank must exit by itself (none waits in a collective for another), with a
    non-zero code: 1, or gloo's abort at exit (-6) when the other rank closed its connections first
    (`pytest -m slow`; the ranks' agreement itself is checked by the test above, in the default suite)."""
    _, (r0, _) = runs
    started = time.monotonic()
    codes, outputs, timed_out = wait_ranks(
        *start_ranks([SCENARIO, os.path.dirname(r0["damaged"]), "truncated_exit", r0["damaged"]]),
        timeout=120, first_failure_ends_all=False,
    )
    assert not timed_out and all(code not in (0, None) for code in codes), (codes, time.monotonic() - started)
    for out in outputs:
        assert "CheckpointError: resume_from_checkpoint: " in out and "(the state of rank 1) is truncated" in out


def processes_in_groups(groups: set[int]) -> list[int]:
    """Live (not zombie) processes whose process group is one of ``groups``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in groups:
            found.append(int(entry))
    return found


def test_sigkill_of_one_worker_mid_round_ends_the_launch_non_zero_with_no_process_left(tmp_path):
    """accelerate's launcher (torch elastic) tears the group down when a worker dies; the survivor must not sit in
    its next outer all-reduce waiting for a dead peer."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--num_processes",
           "2", "--main_process_port", str(free_port()), SCENARIO, str(tmp_path), "long"]
    log = open(tmp_path / "launch.log", "w+")
    launcher = subprocess.Popen(cmd, env=launch_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    groups = {launcher.pid}
    try:
        deadline = time.monotonic() + 180
        ready = [tmp_path / f"ready_rank{rank}" for rank in range(2)]
        while not all(path.exists() for path in ready):
            assert launcher.poll() is None and time.monotonic() < deadline, (log.seek(0), log.read()[-4000:])
            time.sleep(0.1)
        pids = [int(path.read_text()) for path in ready]
        groups |= {os.getpgid(pid) for pid in pids}  # torch elastic starts each worker in a session of its own
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        code = launcher.wait(timeout=60)
        seconds = time.monotonic() - killed
        assert code != 0
        while processes_in_groups(groups) and time.monotonic() < killed + 60:
            time.sleep(0.1)
        assert processes_in_groups(groups) == [], "processes left behind"
        print(f"launcher exited {code} {seconds:.1f} s after the SIGKILL")
        assert seconds < 60
    finally:
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        launcher.wait()
        log.close()


SYNC_FAULTS = str(SCENARIOS / "sync_faults.py")


@pytest.fixture(scope="module")
def sync_fault_runs(tmp_path_factory):
    return run_scenarios(tmp_path_factory.mktemp("sync_faults"), ["sync_faults:nan", "sync_faults:nan,delayed",
                                                                  "sync_faults:nan,none,int8",
                                                                  "sync_faults:nan,none,bfloat16",
                                                                  "sync_faults:nan,eager",
                                                                  "sync_faults:nan,none,float32,2"])


@pytest.mark.parametrize("spec, skipped", [("sync_faults:nan", [0, 1, 1, 1, 1]),
                                           ("sync_faults:nan,delayed", [0, 0, 1, 1, 1]),
                                           ("sync_faults:nan,none,int8", [0, 1, 1, 1, 1]),
                                           ("sync_faults:nan,none,bfloat16", [0, 1, 1, 1, 1])])
def test_a_nan_replica_never_reaches_the_global_model(sync_fault_runs, spec, skipped):
    """Rank 1 turns NaN in round 2: that round's sum is skipped (blocking: at its end; delayed: a round later),
    the global model stays the previous sync's and finite on both ranks, every replica restarts from it, and
    training goes on (the next syncs apply)."""
    r0, r1 = sync_fault_runs[spec]
    skipped_at = skipped.index(1)
    for r in (r0, r1):
        assert r["skipped"] == skipped and all(r["finite"]) and r["final_finite"]
        assert all(r["replicas_equal_global"])
        assert r["global_after_sync"][skipped_at] == r["global_after_sync"][skipped_at - 1]  # untouched
        assert r["global_after_sync"][skipped_at + 1] != r["global_after_sync"][skipped_at]  # and on it goes
    assert r0["global_after_sync"] == r1["global_after_sync"]


def test_a_nan_replica_under_eager_drops_its_eager_part_and_its_sum_is_skipped_a_round_later(sync_fault_runs):
    """Eager: rank 1's own outer gradient of round 2 is NaN, so at the end of round 2 it drops its eager part
    (it holds the consensus, rank 0 its consensus + eager part); the sum of round 2 is skipped at the end of
    round 3, where every replica restarts from the consensus, which stays the previous one and finite."""
    r0, r1 = sync_fault_runs["sync_faults:nan,eager"]
    for r in (r0, r1):
        assert r["skipped"] == [0, 0, 1, 1, 1] and all(r["finite"]) and all(r["model_finite"]) and r["final_finite"]
        assert r["global_after_sync"][2] == r["global_after_sync"][1]
        assert r["global_after_sync"][3] != r["global_after_sync"][2]
        assert r["replicas_equal_global"][2]  # the skip: everyone restarts from the consensus
    assert r1["replicas_equal_global"][1] and not r0["replicas_equal_global"][1]  # only rank 1 dropped its part
    assert r0["global_after_sync"] == r1["global_after_sync"]


def test_a_nan_replica_under_streaming_skips_its_fragment_and_restarts_from_the_whole_global_model(sync_fault_runs):
    """Streaming (P = 2, τ = 1, α = 0.5): rank 1 turns NaN after fragment 0 of round 2 was sent, so fragment 0
    applies (rank 1 keeps α of its NaN part) and fragment 1's sum is skipped at the round's end, where every
    replica restarts from the whole global model: no fragment carries the NaN on (it would come back through
    the gradients), and the syncs after it all apply."""
    r0, r1 = sync_fault_runs["sync_faults:nan,none,float32,2"]
    for r in (r0, r1):
        assert r["skipped"] == [0, 1, 1, 1, 1] and all(r["finite"]) and all(r["model_finite"]) and r["final_finite"]
        before, after = r["global_after_sync"][0], r["global_after_sync"][1]
        same = [a == b for a, b in zip(before, after)]
        assert any(same) and not all(same)  # fragment 0 stepped, fragment 1 stayed
        assert r["replicas_equal_global"][1]
        assert all(x != y for x, y in zip(r["global_after_sync"][2], r["global_after_sync"][1]))
    assert r0["global_after_sync"] == r1["global_after_sync"]


def test_nan_in_every_round_stops_every_rank_with_the_error(tmp_path):
    codes, outputs, timed_out = wait_ranks(*start_ranks([SYNC_FAULTS, str(tmp_path), "nan_every_round"]),
                                           timeout=120, first_failure_ends_all=False)
    assert not timed_out and all(code not in (0, None) for code in codes), codes
    for out in outputs:
        assert "FloatingPointError: max_skipped_syncs: the summed outer gradient was not finite at 2 syncs" in out


@pytest.mark.parametrize("overlap, comm, fragments, at", [("none", "float32", "1", r"round 2 \(step 8\)"),
                                                         ("none", "int8", "1", r"round 2 \(step 8\)"),
                                                         ("eager", "float32", "1", r"round (2 \(step 8|3 \(step 12)\)"),
                                                         ("none", "float32", "2", r"round 2 \(step (6|8)\)")])
def test_a_hung_worker_stops_the_others_at_the_sync_timeout(tmp_path, overlap, comm, fragments, at):
    """Rank 1 stops (SIGSTOP) at step 6, in round 2; rank 0 waits sync_timeout_seconds (3 s) for the sum it
    needs, then exits non-zero naming the sync (the launcher, here the helper, then ends the stopped rank).
    Blocking: at the end of round 2. int8: the pipeline's thread stays stuck in the collective, and must not keep
    the process from exiting. Eager: at the end of round 2 for round 1's sum, if rank 1 stopped (two tiny steps
    later) before it completed, else at the end of round 3 for round 2's. Streaming (P = 2, τ = 1): at step 6
    for fragment 0's sum, sent at step 5, or at step 8 for fragment 1's."""
    codes, outputs, timed_out = wait_ranks(*start_ranks([SYNC_FAULTS, str(tmp_path), "hang", overlap, comm,
                                                         fragments]), timeout=120)
    seconds = time.time() - float((tmp_path / "stopped").read_text())
    assert not timed_out and codes[0] == 1, (codes, outputs[0][-3000:])
    assert re.search(f"SyncTimeoutError: sync_timeout_seconds: the outer sync of {at} timed out", outputs[0]), \
        outputs[0][-3000:]
    assert seconds < 3 + 30, seconds  # the timeout, not gloo's 30-minute default; and no hang on the way out
