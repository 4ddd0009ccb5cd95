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
  setup_transfers     transfer scores of the real setups (not the published 'all:all' average), and
                      '<setup>@predicted' from predicted_transfer_scores (analysis.budget.store)
  analysis_transfers  setup_transfers plus the pseudo-setup 'mean' (average over real setups)
  commutativity       per setup, every unordered pair with both directions and whether signs agree
  transitive_triples  per setup, every (A, B, C) with A->B, B->C and A->C known
  setup_similarity    normalised dot product (cosine) of two setups' transfer matrices
  target_performance  mean over seeds of p(m_{s->t}) per (setup, source, target), one hparam config
  multitask_selections  which source-set choice of a multi-task sweep asked for which run (rayjobs.multitask)
  multitask_runs / _scores / _table / _topk / _bottom_random / _mix_curve
                      zero-shot target scores per choice: paper 000 Tables 3, 4, 5 and Figure 4
  pvi                 per held-out instance: PVI(x -> y) in bits from a 'pvi_x' / 'pvi_null' run pair (paper 003)
  pvi_tasks           per (setup, task): V-information = mean PVI over the held-out instances
  pvi_tests           every t-test / ANOVA between tasks' PVI distributions (filled by analysis.pvi.grouping)
  mtl_groups          which grouping (pvi, dissimilar, single, ...) asked for which MTL run (filled by the MTL job)
  t_quantiles         Student t quantiles for confidence intervals (filled from scipy by analysis.pvi.grouping)
  mtl_member_scores   accuracy and macro-F1 of each member task of an MTL run, from its predictions
  mtl_comparison      per grouping and member: mean over seeds, 95% CI, single-task baseline, difference
  task_embeddings     FUTE (paper 004): one row per stored dataset / model task embedding (rayjobs.embed):
                      its space, DTE or MTE, task, model, prompt, dims and vector file
  embedding_spaces    per space: name, spec, probe pool composition, counts of DTEs and MTEs
  tuned_configs       every searched source / baseline configuration (rayjobs.search_space) with its values,
                      status and validation score (`best_validation_score`, held out of the training sample)
  tuned_runs          per search (setup, stage, task, seed): the chosen configuration, best on validation
                      (ties: the first), which the transfers start from / train with
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

-- A fitted predictor's mean / sd per pair (analysis.budget.store); listed in setup_transfers as
-- setup '<setup>@predicted' so selectors can use the completed grid as T.
CREATE TABLE IF NOT EXISTS predicted_transfer_scores (
    setup VARCHAR, source VARCHAR, target VARCHAR, observed BOOLEAN, seeds_run INTEGER,
    mean DOUBLE, sd DOUBLE, p_best DOUBLE, provenance VARCHAR, PRIMARY KEY (setup, source, target));

CREATE OR REPLACE VIEW setup_transfers AS
SELECT setup, model, adaptation, source, target, pc, pm, score, n_seeds, provenance
FROM transfer_scores
WHERE source <> target AND NOT (model = 'all' AND adaptation = 'all')
UNION ALL
SELECT setup || '@predicted', split_part(setup, ':', 2) || '@predicted', split_part(setup, ':', 1), source, target,
       NULL, NULL, mean, seeds_run, provenance
FROM predicted_transfer_scores WHERE source <> target;

CREATE OR REPLACE VIEW analysis_transfers AS
SELECT setup, source, target, score FROM setup_transfers
UNION ALL
SELECT 'mean' AS setup, source, target, avg(score) AS score FROM setup_transfers
WHERE NOT ends_with(setup, '@predicted') GROUP BY source, target;

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

