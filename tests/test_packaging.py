"""The distribution: the wheel `pip wheel` builds holds every package and subpackage of the three
top-level folders and its data files, and each imports from the wheel alone (an isolated sys.path: no
checkout, no PYTHONPATH); pyproject.toml declares what the code needs (the floors the code relies on)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("rayjobs", "analysis", "serving")
_SKIP_ANYWHERE = shutil.ignore_patterns(".git", ".venv", "venv", "*.egg-info", "__pycache__", ".pytest_cache",
                                       ".ruff_cache")
_SKIP_AT_ROOT = {"results", "reports", "build", "dist"}  # run outputs; `analysis/reports` is a package


def SKIP(folder: str, names: list[str]) -> set[str]:  # noqa: N802 - shutil.copytree's `ignore`
    skip = set(_SKIP_ANYWHERE(folder, names))
    return skip | (_SKIP_AT_ROOT & set(names) if Path(folder) == ROOT else set())


def subpackages() -> list[str]:
    return sorted(".".join(p.parent.relative_to(ROOT).parts) for top in TOP for p in (ROOT / top).rglob("__init__.py")
                  if "__pycache__" not in p.parts)


def test_the_wheel_holds_every_subpackage_and_each_imports_from_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)  # a clean copy: the build writes nothing into the checkout
    out = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = out.glob("transferlab-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    want = subpackages()
    assert "rayjobs.models" in want
    missing = [m for m in want if f"{m.replace('.', '/')}/__init__.py" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert {"rayjobs/tasks/registry.yaml", "serving/config.yaml"} <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "transferlab = rayjobs.cli:main" in (site / entry).read_text()

    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); bad = []\n"
            "for m in sys.argv[2:]:\n"
            "    f = importlib.import_module(m).__file__\n"
            "    bad += [] if f.startswith(sys.argv[1]) else [f'{m} from {f}']\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-I", "-c", code, str(site), *want], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


def test_pyproject_declares_the_ray_the_code_needs() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from packaging.requirements import Requirement

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {Requirement(d).name: Requirement(d) for d in meta["project"]["dependencies"]}
    ray = deps["ray"]
    assert {"tune", "serve", "train"} <= ray.extras  # Ray Train runs the distributed workers
    assert not ray.specifier.contains("2.59.0") and ray.specifier.contains("2.60.0")
    assert "torch" in deps and not any(c.strip().lower().startswith(("torch==", "nvidia-", "triton=="))
                                       for c in (ROOT / "constraints.txt").read_text().splitlines())
    assert "find" in meta["tool"]["setuptools"]["packages"]  # discovery, not a hand-kept list
