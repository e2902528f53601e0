"""The package's layers, read from its imports: no cycles, and no arrow pointing up.

A module may import modules of its own layer or below. The layers, bottom to top, are the
one list below; docs/development.md draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "recsys_pipeline"
LAYERS: list[tuple[str, set[str]]] = [
    (
        "foundations",
        {
            "errors",
            "redaction",
            "config",
            "airflow_sqlite",
            "trigger",
            "files",
            "state",
            "artifacts",
            "runs",
            "tables",
            "embeddings",
            "ranking",
            "sets",
            "hashing",
            "resources",
            "spark",
        },
    ),
    (
        "algorithms",
        {
            "events",
            "driver_ingest",
            "interactions",
            "als",
            "tuning",
            "refresh",
            "index",
            "drift",
            "evaluate",
            "recommendations",
            "validation",
            "synthetic",
            "content",
            "erasure",
        },
    ),
    ("artifacts and registry", {"tracking", "bundle", "registry"}),
    ("consumers", {"serving", "client", "rest", "pyfunc_entry", "replay", "doctor", "cli"}),
    ("stages", {"stages", "pipelines"}),
    ("entry points", {"jobs", "orchestration"}),
]


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for number, (_, members) in enumerate(LAYERS):
        if top in members:
            return number
    raise AssertionError(f"recsys_pipeline.{module} is in no layer: add it to LAYERS and docs/development.md")


def package_modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts): path
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py"
    }


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every ``recsys_pipeline`` module a file imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        for name in names:
            if name.startswith("recsys_pipeline."):
                module = name.removeprefix("recsys_pipeline.")
                if module in known:
                    found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer() -> None:
    for module in package_modules():
        layer_of(module)


def test_no_import_points_up_a_layer() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def test_imports_have_no_cycle() -> None:
    graph = import_graph()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            cycle = [*visiting[visiting.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "def f():\n    from recsys_pipeline.registry import download\n    import recsys_pipeline.als\n"
    )
    assert imported_modules(source, {"registry", "als"}) == {"registry", "als"}
