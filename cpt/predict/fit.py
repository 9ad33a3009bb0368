"""Fitting a law to runs' curves: robust least squares from grid starts, a moving-block bootstrap, and the
refusal of data that cannot identify the law."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpt.errors import CptError
from cpt.predict.curves import Curve
from cpt.predict.laws import LAMBDA, LAWS, PARAMS, _features, _linear_part, law_curve, law_jacobian


@dataclass
class Fit:
    """A fitted law: parameters, the bootstrap replicates, and how to apply it to a schedule."""

    law: str
    theta: np.ndarray
    ref_lr: float
    tokens_per_step: int
    lam: float = LAMBDA
    runs: tuple[str, ...] = ()
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    huber_scale: float = float("nan")
    fit_rmse_rel: float = float("nan")  # in-sample, on log-loss (~ relative error)

    @property
    def names(self) -> tuple[str, ...]:
        return PARAMS[self.law]

    def _check(self, curve: Curve) -> None:
        if curve.tokens_per_step != self.tokens_per_step:
            raise CptError(
                f"{curve.name}: {curve.tokens_per_step} tokens per step, but the law was fitted on runs with "
                f"{self.tokens_per_step}: the laws count optimizer steps and do not carry across batch sizes"
            )

    def predict(self, curve: Curve) -> np.ndarray:
        """The predicted loss after n = 0..T updates of ``curve``'s schedule (NaN in the warmup)."""
        self._check(curve)
        return law_curve(self.law, self.theta, _features(curve.lrs, self.ref_lr, self.lam))

    def band(self, curve: Curve, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap interval of the prediction (noise in the fitted runs only, not the law's
        own misfit); the central prediction again when there are no replicates."""
        self._check(curve)
        f = _features(curve.lrs, self.ref_lr, self.lam)
        if not len(self.boot):
            mid = law_curve(self.law, self.theta, f)
            return mid, mid
        preds = np.stack([law_curve(self.law, th, f) for th in self.boot])
        q = 100 * (1 - level) / 2
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: the warmup
            return np.nanpercentile(preds, q, axis=0), np.nanpercentile(preds, 100 - q, axis=0)

    def param_intervals(self, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
        """{name: (value, low, high)} with bootstrap percentile intervals."""
        q = 100 * (1 - level) / 2
        out = {}
        for j, name in enumerate(self.names):
            if len(self.boot):
                lo, hi = np.percentile(self.boot[:, j], [q, 100 - q])
            else:
                lo = hi = self.theta[j]
            out[name] = (float(self.theta[j]), float(lo), float(hi))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"law": self.law, "params": dict(zip(self.names, map(float, self.theta), strict=True)),
                "intervals": {k: [lo, hi] for k, (_, lo, hi) in self.param_intervals().items()},
                "ref_lr": self.ref_lr, "lambda": self.lam if self.law == "anneal" else None,
                "tokens_per_step": self.tokens_per_step, "runs": list(self.runs),
                "bootstrap": len(self.boot), "huber_scale": self.huber_scale,
                "fit_rmse_rel": self.fit_rmse_rel}


def check_identifiable(curves: Sequence[Curve], law: str) -> None:
    """Refuse data that cannot identify ``law``, with the reason and what would fix it."""
    names = ", ".join(c.name for c in curves)
    n_par = len(PARAMS[law])
    points = sum(len(c.measured(c.peak)) for c in curves)
    if points < 4 * n_par:
        raise CptError(f"{law}: {points} measured points after the warmup in {names}; a fit of {n_par} "
                       f"parameters needs at least {4 * n_par}")
    drops = []
    for c in curves:
        peak = c.lrs[c.peak - 1]
        drops.append((peak - c.lrs[c.peak:].min()) / peak if c.steps > c.peak else 0.0)
    if max(drops) < 0.05:
        raise CptError(
            f"{law}: the LR never falls after the warmup in {names} (largest fall {100 * max(drops):.1f}% of "
            f"the peak), so the annealing term ({'C*S2' if law == 'anneal' else 'the loss-drop term'}) "
            f"cannot be identified: a constant LR shows how loss falls with the LR area, not what "
            f"annealing adds. Fit on a run that decays its LR too, e.g. a constant and a cosine run"
        )
    after = 0
    for c, dr in zip(curves, drops, strict=True):
        if dr >= 0.05:
            peak = c.lrs[c.peak - 1]
            first = c.peak + int(np.argmax(c.lrs[c.peak:] < peak * 0.99))  # the first update 1% below the peak
            after += len(c.measured(first))
    need = 2 * (n_par - 3)
    if after < need:
        raise CptError(f"{law}: only {after} measured points after the LR starts to fall in {names}; the "
                       f"annealing term needs at least {need} to be seen developing")


def _noise_scale(curves: Sequence[Curve]) -> float:
    """Robust point-to-point noise of log-loss: MAD of first differences / (0.6745 * sqrt 2)."""
    diffs = np.concatenate([np.diff(np.log(c.losses[c.measured(c.peak)])) for c in curves])
    mad = np.median(np.abs(diffs - np.median(diffs)))
    return float(max(mad / (0.6745 * math.sqrt(2)), 1e-4))


def fit(curves: Sequence[Curve], law: str, lam: float = LAMBDA, bootstrap: int = 100,
        seed: int = 0) -> Fit:
    """Fit ``law`` to one or more runs' curves (their LRs and losses) and bootstrap it.

    Robust: Huber loss on log-loss residuals, scale 1.345 x the curves' step-to-step noise (so that
    steps within the noise count as least squares, outliers linearly); starts from the best points of
    a grid over the nonlinear parameters with the linear ones solved exactly. Intervals: a moving-
    block bootstrap over each run's post-warmup steps (blocks of ~sqrt(n) steps keep the correlation
    of neighbouring residuals), each replicate refitted from the best parameters.
    """
    from scipy.optimize import least_squares

    if law not in LAWS:
        raise CptError(f"unknown law {law!r} (expected one of {', '.join(LAWS)})")
    curves = list(curves)
    if not curves:
        raise CptError("fit: no runs given")
    if any(c.losses is None for c in curves):
        raise CptError("fit: every curve needs its losses (a run, not only a schedule)")
    tps = {c.tokens_per_step for c in curves}
    if len(tps) > 1:
        raise CptError(f"fit: the runs differ in tokens per step ({sorted(tps)}); the laws count optimizer "
                       f"steps, so fit runs of one batch size")
    check_identifiable(curves, law)

    ref = float(max(c.lrs.max() for c in curves))
    feats = [_features(c.lrs, ref, lam) for c in curves]
    idx = [c.measured(f.p) for c, f in zip(curves, feats, strict=True)]
    y = np.concatenate([c.losses[i] for c, i in zip(curves, idx, strict=True)])
    logy = np.log(y)
    delta = 1.345 * _noise_scale(curves)

    def predict_all(theta) -> np.ndarray:
        return np.concatenate([law_curve(law, theta, f)[i] for f, i in zip(feats, idx, strict=True)])

    def residuals(theta) -> np.ndarray:
        pred = predict_all(theta)
        r = np.log(np.maximum(pred, 1e-3)) - logy
        return np.where(np.isfinite(r), r, 10.0)

    def jacobian(theta) -> np.ndarray:
        pred = np.maximum(predict_all(theta), 1e-3)
        J = np.concatenate([law_jacobian(law, theta, f)[i] for f, i in zip(feats, idx, strict=True)])
        return np.nan_to_num(J / pred[:, None], nan=0.0, posinf=0.0, neginf=0.0)

    lo, hi, grid = _search_space(law, float(y.max()))
    starts = _grid_starts(law, grid, feats, idx, y, lo, hi)

    best = None
    for x0 in starts:
        r = least_squares(residuals, x0, jac=jacobian, bounds=(lo, hi), loss="huber", f_scale=delta,
                          x_scale="jac", max_nfev=3000, ftol=1e-7, xtol=1e-7)
        if best is None or r.cost < best.cost:
            best = r
    theta = best.x
    boots = _bootstrap(residuals, jacobian, theta, idx, (lo, hi), delta, bootstrap, seed)
    rmse = float(np.sqrt(np.mean(residuals(theta) ** 2)))
    return Fit(law, theta, ref, tps.pop(), lam, tuple(c.name for c in curves), boots, delta, rmse)


def _search_space(law: str, ymax: float) -> tuple[list[float], list[float], list[tuple[float, ...]]]:
    """Bounds of ``law``'s parameters (L0 below the highest loss seen) and the grid over its nonlinear
    ones that the fit starts from."""
    if law == "anneal":
        lo = [0.0, 0.0, 0.01, 0.0]
        hi = [ymax, np.inf, 3.0, np.inf]
        grid = [(a,) for a in np.linspace(0.05, 2.0, 40)]
    else:
        lo = [0.0, 0.0, 0.01, 0.0, 1e-6, 0.01, 0.0]
        hi = [ymax, np.inf, 3.0, np.inf, 1e4, 5.0, 2.0]
        grid = [(a, c, b, g) for a in (0.2, 0.5, 1.0) for c in (0.01, 0.1, 1.0, 10.0)
                for b in (0.3, 0.6, 1.2) for g in (0.0, 0.5, 1.0)]
    return lo, hi, grid


def _bootstrap(residuals, jacobian, theta: np.ndarray, idx: list[np.ndarray], bounds, delta: float,
               replicates: int, seed: int) -> np.ndarray:
    """``replicates`` refits from ``theta``, each on the measured points of every run resampled in moving
    blocks (rows of the result; none: an empty array of the parameters' width)."""
    from scipy.optimize import least_squares

    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + [len(i) for i in idx])
    boots = []
    for _ in range(replicates):
        pick = np.concatenate([off + _block_resample(len(i), rng) for off, i in zip(offsets, idx, strict=False)])

        def res_b(th, pick=pick):
            return residuals(th)[pick]

        def jac_b(th, pick=pick):
            return jacobian(th)[pick]

        r = least_squares(res_b, theta, jac=jac_b, bounds=bounds, loss="huber", f_scale=delta,
                          x_scale="jac", max_nfev=500, ftol=1e-6, xtol=1e-6)
        boots.append(r.x)
    return np.array(boots) if boots else np.zeros((0, len(theta)))


