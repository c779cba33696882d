"""`hf-localsgd advise`: the table of Eq. 16 of "On the Choice of Learning Rate for Local SGD" from hand-picked times, and a real measurement on 2 CPU
processes whose printed table must parse and agree with its JSON."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, accelerate_launch
from hf_localsgd.tools import cli
from hf_localsgd.tools.advise import advice, format_table, recommendation


DEMO = ROOT / "recipes" / "gptneo-tinystories" / "demo.yaml"
ROW = re.compile(r"^\s*(\d+)\s+([\d.]+) (ms|s)\s+([\d.]+)x\s+([\d.]+)%\s+([\d.]+) (B|kB|MB|GB)\s+([\d.]+)%")


def parse_rows(text: str) -> dict[int, dict]:
    rows = {}
    for line in text.splitlines():
        if match := ROW.match(line):
            h, t, t_unit, speedup, overhead, sent, sent_unit, saved = match.groups()
            rows[int(h)] = {"seconds": float(t) * (1e-3 if t_unit == "ms" else 1), "speedup": float(speedup),
                            "overhead": float(overhead) / 100, "saved": float(saved) / 100}
    return rows


def test_table_from_hand_values():
    # m = 0.4 / 0.1 = 4: the paper's regime where local SGD pays off
    result = advice(t_step=0.1, t_comm=0.4, comm_bytes=1e6, sync_every_values=[64, 1, 4, 16, 32])
    assert result["m"] == pytest.approx(4)
    rows = {row["sync_every"]: row for row in result["rows"]}
    assert list(rows) == [1, 4, 16, 32, 64]  # sorted
    assert rows[1]["seconds_per_step"] == pytest.approx(0.5) and rows[1]["speedup_vs_every_step"] == 1
    assert rows[4]["seconds_per_step"] == pytest.approx(0.2) and rows[4]["speedup_vs_every_step"] == pytest.approx(2.5)
    assert rows[16]["overhead"] == pytest.approx(0.25) and rows[16]["bytes_per_step"] == pytest.approx(62_500)
    assert rows[64]["communication_saved"] == pytest.approx(63 / 64)
    assert result["recommended_sync_every"] == 64  # the smallest H with m / H <= 10%: 4 / 32 = 12.5% is not
    assert advice(0.1, 0.4, 1e6, [1, 4, 16, 32], max_overhead=0.25)["recommended_sync_every"] == 16
    assert advice(0.1, 0.4, 1e6, [1, 4, 16])["recommended_sync_every"] is None
    with pytest.raises(ValueError):
        advice(0.0, 0.4, 1e6)


def test_recommendation_follows_m():
    cheap = recommendation(advice(t_step=0.1, t_comm=0.001, comm_bytes=1e6))
    assert "m = 0.01" in cheap and "data-parallel" in cheap
    costly = recommendation(advice(t_step=0.1, t_comm=0.4, comm_bytes=1e6))
    assert "sync_every = 64" in costly and "2-4" not in costly
    middling = recommendation(advice(t_step=0.1, t_comm=0.1, comm_bytes=1e6))  # m = 1: H = 16, with the caveat
    assert "sync_every = 16" in middling and "m >= 2-4" in middling
    hopeless = recommendation(advice(t_step=0.1, t_comm=100.0, comm_bytes=1e6))
    assert "even H = 512 leaves 195% overhead" in hopeless
    for text in (cheap, costly, middling, hopeless):  # larger H may need more steps: always said
        assert "more steps" in text


def test_table_text_parses_and_marks_the_recipe_h():
    result = advice(t_step=0.1, t_comm=0.4, comm_bytes=1e6)
    text = format_table(result, configured_sync_every=16)
    rows = parse_rows(text)
    assert sorted(rows) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert rows[4]["seconds"] == pytest.approx(0.2) and rows[4]["speedup"] == 2.5 and rows[4]["saved"] == 0.75
    assert [line for line in text.splitlines() if "<- recipe" in line][0].split()[0] == "16"
    assert "m = t_comm / t_step = 4" in text


def test_cli_lists_and_dispatches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "advise" in out and "plot" in out
    for command, flag in (("advise", "--timing_steps"), ("plot", "--compare")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out


def test_advise_measures_on_two_processes(tmp_path):
    report = tmp_path / "advise.json"
    proc = accelerate_launch(
        ["-m", "hf_localsgd", "advise", str(DEMO), "--timing_steps", "3", "--timing_warmup", "1",
         "--sync_every_values", "1", "4", "16", "64", "--per_device_train_batch_size", "4", "--block_size", "32",
         "--json", str(report)],
        timeout=180,
    )
    result = json.loads(report.read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo" and result["comm_dtype"] == "float32"
    assert len(result["step_samples_s"]) == len(result["comm_samples_s"]) == 3
    assert result["t_step_s"] > 0 and result["t_comm_s"] > 0 and result["m"] > 0
    assert result["comm_bytes"] == 4 * result["num_parameters"]

    rows = parse_rows(proc.stdout)  # only rank 0 prints: one table
    assert sorted(rows) == [1, 4, 16, 64] and proc.stdout.count("m = t_comm / t_step") == 1
    printed_m = float(re.search(r"m = t_comm / t_step = ([\d.e+-]+)", proc.stdout).group(1))
    assert printed_m == pytest.approx(result["m"], rel=1e-3) and printed_m > 0
    for row in result["rows"]:  # the table is Eq. 16 applied to the two measured medians
        h = row["sync_every"]
        assert row["seconds_per_step"] == pytest.approx(result["t_step_s"] * (1 + result["m"] / h))
        assert rows[h]["seconds"] == pytest.approx(row["seconds_per_step"], rel=0.01)
    assert "<- recipe" in proc.stdout and "more steps" in proc.stdout
