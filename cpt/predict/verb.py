"""The `cpt predict` verb: fit the laws on runs, predict recipes (against their runs where they ran),
search, and write the report."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpt.errors import CptError
from cpt.predict.curves import recipe_curve, run_curve
from cpt.predict.evaluate import closest_run, compare, final_points
from cpt.predict.fit import Fit, fit
from cpt.predict.laws import LAMBDA, LAWS
from cpt.predict.report import plot_predictions, render_predictions, render_report
from cpt.predict.search import family_candidates, fragment, search

# Keys that do not change a curve: a recipe "has been run" by a run dir whose recipe differs in these only.
_IRRELEVANT = ("run.name", "run.output_dir", "tracking", "checkpoint", "probes")


def _split_at(arg: str) -> tuple[str, str | None]:
    """``PATH@STAGE`` -> (PATH, STAGE); a path that exists with the @ is taken whole."""
    if "@" in arg and not Path(arg).exists():
        path, stage = arg.rsplit("@", 1)
        return path, stage
    return arg, None


def _empty(v: Any) -> bool:
    # missing (None) or a default that means "nothing": a field added to the schema after the run
    return v is None or v is False or v == {} or v == []


def _matching_run(recipe: Any, run_dirs: Iterable[Path]) -> Path | None:
    """The run dir that ran ``recipe``: one whose recipe.yaml differs only in keys that do not change
    the curve (a key missing on one side and empty on the other is no difference: a run recorded
    before the schema had that field)."""
    import yaml

    from cpt.recipe import recipe_diff

    want = recipe.to_dict()
    for d in run_dirs:
        f = d / "recipe.yaml"
        if not f.is_file():
            continue
        diff = recipe_diff(yaml.safe_load(f.read_text()) or {}, want)
        real = [k for k, (a, b) in diff.items()
                if not any(k == i or k.startswith(i + ".") for i in _IRRELEVANT)
                and not (_empty(a) and _empty(b))]
        if not real:
            return d
    return None


def run_predict(fit_runs: Sequence[str], recipes: Sequence[str] = (), overrides: Sequence[str] = (),
                compare_runs: Sequence[str] = (), laws: Sequence[str] = LAWS, families: Sequence[str] = (),
                out: str | Path = "predict", lam: float = LAMBDA, bootstrap: int = 100, window: int = 9,
                final_window: int = 10, metric: str = "train/loss", echo=print) -> dict[str, Any]:
    """Fit ``laws`` on ``fit_runs``; predict every recipe; optionally search schedule families.

    ``metric`` is what is fitted and compared: the train loss, or a probe logged by the run
    (probe/DOMAIN/loss). Writes to ``out``: report.md (fits, predictions, search), report.json,
    curves.png and, with a search, best-schedule-<law>.yaml. Returns the JSON report.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not fit_runs:
        raise CptError("cpt predict needs at least one run to fit (--fit RUN_DIR ...)")
    fit_curves = [run_curve(*_split_at(a), metric=metric) for a in fit_runs]
    fit_dirs = [Path(_split_at(a)[0]) for a in fit_runs]
    stage_of = {Path(_split_at(a)[0]): _split_at(a)[1] for a in [*compare_runs, *fit_runs]}

    fits: dict[str, Fit] = {}
    for law in laws:
        fits[law] = fit(fit_curves, law, lam=lam, bootstrap=bootstrap)
        echo(f"{law}: fitted on {', '.join(fits[law].runs)} ({metric}): "
             + ", ".join(f"{k}={v:.4g} [{lo:.3g}, {hi:.3g}]" for k, (v, lo, hi) in fits[law].param_intervals().items())
             + f"; in-sample RMS log-residual {fits[law].fit_rmse_rel:.4f}")

    report: dict[str, Any] = {"metric": metric, "fit": {law: f.to_dict() for law, f in fits.items()},
                              "predictions": [], "smoothing": {"window": window, "final_window": final_window}}
    plotted = []
    for arg in recipes:
        path, stage = _split_at(arg)
        target, recipe = recipe_curve(path, overrides, stage)
        real_dir = _matching_run(recipe, fit_dirs + [Path(_split_at(a)[0]) for a in compare_runs])
        real = run_curve(real_dir, stage or stage_of.get(real_dir), metric) if real_dir is not None else None
        if real is not None and real.steps != target.steps:
            real = None  # the same recipe cut short (or resumed further): nothing to compare step by step
        row: dict[str, Any] = {"recipe": str(path), "name": target.name, "steps": target.steps,
                               "peak": target.peak, "real_run": str(real_dir) if real is not None else None,
                               "in_fit": real is not None and real_dir in fit_dirs, "laws": {}}
        k = final_points(target.steps, real.measured(target.peak) if real is not None else None, final_window)
        curves_for_plot = {}
        for law, f in fits.items():
            mid = f.predict(target)
            lo, hi = f.band(target)
            entry = {"final": float(np.mean(mid[k])), "final_low": float(np.mean(lo[k])),
                     "final_high": float(np.mean(hi[k])), "end": float(mid[-1])}
            if real is not None:
                entry.update(compare(mid, real.losses, target.peak, window, final_window))
            row["laws"][law] = entry
            curves_for_plot[law] = (mid, lo, hi)
        if real is not None:
            others = [c for c, d in zip(fit_curves, fit_dirs, strict=True) if d != real_dir]
            if others:
                base = closest_run(target, others)
                if base.steps == target.steps:
                    row["baseline"] = {"run": base.name, **compare(base.losses, real.losses, target.peak, window,
                                                                   final_window)}
        report["predictions"].append(row)
        plotted.append((target, real, curves_for_plot))

    if families:
        first = recipes[0] if recipes else str(fit_dirs[0] / "recipe.yaml")
        report["search"] = _search(families, first, overrides, fits, out, echo)

    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(render_report(report))
    if plotted:
        plot_predictions(plotted, fit_curves, fits, out / "curves.png", window)
    echo(render_predictions(report))
    echo(f"report: {out / 'report.md'}, {out / 'report.json'}" + (f", plot: {out / 'curves.png'}" if plotted else ""))
    return report


def _search(families: Sequence[str], first: str, overrides: Sequence[str], fits: dict[str, Fit], out: Path,
            echo) -> dict[str, Any]:
    """Search ``families`` under each fitted law at the budget of the template recipe ``first``, writing
    the best schedule of each law as a recipe beside the report; returns the report's search section."""
    path, stage = _split_at(first)
    _, recipe = recipe_curve(path, overrides, stage)
    if getattr(recipe, "stages", None) or recipe.schedule is None:
        raise CptError("--search: the template recipe (the first --recipe) must be single-stage with a schedule")
    template = recipe.schedule.model_dump(mode="json")
    cands: dict[str, dict[str, Any]] = {}
    for fam in families:
        cands.update(family_candidates(fam, template))
    section: dict[str, Any] = {"template": str(path), "tokens": recipe.train.tokens, "laws": {}, "fragments": {}}
    for law, f in fits.items():
        res = search(f, cands, recipe.train.tokens, recipe.train.global_batch_tokens, recipe.data.seq_len)
        section["laws"][law] = [r.__dict__ for r in res]
        frag = out / f"best-schedule-{law}.yaml"
        frag.write_text(fragment(res, law, f, recipe, Path(path), overrides))
        section["fragments"][law] = str(frag)
        echo(f"search ({law}): best {res[0].label}: predicted loss after the last step {res[0].final:.4f} "
             f"[{res[0].low:.4f}, {res[0].high:.4f}] -> {frag}")
    return section
