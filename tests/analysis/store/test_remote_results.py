"""Results beyond a shared filesystem: `--results s3://...` against a local S3-compatible server (moto)
started here. Trials work in a node-local mirror and push their files; the driver keeps the DuckDB file
and a mirror of run rows and predictions locally; checkpoints live only in the bucket, and a later run
from a fresh folder resumes from the bucket alone and starts transfers from checkpoints it downloads."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.fs as pafs
import pytest

from tests.conftest import cli, needs_data, tiny_grid

pytestmark = needs_data

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[str, pafs.S3FileSystem]]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("tl-results")
    try:
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", fs
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _keys(fs: pafs.S3FileSystem, prefix: str) -> list[str]:
    sel = pafs.FileSelector(prefix, allow_not_found=True, recursive=True)
    return sorted(i.path[len(prefix) + 1:] for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)


def _runs(db: Path) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT kind, source, target, status FROM runs ORDER BY kind, source, target").fetchall()
    finally:
        con.close()


def test_results_in_s3_without_a_shared_folder_resume_from_the_bucket(s3: tuple[str, pafs.S3FileSystem],
                                                                       tmp_path: Path) -> None:
    query, fs = s3
    uri = f"s3://tl-results/exp?{query}"
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(tiny_grid("remote"))
    first, mirror = tmp_path / "first", tmp_path / "node-mirror"
    first.mkdir()
    env = {**os.environ, "TRANSFERLAB_MIRROR": str(mirror)}
    r = cli("run", str(cfg), "--results", uri, cwd=first, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "results at s3://tl-results/exp;" in r.stdout and "endpoint_override" not in r.stdout  # no options in logs
    stored = _keys(fs, "tl-results/exp")
    rows = [k for k in stored if k.startswith("runs/")]
    assert len(rows) == 6, (stored, r.stdout[-3000:])  # 2 sources, 2 baselines, 2 transfers
    assert {k.split("/")[1] for k in stored if k.startswith("checkpoints/")}  # the sources' checkpoints
    assert len([k for k in stored if k.startswith("predictions/")]) == 6
    # the driver: database and mirror of rows / predictions local, no checkpoint
    local = first / "results" / "remote"
    assert _runs(local / "transferlab.duckdb") == [
        ("source", "mrpc", None, "ok"), ("source", "snli", None, "ok"), ("target", None, "mrpc", "ok"),
        ("target", None, "snli", "ok"), ("transfer", "mrpc", "snli", "ok"), ("transfer", "snli", "mrpc", "ok")]
    assert not any((local / "checkpoints").glob("*/*"))
    assert sorted(p.name for p in (local / "runs").iterdir()) == sorted(Path(k).name for k in rows)
    st = cli("status", "--results", uri, cwd=tmp_path, env=env)  # from anywhere, through the bucket
    assert st.returncode == 0 and "finished: no planned run is missing" in st.stdout, st.stdout + st.stderr

    # a fresh driver folder and an empty node mirror: everything stored is found in the bucket, and the
    # new target's transfers start from source checkpoints downloaded from it
    shutil.rmtree(mirror)
    second = tmp_path / "second"
    second.mkdir()
    r = cli("run", str(cfg), "tasks={sources: [snli, mrpc], targets: [snli, mrpc, cb]}", "--results", uri,
            cwd=second, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "6 already stored, 3 to run" in r.stdout
    got = _runs(second / "results" / "remote" / "transferlab.duckdb")
    assert len(got) == 9 and all(s == "ok" for *_, s in got)
    assert {(k, s, t) for k, s, t, _ in got if t == "cb"} == {("target", None, "cb"), ("transfer", "snli", "cb"),
                                                              ("transfer", "mrpc", "cb")}
    node = next(mirror.iterdir())
    assert len(list((node / "checkpoints").iterdir())) == 2  # both sources pulled for their cb transfers
    assert len([k for k in _keys(fs, "tl-results/exp") if k.startswith("runs/")]) == 9


def test_an_unusable_bucket_is_a_clear_error_before_ray_starts(s3: tuple[str, pafs.S3FileSystem],
                                                               tmp_path: Path) -> None:
    query, _ = s3
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(tiny_grid("remote"))
    r = cli("run", str(cfg), "--results", f"s3://no-such-bucket/x?{query}", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "results location s3://no-such-bucket/x is not writable" in r.stderr
    assert "Traceback" not in r.stderr
