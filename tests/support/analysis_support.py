"""Shared helpers of the analysis tests: where the reference data is, and one imported TaskWeb store.

The store is imported once per test process into a temporary folder (about two seconds) and
only read by the tests that use it; tests that write get their own store.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("TRANSFERLAB_DATA") or ROOT.parent / "shared" / "data")
TASKWEB = DATA / "taskweb"

needs_taskweb = pytest.mark.skipif(
    not (TASKWEB / "transfer_scores.csv").is_file(),
    reason=f"the TaskWeb release is not at {TASKWEB} (reference data of this workplace; set TRANSFERLAB_DATA)")


@functools.lru_cache(maxsize=1)
def pristine_taskweb_db() -> Path:
    """A store with exactly the TaskWeb release imported, which no test opens writable: copy it
    (`copy_db`) where a test needs to know what the store holds before it."""
    from analysis.importers.taskweb import import_taskweb
    from analysis.store.duck import open_store

    root = Path(tempfile.mkdtemp(prefix="transferlab-taskweb-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    db = root / "taskweb.duckdb"
    with open_store(db, create=True) as con:
        import_taskweb(con, TASKWEB)
    return db


@functools.lru_cache(maxsize=1)
def taskweb_db() -> Path:
    """A shared store with the TaskWeb release imported. Tests that compute selectors store them here
    (a cache others may reuse), so its selector_scores grow during a session; see pristine_taskweb_db."""
    root = Path(tempfile.mkdtemp(prefix="transferlab-taskweb-shared-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return copy_db(pristine_taskweb_db(), root)


def copy_db(src: Path, dest_dir: Path) -> Path:
    """A private writable copy of a store."""
    dest = dest_dir / src.name
    shutil.copy(src, dest)
    return dest
