"""The `cpt predict` verb: fit the laws on runs, predict recipes (against their runs where they ran),
search, and write the report."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpt.errors import CptError
from cpt.predict.checks import held_out_warning
from cpt.predict.curves import Curve, recipe_curve, run_curve
from cpt.predict.evaluate import baseline, compare, final_points
from cpt.predict.files import file_curve
from cpt.predict.fit import BOOTSTRAP, MAX_POINTS, Fit, fit
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


def _load_fit(fit_runs: Sequence[str], curve_specs: Sequence[str], metric: str, echo):
    """The curves to fit (run dirs, then curve files) and the run dir of each (None for a file)."""
    if not fit_runs and not curve_specs:
        raise CptError("cpt predict needs at least one run to fit (--fit RUN_DIR ... or --curve NAME=FILE ...)")
    curves = [run_curve(*_split_at(a), metric=metric) for a in fit_runs]
    dirs: list[Path | None] = [Path(_split_at(a)[0]) for a in fit_runs]
    for spec in curve_specs:
        c, how = file_curve(spec, metric)
        echo(f"curve {how}")
        curves.append(c)
        dirs.append(None)
    return curves, dirs


def _lam(lam: float, half_life: str | None, curves: Sequence[Curve]) -> float:
    """lambda per optimizer step: ``lam``, or from a half-life in steps or tokens (converted with the
    fitted runs' tokens per step)."""
    if half_life is None:
        return lam
    from cpt.units import parse_length

    length = parse_length(half_life)
    tps = {c.tokens_per_step for c in curves}
    if length.unit == "fraction":
        raise CptError(f"--lam-half-life {half_life}: give steps (693 steps) or tokens (2.8M), not a fraction")
    if length.unit == "tokens" and (None in tps or len(tps) != 1):
        raise CptError(f"--lam-half-life {half_life}: a half-life in tokens needs the fitted runs' tokens per step "
                       f"(known and one value; here {sorted(map(str, tps))}); give it in steps")
    steps = length.value if length.unit == "steps" else length.value / tps.pop()
    if steps <= 0:
        raise CptError(f"--lam-half-life {half_life}: must be positive")
    return 0.5 ** (1.0 / steps)


def _fit_laws(curves: Sequence[Curve], laws: Sequence[str], lam: float, bootstrap: int, fit_points: int,
              metric: str, echo) -> dict[str, Fit]:
    fits: dict[str, Fit] = {}
    for law in laws:
        f = fits[law] = fit(curves, law, lam=lam, bootstrap=bootstrap, max_points=fit_points)
        n, m = f.points
        echo(f"{law}: fitted on {', '.join(f.runs)} ({metric}) in {f.seconds[0]:.1f} s on {n} points"
             + (f" (block means of {m} measured)" if n < m else "") + ": "
             + ", ".join(f"{k}={v:.4g} [{lo:.3g}, {hi:.3g}]" for k, (v, lo, hi) in f.param_intervals().items())
             + (f"; lambda {f.lam_units()}" if law == "anneal" else "")
             + f"; {len(f.boot)} bootstrap replicates in {f.seconds[1]:.1f} s"
             + f"; in-sample RMS log-residual {f.fit_rmse_rel:.4f}")
    return fits


def _law_entry(f: Fit, target: Curve, real: Curve | None, k: np.ndarray, window: int, final_window: int):
    """One law's prediction of ``target`` (scored against ``real`` where given) and its curves for the plot."""
    mid = f.curve(target, must=k)
    lo, hi = f.band_curve(target, must=k)
    entry = {"final": float(np.mean(mid[k])), "final_low": float(np.mean(lo[k])),
             "final_high": float(np.mean(hi[k])), "end": float(mid[-1])}
    if real is not None:
        entry.update(compare(mid, real.losses, target.peak, window, final_window))
    return entry, (mid, lo, hi)


def _row(target: Curve, real: Curve | None, fits: dict[str, Fit], others: Sequence[Curve], window: int,
         final_window: int, **about) -> tuple[dict[str, Any], tuple]:
    """A prediction row of the report: every law's prediction, and the naive baseline where it ran."""
    row: dict[str, Any] = {**about, "name": target.name, "steps": target.steps, "peak": target.peak, "laws": {}}
    k = final_points(target.steps, real.measured(target.peak) if real is not None else None, final_window)
    plot = {}
    for law, f in fits.items():
        row["laws"][law], plot[law] = _law_entry(f, target, real, k, window, final_window)
    if real is not None:
        row["baseline"] = baseline(target, real, others, window, final_window)
    return row, (target, real, plot)


def _recipe_rows(recipes, overrides, compare_runs, fit_curves, fit_dirs, stage_of, fits, metric, window,
                 final_window):
    """A row per recipe, scored against the run that ran it where there is one (a fitted run: in sample)."""
    for arg in recipes:
        path, stage = _split_at(arg)
        target, recipe = recipe_curve(path, overrides, stage)
        real_dir = _matching_run(recipe, [d for d in fit_dirs if d] + [Path(_split_at(a)[0]) for a in compare_runs])
        real = run_curve(real_dir, stage or stage_of.get(real_dir), metric) if real_dir is not None else None
        if real is not None and real.steps != target.steps:
            real = None  # the same recipe cut short (or resumed further): nothing to compare step by step
        others = [c for c, d in zip(fit_curves, fit_dirs, strict=True) if d is None or d != real_dir]
        yield _row(target, real, fits, others, window, final_window, recipe=str(path),
                   real_run=str(real_dir) if real is not None else None,
                   in_fit=real is not None and real_dir in fit_dirs, held_out=False)


def _held_out_rows(specs, fit_curves, fits, metric, window, final_window, echo):
    """A row per held-out curve (NAME=FILE or RUN_DIR[@STAGE]): its own logged LR predicted, scored against
    its own losses."""
    for spec in specs:
        if "=" in spec.split(",")[0] and not Path(spec).exists():
            real, how = file_curve(spec, metric)
            echo(f"held out: {how}")
        else:
            real = run_curve(*_split_at(spec), metric=metric)
        target = Curve(real.name, real.lrs, real.tokens_per_step)
        yield _row(target, real, fits, fit_curves, window, final_window, recipe=None, real_run=spec,
                   in_fit=False, held_out=True)


def _in_sample(fits: dict[str, Fit], curves: Sequence[Curve], window: int, final_window: int):
    """Each law on its own fitted runs, scored like a held-out run: {law: {run: errors}}, and the curves."""
    errors: dict[str, dict[str, dict[str, float]]] = {}
    plot: dict[str, list[np.ndarray]] = {}
    for law, f in fits.items():
        errors[law], plot[law] = {}, []
        for c in curves:
            mid = f.curve(c, must=final_points(c.steps, c.measured(c.peak), final_window))
            errors[law][c.name] = compare(mid, c.losses, c.peak, window, final_window)
            plot[law].append(mid)
    return errors, plot


def _honesty(report: dict[str, Any], in_sample: dict[str, dict], echo) -> None:
    """Add the held-out vs in-sample check to each law's warnings, and print every warning."""
    for law, section in report["fit"].items():
        section["in_sample"] = in_sample[law]
        held = {p["name"]: p["laws"][law] for p in report["predictions"]
                if p.get("real_run") and not p["in_fit"] and "final_err" in p["laws"][law]}
        w = held_out_warning(law, in_sample[law], held)
        if w:
            section["warnings"].append(w)
        for line in section["warnings"]:
            echo(f"warning: {line}")


def run_predict(fit_runs: Sequence[str], recipes: Sequence[str] = (), overrides: Sequence[str] = (),
                compare_runs: Sequence[str] = (), laws: Sequence[str] = LAWS, families: Sequence[str] = (),
                out: str | Path = "predict", lam: float = LAMBDA, bootstrap: int = BOOTSTRAP, window: int = 9,
                final_window: int = 10, metric: str = "train/loss", echo=print, curves: Sequence[str] = (),
                held_out: Sequence[str] = (), fit_points: int = MAX_POINTS,
                lam_half_life: str | None = None) -> dict[str, Any]:
    """Fit ``laws`` on ``fit_runs`` (run dirs) and ``curves`` (NAME=FILE curve files); predict every recipe
    and every ``held_out`` curve (from its own LR); optionally search schedule families.

    ``metric`` is what is fitted and compared: the train loss, or a probe logged by the run
    (probe/DOMAIN/loss). Writes to ``out``: report.md (fits, warnings, predictions, search), report.json,
    curves.png and, with a search, best-schedule-<law>.yaml. Returns the JSON report.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fit_curves, fit_dirs = _load_fit(fit_runs, curves, metric, echo)
    stage_of = {Path(_split_at(a)[0]): _split_at(a)[1] for a in [*compare_runs, *fit_runs]}
    fits = _fit_laws(fit_curves, laws, _lam(lam, lam_half_life, fit_curves), bootstrap, fit_points, metric, echo)

    report: dict[str, Any] = {"metric": metric, "fit": {law: f.to_dict() for law, f in fits.items()},
                              "predictions": [], "smoothing": {"window": window, "final_window": final_window}}
    rows = [*_recipe_rows(recipes, overrides, compare_runs, fit_curves, fit_dirs, stage_of, fits, metric, window,
                          final_window),
            *_held_out_rows(held_out, fit_curves, fits, metric, window, final_window, echo)]
    report["predictions"] = [r for r, _ in rows]
    in_sample, fitted_plot = _in_sample(fits, fit_curves, window, final_window)
    _honesty(report, in_sample, echo)
    if families:
        first = recipes[0] if recipes else (str(fit_dirs[0] / "recipe.yaml") if fit_dirs[0] else None)
        if first is None:
            raise CptError("--search needs a template recipe: give --recipe R.yaml (the first is the template)")
        report["search"] = _search(families, first, overrides, fits, out, echo)

    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(render_report(report))
    if rows:
        plot_predictions([p for _, p in rows], fit_curves, fits, out / "curves.png", window, fitted_plot)
    echo(render_predictions(report))
    echo(f"report: {out / 'report.md'}, {out / 'report.json'}" + (f", plot: {out / 'curves.png'}" if rows else ""))
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
