"""Docs cannot drift from the code: README's option table lists every option with its default."""

from dataclasses import MISSING, fields
from pathlib import Path

from hf_localsgd import LocalSGDArguments


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
