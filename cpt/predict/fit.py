"""Fitting a law to runs' curves: robust least squares from grid starts, a moving-block bootstrap, and the
refusal of data that cannot identify the law."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpt.errors import CptError
from cpt.predict.curves import Curve
from cpt.predict.laws import LAMBDA, LAWS, PARAMS, _features, _linear_part, law_curve, law_values_jacobian

MAX_POINTS = 256  # fit points per run: past this many measured points, means of blocks of them
BOOTSTRAP = 20  # the CLI's default replicates (timed in docs/prediction.md)
_BOOT_NFEV = 30  # evaluations a replicate may take from the best fit (it counts where it stopped)
_GRID_POINTS = 64  # fit points per run on which the grid of starts is scored and the starts refined
_BLOCK_WIDTH = 0.05  # a block of fit points spans at most this fraction of its first n ...
_BLOCK_LR = 0.02  # ... and LR changes adding up to at most this fraction of the peak LR
_EVAL_BUDGET = 2e8  # (point, LR change) pairs of the multi-power sum for one predicted curve


@dataclass
class Fit:
    """A fitted law: parameters, the bootstrap replicates, and how to apply it to a schedule."""

    law: str
    theta: np.ndarray
    ref_lr: float
    tokens_per_step: int | None
    lam: float = LAMBDA
    runs: tuple[str, ...] = ()
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    huber_scale: float = float("nan")
    fit_rmse_rel: float = float("nan")  # in-sample, on log-loss (~ relative error) at the fit points
    bounds: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())
    points: tuple[int, int] = (0, 0)  # (fit points, measured points they summarise)
    seconds: tuple[float, float] = (0.0, 0.0)  # (fit, bootstrap)

    @property
    def names(self) -> tuple[str, ...]:
        return PARAMS[self.law]

    def _check(self, curve: Curve) -> None:
        if None not in (curve.tokens_per_step, self.tokens_per_step) and curve.tokens_per_step != self.tokens_per_step:
            raise CptError(
                f"{curve.name}: {curve.tokens_per_step} tokens per step, but the law was fitted on runs with "
                f"{self.tokens_per_step}: the laws count optimizer steps and do not carry across batch sizes"
            )

    def predict(self, curve: Curve, at=None) -> np.ndarray:
        """The predicted loss after n = 0..T updates of ``curve``'s schedule, or after the n in ``at``
        (NaN in the warmup)."""
        self._check(curve)
        return law_curve(self.law, self.theta, _features(curve.lrs, self.ref_lr, self.lam), at)

    def band(self, curve: Curve, level: float = 0.95, at=None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap interval of the prediction (noise in the fitted runs only, not the law's
        own misfit); the central prediction again when there are no replicates."""
        self._check(curve)
        f = _features(curve.lrs, self.ref_lr, self.lam)
        if not len(self.boot):
            mid = law_curve(self.law, self.theta, f, at)
            return mid, mid
        preds = np.stack([law_curve(self.law, th, f, at) for th in self.boot])
        q = 100 * (1 - level) / 2
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: the warmup
            return np.nanpercentile(preds, q, axis=0), np.nanpercentile(preds, 100 - q, axis=0)

    def eval_points(self, curve: Curve, must: Sequence[int] = (), copies: int = 1) -> np.ndarray | None:
        """Where to evaluate a whole predicted curve: None (every n) when that is cheap (the anneal law, or
        a multi-power sum of at most _EVAL_BUDGET pairs for ``copies`` parameter sets), else an even grid
        of n from the peak to T that keeps to the budget, with the n in ``must``."""
        changes = _features(curve.lrs, self.ref_lr, self.lam).changes if self.law == "multipower" else 0
        T = curve.steps
        if (T + 1) * changes * copies <= _EVAL_BUDGET:
            return None
        m = max(64, int(_EVAL_BUDGET / (changes * copies)))
        grid = np.linspace(curve.peak, T, m).round().astype(np.int64)
        return np.unique(np.concatenate([grid, np.asarray(must, dtype=np.int64), [T]]).clip(0, T))

    def curve(self, curve: Curve, must: Sequence[int] = ()) -> np.ndarray:
        """The predicted loss at every n = 0..T: exact at ``eval_points`` (every n where that is cheap),
        linearly interpolated between them."""
        at = self.eval_points(curve, must)
        return self.predict(curve) if at is None else _fill(curve, at, self.predict(curve, at=at))

    def band_curve(self, curve: Curve, must: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """``band`` at every n = 0..T, exact at ``eval_points`` for all the replicates, interpolated between."""
        at = self.eval_points(curve, must, copies=max(1, len(self.boot)))
        if at is None:
            return self.band(curve)
        lo, hi = self.band(curve, at=at)
        return _fill(curve, at, lo), _fill(curve, at, hi)

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

    def lam_units(self) -> str:
        """lambda with its unit: per optimizer step, its half-life in steps and (batch size known) tokens."""
        if not 0 < self.lam < 1:
            return f"{self.lam:g} per optimizer step"
        half = math.log(0.5) / math.log(self.lam)
        tokens = f" = {half * self.tokens_per_step:.3g} tokens" if self.tokens_per_step else ""
        return f"{self.lam:g} per optimizer step (half-life {half:.4g} steps{tokens})"

    def to_dict(self) -> dict[str, Any]:
        from cpt.predict.checks import fit_warnings

        anneal = self.law == "anneal"
        return {"law": self.law, "params": dict(zip(self.names, map(float, self.theta), strict=True)),
                "intervals": {k: [lo, hi] for k, (_, lo, hi) in self.param_intervals().items()},
                "ref_lr": self.ref_lr, "lambda": self.lam if anneal else None,
                "lambda_unit": "per optimizer step" if anneal else None,
                "lambda_text": self.lam_units() if anneal else None,
                "tokens_per_step": self.tokens_per_step, "runs": list(self.runs),
                "bootstrap": len(self.boot), "huber_scale": self.huber_scale,
                "fit_rmse_rel": self.fit_rmse_rel, "fit_points": self.points[0], "measured_points": self.points[1],
                "seconds": self.seconds[0], "bootstrap_seconds": self.seconds[1], "warnings": fit_warnings(self)}


def _fill(curve: Curve, at: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A curve over n = 0..T from its values at ``at``: linear between them, NaN in the warmup."""
    ok = np.isfinite(values)
    out = np.interp(np.arange(curve.steps + 1), at[ok], values[ok]) if ok.any() else np.full(curve.steps + 1, np.nan)
    out[: curve.peak] = np.nan
    return out


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


def fit_points(c: Curve, start: int, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points a run is fitted on: (n, mean log-loss, how many measured points each stands for).

    Every measured n >= ``start``, or, past ``max_points`` of them (0: no limit), the means of blocks of
    consecutive measured points, each placed at its mean n (rounded): blocks of at most j points (the
    fewest that give ``max_points`` blocks), narrower where the curve bends: at most _BLOCK_WIDTH of their
    first n (early on) and _BLOCK_LR of the peak LR of change within them (a decay). The law is still
    evaluated exactly at those n (S1, S_k from every step's LR); only the noise is averaged.
    """
    n = c.measured(start)
    ly = np.log(c.losses[n])
    if not max_points or len(n) <= max_points:
        return n, ly, np.ones(len(n))
    j = -(-len(n) // max_points)
    change = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(c.lrs, prepend=0.0)))]) / c.lrs.max()
    cv = change[n]
    cuts, a = [], 0
    while a < len(n):
        cuts.append(a)
        b = min(a + j, int(np.searchsorted(n, n[a] * (1 + _BLOCK_WIDTH), side="right")),
                int(np.searchsorted(cv, cv[a] + _BLOCK_LR, side="right")))
        a = max(b, a + 1)
    counts = np.diff(np.append(cuts, len(n)))
    mid = np.round(np.add.reduceat(n.astype(float), cuts) / counts).astype(np.int64)
    return mid, np.add.reduceat(ly, cuts) / counts, counts.astype(float)


