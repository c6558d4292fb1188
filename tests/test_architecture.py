"""The import structure: the layer contracts of pyproject.toml (import-linter) hold, and graft has
no import cycle (imports inside functions count; imports for type checking only do not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).parents[1]


def import_cycles(package: str = "graft") -> list[set[str]]:
    """The strongly connected components of ``package``'s import graph with more than one module
    (imports inside functions count; imports for type checking only do not)."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_the_layer_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_import_cycle() -> None:
    assert [sorted(c) for c in import_cycles()] == []


def test_the_cycle_finder_finds_cycles(tmp_path, monkeypatch) -> None:
    package = tmp_path / "looped"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from looped import b\n")
    (package / "b.py").write_text("from looped import a\n")
    (package / "c.py").write_text("from looped import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("looped") == [{"looped.a", "looped.b"}]


def test_the_contracts_keep_the_layers_and_every_task_apart() -> None:
    """The layers of the README's picture, and an independence contract over every registered task
    package: a task added to the registry but not to the contract would fail here."""
    import tomllib

    from graft.pipeline.registry import TASKS

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")
    assert [layer.split(" ")[0] for layer in layers["layers"]] == ["cli", "pipeline", "tasks", "engine", "configuration"]
    apart = next(c for c in contracts if c["type"] == "independence")
    assert sorted(apart["modules"]) == sorted(f"graft.tasks.{name}" for name in TASKS)


def test_only_task_packages_name_a_task_in_a_comparison() -> None:
    """Dispatch goes through the registry: no module outside ``graft/tasks/`` compares a task's
    name (``task == "detect"``), nor asks whether a model is a detector or a classifier."""
    import re

    from graft.pipeline.registry import TASKS

    names = "|".join(TASKS)
    compares = re.compile(rf"""[=!]=\s*["']({names})["']|["']({names})["']\s*[=!]=|isinstance\([^)]*Graft(Detector|Classifier)""")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "src" / "graft").rglob("*.py")) if "tasks" not in path.relative_to(ROOT / "src" / "graft").parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if compares.search(line)]
    assert offenders == []


def test_every_task_implements_the_whole_interface() -> None:
    """Each registered task has every attribute and method of ``TaskPackage``, with the same
    parameters (a contract test over all tasks, as timm's over all models)."""
    import inspect

    from graft.pipeline.registry import TASKS
    from graft.tasks.interface import TaskPackage

    attributes = [name for name in TaskPackage.__annotations__]
    methods = {name: inspect.signature(f) for name, f in vars(TaskPackage).items() if inspect.isfunction(f) and not name.startswith("_")}
    assert {"train", "expand", "load_run", "export_spec", "report_spec", "claims"} <= methods.keys()
    for name, task in TASKS.items():
        assert task.name == name
        assert all(isinstance(getattr(task, a, None), str) for a in attributes), [a for a in attributes if not isinstance(getattr(task, a, None), str)]
        for method, wanted in methods.items():
            got = inspect.signature(getattr(task, method))
            positional = [p for p in list(wanted.parameters)[1:] if wanted.parameters[p].kind is not inspect.Parameter.KEYWORD_ONLY]
            assert list(got.parameters)[: len(positional)] == positional, (name, method, got)
