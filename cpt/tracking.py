"""Metrics: one JSONL path, written by the main process only.

Every record carries ``step`` and ``tokens`` (the x-axis for everything in cpt) and prefixed keys:
``train/loss``, ``lr``, ``train/grad_norm``, ``train/tokens_per_s``, ``probe/<domain>/loss``, ...
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a kill is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class MetricsLog:
    """Append-only JSONL metrics. On resume, records past the restored step are dropped first, so the
    file always describes one consistent history (those steps are about to be recomputed)."""

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None):
        self.path = Path(path)
        self._f = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a", buffering=1)  # line-buffered: a kill loses at most one record

    def log(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; a diverged loss must still be a valid record
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
