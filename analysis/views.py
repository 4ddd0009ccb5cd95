"""SQL tables and views of the analyses, created with the store schema (see `store.SCHEMA_SQL`).

Why views: every analysis reads the same few relations, so a user with only the DuckDB file can
query them directly (`transferlab sql "SELECT * FROM commutativity"`), and the Python API is a thin
layer of parameterised SQL over them. Everything here is idempotent (IF NOT EXISTS / OR REPLACE).

Relations:
  imports             one row per imported file: provenance, path, sha256, rows kept / skipped
  selector_scores     F(source -> target) of every stored selector, with method and params
  task_sizes          training-set sizes (SIZE baseline), imported or taken from source runs
  source_pools        named candidate-source pools (`evaluate-selection --pool`), e.g. Lin et al.'s Table 3
  target_hparams      pinned hyper-parameter config per (setup, target) for target performance
  setup_transfers     transfer scores of the real setups (not the published 'all:all' average)
  analysis_transfers  setup_transfers plus the pseudo-setup 'mean' (average over real setups)
  commutativity       per setup, every unordered pair with both directions and whether signs agree
  transitive_triples  per setup, every (A, B, C) with A->B, B->C and A->C known
  setup_similarity    normalised dot product (cosine) of two setups' transfer matrices
  target_performance  mean over seeds of p(m_{s->t}) per (setup, source, target), one hparam config
  multitask_selections  which source-set choice of a multi-task sweep asked for which run (rayjobs.multitask)
  multitask_runs / _scores / _table / _topk / _bottom_random / _mix_curve
                      zero-shot target scores per choice: paper 000 Tables 3, 4, 5 and Figure 4
"""

