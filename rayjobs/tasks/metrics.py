"""Task metrics p (fractions): accuracy, accuracy+F1 mean, Pearson+Spearman mean, exact match.

F1 is the one definition of `analysis.classification` (the store's macro-F1 view follows it too)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from analysis.classification import f1
from rayjobs.tasks.registry import TaskSpec


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
    # F1 as TaskWeb's runs computed it (analysis.classification): macro over the classes present (cb),
    # else binary F1 of the positive label (mrpc, qqp)
    pos = (spec.choices or []).index(spec.positive_label) if spec.positive_label else 1
    f = f1(p_.tolist(), g.tolist(), spec.f1_average, pos)
    return (acc + f) / 2, {"accuracy": acc, "f1": f}


def normalise_text(s: str) -> str:
    """Exact match ignores case, surrounding space and a final full stop."""
    return " ".join(str(s).lower().strip().rstrip(".").split())
