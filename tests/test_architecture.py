"""The shape of the house, checked from the source: layers that import downward only, no import cycles, no
private name imported across modules, a headless core, one optimiser step, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_PACKAGES = ("ipywidgets", "plotly", "widgets", "IPython", "anywidget", "voila", "traitlets")

# Lower layers never import higher ones; a module may import its own layer (no cycles, checked apart).
LAYERS = [
    ("foundation", ("privacy", "errors", "methods", "task_table", "run_paths", "config", "catalog", "callbacks",
                    "kernels", "store")),
    ("records", ("data", "entities", "metrics", "tracking", "classical", "calibration", "slices")),
    ("models", ("models",)),
    ("tasks", ("tasks",)),
    ("loop", ("loop",)),
    ("services", ("launch", "predict", "robustness", "explain", "evaluate", "ensembles", "model_card", "export",
                  "ladder", "active", "deploy")),
    ("entry points", ("cli", "__init__", "__main__")),
]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in the file, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [a.name for a in node.names], node.lineno))
    return found


def _resolve(module: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The project modules an import statement loads (`from pkg import submodule` counts the submodule)."""
    hits = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
    return hits or ([module] if module in known else [])


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for rank, (_, members) in enumerate(LAYERS):
        if key in members:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


KNOWN = {**_modules("workbench"), **_modules("widgets")}
GRAPH = {m: sorted({t for mod, names, _ in _imports(m, p) for t in _resolve(mod, names, KNOWN)} - {m})
         for m, p in KNOWN.items()}


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in GRAPH[m]:
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def _is_ancestor(target: str, module: str) -> bool:
    """`workbench.tasks` imported by `workbench.tasks.chat` runs the package's __init__: an upward import."""
    return module.startswith(target + ".")


@pytest.mark.parametrize("module", sorted(m for m in KNOWN if m.startswith("workbench")))
def test_core_imports_downward_only(module):
    for target in GRAPH[module]:
        if target.startswith("workbench") and target != "workbench":
            assert not _is_ancestor(target, module), f"{module} imports its own package {target}"
            assert _layer(target) <= _layer(module), (
                f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]}), a layer above")


@pytest.mark.parametrize("module", sorted(KNOWN))
def test_no_private_name_crosses_modules(module):
    for imported, names, line in _imports(module, KNOWN[module]):
        if imported.split(".")[0] not in ("workbench", "widgets"):
            continue
        private = [n for n in names if n.startswith("_") and f"{imported}.{n}" not in KNOWN]
        assert not private, f"{KNOWN[module].relative_to(ROOT)}:{line} imports private {private} from {imported}"


@pytest.mark.parametrize("module", sorted(m for m in KNOWN if m.startswith("workbench")))
def test_core_never_imports_ui(module):
    for imported, _, line in _imports(module, KNOWN[module]):
        assert imported.split(".")[0] not in UI_PACKAGES, (
            f"{KNOWN[module].relative_to(ROOT)}:{line} imports {imported}: the core stays headless")


def test_one_place_steps_the_optimiser():
    places = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in (ROOT / "workbench").rglob("*.py")
              for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "step"
              and isinstance(n.func.value, ast.Attribute | ast.Name)
              and (getattr(n.func.value, "attr", None) or getattr(n.func.value, "id", "")).endswith("optimizer")]
    assert len(places) == 1, f"the optimiser is stepped in {places}: the loop alone should"


def test_no_function_in_the_core_is_longer_than_100_lines():
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in (ROOT / "workbench").rglob("*.py") for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 100]
    assert not long, "functions over 100 lines: " + "; ".join(long)


def test_no_helper_reads_a_callers_locals():
    uses = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in (ROOT / "workbench").rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "locals"]
    assert not uses, f"locals() passed around at {uses}"


def test_each_task_and_method_name_is_spelled_in_at_most_three_files():
    """One table per kind of thing: a task's or a method's name is spelled (as a quoted string) in its registry
    and at most two more files (its own module, a panel keyed by it); everything else reads the registry."""
    import re

    from workbench.methods import METHOD_NAMES
    from workbench.task_table import TASK_NAMES

    sources = {p: p.read_text(encoding="utf-8") for package in ("workbench", "widgets")
               for p in sorted((ROOT / package).rglob("*.py"))}
    spread = {}
    for name in (*TASK_NAMES, *METHOD_NAMES):
        quoted = re.compile(rf"[\"']{re.escape(name)}[\"']")
        spread[name] = sorted(str(p.relative_to(ROOT)) for p, text in sources.items() if quoted.search(text))
    too_many = {name: files for name, files in spread.items() if len(files) > 3}
    assert not too_many, too_many
    assert all(files for files in spread.values()), "every name is spelled in its registry"
