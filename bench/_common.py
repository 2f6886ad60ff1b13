"""Helpers shared by the benchmark scripts: result files and tables."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def merge_records(name: str, records: list[dict[str, Any]], key: tuple[str, ...],
                  drop: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    """Add ``records`` to ``results/NAME.json`` (replacing records with the same key, and any old record
    ``drop`` selects); returns all."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    with open(RESULTS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else []
        new_keys = {tuple(r.get(k) for k in key) for r in records}
        merged = [r for r in old if tuple(r.get(k) for k in key) not in new_keys and not (drop and drop(r))] + records
        path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def table(records: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    rows = [[fmt(r.get(c, "")) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