def _grid_starts(law, grid, feats, idx, y, lo, hi, keep: int = 3) -> list[np.ndarray]:
    """The ``keep`` best grid points, their linear parameters solved by least squares on the loss."""
    scored = []
    for nonlin in grid:
        X = np.concatenate([_linear_part(law, nonlin, f)[i] for f, i in zip(feats, idx, strict=True)])
        if not np.all(np.isfinite(X)):
            continue
        lin, *_ = np.linalg.lstsq(X, y, rcond=None)
        sse = float(np.sum((X @ lin - y) ** 2))
        L0, A, third = lin
        theta = [L0, A, nonlin[0], third] if law == "anneal" else [L0, A, nonlin[0], third, *nonlin[1:]]
        scored.append((sse, np.clip(theta, lo, [h if np.isfinite(h) else 1e12 for h in hi])))
    scored.sort(key=lambda t: t[0])
    starts = []
    for _, th in scored[:keep]:
        th = np.array(th, dtype=float)
        # least_squares needs a start strictly inside the bounds
        span = np.where(np.isfinite(hi), np.array(hi) - np.array(lo), 1.0)
        th = np.clip(th, np.array(lo) + 1e-9 * span, np.where(np.isfinite(hi), np.array(hi) - 1e-9 * span, np.inf))
        starts.append(th)
    return starts


def _block_resample(n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices 0..n-1 resampled in moving blocks of ~sqrt(n)."""
    b = max(1, int(round(math.sqrt(n))))
    starts = rng.integers(0, n - b + 1, size=math.ceil(n / b))
    return np.concatenate([np.arange(s, s + b) for s in starts])[:n]