class _Problem:
    """The fit's residuals and Jacobian: log-loss at the fit points of every run, each residual weighted
    by the square root of how many measured points its block mean stands for (a block mean of c points
    then counts in least squares as those c points would)."""

    def __init__(self, law: str, feats: list, pts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.law, self.feats, self.idx = law, feats, [n for n, _, _ in pts]
        self.logy = np.concatenate([ly for _, ly, _ in pts])
        self.w = np.sqrt(np.concatenate([c for _, _, c in pts]))

    def subset(self, per_run: int) -> _Problem:
        """Every j-th fit point of each run, at most ``per_run`` of them."""
        offsets = np.cumsum([0] + [len(i) for i in self.idx])
        keep = [np.arange(0, len(i), -(-len(i) // per_run)) for i in self.idx]
        sub = _Problem.__new__(_Problem)
        sub.law, sub.feats = self.law, self.feats
        sub.idx = [i[k] for i, k in zip(self.idx, keep, strict=True)]
        rows = np.concatenate([off + k for off, k in zip(offsets, keep, strict=False)])
        sub.logy, sub.w = self.logy[rows], self.w[rows]
        return sub

    def residuals(self, theta) -> np.ndarray:
        pred = np.concatenate([law_curve(self.law, theta, f, at=i) for f, i in zip(self.feats, self.idx, strict=True)])
        r = (np.log(np.maximum(pred, 1e-3)) - self.logy) * self.w
        return np.where(np.isfinite(r), r, 10.0)

    def jacobian(self, theta) -> np.ndarray:
        parts = [law_values_jacobian(self.law, theta, f, at=i) for f, i in zip(self.feats, self.idx, strict=True)]
        pred = np.maximum(np.concatenate([v for v, _ in parts]), 1e-3)
        J = np.concatenate([j for _, j in parts]) * (self.w / pred)[:, None]
        return np.nan_to_num(J, nan=0.0, posinf=0.0, neginf=0.0)


def _checked(curves: Sequence[Curve], law: str) -> tuple[list[Curve], int | None]:
    """The curves, refused where they cannot be fitted together; their tokens per step (None: unknown)."""
    if law not in LAWS:
        raise CptError(f"unknown law {law!r} (expected one of {', '.join(LAWS)})")
    curves = list(curves)
    if not curves:
        raise CptError("fit: no runs given")
    if any(c.losses is None for c in curves):
        raise CptError("fit: every curve needs its losses (a run, not only a schedule)")
    tps = {c.tokens_per_step for c in curves} - {None}
    if len(tps) > 1:
        raise CptError(f"fit: the runs differ in tokens per step ({sorted(tps)}); the laws count optimizer "
                       f"steps, so fit runs of one batch size")
    check_identifiable(curves, law)
    return curves, tps.pop() if tps else None


def fit(curves: Sequence[Curve], law: str, lam: float = LAMBDA, bootstrap: int = 100,
        seed: int = 0, max_points: int = MAX_POINTS) -> Fit:
    """Fit ``law`` to any number of runs' curves (their LRs and losses) and bootstrap it.

    Robust: Huber loss on log-loss residuals, scale 1.345 x the curves' step-to-step noise (so that
    steps within the noise count as least squares, outliers linearly). Starts: the best points of a
    grid over the nonlinear parameters with the linear ones solved exactly, each refined on up to
    _GRID_POINTS fit points of each run; the best of them is refined on all the fit points (at most
    ``max_points`` a run, see ``fit_points``). Intervals: a moving-block bootstrap over each run's fit
    points (blocks of ~sqrt(n) keep the correlation of neighbouring residuals), each replicate refitted
    from the best parameters.
    """
    t0 = time.perf_counter()
    curves, tps = _checked(curves, law)
    ref = float(max(c.lrs.max() for c in curves))
    feats = [_features(c.lrs, ref, lam) for c in curves]
    prob = _Problem(law, feats, [fit_points(c, f.p, max_points) for c, f in zip(curves, feats, strict=True)])
    delta = 1.345 * _noise_scale(curves)
    ymax = max(float(np.max(c.losses[c.measured(f.p)])) for c, f in zip(curves, feats, strict=True))
    lo, hi, grid = _search_space(law, ymax)
    coarse = prob.subset(_GRID_POINTS)
    rough = min((_solve(coarse, x0, (lo, hi), delta, max_nfev=500, tol=1e-5)
                 for x0 in _grid_starts(law, grid, coarse, lo, hi)), key=lambda r: r.cost)
    theta = _solve(prob, rough.x, (lo, hi), delta).x
    t1 = time.perf_counter()
    boots = _bootstrap(prob, theta, (lo, hi), delta, bootstrap, seed)
    rmse = float(np.sqrt(np.mean(prob.residuals(theta) ** 2)))
    measured = sum(len(c.measured(f.p)) for c, f in zip(curves, feats, strict=True))
    return Fit(law, theta, ref, tps, lam, tuple(c.name for c in curves), boots, delta, rmse,
               (tuple(lo), tuple(hi)), (len(prob.logy), measured), (t1 - t0, time.perf_counter() - t1))


def _solve(prob: _Problem, x0: np.ndarray, bounds, delta: float, pick: np.ndarray | None = None,
           max_nfev: int = 3000, tol: float = 1e-7):
    """Robust least squares of ``prob`` (its residuals at the rows ``pick`` only, where given) from ``x0``."""
    from scipy.optimize import least_squares

    def res(th):
        r = prob.residuals(th)
        return r if pick is None else r[pick]

    def jac(th):
        J = prob.jacobian(th)
        return J if pick is None else J[pick]

    return least_squares(res, x0, jac=jac, bounds=bounds, loss="huber", f_scale=delta, x_scale="jac",
                         max_nfev=max_nfev, ftol=tol, xtol=tol)


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


def _bootstrap(prob: _Problem, theta: np.ndarray, bounds, delta: float, replicates: int, seed: int) -> np.ndarray:
    """``replicates`` refits from ``theta``, each on the fit points of every run resampled in moving
    blocks (rows of the result; none: an empty array of the parameters' width)."""
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + [len(i) for i in prob.idx])
    boots = []
    for _ in range(replicates):
        pick = np.concatenate([off + _block_resample(len(i), rng) for off, i in zip(offsets, prob.idx, strict=False)])
        boots.append(_solve(prob, theta, bounds, delta, pick, max_nfev=_BOOT_NFEV, tol=1e-6).x)
    return np.array(boots) if boots else np.zeros((0, len(theta)))


def _grid_starts(law, grid, prob: _Problem, lo, hi, keep: int = 3) -> list[np.ndarray]:
    """The ``keep`` best grid points, their linear parameters solved by (weighted) least squares on the
    loss at the fit points of ``prob``."""
    y = np.exp(prob.logy)
    scored = []
    for nonlin in grid:
        X = np.concatenate([_linear_part(law, nonlin, f, at=n) for f, n in zip(prob.feats, prob.idx, strict=True)])
        if not np.all(np.isfinite(X)):
            continue
        lin, *_ = np.linalg.lstsq(X * prob.w[:, None], y * prob.w, rcond=None)
        sse = float(np.sum(((X @ lin - y) * prob.w) ** 2))
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