-- PVI (paper 003, Algorithm 1): PVI(x -> y) = -log2 g[null](y) + log2 g'[x](y), y = the gold choice.
-- A 'pvi_x' run (g') names its 'pvi_null' run (g) in baseline_run_key; both score the same held-out
-- examples. The null model's row of an example is the one with the same template, or its only row
-- when it scored one rendering (the empty input has no template of its own). Lists are 1-based.
-- A probability of 0 gives an infinite PVI; the analyses refuse those rather than drop them.
CREATE OR REPLACE VIEW pvi AS
WITH pairs AS (
    SELECT x.run_key AS key_x, n.run_key AS key_null, x.target AS task, x.setup, x.seed, x.experiment
    FROM runs x JOIN runs n ON n.run_key = x.baseline_run_key
    WHERE x.kind = 'pvi_x' AND n.kind = 'pvi_null' AND x.status = 'ok' AND n.status = 'ok'),
null_rows AS (
    SELECT key, task, example_id, split, template, probs,
           count(*) OVER (PARTITION BY key, task, example_id, split) AS n_renderings
    FROM predictions WHERE key IN (SELECT key_null FROM pairs))
SELECT p.task, px.example_id, px.split, p.setup, p.seed, px.template, px.gold,
       px.probs[px.gold + 1] AS prob_x, pn.probs[px.gold + 1] AS prob_null,
       -log2(pn.probs[px.gold + 1]) + log2(px.probs[px.gold + 1]) AS pvi,
       p.key_x, p.key_null, p.experiment
FROM pairs p
JOIN predictions px ON px.key = p.key_x AND px.task = p.task
JOIN null_rows pn ON pn.key = p.key_null AND pn.task = px.task AND pn.example_id = px.example_id
                 AND pn.split = px.split AND (pn.template = px.template OR pn.n_renderings = 1)
WHERE px.gold IS NOT NULL AND px.probs IS NOT NULL AND pn.probs IS NOT NULL;

-- V-information of a task (Ethayarajh et al.): the mean PVI over its held-out ('eval') instances;
-- v_info averages every seed's rows, v_info_sd_seeds is the spread of the per-seed means.
CREATE OR REPLACE VIEW pvi_tasks AS
WITH per_seed AS (
    SELECT setup, task, seed, avg(pvi) AS v_info, count(*) AS n
    FROM pvi WHERE split = 'eval' GROUP BY setup, task, seed),
rows_ AS (
    SELECT setup, task, count(DISTINCT (example_id, template)) AS n_instances, stddev_samp(pvi) AS sd_pvi,
           avg(pvi) AS v_info
    FROM pvi WHERE split = 'eval' GROUP BY setup, task)
SELECT r.setup, r.task, count(*) AS n_seeds, r.n_instances, r.v_info, stddev_samp(s.v_info) AS v_info_sd_seeds,
       r.sd_pvi
FROM rows_ r JOIN per_seed s USING (setup, task)
GROUP BY r.setup, r.task, r.n_instances, r.v_info, r.sd_pvi;

-- Every test between tasks' PVI distributions of one setup (analysis.pvi.grouping): pairs by Student's
-- (or Welch's) unpaired t-test with Cohen's d (pooled SD), larger sets by one-way ANOVA with eta-squared.
-- n per task is kept because a task with few instances passes any test.
CREATE TABLE IF NOT EXISTS pvi_tests (
    setup VARCHAR, tasks VARCHAR[], test VARCHAR, n INTEGER[], statistic DOUBLE, p DOUBLE,
    effect VARCHAR, effect_size DOUBLE, is_similar BOOLEAN, threshold DOUBLE, variant VARCHAR,
    seeds VARCHAR, computed_at TIMESTAMP);

-- Which grouping asked for which MTL (hard parameter sharing) run; written by the MTL job.
-- grouping: 'pvi' | 'dissimilar' | 'all' | 'random' | 'single' | 'embedding'.
CREATE TABLE IF NOT EXISTS mtl_groups (
    experiment VARCHAR, grouping VARCHAR, group_id VARCHAR, members VARCHAR[], run_key VARCHAR, seed INTEGER);

-- Student t quantiles (q, df) from scipy (analysis.pvi.grouping.ensure_t_quantiles); until filled, the
-- confidence intervals of mtl_comparison are NULL.
CREATE TABLE IF NOT EXISTS t_quantiles (q DOUBLE, df INTEGER, t DOUBLE, PRIMARY KEY (q, df));

-- Accuracy and macro-F1 of each member task of an MTL run on its held-out rows. Macro-F1 is the one
-- definition of analysis.classification.macro_f1 (the task metric's too): the mean of
-- F1_c = 2 TP_c / (#gold=c + #pred=c) over the classes present in gold or prediction (sklearn's
-- f1_score(average='macro') on the same rows); a missing prediction counts as wrong and is no class.
CREATE OR REPLACE VIEW mtl_member_scores AS
WITH p AS (
    SELECT r.experiment, r.setup, r.run_key, r.seed, r.sources, x.task, x.template, x.gold, x.prediction
    FROM runs r JOIN predictions x ON x.key = r.run_key
    WHERE r.kind = 'mtl' AND r.status = 'ok' AND x.split = 'eval' AND x.gold IS NOT NULL
      AND list_contains(r.sources, x.task)),
cm AS (
    SELECT experiment, setup, run_key, seed, sources, task, template, gold, prediction, count(*) AS n
    FROM p GROUP BY ALL),
per_class AS (
    SELECT run_key, task, template, c, sum(tp) AS tp, sum(n_gold) AS n_gold, sum(n_pred) AS n_pred
    FROM (SELECT run_key, task, template, gold AS c, CASE WHEN prediction = gold THEN n ELSE 0 END AS tp,
                 n AS n_gold, 0 AS n_pred FROM cm
          UNION ALL
          SELECT run_key, task, template, prediction AS c, 0 AS tp, 0 AS n_gold, n AS n_pred
          FROM cm WHERE prediction IS NOT NULL)
    GROUP BY run_key, task, template, c),
f1 AS (
    SELECT run_key, task, template, avg(2.0 * tp / (n_gold + n_pred)) AS macro_f1, count(*) AS n_classes
    FROM per_class GROUP BY run_key, task, template),
acc AS (
    SELECT experiment, setup, run_key, seed, sources, task, template, sum(n) AS n_eval,
           CAST(sum(CASE WHEN prediction = gold THEN n ELSE 0 END) AS DOUBLE) / sum(n) AS accuracy
    FROM cm GROUP BY experiment, setup, run_key, seed, sources, task, template)
SELECT a.experiment, a.setup, a.run_key, a.seed, a.sources, a.task, a.template, a.n_eval, a.accuracy,
       f.macro_f1, f.n_classes
FROM acc a JOIN f1 f USING (run_key, task, template);

-- Paper 003 Tables 3-6: per (experiment, grouping, group, member task) the mean over seeds with the 95%
-- CI half-width t(0.975, n-1) * s / sqrt(n), next to the member's single-task baseline (an MTL run of a
-- group of one in the same experiment and setup) and the difference MTL - single.
CREATE OR REPLACE VIEW mtl_comparison AS
WITH g AS (
    SELECT DISTINCT m.experiment, m.grouping, m.group_id, list_sort(m.members) AS members, s.setup, s.task,
           s.template, s.run_key, s.seed, s.accuracy, s.macro_f1
    FROM mtl_groups m JOIN mtl_member_scores s ON s.run_key = m.run_key),
agg AS (
    SELECT experiment, grouping, group_id, members, setup, task, template, count(*) AS n_seeds,
           avg(accuracy) AS accuracy, stddev_samp(accuracy) AS sd_accuracy,
           avg(macro_f1) AS macro_f1, stddev_samp(macro_f1) AS sd_macro_f1
    FROM g GROUP BY experiment, grouping, group_id, members, setup, task, template),
ci AS (
    SELECT a.*, t.t AS t_975, t.t * a.sd_accuracy / sqrt(a.n_seeds) AS ci_accuracy,
           t.t * a.sd_macro_f1 / sqrt(a.n_seeds) AS ci_macro_f1
    FROM agg a LEFT JOIN t_quantiles t ON t.q = 0.975 AND t.df = a.n_seeds - 1),
single AS (
    SELECT experiment, setup, task, template, count(*) AS n_seeds, avg(accuracy) AS accuracy,
           avg(macro_f1) AS macro_f1, stddev_samp(accuracy) AS sd_accuracy, stddev_samp(macro_f1) AS sd_macro_f1
    FROM (SELECT DISTINCT experiment, setup, task, template, run_key, accuracy, macro_f1 FROM g
          WHERE len(members) = 1)
    GROUP BY experiment, setup, task, template)
SELECT c.experiment, c.grouping, c.group_id, c.members, c.setup, c.task, c.template, c.n_seeds,
       c.accuracy, c.ci_accuracy, c.macro_f1, c.ci_macro_f1,
       s.n_seeds AS single_n_seeds, s.accuracy AS single_accuracy,
       t.t * s.sd_accuracy / sqrt(s.n_seeds) AS single_ci_accuracy,
       s.macro_f1 AS single_macro_f1, t.t * s.sd_macro_f1 / sqrt(s.n_seeds) AS single_ci_macro_f1,
       c.accuracy - s.accuracy AS diff_accuracy, c.macro_f1 - s.macro_f1 AS diff_macro_f1
FROM ci c
LEFT JOIN single s ON s.experiment = c.experiment AND s.setup = c.setup AND s.task = c.task
                  AND s.template = c.template
LEFT JOIN t_quantiles t ON t.q = 0.975 AND t.df = s.n_seeds - 1;

-- FUTE (paper 004): the index of the task embeddings the embed job stored (rayjobs.embed). A view over the
-- embed runs' rows, so it can never disagree with them; the vectors are files (`file`, relative to the
-- results folder; `abs_file` where the trial wrote it). Embeddings of different spaces are never compared.
CREATE OR REPLACE VIEW task_embeddings AS
SELECT json_extract_string(metrics, '$.space') AS space, json_extract_string(metrics, '$.space_name') AS space_name,
       json_extract_string(metrics, '$.embedding') AS kind, target AS task, json_extract_string(metrics, '$.data') AS data,
       model, json_extract_string(metrics, '$.prompt') AS prompt, source AS source_task,
       CAST(json_extract(metrics, '$.dims') AS BIGINT) AS dims, json_extract_string(metrics, '$.file') AS file,
       checkpoint AS abs_file, json_extract_string(metrics, '$.method') AS method,
       json_extract_string(metrics, '$.variant') AS variant, json_extract_string(metrics, '$.loss') AS loss,
       json_extract_string(metrics, '$.ref') AS ref, seed, n_train, wall_time_s, run_key, experiment, created_at
FROM runs WHERE kind = 'embed' AND status = 'ok';

CREATE OR REPLACE VIEW embedding_spaces AS
SELECT json_extract_string(r.metrics, '$.space') AS space, any_value(json_extract_string(r.metrics, '$.space_name')) AS name,
       any_value(json_extract(r.hparams, '$.space')) AS spec, any_value(json_extract(r.hparams, '$.composition')) AS pool,
       any_value(r.seed) AS seed, any_value(json_extract_string(r.metrics, '$.variant')) AS variant,
       count(*) FILTER (WHERE json_extract_string(r.metrics, '$.embedding') = 'DTE') AS n_dte,
       count(*) FILTER (WHERE json_extract_string(r.metrics, '$.embedding') = 'MTE') AS n_mte,
       any_value(CAST(json_extract(r.metrics, '$.dims') AS BIGINT)) AS dims
FROM runs r WHERE r.kind = 'embed' AND r.status = 'ok'
GROUP BY 1;

-- Search spaces (rayjobs.search_space): one row per searched configuration of a source / baseline stage.
-- The validation score is the periodic validation's best (train.eval_every), never the eval split's score;
-- stopped runs (early stopping) are decided losers and score NULL.
CREATE OR REPLACE VIEW tuned_configs AS
SELECT experiment, setup, kind AS stage, coalesce(source, target) AS task, seed,
       json_extract_string(metrics, '$.search.group') AS search_group,
       CAST(json_extract(metrics, '$.search.index') AS INTEGER) AS config_index,
       CAST(json_extract(metrics, '$.search.n') AS INTEGER) AS n_planned,
       CAST(json_extract(metrics, '$.search.values') AS VARCHAR) AS config,
       status, CASE WHEN status = 'ok' THEN CAST(json_extract(metrics, '$.best_validation_score') AS DOUBLE)
                    END AS validation_score,
       score AS eval_score, hparams, run_key
FROM runs WHERE kind IN ('source', 'target') AND status IN ('ok', 'stopped')
  AND json_extract(metrics, '$.search') IS NOT NULL;

-- The chosen configuration per search: highest validation score, the first configuration of equal ones
-- (rayjobs.search_space.best_of makes the same choice when a transfer starts); `complete` once every
-- planned configuration is decided.
CREATE OR REPLACE VIEW tuned_runs AS
SELECT experiment, setup, stage, task, seed, run_key, config, hparams, validation_score, eval_score,
       n_decided, n_planned, n_decided = n_planned AS complete, search_group
FROM (SELECT *, row_number() OVER (PARTITION BY search_group
                                   ORDER BY validation_score DESC NULLS LAST, config_index) AS rank,
             count(*) OVER (PARTITION BY search_group) AS n_decided
      FROM tuned_configs)
WHERE rank = 1 AND validation_score IS NOT NULL;
"""
