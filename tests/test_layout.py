"""The layers of the source tree hold: no import circle between modules (every import counted, those inside
functions and under TYPE_CHECKING too, so a function-local import never hides one), `analysis` imports
nothing of `rayjobs` or `serving`, `rayjobs` nothing of `serving`, nothing imports the console script's
module, the CLI's command groups come from entry points that resolve, and every import inside a function says
why it is there (`# lazy: <reason>`), so a function-local import is a kept-out heavy dependency, not a habit."""

from __future__ import annotations

import ast
import importlib
import subprocess
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
LAZY_MARK = "# lazy:"
# Files another helper is rewriting concurrently; their function-local imports get their reasons there. The lead
# empties this after merging both branches.


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


def unexplained_local_imports(source: str) -> list[int]:
    """Lines of imports inside a function or method body with no `# lazy:` reason on their line or the one above."""
    lines = source.splitlines()
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                here = lines[node.lineno - 1]
                above = lines[node.lineno - 2] if node.lineno > 1 else ""
                if LAZY_MARK not in here and LAZY_MARK not in above:
                    found.append(node.lineno)
    return sorted(set(found))  # a nested function's import is walked from each enclosing function


def test_the_lazy_import_checker_flags_an_unexplained_local_import() -> None:
    source = ("import json\n"
              "def f():\n"
              "    import torch  # lazy: torch stays out of start-up\n"
              "    # lazy: ray only on the cluster path\n"
              "    import ray\n"
              "    import yaml\n"
              "class C:\n"
              "    def m(self):\n"
              "        def inner():\n"
              "            from numpy import array\n"
              "        return inner\n")
    assert unexplained_local_imports(source) == [6, 10]


def test_every_function_local_import_states_why_it_is_lazy() -> None:
    bad = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            bad += [f"{rel}:{n}" for n in unexplained_local_imports(path.read_text())]
    assert bad == [], (f"function-local imports without a '{LAZY_MARK} <reason>' comment (hoist cheap ones to "
                       "the module top): " + ", ".join(bad))


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


def test_the_command_line_starts_without_torch() -> None:
    """`transferlab --help` and every command group's parser build without importing torch (seconds of start-up);
    the function-local imports marked `# lazy:` are what keeps it so."""
    # every job kind's module too, but embed: its config holds FUTE's SpaceSpec, defined beside the torch surrogates
    code = ("import sys, rayjobs.cli, analysis.cli.commands, serving.cli, rayjobs.pairwise, rayjobs.multitask, "
            "rayjobs.score, rayjobs.pvi, rayjobs.mtl, rayjobs.fewshot\n"
            "print(sorted(m for m in ('torch', 'transformers', 'ray.tune', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