ANALYSIS_SQL = """
CREATE TABLE IF NOT EXISTS imports (
    provenance VARCHAR PRIMARY KEY, path VARCHAR, sha256 VARCHAR,
    n_rows BIGINT, n_skipped BIGINT, imported_at TIMESTAMP);

CREATE TABLE IF NOT EXISTS selector_scores (
    selector VARCHAR, method VARCHAR, params JSON, source VARCHAR, target VARCHAR,
    score DOUBLE, details JSON, provenance VARCHAR,
    PRIMARY KEY (selector, source, target));

CREATE TABLE IF NOT EXISTS task_sizes (
    task VARCHAR, n_train BIGINT, provenance VARCHAR, PRIMARY KEY (task, provenance));

-- Named candidate pools: evaluating with `--pool NAME` ranks only these sources for every target.
CREATE TABLE IF NOT EXISTS source_pools (
    pool VARCHAR, source VARCHAR, provenance VARCHAR, PRIMARY KEY (pool, source));

-- Which hyper-parameter config of a target counts as "the" transfer run when a release holds
-- several (TaskWeb's t5l copa: batch sizes 8 and 32; its configs/t5l_finetune.json names 8).
CREATE TABLE IF NOT EXISTS target_hparams (
    setup VARCHAR, target VARCHAR, hparams VARCHAR, provenance VARCHAR, PRIMARY KEY (setup, target));

-- Directional score actually used by a selector: symmetric selectors (LLM-similarity in TaskWeb)
-- average both directions.
CREATE OR REPLACE VIEW selector_pair_scores AS
SELECT s.selector, s.source, s.target,
       CASE WHEN coalesce(TRY_CAST(json_extract_string(s.params, '$.symmetric') AS BOOLEAN), false)
                 AND r.score IS NOT NULL
            THEN (s.score + r.score) / 2 ELSE s.score END AS score
FROM selector_scores s
LEFT JOIN selector_scores r ON r.selector = s.selector AND r.source = s.target AND r.target = s.source
WHERE s.source <> s.target;

CREATE OR REPLACE VIEW setup_transfers AS
SELECT setup, model, adaptation, source, target, pc, pm, score, n_seeds, provenance
FROM transfer_scores
WHERE source <> target AND NOT (model = 'all' AND adaptation = 'all');

CREATE OR REPLACE VIEW analysis_transfers AS
SELECT setup, source, target, score FROM setup_transfers
UNION ALL
SELECT 'mean' AS setup, source, target, avg(score) AS score FROM setup_transfers GROUP BY source, target;

CREATE OR REPLACE VIEW commutativity AS
SELECT a.setup, a.source AS task_a, a.target AS task_b, a.score AS score_ab, b.score AS score_ba,
       (a.score > 0) = (b.score > 0) AS commutative
FROM analysis_transfers a
JOIN analysis_transfers b ON b.setup = a.setup AND b.source = a.target AND b.target = a.source
WHERE a.source < a.target;

CREATE OR REPLACE VIEW transitive_triples AS
SELECT ab.setup, ab.source AS a, ab.target AS b, bc.target AS c,
       ab.score AS score_ab, bc.score AS score_bc, ac.score AS score_ac
FROM analysis_transfers ab
JOIN analysis_transfers bc ON bc.setup = ab.setup AND bc.source = ab.target
JOIN analysis_transfers ac ON ac.setup = ab.setup AND ac.source = ab.source AND ac.target = bc.target
WHERE ab.source <> bc.target;

CREATE OR REPLACE VIEW setup_similarity AS
SELECT x.setup AS setup_a, y.setup AS setup_b, count(*) AS n_pairs,
       sum(x.score * y.score) / sqrt(sum(x.score * x.score) * sum(y.score * y.score)) AS similarity
FROM setup_transfers x
JOIN setup_transfers y ON y.source = x.source AND y.target = x.target
GROUP BY x.setup, y.setup;

CREATE OR REPLACE VIEW transfer_runs AS
SELECT setup, source, target, seed, score, coalesce(CAST(json(hparams) AS VARCHAR), '{}') AS hparams,
       provenance, run_key
FROM runs
WHERE kind = 'transfer' AND status = 'ok' AND score IS NOT NULL;

-- Per (setup, target): the pinned config, else the one with the most runs (ties: smallest JSON).
-- Configs compare as minified JSON text, so writers must sort keys (json.dumps(sort_keys=True)).
CREATE OR REPLACE VIEW canonical_hparams AS
WITH counts AS (SELECT setup, target, hparams, count(*) AS n FROM transfer_runs GROUP BY ALL),
     auto AS (SELECT setup, target, hparams FROM (
                  SELECT *, row_number() OVER (PARTITION BY setup, target ORDER BY n DESC, hparams) AS rn
                  FROM counts) WHERE rn = 1)
SELECT a.setup, a.target, coalesce(CAST(json(p.hparams) AS VARCHAR), a.hparams) AS hparams,
       coalesce(p.provenance, 'most runs') AS chosen_by
FROM auto a LEFT JOIN target_hparams p USING (setup, target);

-- Mean over seeds of the transfer runs' task metric, from the canonical config of the target
-- (a pair without a run in that config falls back to its own most-run config).
CREATE OR REPLACE VIEW target_performance AS
WITH g AS (SELECT setup, source, target, hparams, avg(score) AS perf, count(*) AS n_seeds,
                  min(provenance) AS provenance
           FROM transfer_runs GROUP BY setup, source, target, hparams),
     ranked AS (SELECT g.*, row_number() OVER (
                    PARTITION BY g.setup, g.source, g.target
                    ORDER BY coalesce(g.hparams = c.hparams, false) DESC, g.n_seeds DESC, g.hparams) AS rn
                FROM g LEFT JOIN canonical_hparams c ON c.setup = g.setup AND c.target = g.target)
SELECT setup, source, target, perf, n_seeds, hparams, provenance FROM ranked WHERE rn = 1;

-- Multi-task sweeps (rayjobs.multitask, paper 000 sections 5.2-5.3). Which source-set choice asked
-- for which run: two choices that yield the same set share one run key (trained once), so the
-- choice lives here, written by the job at plan time, rather than on the run row.
CREATE TABLE IF NOT EXISTS multitask_selections (
    experiment VARCHAR, setup VARCHAR, target VARCHAR, selection VARCHAR, seed INTEGER,
    method VARCHAR, selector VARCHAR, selection_setup VARCHAR, k INTEGER, replaced INTEGER,
    sources VARCHAR[], run_key VARCHAR,
    PRIMARY KEY (experiment, setup, target, selection, seed));

-- One row per (choice, seed) with its finished run; per-prompt zero-shot scores from the metrics.
CREATE OR REPLACE VIEW multitask_runs AS
SELECT m.experiment, m.setup, m.target, m.selection, m.method, m.selector, m.selection_setup, m.k,
       m.replaced, m.seed, m.sources, r.score, r.metric,
       CAST(json_extract(r.metrics, '$.prompt_scores') AS DOUBLE[]) AS prompt_scores,
       r.n_train, r.run_key
FROM multitask_selections m JOIN runs r ON r.run_key = m.run_key
WHERE r.kind = 'multitask' AND r.status = 'ok' AND r.score IS NOT NULL;

-- Mean over seeds per (experiment, setup, selection, target).
CREATE OR REPLACE VIEW multitask_scores AS
SELECT experiment, setup, selection, method, selector, selection_setup, k, replaced, target,
       avg(score) AS score, stddev_samp(score) AS sd, count(*) AS n_seeds
FROM multitask_runs GROUP BY ALL;

-- Table 3: one row per selection, the score of every target and their mean (a wide table:
-- PIVOT multitask_scores ON target USING first(score) GROUP BY selection). Not grouped by k: an
-- `all` / `top-all` set is one row although its size differs between targets when the pool holds
-- some targets (k is then NULL; the selection name says what it is).
CREATE OR REPLACE VIEW multitask_table AS
SELECT experiment, setup, selection, method, selector, selection_setup,
       CASE WHEN min(k) = max(k) THEN min(k) END AS k, replaced,
       map(list(target ORDER BY target), list(score ORDER BY target)) AS by_target,
       avg(score) AS mean, count(*) AS n_targets, min(n_seeds) AS min_seeds
FROM multitask_scores GROUP BY experiment, setup, selection, method, selector, selection_setup, replaced;

-- Table 4: top-k sets of each selector, by k.
CREATE OR REPLACE VIEW multitask_topk AS
SELECT experiment, setup, selector, selection_setup, k, selection, by_target, mean, n_targets
FROM multitask_table WHERE method = 'top';

-- Table 5: the selector's top-k next to its bottom-k and random-k sets of the same size.
CREATE OR REPLACE VIEW multitask_bottom_random AS
SELECT experiment, setup, method, selector, selection_setup, k, selection, by_target, mean, n_targets
FROM multitask_table WHERE method IN ('top', 'bottom', 'random');

-- Figure 4: score as the top-k are replaced one at a time by the bottom-k, and the change from top-k.
CREATE OR REPLACE VIEW multitask_mix_curve AS
SELECT s.experiment, s.setup, s.selector, s.selection_setup, s.target, s.k, s.replaced, s.score,
       s.score - z.score AS change, s.n_seeds
FROM multitask_scores s
LEFT JOIN multitask_scores z
  ON z.method = 'mix' AND z.replaced = 0 AND z.experiment = s.experiment AND z.setup = s.setup
     AND z.selector = s.selector AND z.selection_setup IS NOT DISTINCT FROM s.selection_setup
     AND z.target = s.target AND z.k = s.k
WHERE s.method = 'mix';
"""
