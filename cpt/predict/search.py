"""Searching a schedule family for the lowest predicted final loss at a budget, and the best schedule
written out as a recipe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpt.errors import CptError
from cpt.predict.curves import Curve
from cpt.predict.fit import Fit

FAMILIES = ("wsd", "cosine", "linear", "infinite")
_FRACTIONS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8]
_MIN_RATIOS = [0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5]


def family_candidates(family: str, template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Schedule configs of ``family`` (label -> the ``schedule:`` mapping), keeping the template's
    max_lr, warmup and warmup_from."""
    keep = {k: template[k] for k in ("max_lr", "warmup", "warmup_from") if k in template}
    top = float(keep["max_lr"])
    out: dict[str, dict[str, Any]] = {}
    if family == "wsd":
        for shape in ("linear", "cosine", "1-sqrt"):
            for fr in _FRACTIONS:
                out[f"wsd decay {fr:.0%} {shape}"] = {"kind": "wsd", **keep, "min_lr": 0.0,
                                                      "decay": {"length": f"{fr:.0%}", "shape": shape}}
    elif family in ("cosine", "linear"):
        for r in _MIN_RATIOS:
            out[f"{family} min_lr {r:g}x"] = {"kind": family, **keep, "min_lr": r * top}
    elif family == "infinite":
        for to in (0.25, 0.5, 0.75):
            for cool in (0.1, 0.25):
                for ann in (0.1, 0.2, 0.3):
                    out[f"infinite const {to:g}x cooldown {cool:.0%} anneal {ann:.0%}"] = {
                        "kind": "infinite", **keep,
                        "cooldown": {"length": f"{cool:.0%}", "shape": "cosine", "to": to * top},
                        "anneal": {"length": f"{ann:.0%}", "shape": "linear", "to": 0.0}}
    else:
        raise CptError(f"--search: unknown family {family!r} (expected {', '.join(FAMILIES)})")
    return out


@dataclass
class SearchResult:
    label: str
    schedule: dict[str, Any]
    final: float  # predicted loss of the model after the last update (n = T)
    low: float
    high: float


def search(law: Fit, candidates: dict[str, dict[str, Any]], total_tokens: int, tokens_per_step: int,
           seq_len: int | None = None, start_lr: float | None = None) -> list[SearchResult]:
    """The predicted loss after the last update of every candidate schedule at a token budget, best
    first, with its bootstrap interval. Candidates that do not build (a decay longer than what the
    warmup leaves of the budget) are left out."""
    from pydantic import TypeAdapter

    from cpt.schedules import ScheduleConfig, build_schedule

    adapter = TypeAdapter(ScheduleConfig)
    batch = tokens_per_step // seq_len if seq_len else None
    steps = total_tokens // tokens_per_step
    results = []
    for label, cfg in candidates.items():
        try:
            sched = build_schedule(adapter.validate_python(cfg), total_tokens=total_tokens,
                                   tokens_per_step=tokens_per_step, start_lr=start_lr, batch_size=batch)
        except (CptError, ValueError):
            continue
        curve = Curve(label, np.array([sched(s * tokens_per_step) for s in range(steps)]), tokens_per_step)
        end = [steps]  # only n = T is needed: the multi-power sum is evaluated there alone
        lo, hi = law.band(curve, at=end)
        results.append(SearchResult(label, cfg, float(law.predict(curve, at=end)[0]), float(lo[0]), float(hi[0])))
    if not results:
        raise CptError("--search: no candidate schedule fits the budget")
    results.sort(key=lambda r: r.final)
    return results



def fragment(results: list[SearchResult], law: str, f: Fit, recipe: Any, template: Path,
              overrides: Sequence[str]) -> str:
    """The best schedule as a recipe that trains as it is: the template recipe, resolved (its overrides
    applied), with this schedule in place of its own and a run name and directory of its own. Resolved
    rather than ``extends:``, since a merge would keep keys of the template's schedule (a WSD ``decay``
    under a cosine)."""
    import yaml

    best = results[0]
    lines = [
        f"# Best schedule found by `cpt predict --search` under the {law} law fitted on {', '.join(f.runs)}:",
        f"# {best.label}: predicted loss after the last step {best.final:.4f} (95% bootstrap interval "
        f"{best.low:.4f}-{best.high:.4f}) at {recipe.train.tokens} tokens, {recipe.train.global_batch_tokens} per step.",
    ]
    if len(results) > 1:
        lines.append(f"# Runner-up: {results[1].label} at {results[1].final:.4f}; differences inside the interval "
                     f"are not resolved by the fit.")
    lines.append(f"# The template recipe {template}" + (f" with {' '.join(overrides)}" if overrides else "")
                 + ", resolved, with this schedule: `cpt train` this file, or paste the schedule: section into a "
                 "recipe of your own.")
    body = recipe.to_dict()
    suffix = f"-searched-{law}"
    body["run"]["name"] = recipe.run.name + suffix
    body["run"]["output_dir"] = str(recipe.run.output_dir) + suffix
    body["schedule"] = best.schedule
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)

