"""PNG figures from the logs of one or more runs: loss against steps and against bytes communicated, and
the outer-gradient cosine similarity and replica drift over training.

    hf-localsgd plot outputs/diloco --compare outputs/ddp            # writes outputs/diloco/plots/*.png
    python -m hf_localsgd.tools.plot RUN_DIR [--compare RUN_DIR ...] [--out DIR] [--params N]

Needs matplotlib (`pip install "hf_localsgd[plot]"`). A run directory is a Trainer `output_dir` (or one of its
`checkpoint-*` folders): everything is read from `trainer_state.json`'s `log_history`, so the figures can be
drawn after the fact, on another machine, with no model or data. Each run is labelled with its directory name.

- `loss_vs_steps.png`: training loss (lines) and held-out `eval_loss` (markers) against the optimizer step.
- `loss_vs_bytes.png`: the same losses against the bytes one rank has sent so far (log scale): what a
  loss costs in communication, where local SGD's savings show. A local-SGD run's bytes are its logged
  `local_sgd/bytes_total` (warm-up gradient all-reduces included); a run that logged none, e.g.
  `--trainer ddp`, is taken to be data-parallel and to send the same every step (see `resolve_ddp_bytes`).
- `cosine_drift.png`: `local_sgd/cosine_similarity` (mean pairwise cosine between replicas' outer gradients)
  and `local_sgd/drift` (mean squared distance of the replicas to their average before a sync) against the
  step; only written when some run logged them.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.metrics import logged


BYTES_TOTAL = logged("bytes_total")
BYTES_SENT = logged("bytes_sent")
DDP_BYTES_TOTAL = logged("ddp_bytes_total")
COSINE = logged("cosine_similarity")
DRIFT = logged("drift")
FIGSIZE = (6.4, 4.0)
DPI = 100  # with FIGSIZE, a figure of a few runs is a 30-60 KB PNG


@dataclass
class Run:
    """One run to draw: its directory, legend label, `log_history`, and what data-parallel training sends
    per step for it (bytes; `None` when unknown)."""

    dir: Path
    label: str
    history: list[dict]
    ddp_bytes_per_step: float | None = None

    @property
    def logged_bytes(self) -> bool:
        return any(BYTES_TOTAL in entry for entry in self.history)


def find_state_file(run_dir: Path) -> Path:
    """`run_dir/trainer_state.json`, or the latest checkpoint's while a run is still training (Trainer writes
    the top-level file only at the end)."""
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    checkpoints = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    if not checkpoints:
        raise FileNotFoundError(
            f"{run_dir}: no trainer_state.json (Trainer writes it in each checkpoint-*/ and, at the end of "
            "training, with trainer.save_state())"
        )
    return checkpoints[-1]


def load_history(run_dir: str | Path) -> list[dict]:
    """The `log_history` of a run directory (see `find_state_file`)."""
    with open(find_state_file(Path(run_dir)), encoding="utf-8") as f:
        return json.load(f)["log_history"]


def series(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the log entries that have `key`, in step order."""
    points = sorted((entry["step"], entry[key]) for entry in history if key in entry and "step" in entry)
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def logged_ddp_bytes_per_step(history: list[dict]) -> float | None:
    """What data-parallel training sends per step, as a local-SGD run logged it (`ddp_bytes_total / step`)."""
    steps, totals = series(history, DDP_BYTES_TOTAL)
    return float(totals[-1] / steps[-1]) if len(steps) and steps[-1] > 0 else None


def model_ddp_bytes_per_step(run_dir: str | Path, num_params: int | None = None) -> float | None:
    """One float32 gradient all-reduce's payload, 4 bytes per parameter: `num_params`, else the parameters of
    the model in `run_dir/config.json` (all trainable, as `hf_localsgd.train` trains them). `None` without
    either. A ring all-reduce over K ranks sends 2(K-1)/K times the payload: exactly it at K = 2."""
    if num_params is None:
        if not (Path(run_dir) / "config.json").is_file():
            return None
        from transformers import AutoConfig  # only here: the rest of the module needs no transformers

        from ..recipes.models import count_parameters

        num_params = count_parameters(AutoConfig.from_pretrained(run_dir))
    return 4.0 * num_params


