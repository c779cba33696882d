"""Docs cannot drift from the code: README's option table, layout table and metric names match the package, and
the shipped docs stand alone (no pointers to files users do not have)."""

import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from hf_localsgd import LocalSGDArguments
from hf_localsgd.core.metrics import METRICS, PREFIX


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_option_table_matches_the_dataclass():
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip().strip("`")
            for line in README.splitlines() if line.startswith("| `")}
    for f in fields(LocalSGDArguments):
        assert f.name in rows, f"README's option table misses {f.name}"
        assert f.metadata.get("help"), f"{f.name} has no help text"
        if f.default is not None and f.default is not MISSING:
            assert rows[f.name] == str(f.default), f"README says {f.name} defaults to {rows[f.name]}"
        if "choices" in f.metadata:
            for choice in f.metadata["choices"]:
                assert f"`{choice}`" in README, f"README does not mention {f.name}={choice}"


def test_readme_layout_table_names_every_module_and_only_existing_ones():
    """Each row's first cell names paths; a bare file name is in the folder of the path before it."""
    layout = README[README.index("## Layout"):]
    named = set()
    for cell in re.findall(r"^\| (.+?) \|", layout, flags=re.M):
        folder = ""
        for path in re.findall(r"`([\w./]+)`", cell):
            if "/" not in path.rstrip("/"):
                path = f"{folder}/{path}" if folder else path
            if not (ROOT / path).exists() and (ROOT / "hf_localsgd" / path).exists():
                path = f"hf_localsgd/{path}"  # core/engine.py stands for hf_localsgd/core/engine.py
            assert (ROOT / path).exists(), f"README's layout names {path}, which does not exist"
            folder = path.rstrip("/") if path.endswith("/") else str(Path(path).parent)
            named.add(path.rstrip("/"))
    for module in (ROOT / "hf_localsgd").glob("*/*.py"):
        relative = module.relative_to(ROOT).as_posix()
        assert module.name == "__init__.py" or relative in named, f"README's layout table does not name {relative}"


def test_readme_monitoring_names_every_metric():
    monitoring = README[README.index("## Monitoring"):README.index("## Benchmarks")]
    for name in METRICS:
        assert f"`{PREFIX}{name}`" in monitoring or f"`{PREFIX}" in monitoring and f"`{name}`" in monitoring, name


def test_readme_deepspeed_table_matches_the_tests():
    """Every run README's DeepSpeed table names trains that ZeRO stage at that island size in the scenario and is
    launched by the default DeepSpeed tests, which run no other; the refused stage is refused in Failures."""
    section = README[README.index("### 7. DeepSpeed"):README.index("## Options")]
    scenario = (ROOT / "tests" / "scenarios" / "deepspeed_trainer.py").read_text()
    runs = {name: (int(stage), int(island)) for name, stage, island
            in re.findall(r'"(\w+)": \("zero(\d)\w*\.json", (\d)', scenario)}
    tests = (ROOT / "tests" / "distributed" / "test_deepspeed.py").read_text()
    launched = set(re.findall(r'"(\w+)"', re.search(r"^PAIRS = \[.*?\]", tests, re.M | re.S).group(0)))
    launched |= set(re.findall(r'"(\w+)"', re.search(r"^ISLANDS = \[.*?\]", tests, re.M | re.S).group(0)))
    named = set()
    for row in re.findall(r"^\| (\d) \| (.+?) \| (.+?) \|", section, flags=re.M):
        stage = int(row[0])
        for column, island_size in ((row[1], 1), (row[2], 2)):
            if stage == 3:
                assert column == "refused"
                continue
            assert column.startswith("tested: "), column
            for name in re.findall(r"`(\w+)`", column):
                assert runs[name] == (stage, island_size) and name in launched, name
                named.add(name)
    assert named == launched
    assert "`deepspeed: zero_optimization.stage=3: " in README[README.index("## Failures"):]


SHIPPED = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").rglob("*.md"),
           *(ROOT / "hf_localsgd").rglob("*.py"), *(ROOT / "recipes").rglob("*"), *(ROOT / "accelerate_configs").rglob("*"),
           *(ROOT / "examples").rglob("*.py"), *(ROOT / "bench").rglob("*"),
           *(ROOT / "reproductions").rglob("*.md"), *(ROOT / "reproductions").rglob("*.py")]


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.is_file()], ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_docs_stand_alone(path):
    """Users have neither the project's planning files nor its copies of the papers: cite papers by title.
    (The benchmarks' simulated slow link, ../shared/tools/wan, is test infrastructure they name on purpose.)"""
    text = path.read_text(errors="ignore")
    assert not re.search(r"\.\./shared(?!/tools/wan)|SPEC\.md|[Ss]eed 00\d", text), path
