"""Import Lin et al. (2024, "intermediate-task selection with soft prompts", paper 001): the T5-base
prompt-transfer results of its Table 7, the task sizes, and the source pools of its Table 3.

Why: Lin et al. evaluate selectors (RANDOM, SIZE, SEMB, FEATURE, MAX) on 13 source x 10 target
prompt transfers; with their results in the store every selector and both metric families
(`evaluate-selection --metrics taskweb|lin`) run on them like on TaskWeb's or local results.

What lands where (setup `prompt_tuning:t5b`, provenance `its:<file>`; re-importing replaces it):
  prompt_transfer_t5base.csv (source,target,mean_score,std_score; percent, mean and std of 3 runs)
    no_transfer_text rows     -> runs, kind 'target': the target-only baseline (PROMPT-TEXT, the
                                 tuned baseline Lin et al. compare against), hparams {"labels": "text"}
    no_transfer_abstract rows -> runs, kind 'target', hparams {"labels": "abstract"}: kept, never a
                                 baseline
    the 130 transfer rows     -> runs, kind 'transfer', score = mean / 100 (the store's fractions), seed
                                 NULL (a published mean is one pseudo-seed), metrics {mean_score,
                                 std_score, n_runs}; absolute scores for the lin metrics and Regret@k
                              -> published_transfer_scores, the TaskWeb-style relative score:
                                 pc = (mean - baseline) / baseline and pm = 1 if mean > baseline else 0
                                 (TaskWeb's PM over the one pseudo-seed), so T = 0.5 pc + 0.5 (0.2 pm - 0.1)
    The transfer runs carry no baseline_run_key: the relative score is stored once, as published
    aggregates (as for TaskWeb); a link would make the store derive it a second time.
  task_sizes.csv              -> task_sizes (`import_task_sizes`, provenance sizes:task_sizes.csv)
  Table 3's pools             -> source_pools: its-classification, its-multiple-choice, its-qa (the
                                 sources of each task category of Table 6) and its-all.

Table 3's caption says "grouped by the target task category", but Table 6 puts 9 of the 10 targets in
Classification, COPA in Multiple Choice and none in QA, while Table 3 has a QA column; its values fit
pools of *source* candidates (the 2-source QA pool has the highest nDCG, the 13-source ALL pool the
highest regret), so the groups are stored as named source pools (`evaluate-selection --pool`).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from analysis.errors import AnalysisError
from analysis.importers.taskweb import (
    ImportReport,
    _check_float,
    _check_name,
    _parse,
    _sha256,
    _utcnow,
    import_task_sizes,
)
from analysis.store.duck import registered

ITS_FILE = "prompt_transfer_t5base.csv"
SIZES_FILE = "task_sizes.csv"
ITS_MODEL, ITS_ADAPTATION = "t5b", "prompt_tuning"
ITS_SETUP = f"{ITS_ADAPTATION}:{ITS_MODEL}"
BASELINE = "no_transfer_text"
OTHER_BASELINES = ("no_transfer_abstract",)
N_RUNS = 3  # "All reported scores are mean values obtained from three random restarts"
# Table 6: task category of the 13 source tasks
ITS_POOLS: dict[str, list[str]] = {
    "its-classification": ["mnli", "qqp", "qnli", "cxc", "sst2", "multirc"],
    "its-multiple-choice": ["record", "winogrande", "hellaswag", "cosmosqa", "race"],
    "its-qa": ["squad", "drop"],
}
ITS_POOLS["its-all"] = sorted(s for pool in ITS_POOLS.values() for s in pool)
POOL_PROVENANCE = "its:table3"
# Table 6: the metric of each target (the store records its name only)
ITS_METRICS = {"cola": "matthews", "stsb": "pearson_spearman", "mrpc": "f1_accuracy", "cb": "f1_accuracy"}


def _parse_transfers(con: duckdb.DuckDBPyConnection, path: Path) -> tuple[pa.Table, list[str]]:
    cols = ("source", "target", "mean_score", "std_score")
    baselines = ", ".join(f"'{b}'" for b in (BASELINE, *OTHER_BASELINES))
    # each row sees its target's first no_transfer_text mean (as text: the checks cast it)
    source = f"""(SELECT r.*, b.base FROM _raw r LEFT JOIN
                   (SELECT target, min_by(mean_score, _line) AS base FROM _raw WHERE source = '{BASELINE}'
                    GROUP BY target) b USING (target))"""
    checks = ([_check_name("source"), _check_name("target"), _check_float("mean_score", -100.0, 100.0),
               _check_float("std_score", 0.0)]
              + [f"""CASE WHEN source NOT IN ({baselines}) AND coalesce(TRY_CAST(base AS DOUBLE) <= 0, true)
                          THEN 'no positive {BASELINE} score for target ' || target END"""])
    select = ("source, target, CAST(mean_score AS DOUBLE) AS mean_score, CAST(std_score AS DOUBLE) AS std_score, "
              "TRY_CAST(base AS DOUBLE) AS base")
    return _parse(con, path, cols, checks, ["source", "target"], select, source)


def _write_its(con: duckdb.DuckDBPyConnection, good: pa.Table, n_bad: int, path: Path, prov: str) -> None:
    """In one transaction: replace this file's runs (baselines as kind 'target', labelled by prompt kind) and
    published PC / PM, the ITS source pools, and its `imports` row."""
    labels = {BASELINE: "text", **{b: b.removeprefix("no_transfer_") for b in OTHER_BASELINES}}
    is_base = "source IN (" + ", ".join(f"'{b}'" for b in labels) + ")"
    label = "CASE source " + " ".join(f"WHEN '{b}' THEN '{v}'" for b, v in labels.items()) + " END"
    metric = "CASE target " + " ".join(f"WHEN '{t}' THEN '{m}'" for t, m in ITS_METRICS.items()) + " ELSE 'accuracy' END"
    con.execute("BEGIN TRANSACTION")
    try:
        with registered(con, "_incoming", good):
            con.execute("DELETE FROM runs WHERE provenance = ?", [prov])
            con.execute(f"""
                INSERT INTO runs (run_key, experiment, kind, setup, model, adaptation, source, target, seed,
                                  hparams, metric, score, metrics, status, provenance, created_at)
                SELECT 'its-' || sha256($prov || '|' || source || '|' || target)[:24], 'its',
                       CASE WHEN {is_base} THEN 'target' ELSE 'transfer' END, $setup, $model, $adaptation,
                       CASE WHEN {is_base} THEN NULL ELSE source END, target, NULL,
                       CASE WHEN {is_base} THEN json_object('labels', {label}) END, {metric}, mean_score / 100,
                       json_object('mean_score', mean_score, 'std_score', std_score, 'n_runs', $n_runs),
                       'ok', $prov, now()::TIMESTAMP
                FROM _incoming""", {"prov": prov, "setup": ITS_SETUP, "model": ITS_MODEL,
                                     "adaptation": ITS_ADAPTATION, "n_runs": N_RUNS})
            con.execute("DELETE FROM published_transfer_scores WHERE provenance = ?", [prov])
            con.execute(f"""
                INSERT INTO published_transfer_scores (model, adaptation, source, target, pc, pm, provenance)
                SELECT $model, $adaptation, source, target, (mean_score - base) / base,
                       CASE WHEN mean_score > base THEN 1.0 ELSE 0.0 END, $prov
                FROM _incoming WHERE NOT ({is_base})""",
                        {"prov": prov, "model": ITS_MODEL, "adaptation": ITS_ADAPTATION})
        con.execute("DELETE FROM source_pools WHERE provenance = ?", [POOL_PROVENANCE])
        con.executemany("INSERT INTO source_pools VALUES (?, ?, ?)",
                        [(pool, s, POOL_PROVENANCE) for pool, srcs in ITS_POOLS.items() for s in srcs])
        con.execute("INSERT OR REPLACE INTO imports VALUES (?, ?, ?, ?, ?, ?)",
                    [prov, str(path.resolve()), _sha256(path), good.num_rows, n_bad, _utcnow()])
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


def import_its(con: duckdb.DuckDBPyConnection, directory: str | Path, strict: bool = False) -> ImportReport:
    """Load Lin et al.'s Table 7 (and task sizes, pools) from `directory` into setup `prompt_tuning:t5b`."""
    root = Path(directory)
    if not root.is_dir():
        raise AnalysisError(f"ITS directory {root} does not exist")
    path = root / ITS_FILE
    if not path.is_file():
        raise AnalysisError(f"no {ITS_FILE} in {root} (Lin et al.'s Table 7)")
    prov = f"its:{ITS_FILE}"
    good, bad = _parse_transfers(con, path)
    report = ImportReport(skipped=list(bad))
    if strict and bad:
        raise AnalysisError(f"{len(bad)} malformed rows, nothing imported:\n  " + "\n  ".join(bad[:20]))
    sizes = root / SIZES_FILE
    if sizes.is_file():  # first: with strict=True a malformed sizes file stops the import before any write
        sub = import_task_sizes(con, sizes, strict=strict)
        report.kept.update(sub.kept)
        report.skipped += sub.skipped
    else:
        report.missing.append(SIZES_FILE)
    _write_its(con, good, len(bad), path, prov)
    report.kept[ITS_FILE] = good.num_rows
    n_transfer, n_base = con.execute(
        "SELECT count(*) FILTER (WHERE kind = 'transfer'), count(*) FILTER (WHERE kind = 'target' "
        "AND json_extract_string(hparams, '$.labels') = 'text') FROM runs WHERE provenance = ?", [prov]).fetchone()
    report.notes.append(f"setup {ITS_SETUP}: {n_transfer} transfers, {n_base} {BASELINE} baselines; "
                        f"source pools {', '.join(ITS_POOLS)}")
    return report
