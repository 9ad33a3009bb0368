"""Honesty checks of a fit, each with what to do: a parameter on (or within a hair of) its bound, a bootstrap
interval spanning orders of magnitude, an in-sample error far below the held-out one."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

ADVICE = ("fit on runs of more schedule shapes (three runs, as in the papers' protocol: e.g. constant, cosine "
          "and a WSD or step decay), or fit the other law")
_HAIR = 5e-3  # a value this close to a bound (as a fraction of the range) is on it
_ORDERS = 2.0  # an interval wider than this many orders of magnitude is reported


def _near(v: float, bound: float, lo: float, hi: float) -> bool:
    """Whether ``v`` is within a hair (_HAIR of the range, in decades where the range spans several) of
    ``bound``, one of the bounds [lo, hi]; a bound of 0 with no upper one: within 1e-9."""
    if not math.isfinite(hi):
        return abs(v - bound) <= 1e-9 * max(1.0, abs(bound))
    if lo > 0 and hi / lo >= 1e3:
        return abs(math.log10(max(v, 1e-300) / bound)) <= _HAIR * math.log10(hi / lo)
    return abs(v - bound) <= _HAIR * (hi - lo)


def _bound_note(name: str, v: float, a: float, b: float, lo: float, hi: float) -> str | None:
    """What of (the value ``v``, its interval [a, b]) sits on a bound of [lo, hi]."""
    for bound, side in ((lo, "lower"), (hi, "upper")):
        if not math.isfinite(bound):
            continue
        if _near(v, bound, lo, hi):
            return f"{name} = {v:.4g} is on its {side} bound {bound:g}"
        if _near(a if side == "lower" else b, bound, lo, hi):
            return f"{name} = {v:.4g}: its 95% interval [{a:.3g}, {b:.3g}] reaches its {side} bound {bound:g}"
    return None


def fit_warnings(f: Any) -> list[str]:
    """What is degenerate in ``f`` (a Fit): parameters (or their intervals) on their bounds, intervals over
    orders of magnitude."""
    out = []
    lo, hi = f.bounds
    for j, (name, (v, a, b)) in enumerate(f.param_intervals().items() if lo else ()):
        note = _bound_note(name, v, a, b, lo[j], hi[j])
        if note:
            out.append(f"{f.law}: {note}: the data do not pin it and the fit is degenerate there; {ADVICE}")
        elif len(f.boot) and b > 0 and (a <= 0 or math.log10(b / a) > _ORDERS):
            span = (f"reaches {a:.3g}: not even its order of magnitude is known" if a <= 0
                    else f"spans {math.log10(b / a):.1f} orders of magnitude")
            out.append(f"{f.law}: {name}'s 95% interval [{a:.3g}, {b:.3g}] {span}: predictions that lean on it "
                       f"are extrapolations; {ADVICE}")
    return out


def _worst(errors: Mapping[str, Mapping[str, float]]) -> tuple[str, float]:
    """The run with the largest error (the larger of |final-loss error| and curve MARE) and that error."""
    scored = {k: max(abs(e.get("final_err", 0.0)), e.get("mare", 0.0)) for k, e in errors.items()}
    scored = {k: v for k, v in scored.items() if math.isfinite(v)}
    if not scored:
        return "", float("nan")
    run = max(scored, key=scored.get)
    return run, scored[run]


def held_out_warning(law: str, in_sample: Mapping[str, Mapping[str, float]],
                     held_out: Mapping[str, Mapping[str, float]]) -> str | None:
    """A warning when the held-out error is far above the in-sample one (3x and 0.5 points at least)."""
    run_in, e_in = _worst(in_sample)
    run_out, e_out = _worst(held_out)
    if not run_in or not run_out or not e_out > max(3 * e_in, 0.005):
        return None
    return (f"{law}: the in-sample error (worst {100 * e_in:.2f}%, {run_in}) is far below the held-out one (worst "
            f"{100 * e_out:.2f}%, {run_out}): the law fits the fitted runs' own curves, not what changes between "
            f"schedules; {ADVICE}, and read its predictions as +-{100 * e_out:.1f}% at best")
