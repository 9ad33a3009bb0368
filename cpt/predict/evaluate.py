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


def compare(pred: np.ndarray, real: np.ndarray, start: int, window: int = 9, final: int = 10) -> dict[str, float]:
    """Error of a predicted curve against a real one, both treated alike.

    ``mare``: mean |pred - real| / real over the measured n >= ``start``, both curves smoothed by the
    same centred ``window``-point mean (after dropping n < start, so no window reaches into the
    warmup); ``final_*``: the mean of the last ``final`` measured points, raw, on both sides, and the
    signed relative error of the prediction.
    """
    n = np.arange(min(len(pred), len(real)))
    ok = (n >= start) & np.isfinite(real[: len(n)])
    ps, rs = (smooth(np.where(ok, c[: len(n)], np.nan), window) for c in (pred, real))
    mare = float(np.nanmean(np.abs(ps[ok] - rs[ok]) / rs[ok]))
    k = final_points(len(n) - 1, n[ok], final)
    fp, fr = float(np.mean(pred[k])), float(np.mean(real[k]))
    return {"mare": mare, "final_pred": fp, "final_real": fr, "final_err": (fp - fr) / fr}


def closest_run(target: Curve, runs: Sequence[Curve]) -> Curve:
    """The naive baseline: the run whose LR sequence is closest (mean |difference|) to the target's."""
    def dist(c: Curve) -> float:
        n = min(c.steps, target.steps)
        return float(np.mean(np.abs(c.lrs[:n] - target.lrs[:n]))) + (0.0 if c.steps == target.steps else np.inf)

    return min(runs, key=dist)

