"""The layers of the source tree hold: no import circle between modules (every import counted, those inside
functions and under TYPE_CHECKING too, so a function-local import never hides one), `analysis` imports
nothing of `rayjobs` or `serving`, `rayjobs` nothing of `serving`, nothing imports the console script's
module, and the CLI's command groups come from entry points that resolve."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

PACKAGES = ("analysis", "rayjobs", "serving")
LAYER = {"analysis": 0, "rayjobs": 1, "serving": 2}
CLI = "rayjobs.cli"


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    files = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for n in names:
                target = resolve(n)
                if target and target != mod and not mod.startswith(target + "."):  # a package's own submodule
                    graph[mod].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_checker_finds_a_planted_circle_and_layer_break(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "analysis" / "a.py").write_text("def f():\n    from analysis.b import g\n")
    (tmp_path / "analysis" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                "    from analysis import a\nimport serving.x\n")
    (tmp_path / "serving" / "x.py").write_text("")
    graph = module_graph(tmp_path)
    assert circles(graph) == [["analysis.a", "analysis.b"]]
    assert "serving.x" in graph["analysis.b"]


def test_no_import_circle_between_modules() -> None:
    found = circles(module_graph(REPO))
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_lower_layers_import_nothing_above_them() -> None:
    graph = module_graph(REPO)
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                    if m != CLI and LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]])
    assert upward == []
    assert sorted(m for m, ts in graph.items() if CLI in ts) == []


def test_cli_commands_come_from_entry_points_that_resolve() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["scripts"]["transferlab"] == f"{CLI}:main"
    groups = meta["entry-points"]["transferlab.commands"]
    assert set(groups) == {"analysis", "serve"}
    for target in groups.values():
        module, _, fn = target.partition(":")
        assert callable(getattr(importlib.import_module(module), fn))
    from rayjobs import cli

    loaded = cli.command_groups()  # what the installed package's metadata says, not only the file
    assert {f"{f.__module__}:{f.__name__}" for f in loaded} == set(groups.values())
