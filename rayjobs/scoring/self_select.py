"""Self-Select (Ramji and Kyimpopkin, 2023), the prompt-selection baseline of FUTE (paper 004, Sec. 4.2.2):
"a meta-prompt that queries the LLM for selecting the most effective prompt".

The model half, through the one black-box interface: per task input, one meta-prompt lists every candidate
instruction (the template with its input slot shown as [input]) under its name, then the input, and asks
which instruction is the most effective; the answer choices are the candidates' names, scored like any
choice (raw log-likelihoods at the answer position, softmax over the names; no generation, no sampling).
The listing order rotates by one per input, so no candidate always sits first (LLMs favour early options).
Rows go to `predictions` (template 'self-select', `choices` = the names in the order shown, no gold) under a
run of kind 'self_select'; `analysis.prompts.selection.self_select` turns them into one score per prompt
(the mean probability the model gives it). Named choices of ours (the paper gives no meta-prompt): the
wording of META, per-input querying with rotation, and the mean-probability aggregate.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

from rayjobs.scoring.blackbox import open_black_box
from rayjobs.tasks.registry import Example
from rayjobs.tasks.templates import PromptTemplate

SELF_SELECT = "self-select"  # the template name of the meta-prompt rows
META = ("Here is an input of a task and {n} candidate instructions for it.\n{listing}\n"
        "Input: {input}\nWhich instruction is the most effective for this input? Answer with its name.\nAnswer:")
META_TEMPLATE = PromptTemplate(name=SELF_SELECT, input="{input}")


def instruction(t: PromptTemplate) -> str:
    """The template's text with its slots shown, not filled."""
    return t.input.format(input="[input]", options="[options]", options_list="[options]")


def meta_examples(candidates: Sequence[PromptTemplate], examples: Sequence[Example]) -> list[Example]:
    """One meta-prompt per input; the i-th lists the candidates rotated by i (choices: their names)."""
    names = [c.name for c in candidates]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"Self-Select needs two or more distinctly named prompts, got {names}")
    out = []
    for i, ex in enumerate(examples):
        k = i % len(candidates)
        order = list(candidates[k:]) + list(candidates[:k])
        listing = "\n".join(f"Instruction {c.name}: {instruction(c)}" for c in order)
        out.append(Example(META.format(n=len(order), listing=listing, input=ex.text),
                           tuple(c.name for c in order), -1, uid=ex.uid))
    return out


def self_select_rows(box: Any, candidates: Sequence[PromptTemplate], examples: Sequence[Example], task: str,
                     split: str, batch_size: int = 32) -> list[dict[str, Any]]:
    """`predictions` rows of the meta-prompts scored by `box` (a BlackBox)."""
    from rayjobs.train.loop import prediction_rows  # lazy: torch stays out of CLI start-up

    metas = meta_examples(candidates, examples)
    records = box.score(META_TEMPLATE, metas, batch_size=batch_size)
    return prediction_rows(task, SELF_SELECT, split, [META_TEMPLATE.render(e) for e in metas], records)


def self_select_trial(trial: Any, ctx: Any = None) -> dict[str, Any]:
    """Executor (a `score` job's self_select trials): one model's meta-prompts over one task's split."""
    from rayjobs.score import split_examples  # lazy: duckdb only when a store is opened
    from rayjobs.train.loop import (  # lazy: torch stays out of CLI start-up
        TrainContext,
        seed_everything,
        trial_device,
    )

    t0 = time.time()
    p = trial.params
    seed_everything(trial.seed)
    data, examples = split_examples(trial)
    candidates = [PromptTemplate.model_validate(t) for t in p["templates"]]
    box = open_black_box(p["ref"], results=trial.results_dir, temperature=p.get("temperature"),
                         max_length=p.get("max_length", 512)).to(trial_device(trial, ctx or TrainContext()))
    rows = self_select_rows(box, candidates, examples, data.spec.name, p["split"])
    return {
        "run_key": trial.run_key, "experiment": trial.experiment, "kind": "self_select", "setup": trial.setup.key,
        "model": trial.setup.model.name, "adaptation": "none", "target": trial.eval_task, "seed": trial.seed,
        "n_train": 0, "n_eval": len(examples), "hparams": {**p, "data": data.origin}, "metric": None, "score": None,
        "metrics": {"template": SELF_SELECT, "split": p["split"], "black_box": box.kind,
                    "prompts": [c.name for c in candidates]},
        "train_time_s": 0.0, "wall_time_s": time.time() - t0, "host": socket.gethostname(), "status": "ok",
        "predictions": rows,
    }
