"""`hf-localsgd plot`: valid PNGs from the logs of a real 2-process demo run, and the bytes axis and the
overlay of runs (a DDP baseline with no sync entries, a run that logged nothing usable) on hand-made logs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_localsgd.tools import cli
from hf_localsgd.tools.plot import (
    Run, cumulative_bytes, find_state_file, load_history, logged_ddp_bytes_per_step, main, model_ddp_bytes_per_step,
    resolve_ddp_bytes, run_labels,
)


pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, height, width=640):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    assert path.stat().st_size < 150_000, f"{path} is {path.stat().st_size} bytes"
    image = imread(path)
    assert image.shape == (height, width, 4) and image.std() > 0  # drawn on, not blank


def test_pngs_from_a_real_run(demo_run, capsys):
    demo_run, _ = demo_run  # tests/conftest.py: the demo recipe, 6 steps, H = 3 after 2 warm-up steps
    out = demo_run / "figures"
    cli.main(["plot", str(demo_run), "--out", str(out)])  # through the console script's dispatch
    history = load_history(demo_run)
    assert any("local_sgd/drift" in entry for entry in history)
    assert {p.name for p in out.glob("*.png")} == {"loss_vs_steps.png", "loss_vs_bytes.png", "cosine_drift.png"}
    assert_png(out / "loss_vs_steps.png", 400)
    assert_png(out / "loss_vs_bytes.png", 400)
    assert_png(out / "cosine_drift.png", 600)
    assert str(out / "loss_vs_steps.png") in capsys.readouterr().out


def test_ddp_bytes_from_the_model_match_what_the_engine_logs(demo_run):
    """4 B x parameters counted from config.json is the logged DDP traffic per step (ring bytes at K = 2)."""
    demo_run, _ = demo_run
    logged = logged_ddp_bytes_per_step(load_history(demo_run))
    assert logged is not None
    assert model_ddp_bytes_per_step(demo_run) == pytest.approx(logged)
    assert model_ddp_bytes_per_step(demo_run, num_params=10) == 40


# ---------------------------------------------------------------------- hand-made logs
P = 1000.0  # DDP bytes per step of the hand-made runs


def sync(step, round_, total):
    return {"step": step, "local_sgd/round": round_, "local_sgd/sync_every": 3, "local_sgd/bytes_sent": P,
            "local_sgd/bytes_total": total, "local_sgd/ddp_bytes_total": step * P,
            "local_sgd/cosine_similarity": 0.5 / round_, "local_sgd/drift": 0.1 / round_}


# 2 warm-up steps (2P sent), then rounds of H = 3 ending at steps 5 and 8; losses every step, evals at 4 and 8.
DILOCO = [{"step": s, "loss": 7.0 - 0.2 * s} for s in range(1, 9)] + [
    sync(5, 1, 3 * P), sync(8, 2, 4 * P), {"step": 4, "eval_loss": 6.5}, {"step": 8, "eval_loss": 5.6}]
DDP = [{"step": s, "loss": 7.0 - 0.25 * s} for s in range(1, 9)] + [{"step": 8, "eval_loss": 5.4}]


def write_run(path, history):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 8, "log_history": history}))
    return path


def test_cumulative_bytes_follow_warmup_then_syncs():
    steps = np.arange(1, 9, dtype=float)
    # warm-up: P per step up to 2P; local steps send nothing until the sync at 5 (3P) and at 8 (4P)
    assert cumulative_bytes(DILOCO, steps, P).tolist() == [P, 2 * P, 2 * P, 2 * P, 3 * P, 3 * P, 3 * P, 4 * P]
    assert cumulative_bytes(DDP, steps, P).tolist() == (steps * P).tolist()
    assert cumulative_bytes(DDP, steps, None) is None  # data-parallel at an unknown rate
    no_warmup = [sync(3, 1, P), sync(6, 2, 2 * P)]
    assert cumulative_bytes(no_warmup, np.array([1.0, 3.0, 4.0, 6.0]), P).tolist() == [0, P, P, 2 * P]
    assert logged_ddp_bytes_per_step(DILOCO) == P and logged_ddp_bytes_per_step(DDP) is None


def test_compare_overlays_and_borrows_ddp_bytes(tmp_path, capsys):
    diloco, ddp = write_run(tmp_path / "diloco", DILOCO), write_run(tmp_path / "ddp", DDP)
    out = tmp_path / "figures"
    written = main([str(diloco), "--compare", str(ddp), "--out", str(out)])
    assert sorted(p.name for p in written) == ["cosine_drift.png", "loss_vs_bytes.png", "loss_vs_steps.png"]
    for name, height in (("loss_vs_steps.png", 400), ("loss_vs_bytes.png", 400), ("cosine_drift.png", 600)):
        assert_png(out / name, height)
    # The DDP baseline logged no bytes: it gets the per-step DDP traffic the diloco run's engine logged.
    note = "ddp: no local_sgd/bytes_total logged, plotted as data-parallel: 1,000 bytes per step"
    assert note in capsys.readouterr().err


def test_params_override_what_a_compared_run_logged(tmp_path):
    runs = [Run(tmp_path, "diloco", DILOCO), Run(tmp_path, "ddp", DDP)]
    assert resolve_ddp_bytes(runs) == [
        "ddp: no local_sgd/bytes_total logged, plotted as data-parallel: 1,000 bytes per step "
        "(the DDP bytes a compared local-SGD run logged)"]
    assert resolve_ddp_bytes(runs, num_params=500)[0].endswith("2,000 bytes per step (4 B x parameters)")
    assert [run.ddp_bytes_per_step for run in runs] == [P, 2000]  # a run's own log always wins


def test_a_run_without_any_bytes_is_left_out_of_the_bytes_figure(tmp_path, capsys):
    ddp = write_run(tmp_path / "ddp", DDP)  # no config.json to count parameters, nothing to borrow
    out = tmp_path / "figures"
    assert [p.name for p in main([str(ddp), "--out", str(out)])] == ["loss_vs_steps.png"]  # no cosine/drift, no bytes
    assert "left out of loss_vs_bytes.png (pass --params N)" in capsys.readouterr().err
    main([str(ddp), "--out", str(out), "--params", "250"])  # 4 B x 250 = 1 kB per step
    assert_png(out / "loss_vs_bytes.png", 400)


def test_run_dirs_checkpoints_and_labels(tmp_path):
    run = tmp_path / "run"
    for step in (2, 10):  # while training only checkpoints exist: the latest, by number, not by name
        write_run(run / f"checkpoint-{step}", DDP[:step])
    assert find_state_file(run) == run / "checkpoint-10" / "trainer_state.json"
    assert load_history(run) == DDP
    with pytest.raises(FileNotFoundError, match="no trainer_state.json"):
        find_state_file(tmp_path / "missing")
    assert run_labels([tmp_path / "a" / "out", tmp_path / "b" / "out"]) == ["a/out", "b/out"]
    assert run_labels([tmp_path / "ddp", tmp_path / "diloco"]) == ["ddp", "diloco"]
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2


def test_plot_runs_without_importing_torch(tmp_path):
    """The package's names load lazily: plotting logs must not pay for importing torch and transformers."""
    import subprocess
    import sys

    run = write_run(tmp_path / "diloco", DILOCO)
    code = ("import sys; from hf_localsgd.tools import cli; "
            f"cli.main(['plot', {str(run)!r}, '--out', {str(tmp_path / 'figs')!r}]); "
            "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "figs" / "loss_vs_steps.png").is_file()
