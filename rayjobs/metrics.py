"""Task metrics p (fractions): accuracy, accuracy+F1 mean, Pearson+Spearman mean, exact match."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from rayjobs.tasks import TaskSpec


def f1(pred: np.ndarray, gold: np.ndarray, n_classes: int, average: str, positive: int = 1) -> float:
    def one(c: int) -> float:
        tp = float(np.sum((pred == c) & (gold == c)))
        fp = float(np.sum((pred == c) & (gold != c)))
        fn = float(np.sum((pred != c) & (gold == c)))
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    if average == "macro":
        return float(np.mean([one(c) for c in range(n_classes)]))
    return one(positive)


def compute(spec: TaskSpec, pred: Sequence, gold: Sequence) -> tuple[float, dict[str, float]]:
    """Return (p, all metrics). `pred`/`gold` are choice indices, strings, or floats by answer type."""
    if spec.answer_type == "score":
        p_, g = np.asarray(pred, float), np.asarray(gold, float)
        pear = float(stats.pearsonr(p_, g)[0]) if np.std(p_) > 0 else 0.0
        spear = float(stats.spearmanr(p_, g)[0]) if np.std(p_) > 0 else 0.0
        return (pear + spear) / 2, {"pearson": pear, "spearmanr": spear}
    if spec.answer_type == "text":
        em = float(np.mean([normalise_text(a) == normalise_text(b) for a, b in zip(pred, gold, strict=False)]))
        return em, {"exact_match": em}
    p_, g = np.asarray(pred, int), np.asarray(gold, int)
    acc = float(np.mean(p_ == g))
    if spec.metric != "acc_f1":
        return acc, {"accuracy": acc}
    n = len(spec.choices or []) or int(max(p_.max(), g.max()) + 1)
    pos = (spec.choices or []).index(spec.positive_label) if spec.positive_label else 1
    f = f1(p_, g, n, spec.f1_average, pos)
    return (acc + f) / 2, {"accuracy": acc, "f1": f}


def normalise_text(s: str) -> str:
    """Exact match ignores case, surrounding space and a final full stop."""
    return " ".join(str(s).lower().strip().rstrip(".").split())
