"""The report of `cpt predict`: markdown tables of fits, predictions and searches, and the plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpt.predict.curves import Curve
from cpt.predict.evaluate import smooth
from cpt.predict.fit import Fit


def render_predictions(report: dict[str, Any]) -> str:
    """The predictions as a markdown table: final loss per recipe and law, errors when the recipe ran."""
    rows = ["| recipe | law | predicted final loss (95% interval) | real | final-loss error | curve MARE |",
            "|---|---|---|---|---|---|"]
    for p in report["predictions"]:
        tag = " (in fit)" if p["in_fit"] else ""
        for law, e in p["laws"].items():
            real = f"{e['final_real']:.4f}" if "final_real" in e else "-"
            err = f"{100 * e['final_err']:+.2f}%" if "final_err" in e else "-"
            mare = f"{100 * e['mare']:.2f}%" if "mare" in e else "-"
            rows.append(f"| {p['name']}{tag} | {law} | {e['final']:.4f} ({e['final_low']:.4f}-{e['final_high']:.4f}) "
                        f"| {real} | {err} | {mare} |")
        b = p.get("baseline")
        if b and b.get("run"):
            rows.append(f"| {p['name']}{tag} | naive: {b['run']} | {b['final_pred']:.4f} | {b['final_real']:.4f} "
                        f"| {100 * b['final_err']:+.2f}% | {100 * b['mare']:.2f}% |")
        elif b:
            rows.append(f"| {p['name']}{tag} | naive: none | {b['why']} | - | - | - |")
    return "\n".join(rows)


def _fit_lines(law: str, f: dict[str, Any], metric: str) -> list[str]:
    """A law's section of the report: parameters, how the fit was made, its warnings."""
    parts = [f"## {law}: fitted on {', '.join(f['runs'])} ({metric})", "",
             "| parameter | value | 95% bootstrap interval |", "|---|---|---|"]
    for k, v in f["params"].items():
        lo, hi = f["intervals"][k]
        parts.append(f"| {k} | {v:.5g} | {lo:.4g} - {hi:.4g} |")
    extra = f", lambda {f['lambda_text']}" if f.get("lambda_text") else ""
    pts = f.get("fit_points", 0)
    blocks = (f" ({pts} fit points: block means of {f['measured_points']} measured)"
              if pts and pts < f["measured_points"] else "")
    parts += ["", f"LRs divided by {f['ref_lr']:g}{extra}; Huber scale {f['huber_scale']:.4f} on log-loss; "
                  f"{f['bootstrap']} bootstrap replicates; in-sample RMS log-residual {f['fit_rmse_rel']:.4f}"
                  f"{blocks}; fit {f.get('seconds', 0):.1f} s, bootstrap {f.get('bootstrap_seconds', 0):.1f} s.", ""]
    if f.get("warnings"):
        parts += ["**Warnings:**", ""] + [f"- {w}" for w in f["warnings"]] + [""]
    return parts


def render_report(report: dict[str, Any]) -> str:
    parts = ["# cpt predict", ""]
    for law, f in report["fit"].items():
        parts += _fit_lines(law, f, report["metric"])
    if report["predictions"]:
        s = report["smoothing"]
        parts += ["## Predictions", "",
                  f"Final loss: mean of the last {s['final_window']} measured points. Curve MARE: mean |pred - real| "
                  f"/ real after the warmup, both curves smoothed by a centred {s['window']}-point mean. Naive: the "
                  f"fitted run with the closest LR schedule that reaches the run's end, its loss at the same tokens "
                  f"taken as the prediction.", "",
                  render_predictions(report), ""]
    if "search" in report:
        parts += [f"## Search at {report['search']['tokens']} tokens (template {report['search']['template']})", ""]
        for law, res in report["search"]["laws"].items():
            parts += [f"### {law}", "", "| schedule | predicted loss after the last step | 95% interval |",
                      "|---|---|---|"]
            parts += [f"| {r['label']} | {r['final']:.4f} | {r['low']:.4f} - {r['high']:.4f} |" for r in res[:15]]
            parts.append("")
    return "\n".join(parts) + "\n"


def y_limits(lines: Sequence[np.ndarray]) -> tuple[float, float]:
    """The loss axis: from the lowest point of any line (a curve's end must not fall off) to the highest of
    their 90th percentiles (the early steps' high losses would squash the rest), with a 10% margin."""
    vals = [v[np.isfinite(v)] for v in lines]
    vals = [v for v in vals if v.size]
    if not vals:
        return 0.0, 1.0
    lo = min(float(np.min(v)) for v in vals)
    hi = max(max(float(np.percentile(v, 90)) for v in vals), lo + 1e-9)
    return lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)


def plot_predictions(plotted, fit_curves: Sequence[Curve], fits: dict[str, Fit], path: Path, window: int = 9,
                     fitted: dict[str, list[np.ndarray]] | None = None) -> Path:
    """Predicted curves (a band per law) over the real ones where they exist; LRs in a lower panel. ``fitted``:
    each law's curve of each fitted run, where already computed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax, axl = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    styles = {"anneal": "-", "multipower": "--"}
    lines: list[np.ndarray] = []

    def real_line(c: Curve, **kw) -> None:
        n = c.measured(c.peak)
        lines.append(smooth(c.losses, window)[n])
        ax.plot(n, lines[-1], **kw)

    for i, c in enumerate(fit_curves):
        real_line(c, color="0.6", linewidth=0.9)
        axl.plot(np.arange(1, c.steps + 1), c.lrs, color="0.6", linewidth=0.9)
        for law, f in fits.items():
            mid = fitted[law][i] if fitted else f.curve(c)
            ax.plot(np.arange(c.steps + 1), mid, color="0.35", linestyle=styles.get(law, "-"), linewidth=0.8)
    for i, (target, real, curves) in enumerate(plotted):
        color = f"C{i % 10}"
        n = np.arange(target.steps + 1)
        if real is not None:
            real_line(real, color=color, alpha=0.45, linewidth=2.5)
        for law, (mid, lo, hi) in curves.items():
            ax.plot(n, mid, color=color, linestyle=styles.get(law, "-"), linewidth=1.2, label=f"{target.name}: {law}")
            ax.fill_between(n, lo, hi, color=color, alpha=0.12, linewidth=0)
            lines.append(mid[target.peak:])
        axl.plot(np.arange(1, target.steps + 1), target.lrs, color=color)
    ax.set_ylabel("loss")
    ax.set_title(f"predicted (lines, 95% bootstrap band) vs real (thick, {window}-point mean); fitted runs in grey",
                 fontsize=10)
    ax.set_ylim(*y_limits(lines))
    ax.legend(fontsize=7, ncol=2)
    axl.set_ylabel("LR (of update n)")
    axl.set_xlabel("updates done (n)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
