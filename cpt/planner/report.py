"""The report of `cpt plan`: plan.md (in `cpt predict`'s style: a parameter table per fit, then the
predictions) and frontier.png (the predicted forgetting/adaptation frontier, the budget, the pick, and the
pilots with the fitted law)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpt.planner.design import THIN_MARGIN
from cpt.planner.law import DomainFit, Pilot
from cpt.predict.report import y_limits


def _ci(t: Sequence[float]) -> str:
    return f"{t[0]:+.3f} ({t[1]:+.3f} to {t[2]:+.3f})"


def _verdict(rep: dict[str, Any]) -> list[str]:
    unit = "nats" if rep["unit"] == "loss" else "bits/byte"
    budget = f"final old-domain rise <= {rep['max_forgetting']:g} {unit}" + (
        f" and worst in-stage rise <= {rep['max_rise']:g}" if rep["max_rise"] is not None else "")
    p = rep["pick"]
    if p is None:
        best = min(rep["candidates"], key=lambda c: c["old_rise"][0])
        lines = [f"**The budget cannot be met** ({budget}) by any candidate: the least forgetting predicted is "
                 f"{best['old_rise'][0]:+.3f} (worst {best['old_worst'][0]:+.3f}) at replay {best['replay']:g}, max LR "
                 f"{best['max_lr']:.3g}. Widen --replay (more replay) or --lr-scales (lower LRs), or relax the budget."]
    else:
        lines = [f"**Pick**: replay {p['replay']:g} of {rep['old']}, max LR {p['max_lr']:.3g} -> `{rep['recipe_out']}` "
                 f"(`cpt train {rep['recipe_out']}`). Predicted: old-domain rise {_ci(p['old_rise'])}, worst "
                 f"{_ci(p['old_worst'])}, new-domain final {p['new_final'][0]:.3f} ({p['new_final'][1]:.3f} to "
                 f"{p['new_final'][2]:.3f}); budget: {budget}."]
        if rep.get("controlled_out"):
            thin = any(THIN_MARGIN in n for n in rep["notes"])
            lines += ["", ("**Run this instead**, the margin being thinner than the law's miss on a held-out pilot: "
                           if thin else "") + f"the same LR with the replay controller starting at that share, "
                      f"`{rep['controlled_out']}`: it raises the share online if the old domain rises faster than the "
                      "law said (a fixed recipe cannot; docs/planning.md measures both)."]
    if rep["notes"]:
        lines += ["", "**Not to be trusted as it stands:**", ""] + [f"- {n}" for n in rep["notes"]]
    else:
        lines += ["", "No check found a reason to distrust the fit (its intervals cover pilot noise only, not the "
                      "law's own misfit; the held-out pilots above measure that)."]
    return lines


def render_plan(rep: dict[str, Any], brief: bool = False) -> str:
    if brief:
        return "\n".join(_verdict(rep))
    full = rep["full_tokens"]
    share = sum(p["tokens"] for p in rep["pilots"]) / full
    parts = ["# cpt plan", "", f"Base recipe `{rep['recipe']}` {' '.join(rep['overrides'])}: {full} tokens of "
             f"{rep['new']} with replay of {rep['old']}; probes {rep['old_probe']} (old) and {rep['new_probe']} (new), "
             f"in {rep['unit']}.", ""] + _verdict(rep) + [""]
    parts += ["## Pilots", "", f"{len(rep['pilots'])} pilots, {share:.1%} of the full run's tokens together, probed after "
              "every step, at the corners of the candidates' (replay, max LR) box: the law is linear in the replay "
              "share and counts LR areas, so every candidate is an interpolation in both and an extrapolation in "
              "length only.", "",
              "| pilot | replay | max LR | tokens | old: start -> end (worst) | new: end |", "|---|---|---|---|---|---|"]
    L0o, L0n = rep["fits"]["old"]["L0"], rep["fits"]["new"]["L0"]
    for p in rep["pilots"]:
        parts.append(f"| {p['name']} | {p['replay']:g} | {p['max_lr']:.3g} | {p['tokens']} | {L0o:.3f} -> "
                     f"{p['old_final']:.3f} ({p['old_worst']:.3f}) | {p['new_final']:.3f} (from {L0n:.3f}) |")
    term = ("c sum_k (eta_(k-1) - eta_k) (1 - 1/(1 + C S_k(n))), the multi-power law's loss drop (bounded by the "
            "LR's fall)" if rep["anneal"] == "drop" else "c S2(n), the annealing area of `cpt predict`'s anneal law")
    parts += ["", "## The law", "", "Per domain, after n updates of a stage replaying a share r: "
              "L(n) = L0 + (a + b r) eta_max^kappa (1 - (1 + S1(n)/s)^-beta) - w annealing; S1 the stage's LR area (Wang "
              "et al. 2025's distribution-shift term), eta_max the stage's peak LR, w the domain's own share of the "
              f"batch (r for the old domain, 1 - r for the new), annealing = {term}; LRs divided by "
              f"{rep['fits']['old']['ref_lr']:g}.", ""]
    for key in ("old", "new"):
        f = rep["fits"][key]
        parts += [f"### {f['domain']} ({key}): L0 = {f['L0']:.4f}", "", "| parameter | value | 95% bootstrap interval |",
                  "|---|---|---|"]
        parts += [f"| {k} | {v:.5g} | {f['intervals'][k][0]:.4g} - {f['intervals'][k][1]:.4g} |" for k, v in f["params"].items()]
        parts += ["", f"{f['points']} probe points of {len(f['runs'])} pilots; RMS residual {f['rmse']:.4f}; "
                  f"{f['bootstrap']} bootstrap replicates (moving blocks of each pilot's residuals).", ""]
        if f["warnings"]:
            parts += ["**Warnings:**", ""] + [f"- {w}" for w in f["warnings"]] + [""]
    parts += ["## Held-out pilots", "", "Each pilot left out in turn, the law fitted on the others, its last probe "
              "predicted (predicted - measured):", "", "| pilot | old | new |", "|---|---|---|"]
    parts += [f"| {k} | {e['old']:+.3f} | {e['new']:+.3f} |" for k, e in rep["held_out"].items()] or ["| none | - | - |"]
    parts += ["", "## Candidates over the full budget", "",
              "Central prediction (95% bootstrap interval); rise = old-domain probe minus its value at the stage's start.",
              "", "| replay | max LR | old rise at the end | worst old rise | new final | meets |", "|---|---|---|---|---|---|"]
    for c in rep["candidates"]:
        ok = c["old_rise"][0] <= rep["max_forgetting"] and (rep["max_rise"] is None or c["old_worst"][0] <= rep["max_rise"])
        mark = " **(pick)**" if rep["pick"] and (c["replay"], c["max_lr"]) == (rep["pick"]["replay"], rep["pick"]["max_lr"]) else ""
        parts.append(f"| {c['replay']:g} | {c['max_lr']:.3g} | {_ci(c['old_rise'])} | {_ci(c['old_worst'])} | "
                     f"{c['new_final'][0]:.3f} ({c['new_final'][1]:.3f}-{c['new_final'][2]:.3f}) | {'yes' if ok else 'no'}{mark} |")
    parts += ["", "## Pilot commands", "", "```"] + [p["command"] for p in rep["pilots"]] + ["```", ""]
    return "\n".join(parts)


def plot_frontier(rep: dict[str, Any], fits: Sequence[DomainFit], olds: Sequence[Pilot], news: Sequence[Pilot],
                  path: Path) -> Path:
    """Left: each candidate's predicted old-domain rise against its new-domain loss (95% intervals), the
    budget line and the pick. Right: the pilots' probe points and the fitted law through them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax, axp = fig.subplots(1, 2)
    lrs = sorted({c["max_lr"] for c in rep["candidates"]})
    for i, lr in enumerate(lrs):
        cs = sorted((c for c in rep["candidates"] if c["max_lr"] == lr), key=lambda c: c["replay"])
        x = np.array([c["old_rise"] for c in cs])
        y = np.array([c["new_final"] for c in cs])
        span = lambda v: np.maximum([v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]], 0)  # noqa: E731 (a centre outside its band)
        ax.errorbar(x[:, 0], y[:, 0], xerr=span(x), yerr=span(y), fmt="o-", color=f"C{i}", ms=4, lw=0.8,
                    elinewidth=0.5, label=f"max LR {lr:.3g}")
        for c, xi, yi in zip(cs, x[:, 0], y[:, 0], strict=True):
            ax.annotate(f"{c['replay']:g}", (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axvline(rep["max_forgetting"], color="k", ls="--", lw=1, label=f"budget {rep['max_forgetting']:g}")
    if rep["pick"]:
        p = rep["pick"]
        ax.plot(p["old_rise"][0], p["new_final"][0], "*", color="red", ms=16, label="pick")
    ax.set_xlabel(f"predicted old-domain rise at the end ({rep['unit']})")
    ax.set_ylabel(f"predicted new-domain final {rep['unit']}")
    ax.set_title("frontier over the full budget (labels: replay share)", fontsize=10)
    ax.legend(fontsize=7)
    lines = []
    for j, (pilots, f, mk) in enumerate(((olds, fits[0], "o"), (news, fits[1], "s"))):
        for i, p in enumerate(pilots):
            mid, _ = f.curves(p.lrs, p.replay)
            axp.plot(p.n, p.losses, mk, color=f"C{i}", ms=3, label=f"{p.name}" if j == 0 else None)
            axp.plot(np.arange(len(mid)), mid, "-", color=f"C{i}", lw=0.8)
            lines += [np.asarray(p.losses), mid]
    axp.set_ylim(*y_limits(lines))
    axp.set_xlabel("updates in the pilot")
    axp.set_ylabel(f"probe {rep['unit']} (circles: {fits[0].domain}, squares: {fits[1].domain})")
    axp.set_title("pilots (points) and the fitted law (lines)", fontsize=10)
    axp.legend(fontsize=7)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
