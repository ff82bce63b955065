"""The house plan, checked: flopwise's modules import only downward, and no two modules import each other.

The layer order is written once, here (docs/ARCHITECTURE.md shows the same table). Every import of a
flopwise module counts, at the top of a file or inside a function.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "flopwise"

# lowest first; a module may import its own layer and those before it
LAYERS = [
    ("base", ("flopwise", "flopwise.errors", "flopwise.fsutil", "flopwise.progress", "flopwise.cbuild")),
    ("laws", ("flopwise.laws",)),
    ("data", ("flopwise.data",)),
    ("model", ("flopwise.model",)),
    ("run", ("flopwise.config", "flopwise.run")),
    ("infer", ("flopwise.infer",)),
    ("training", ("flopwise.training",)),
    ("sweep", ("flopwise.sweep",)),
    ("report", ("flopwise.report",)),
    ("autopilot", ("flopwise.autopilot",)),
    ("api", ("flopwise.api",)),
    ("cli", ("flopwise.cli", "flopwise.__main__")),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names ``module`` (flopwise.training.probe -> train)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len and (p != "flopwise" or
                                                                                   module == "flopwise"):
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/ARCHITECTURE.md)")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """flopwise modules ``source`` imports (``from flopwise.x import y`` counts y when it is a module)."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "flopwise"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] == "flopwise":
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = imports_of(path.read_text(), mod, path.name == "__init__.py")
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports and import circles (a package importing its own submodules is not a circle)."""
    out = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]}), a higher layer"
           for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)]
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                out.append("import circle: " + " -> ".join(path[path.index(d):] + [m, d]))
            elif d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    return out


def test_flopwise_imports_only_downward_and_has_no_circles():
    graph = import_graph(ROOT)
    assert len(graph) > 40  # the walk found the package
    assert violations(graph) == []


@pytest.mark.parametrize("files,expected", [
    ({"laws/bad.py": "from flopwise.training.trainer import train\n"},
     "flopwise.laws.bad (laws) imports flopwise.training.trainer (training), a higher layer"),
    ({"infer/bad.py": "def f():\n    from flopwise.training import trainer\n"}, "imports flopwise.training.trainer"),
    ({"training/a.py": "from flopwise.training import b\n", "training/b.py": "import flopwise.training.a\n"},
     "import circle"),
])
def test_the_check_catches_upward_imports_and_circles(tmp_path, files, expected):
    root = tmp_path / "flopwise"
    for name in ("laws", "training", "infer", "run"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "__init__.py").write_text("")
    (root / "training" / "trainer.py").write_text("from flopwise.laws import flops\n")
    (root / "laws" / "flops.py").write_text("")
    for rel, text in files.items():
        (root / rel).write_text(text)
    found = violations(import_graph(root))
    assert any(expected in v for v in found), found
    clean = tmp_path / "clean" / "flopwise"
    (clean / "training").mkdir(parents=True)
    (clean / "laws").mkdir()
    (clean / "training" / "trainer.py").write_text("from flopwise.laws import flops\n")
    (clean / "laws" / "flops.py").write_text("")
    assert violations(import_graph(clean)) == []
