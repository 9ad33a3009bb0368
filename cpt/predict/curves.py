"""Curves: an LR sequence step by step, with the losses it produced when it was run, read from a run dir
or planned from a recipe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpt.errors import CptError


@dataclass(frozen=True)
class Curve:
    """One schedule, step by step: ``lrs[i-1]`` is applied in update i (i = 1..T); ``losses[n]`` is the
    loss measured after n updates (n = 0..T, NaN where nothing was measured), or None for a schedule
    that has not been run."""

    name: str
    lrs: np.ndarray
    tokens_per_step: int | None  # None: not known (a curve file with steps only)
    losses: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return len(self.lrs)

    @property
    def peak(self) -> int:
        """p: the update at which the LR first reaches its maximum (the end of the warmup)."""
        return int(np.argmax(self.lrs)) + 1

    def measured(self, start: int = 0) -> np.ndarray:
        """The n >= start at which a loss was measured."""
        n = np.arange(len(self.losses))
        return n[(n >= start) & np.isfinite(self.losses)]


def run_curve(run_dir: str | Path, stage: str | None = None, metric: str = "train/loss") -> Curve:
    """The curve of a run dir (``metrics.jsonl``): the LR of every step and ``metric`` (train/loss, or a
    probe such as probe/english/loss) wherever it was logged; optionally of one stage only (records
    tagged ``stage``), counted from that stage's first step."""
    from cpt.tracking import read_metrics

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CptError(f"{run_dir}: no metrics.jsonl (is it a cpt run dir?)")
    records = read_metrics(path)
    train = [r for r in records if "train/loss" in r and "lr" in r]
    stages = list(dict.fromkeys(r.get("stage") for r in train))
    if stage is not None and stage not in stages:
        raise CptError(f"{run_dir}@{stage}: no such stage in its metrics (stages: {', '.join(map(str, stages))})")
    if stage is None and len(stages) > 1:
        raise CptError(f"{run_dir}: the run has stages {', '.join(map(str, stages))}; name the one to use "
                       f"as {run_dir}@STAGE (the laws hold within a stage)")
    named = stage is not None
    stage = stage if named else (stages[0] if stages else None)
    train = [r for r in train if r.get("stage") == stage]
    if len(train) < 2:
        raise CptError(f"{run_dir}: fewer than 2 training steps logged")
    steps = [r["step"] for r in train]
    if any(b != a + 1 for a, b in zip(steps, steps[1:], strict=False)):
        raise CptError(f"{run_dir}: logged steps are not contiguous (a gap after a resume?)")
    per_step = {round((b["tokens"] - a["tokens"]) / (b["step"] - a["step"])) for a, b in zip(train, train[1:], strict=False)}
    if len(per_step) != 1:
        raise CptError(f"{run_dir}: tokens per step changes within the curve ({sorted(per_step)})")
    T, first = len(train), steps[0]
    losses = np.full(T + 1, np.nan)
    if metric == "train/loss":
        losses[:T] = [float(r["train/loss"]) for r in train]  # step i: the model after i - 1 updates
    else:
        for r in records:  # a probe at step i: after i updates; the one at the stage's start is n = 0
            n = r.get("step", -1) - first + 1
            if metric in r and 0 <= n <= T and r.get("stage", stage) == stage:
                losses[n] = float(r[metric])
        if np.isfinite(losses).sum() < 2:
            raise CptError(f"{run_dir}: {metric} is logged fewer than 2 times")
    if np.any(np.isinf(losses)) or (metric == "train/loss" and np.any(np.isnan(losses[:T]))):
        raise CptError(f"{run_dir}: {metric} is not finite somewhere (a diverged run cannot be fitted)")
    name = f"{run_dir.name}@{stage}" if named else run_dir.name
    return Curve(name, np.array([float(r["lr"]) for r in train]), per_step.pop(), losses)


def recipe_lrs(recipe: Any, stage: str | None = None) -> tuple[np.ndarray, int]:
    """The LR of every step of one stage of a recipe (by name; the last by default; a recipe without
    stages is one stage), and its tokens per step: the stages planned exactly as the trainer plans
    them (cpt.plan), from the recipe's init_from where it exists."""
    from cpt.plan import plan_run

    tps = recipe.train.global_batch_tokens
    plans = plan_run(recipe, allow_missing_init=True).stages  # init_from not there yet: from token 0
    names = [p.name for p in plans]
    if stage is not None and stage not in names:
        raise CptError(f"@{stage}: no such stage (stages: {', '.join(names)})")
    plan = plans[names.index(stage) if stage is not None else -1]
    return np.array([plan.lr(t) for t in range(plan.start, plan.end, tps)]), tps


def recipe_curve(path: str | Path, overrides: Sequence[str] = (), stage: str | None = None) -> tuple[Curve, Any]:
    """A recipe's schedule as a Curve (no losses), with the loaded recipe."""
    from cpt.recipe import load_recipe

    recipe = load_recipe(path, list(overrides))
    lrs, tps = recipe_lrs(recipe, stage)
    name = recipe.run.name if stage is None else f"{recipe.run.name}@{stage}"
    return Curve(name, lrs, tps), recipe

