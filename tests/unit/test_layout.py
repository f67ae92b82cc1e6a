"""The layout docs/design.md describes: packages in floors, no import circles, an engine alone."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The packages, bottom first: each may import only from those before it.
FLOORS = ["db", "completion_queue", "engine", "workers", "producer", "api", "bench", "cli"]

#: What the engine runs without: the queue side's libraries.
QUEUE_LIBRARIES = ["celery", "celery_batches", "kombu", "redis", "sqlalchemy", "alembic"]


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (migrations excluded)."""
    modules = {}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, at module level or inside functions alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, known) - {name} for name, path in modules.items()}


def floor(module: str) -> int:
    return FLOORS.index(module.split(".")[0])


def test_no_package_imports_one_above_it() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if floor(target) > floor(module)
    )
    assert not upward, "imports that run up the floors:\n" + "\n".join(upward)


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph()
    # A package imports its own modules (its __init__ exports them); a module that imports
    # its own package back would close a circle through it.
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_engine_imports_without_the_queue_side() -> None:
    # Given a Python where Celery, kombu, redis and SQLAlchemy cannot be imported
    blocker = textwrap.dedent(
        f"""
        import importlib.abc, pkgutil, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {QUEUE_LIBRARIES!r}:
                    raise ImportError(f"blocked: {{name}}")

        sys.meta_path.insert(0, Block())
        import engine
        for module in pkgutil.iter_modules(engine.__path__, "engine."):
            __import__(module.name)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("workers", "db")))
        """
    )
    # When every module of the engine package is imported there
    done = subprocess.run(
        [sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    # Then each imports, and none of them brings in the queue side's packages
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_worker_start_path_does_not_build_models() -> None:
    # The tiny model's builder is a fixture of the CLI and the tests, not of a worker.
    builders = {"engine.tiny", "engine.shapes"}
    reaching = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if module.split(".")[0] in ("engine", "workers")
        for target in targets & builders
        if module not in builders
    )
    assert not reaching, "the worker's modules import a model builder:\n" + "\n".join(reaching)


def test_no_package_imports_the_experiments() -> None:
    # benchmarks/ holds one-off comparisons, outside the wheel: nothing installed imports them.
    experiments = {
        "benchmarks",
        *(f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("*.py")),
    }
    importing = sorted(
        name for name, path in project_modules().items() if imports_of(path, experiments)
    )
    assert not importing, f"modules importing benchmarks/: {importing}"


def test_the_design_doc_opens_with_the_layout() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    layout = design.split("\n## ", 2)[1]
    for package in FLOORS:
        assert f"`{package}/`" in layout, f"docs/design.md's layout does not name {package}/"
