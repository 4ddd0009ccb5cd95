"""The prompted-examples JSONL (`../shared/data/.../prompted_examples.jsonl`: {"task", "input", "output",
"choices"} per line): the one reader behind RoE's few-shot inputs and FUTE's probe pool and DTE data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analysis.errors import AnalysisError


def read_prompted(path: str | Path, error: type[Exception] = AnalysisError,
                  what: str = "a prompted example {task, input, output, choices}") -> dict[str, list[dict[str, Any]]]:
    """Rows {"input", "output", "choices", "line"} per task, in file order (`line`, the 1-based line number,
    is the row's id); a malformed line raises `error` naming the file, the line and `what` it should be."""
    p = Path(path)
    if not p.is_file():
        raise error(f"prompted-examples file {p} not found")
    out: dict[str, list[dict[str, Any]]] = {}
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.setdefault(str(rec["task"]), []).append(
                    {"input": str(rec["input"]), "output": rec.get("output"), "choices": rec.get("choices"), "line": i})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise error(f"{p}:{i}: not {what} ({e})") from None
    return out
