"""A results folder on a `pyarrow.fs` filesystem (s3://, gs://, hdfs://, file://), mirrored locally.

Why: a cluster without a shared filesystem still needs one place where every trial's files meet. The
layout is the local one (`runs/`, `predictions/`, `checkpoints/<key>/`, `embeddings/`); a trial works in
a node-local mirror, pulls the runs it starts from, and pushes its outputs with the run row last (one
object, written whole: still the commit marker); the driver pulls run rows and predictions into its own
mirror before it reads them and keeps the DuckDB file local. Connection options go in the URI the way
pyarrow reads them, e.g. `s3://bucket/exp?endpoint_override=http://127.0.0.1:9000&region=us-east-1`;
credentials come from the usual environment (AWS_ACCESS_KEY_ID, ...), never from configs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from analysis.errors import StoreError

#: folders a run's outputs live in, by kind of file
RUN_FILES = ("predictions/{key}.parquet", "embeddings/{key}.npy")
CHUNK = 1 << 20


class RemoteError(StoreError):
    """The remote results location cannot be reached or used (named in the message)."""


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def display(uri: str) -> str:
    """The URI without its query (connection options) for messages and logs."""
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def node_mirror(uri: str) -> Path:
    """This node's local mirror of a remote results location (the same on every node, per URI)."""
    root = Path(os.environ.get("TRANSFERLAB_MIRROR", Path(tempfile.gettempdir()) / "transferlab-mirror"))
    return root / hashlib.sha256(uri.encode()).hexdigest()[:16]


class RemoteResults:
    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, base = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise RemoteError(f"cannot use results location {display(uri)}: {e}") from None
        self.base = base.rstrip("/")

    def _p(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def check(self) -> None:
        """Writable: create the prefix and put / delete a probe object, or say why not."""
        probe = self._p(f".probe-{uuid.uuid4().hex}")
        try:
            self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except (OSError, pa.ArrowException) as e:
            raise RemoteError(f"results location {display(self.uri)} is not writable: {e}") from None

    # -- files -------------------------------------------------------------------------------
    def put_file(self, local: Path, rel: str) -> None:
        with open(local, "rb") as src, self.fs.open_output_stream(self._p(rel)) as dst:
            shutil.copyfileobj(src, dst, CHUNK)

    def put_tree(self, local_dir: Path, rel: str) -> int:
        n = 0
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                self.put_file(p, f"{rel}/{p.relative_to(local_dir).as_posix()}")
                n += 1
        return n

    def get_file(self, rel: str, local: Path) -> None:
        """Download whole or not at all (temp file + rename), so a reader of the mirror never sees half."""
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as dst, self.fs.open_input_stream(self._p(rel)) as src:
                shutil.copyfileobj(src, dst, CHUNK)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def files(self, rel_dir: str) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self._p(rel_dir), allow_not_found=True, recursive=True)
        try:
            return [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        except (OSError, pa.ArrowException) as e:
            raise RemoteError(f"cannot list {display(self.uri)}/{rel_dir}: {e}") from None

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._p(rel)).type == pafs.FileType.File

    def pull_new(self, rel_dir: str, local_dir: Path) -> int:
        """Download the files of `rel_dir` that the mirror lacks or holds at another size; returns how many."""
        n = 0
        for info in self.files(rel_dir):
            rel = info.path[len(self.base) + 1:]
            dest = local_dir / Path(rel).relative_to(rel_dir)
            if not dest.is_file() or dest.stat().st_size != info.size:
                self.get_file(rel, dest)
                n += 1
        return n

    # -- one run's files ---------------------------------------------------------------------
    def push_run(self, root: Path, key: str) -> None:
        """A run's outputs, its row last (the commit marker: a reader that sees it sees the rest)."""
        for pattern in RUN_FILES:
            rel = pattern.format(key=key)
            if (root / rel).is_file():
                self.put_file(root / rel, rel)
        if (root / "checkpoints" / key).is_dir():
            self.put_tree(root / "checkpoints" / key, f"checkpoints/{key}")
        row = f"runs/{key}.parquet"
        if (root / row).is_file():
            self.put_file(root / row, row)

    def pull_run(self, root: Path, key: str, checkpoint: bool = True) -> bool:
        """A stored run's row, predictions, vector and (with `checkpoint`) checkpoint into the mirror;
        False when the remote has no row for it."""
        row = f"runs/{key}.parquet"
        if not self.exists(row):
            return False
        for pattern in RUN_FILES:
            rel = pattern.format(key=key)
            if not (root / rel).is_file() and self.exists(rel):
                self.get_file(rel, root / rel)
        if checkpoint:
            self.pull_new(f"checkpoints/{key}", root / "checkpoints" / key)
        self.get_file(row, root / row)
        return True
