"""`transferlab` subcommands of the analyses (registered by `rayjobs.cli`), one module per command group.

  import taskweb DIR | import its DIR | import sizes FILE   published data into the store      (imports)
  analyze matrix|commutativity|transitivity|setup-similarity                                    (analyze)
  selectors                                    list stored selectors                            (selectors)
  compute-selector roe|taskshop|random|size    compute and store a selector's scores
  compare-selectors A B                        closeness of two selectors (e.g. recomputed vs released RoE)
  tune-lambda --selector taskshop-F --setup S  TaskShop's lambda on held-out targets
  evaluate-selection --selector S --setup S    NDCG / Regret@k, leave-one-out (paper Table 2)  (selection)
  select --target T --selector S --k 5         top / bottom / random k sources for multi-task training
  report                                       PNG figures + index.html                         (report)
  groups --setup S                             PVI task groups                                  (groups)
  select-prompts --model M                     zero-shot prompt selection (FUTE Table 3)        (prompts)
  budget-eval | predict-transfers              budgeted grids (analysis.budget)                 (budget)

Every command takes `--db PATH` (default: the configured store); errors are `AnalysisError`s,
which the CLI prints as `transferlab: error: ...` with exit status 2. Only `import` and
`compute-selector` write; every other command runs on `analysis.store.duck.read_store`, an in-memory copy,
so the store file stays byte-identical even when a read materialises a derived selector.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from analysis.cli import analyze, budget, groups, imports, prompts, report, selection, selectors

#: the command groups in the order their subcommands appear in `transferlab --help`
GROUPS = (imports, analyze, selectors, selection, report, groups, prompts, budget)


def register(sub: argparse._SubParsersAction, default_db: Callable[[], str]) -> None:
    """Add the analysis subcommands to the `transferlab` parser (each with a description and option help)."""
    for group in GROUPS:
        group.register(sub, default_db)
