"""Comparing a predicted curve with a real one: smoothing, the final loss, errors, the naive baseline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cpt.predict.curves import Curve


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, NaNs skipped, the window truncated at the ends."""
    y = np.asarray(y, dtype=float)
    if window <= 1:
        return y.copy()
    h = window // 2
    ok = np.isfinite(y)
    cs = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    cn = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(len(y))
    a, b = np.maximum(i - h, 0), np.minimum(i + h + 1, len(y))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (cs[b] - cs[a]) / (cn[b] - cn[a])
    return np.where(ok, out, np.nan)


def final_points(T: int, measured: np.ndarray | None, window: int) -> np.ndarray:
    """The n whose mean is "the final loss": the last ``window`` measured points of a run, or, for a
    schedule not run, the last ``window`` points at which train loss is logged (n = T-window..T-1)."""
    if measured is not None:
        return measured[-window:]
    return np.arange(max(T - window, 0), T)


def _mean(x: np.ndarray) -> float:
    """Mean of the finite values; NaN (and no warning) when there are none."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(np.mean(x)) if x.size else float("nan")


def compare(pred: np.ndarray, real: np.ndarray, start: int, window: int = 9, final: int = 10) -> dict[str, float]:
    """Error of a predicted curve against a real one, both treated alike.

    ``mare``: mean |pred - real| / real over the measured n >= ``start``, both curves smoothed by the
    same centred ``window``-point mean (after dropping n < start, so no window reaches into the
    warmup); ``worst``: the largest of those relative errors; ``final_*``: the mean of the last ``final`` measured points, raw, on both sides, and the
    signed relative error of the prediction. NaN (no warning) where the two share no point.
    """
    n = np.arange(min(len(pred), len(real)))
    ok = (n >= start) & np.isfinite(real[: len(n)])
    ps, rs = (smooth(np.where(ok, c[: len(n)], np.nan), window) for c in (pred, real))
    rel = np.abs(ps[ok] - rs[ok]) / rs[ok]
    mare = _mean(rel)
    worst = float(np.nanmax(rel)) if np.isfinite(rel).any() else float("nan")
    k = final_points(len(n) - 1, n[ok], final)
    fp, fr = _mean(pred[k]), _mean(real[k])
    return {"mare": mare, "worst": worst, "final_pred": fp, "final_real": fr, "final_err": (fp - fr) / fr}


def _per_step(c: Curve, other: Curve) -> int:
    """What one update of ``c`` counts, to align it with ``other``: its tokens, or 1 (steps) where either
    run's batch size is unknown."""
    return c.tokens_per_step if c.tokens_per_step and other.tokens_per_step else 1


def closest_run(target: Curve, runs: Sequence[Curve]) -> Curve | None:
    """The naive baseline's run: of the ``runs`` that reach the target's end (in tokens; in steps where a
    batch size is unknown), the one whose LR, aligned by tokens, is closest to the target's (mean |difference|
    over the target's updates); None when none reaches it."""
    def dist(c: Curve) -> float:
        tc, tt = _per_step(c, target), _per_step(target, c)
        if c.steps * tc < target.steps * tt:
            return np.inf
        lr = np.interp(np.arange(1, target.steps + 1) * tt, np.arange(1, c.steps + 1) * tc, c.lrs)
        return float(np.mean(np.abs(lr - target.lrs)))

    best = min(runs, key=dist, default=None)
    return best if best is not None and np.isfinite(dist(best)) else None


def baseline(target: Curve, real: Curve, runs: Sequence[Curve], window: int = 9, final: int = 10) -> dict:
    """The naive baseline for ``real`` (a run of ``target``'s schedule): the closest of ``runs``, its loss
    taken as the prediction at the same tokens (interpolated between its records, held at its ends) and
    scored like a law; or, when there is none, why not (``run`` None, ``why``)."""
    base = closest_run(target, runs)
    if base is None:
        if not runs:
            return {"run": None, "why": "no other fitted run to take as the naive prediction"}
        longest = max(runs, key=lambda c: c.steps * _per_step(c, target))
        unit = "tokens" if _per_step(longest, target) > 1 else "steps"
        return {"run": None, "why": f"no fitted run reaches this run's end ({target.steps * _per_step(target, longest)} "
                                    f"{unit}; the longest, {longest.name}, ends at "
                                    f"{longest.steps * _per_step(longest, target)})"}
    tb, tr = _per_step(base, target), _per_step(target, base)
    mb = base.measured()
    pred = np.interp(np.arange(len(real.losses)) * tr, mb * tb, base.losses[mb])
    return {"run": base.name, "aligned": "tokens" if tb > 1 else "steps",
            **compare(pred, real.losses, target.peak, window, final)}