def cumulative_bytes(history: list[dict], steps: np.ndarray, ddp_bytes_per_step: float | None) -> np.ndarray | None:
    """Bytes one rank has sent by the end of each of `steps`.

    With sync entries (`local_sgd/bytes_total`), bytes arrive in lumps at the syncs: a step gets the total of
    the last sync at or before it. Before the first sync, the run may have been in its data-parallel warm-up,
    whose traffic the first sync's total includes (total minus that sync's own `bytes_sent`); it is spread at
    `ddp_bytes_per_step` from step 1. Without sync entries the run is data-parallel: `ddp_bytes_per_step` per
    step. `None` when that rate is needed and unknown.
    """
    sync_steps, totals = series(history, BYTES_TOTAL)
    if not len(sync_steps):
        return None if ddp_bytes_per_step is None else steps * ddp_bytes_per_step
    index = np.searchsorted(sync_steps, steps, side="right") - 1  # last sync at or before each step
    out = np.where(index >= 0, totals[np.maximum(index, 0)], 0.0)
    _, sent = series(history, BYTES_SENT)
    warmup_bytes = totals[0] - (sent[0] if len(sent) else 0.0)
    if warmup_bytes > 0:
        before = index < 0
        rate = ddp_bytes_per_step or warmup_bytes / sync_steps[0]  # unknown rate: spread evenly
        out[before] = np.minimum(steps[before] * rate, warmup_bytes)
    return out


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Directory names; as many trailing path parts as it takes to tell the runs apart."""
    parts = [p.resolve().parts for p in run_dirs]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in run_dirs]


def resolve_ddp_bytes(runs: list[Run], num_params: int | None = None) -> list[str]:
    """Set each run's `ddp_bytes_per_step`; returns one note per run that logged no bytes.

    A local-SGD run logged it. A run that logged no bytes (`--trainer ddp`) is taken to be data-parallel; its
    rate is, in order: 4 B x `num_params` when given; the rate a compared local-SGD run logged (exact when
    the runs train the same model on as many ranks, which is what comparing them is for); 4 B x the
    parameters counted from its config.json.
    """
    notes = []
    for run in runs:
        run.ddp_bytes_per_step = logged_ddp_bytes_per_step(run.history)
    compared = next((run.ddp_bytes_per_step for run in runs if run.ddp_bytes_per_step), None)
    for run in runs:
        if run.logged_bytes:
            continue
        if compared is not None and num_params is None:
            run.ddp_bytes_per_step, source = compared, "the DDP bytes a compared local-SGD run logged"
        else:
            run.ddp_bytes_per_step, source = model_ddp_bytes_per_step(run.dir, num_params), "4 B x parameters"
        if run.ddp_bytes_per_step is None:
            notes.append(f"{run.label}: no local_sgd/bytes_total logged and no config.json to count parameters: "
                         "left out of loss_vs_bytes.png (pass --params N)")
        else:
            notes.append(f"{run.label}: no local_sgd/bytes_total logged, plotted as data-parallel: "
                         f"{run.ddp_bytes_per_step:,.0f} bytes per step ({source})")
    return notes


def _plot_losses(ax, runs: list[Run], x_of) -> bool:
    """Training loss as a line and eval loss as markers, one colour per run; `x_of(run, steps)` maps steps
    to the x axis (or returns None to leave the run out). Returns whether anything was drawn."""
    drawn = False
    for color, run in zip(_colors(), runs):
        for key, style in (("loss", {"lw": 1.2}), ("eval_loss", {"marker": "o", "ls": "--", "ms": 4})):
            steps, values = series(run.history, key)
            x = x_of(run, steps) if len(steps) else None
            if x is None:
                continue
            ax.plot(x, values, color=color, label=run.label if key == "loss" else f"{run.label} (eval)", **style)
            drawn = True
    return drawn


def _colors():
    # One colour per run, the same in every figure.
    from matplotlib import rcParams

    return itertools.cycle(rcParams["axes.prop_cycle"].by_key()["color"])


def _new_figure(rows: int = 1):
    # Figure without pyplot: no global state, no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * (1 + 0.5 * (rows - 1))), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps; the bytes figure replaces it
    return fig, axes


def plot_runs(runs: list[Run], out_dir: str | Path) -> list[Path]:
    """Write the figures for `runs` into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = out_dir / name
        fig.savefig(path)
        written.append(path)

    fig, (ax,) = _new_figure()
    _plot_losses(ax, runs, lambda run, steps: steps)
    ax.set(xlabel="optimizer step", ylabel="loss", title="Loss against steps")
    ax.legend(fontsize="small")
    save(fig, "loss_vs_steps.png")

    fig, (ax,) = _new_figure()
    if _plot_losses(ax, runs, lambda run, steps: _positive(cumulative_bytes(run.history, steps,
                                                                            run.ddp_bytes_per_step))):
        _bytes_axis(ax.xaxis)
        ax.set(xlabel="bytes sent per rank (cumulative)", ylabel="loss", title="Loss against communication")
        ax.legend(fontsize="small")
        save(fig, "loss_vs_bytes.png")

    tracked = [(color, run) for color, run in zip(_colors(), runs)
               if any(DRIFT in entry or COSINE in entry for entry in run.history)]
    if tracked:
        fig, (ax_cos, ax_drift) = _new_figure(rows=2)
        for color, run in tracked:
            for ax, key in ((ax_cos, COSINE), (ax_drift, DRIFT)):
                steps, values = series(run.history, key)
                if len(steps):
                    ax.plot(steps, values, color=color, marker=".", label=run.label)
        ax_cos.set(ylabel="cosine similarity", title="Replicas' outer gradients at each sync")
        ax_cos.axhline(0, color="0.7", lw=0.8)
        drifts = [series(run.history, DRIFT)[1] for _, run in tracked]
        if all(len(d) and (d > 0).all() for d in drifts):
            ax_drift.set_yscale("log")  # drift scales with the inner learning rate and H: orders of magnitude
        ax_drift.set(xlabel="optimizer step", ylabel="drift (mean ‖x_k − x̄‖²)")
        ax_cos.legend(fontsize="small")
        save(fig, "cosine_drift.png")
    return written


