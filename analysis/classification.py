"""F1 of a classification task: the one definition the task metric (`rayjobs.tasks.metrics`) and the store's
view `mtl_member_scores` (`analysis.store.views`) both follow.

The papers' definition, as their code computes it (TaskWeb's runs score cb with Hugging Face's
`super_glue/cb` metric and mrpc/qqp with `glue/mrpc|qqp`; paper 003 reports macro-F1 for every task):
  - per class c: F1_c = 2 TP_c / (#gold = c + #predicted = c), 0 when TP_c = 0;
  - macro-F1 (cb in TaskWeb, every task in paper 003): the mean of F1_c over the classes that occur in the
    gold labels or the predictions, i.e. sklearn's `f1_score(average='macro')` with its default label
    set. A class of the task that occurs in neither is not averaged (it would count 0 and lower the mean);
  - binary F1 (mrpc and qqp in TaskWeb, GLUE's F1): F1 of the positive class alone, 0 when it occurs in
    neither gold nor predictions (sklearn's `f1_score(average='binary', pos_label=...)`).
A missing prediction (None) is wrong for its gold class and is not a class of its own.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def _counts(pred: Sequence[Hashable | None], gold: Sequence[Hashable]) -> dict[Hashable, tuple[int, int, int]]:
    """Per class present in gold or predictions: (TP, #gold, #predicted)."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels")
    out: dict[Hashable, list[int]] = {}
    for p, g in zip(pred, gold, strict=True):
        out.setdefault(g, [0, 0, 0])[1] += 1
        if p is not None:
            out.setdefault(p, [0, 0, 0])[2] += 1
            if p == g:
                out[g][0] += 1
    return {c: (v[0], v[1], v[2]) for c, v in out.items()}


def class_f1(pred: Sequence[Hashable | None], gold: Sequence[Hashable]) -> dict[Hashable, float]:
    """F1_c = 2 TP_c / (#gold = c + #predicted = c) for every class present in gold or predictions."""
    return {c: 2.0 * tp / (ng + npred) for c, (tp, ng, npred) in _counts(pred, gold).items()}


def macro_f1(pred: Sequence[Hashable | None], gold: Sequence[Hashable]) -> float:
    """Mean F1 over the classes present in gold or predictions (sklearn's f1_score(average='macro'))."""
    f = class_f1(pred, gold)
    return float(np.mean(list(f.values()))) if f else 0.0


def binary_f1(pred: Sequence[Hashable | None], gold: Sequence[Hashable], positive: Hashable) -> float:
    """F1 of the positive class (GLUE's F1 for mrpc / qqp); 0 when it occurs nowhere."""
    return class_f1(pred, gold).get(positive, 0.0)


def f1(pred: Sequence[Hashable | None], gold: Sequence[Hashable], average: str, positive: Hashable = 1) -> float:
    """`average`: 'macro' or 'binary' (the task registry's `f1_average`)."""
    if average == "macro":
        return macro_f1(pred, gold)
    if average == "binary":
        return binary_f1(pred, gold, positive)
    raise ValueError(f"f1 average must be 'macro' or 'binary', got '{average}'")
