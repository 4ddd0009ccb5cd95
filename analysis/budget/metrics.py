"""TaskWeb's NDCG and Regret@k in numpy, batched over rankings (the replay scores thousands).

Same definitions as `analysis.ranking.families.taskweb_metrics` (tested equal on the release):
candidates of a target are the sources with a pair in the grid; gold order by the gold score
descending, predicted order by the predicted score descending, ties by source name (the arrays
hold sources in name order and the sorts are stable); relevance of a source = n - its 0-based gold
rank, gain 2^rel - 1, discount log2(i + 2); Regret@k = (mean P of the gold top k - mean P of the
predicted top k) / mean P of the gold top k, P the mean target metric of the pair's runs.
"""

from __future__ import annotations

import numpy as np


def _order(score: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per (..., target) the source indices best first (invalid sources last); score (..., S, T)."""
    s = np.where(valid, score, -np.inf)
    return np.argsort(-np.moveaxis(s, -2, -1), axis=-1, kind="stable")  # (..., T, S)


def rankings(score: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return _order(score, valid)


def ndcg(pred: np.ndarray, gold: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(..., T) NDCG per target; pred, gold (..., S, T), valid (S, T)."""
    n = valid.sum(0)  # (T,)
    g_order = _order(gold, valid)
    p_order = _order(pred, valid)
    S = valid.shape[0]
    grank = np.empty_like(g_order)
    np.put_along_axis(grank, g_order, np.broadcast_to(np.arange(S), g_order.shape), axis=-1)
    rel = n[:, None] - grank  # (..., T, S) by source index
    gain = np.where(np.moveaxis(valid, 0, 1), 2.0 ** rel - 1, 0.0)
    disc = 1.0 / np.log2(np.arange(S) + 2)
    dcg = (np.take_along_axis(gain, p_order, axis=-1) * disc).sum(-1)
    idcg = (np.take_along_axis(gain, g_order, axis=-1) * disc).sum(-1)
    return dcg / idcg


def regret(pred: np.ndarray, gold: np.ndarray, perf: np.ndarray, valid: np.ndarray, k: int = 5) -> np.ndarray:
    """(..., T) Regret@k per target; perf (..., S, T) the mean target metric of each pair (gold seeds)."""
    g_top = _order(gold, valid)[..., :k]
    p_top = _order(pred, valid)[..., :k]
    pt = np.moveaxis(perf, -2, -1)
    g = np.take_along_axis(pt, g_top, axis=-1).mean(-1)
    p = np.take_along_axis(pt, p_top, axis=-1).mean(-1)
    return (g - p) / g
