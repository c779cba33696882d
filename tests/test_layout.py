"""The package's layers: the core needs torch alone, each room imports only the rooms below it, no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "hf_localsgd"
# room: the rooms it may import from
LAYERS = {"core": {"core"}, "integrations": {"core", "integrations"},
          "recipes": {"core", "integrations", "recipes"}, "tools": {"core", "integrations", "recipes", "tools"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The hf_localsgd modules ``path`` imports, anywhere in it but under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skipped = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
               and getattr(stmt.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("hf_localsgd"):
                for alias in node.names:  # `from . import console` imports a module
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                              else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hf_localsgd")}
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_core_imports_torch_alone():
    core = sorted(m for m in MODULES if m.startswith("hf_localsgd.core"))
    code = (f"import sys\nfor m in {core!r}: __import__(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'accelerate', 'datasets', "
            "'tokenizers', 'evaluate', 'yaml'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.count(".") >= 2))
def test_each_room_imports_only_the_rooms_below_it(module):
    room = module.split(".")[1]
    for imported in imports_of(MODULES[module]):
        # `from .. import X` (the top-level package, whose names load any room lazily) is no way around it
        other = imported.split(".")[1] if imported.count(".") >= 1 else "the top-level package"
        assert other in LAYERS[room], f"{module} imports {imported}"


def test_no_import_cycles():
    graph = {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    # a package imports its own __init__ on the way; only module-to-module edges below it count
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for dep in graph[m]:
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [m, dep])
            if dep not in state:
                visit(dep, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 400, f"{path.name}: split it by responsibility"