def _bytes_axis(axis) -> None:
    """Log scale (runs differ by up to a factor H), labelled in B / kB / MB; over less than two decades,
    also at 2x and 5x, else a short run would show one or no labelled tick."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    axis.axes.set_xscale("log")
    axis.set_major_formatter(EngFormatter(unit="B"))
    low, high = axis.axes.dataLim.intervalx
    if np.log10(high / low) < 2:
        axis.set_minor_locator(LogLocator(subs=(2, 5)))
        axis.set_minor_formatter(EngFormatter(unit="B"))
    else:
        axis.set_minor_formatter(NullFormatter())


def _positive(x: np.ndarray | None) -> np.ndarray | None:
    # A log axis cannot show 0 bytes (losses logged before a run's first communication): NaN leaves them out.
    return None if x is None else np.where(x > 0, x, np.nan)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-localsgd plot", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a Trainer output_dir (or a checkpoint-* folder in it)")
    parser.add_argument("--compare", nargs="+", action="extend", default=[], metavar="RUN_DIR",
                        help="more runs to overlay, e.g. a --trainer ddp baseline")
    parser.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/plots)")
    parser.add_argument("--params", type=int,
                        help="parameters of the model, for the bytes of runs that logged none (default: count "
                             "them from RUN_DIR/config.json)")
    return parser


def main(argv: list[str] | None = None) -> list[Path]:
    parser = _parser()
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        parser.error('needs matplotlib: pip install "hf_localsgd[plot]"')
    run_dirs = [Path(args.run_dir), *map(Path, args.compare)]
    runs = []
    for run_dir, label in zip(run_dirs, run_labels(run_dirs)):
        try:
            runs.append(Run(run_dir, label, load_history(run_dir)))
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"cannot read the logs of {run_dir}: {err}")
    for note in resolve_ddp_bytes(runs, args.params):
        print(note, file=sys.stderr)

    written = plot_runs(runs, args.out or run_dirs[0] / "plots")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
