"""Predict loss curves across LR schedules from one or two runs, and search for a better schedule.

Two laws give the loss as a function of the LR sequence alone, counted in optimizer steps:

* ``anneal``, the scaling law with LR annealing (Tissue et al. 2024)::

      L(n) = L0 + A * S1(n)**-alpha - C * S2(n)

* ``multipower``, the multi-power law (Luo et al. 2025)::

      L(n) = L0 + A * S1(n)**-alpha - B * sum_{k=p+1..n} (eta_{k-1} - eta_k) * G(eta_k**-gamma * S_k(n))
      G(x) = 1 - (C * x + 1)**-beta

The exact form implemented (the conventions matter for a fit on a few hundred steps):

* ``eta_i`` is the LR applied in update ``i`` (i = 1..T), as the trainer logs it with step ``i``. The
  laws are written in ``n``, the number of updates done (0..T): ``S1(n) = sum_{i<=n} eta_i`` (warmup
  included, which is the multi-power law's S_W), ``S_k(n) = sum_{k<=tau<=n} eta_tau``. The train loss
  logged with step ``i`` is that step's batch *before* the update: the model after ``n = i - 1``
  updates. A probe logged with step ``i`` is measured after the update: ``n = i``.
* ``p``, the end of the warmup, is the first update at which the LR reaches its maximum. The annealing
  terms count LR changes after ``p`` only: ``m_i = 0`` for ``i <= p`` and
  ``m_i = lam * m_{i-1} + (eta_{i-1} - eta_i)`` after, ``S2(n) = sum_{i<=n} m_i``; the multi-power sum
  starts at ``k = p + 1``. Counted from the start, the warmup's rise would be negative annealing that a
  constant-LR run carries for ever (with lam = 0.999 it barely fades in a few hundred steps).
* Both laws are fitted on the points after the warmup (``n >= p``), as both papers do, and predicted
  there; the warmup itself is outside them.
* LRs are divided by a reference LR (the largest LR of the fitted runs), which only rescales the
  constants; a prediction uses the fit's reference.

A fit minimises a Huber loss on log-loss residuals (scipy least squares), from several starts found by
solving the laws' linear parameters exactly on a grid of the nonlinear ones; parameter and prediction
intervals come from a moving-block bootstrap over the steps of each fitted run. A fit refuses data that
cannot identify the law (a constant LR shows no annealing term).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cpt.errors import CptError

LAWS = ("anneal", "multipower")
PARAMS = {"anneal": ("L0", "A", "alpha", "C"), "multipower": ("L0", "A", "alpha", "B", "C", "beta", "gamma")}
LAMBDA = 0.999  # Tissue et al.'s decay factor of the annealing momentum
_LR_FLOOR = 1e-6  # relative; eta**-gamma at an LR of exactly 0 (the end of a decay to 0)


# --------------------------------------------------------------------------------------------------
# Curves: an LR sequence, with the losses it produced when it was run
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One schedule, step by step: ``lrs[i-1]`` is applied in update i (i = 1..T); ``losses[n]`` is the
    loss measured after n updates (n = 0..T, NaN where nothing was measured), or None for a schedule
    that has not been run."""

    name: str
    lrs: np.ndarray
    tokens_per_step: int
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
    them (cpt.stages), from the recipe's init_from where it exists."""
    from cpt.stages import plan_run

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


def areas(lrs: np.ndarray, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """S1(n) and S2(n) for n = 0..T updates done (see the module docstring for the conventions)."""
    lrs = np.asarray(lrs, dtype=float)
    T = len(lrs)
    p = int(np.argmax(lrs)) + 1
    m = np.zeros(T + 1)  # m[i] for update i = 1..T; m[0] = 0 is the empty sum S2(0)
    for i in range(p + 1, T + 1):
        m[i] = lam * m[i - 1] + (lrs[i - 2] - lrs[i - 1])
    return np.concatenate([[0.0], np.cumsum(lrs)]), np.cumsum(m)


# --------------------------------------------------------------------------------------------------
# The laws
# --------------------------------------------------------------------------------------------------


@dataclass
class _Features:
    """What a law needs of one schedule, LRs already divided by the reference LR; n = 0..T."""

    N: int  # T + 1 points
    p: int
    s1: np.ndarray  # S1(n)
    s2: np.ndarray  # anneal: S2(n)
    drop: np.ndarray  # multipower: eta_{k-1} - eta_k for the k in `ks`
    eta: np.ndarray  # multipower: eta_k (floored) for the k in `ks`
    sk: np.ndarray  # multipower: S_k(n) [n, j] for k = ks[j] (0 where k > n)


def _features(lrs: np.ndarray, ref_lr: float, lam: float) -> _Features:
    eta = np.asarray(lrs, dtype=float) / ref_lr
    T = len(eta)
    s1, s2 = areas(eta, lam)
    p = int(np.argmax(eta)) + 1
    # Multi-power loss-drop terms: only the updates k > p whose LR differs from the one before.
    k = np.arange(p + 1, T + 1)
    d = eta[k - 2] - eta[k - 1]
    keep = d != 0
    k, d = k[keep], d[keep]
    n = np.arange(T + 1)[:, None]
    sk = np.where(k[None, :] <= n, s1[n] - s1[k[None, :] - 1], 0.0)
    return _Features(T + 1, p, s1, s2, d, np.maximum(eta[k - 1], _LR_FLOOR), sk)


def law_curve(law: str, theta: Sequence[float], f: _Features) -> np.ndarray:
    """The law's loss after n = 0..T updates; NaN inside the warmup (n < p), where it does not hold."""
    L0, A, alpha = theta[0], theta[1], theta[2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = L0 + A * f.s1 ** -alpha
        if law == "anneal":
            out = out - theta[3] * f.s2
        elif law == "multipower":
            B, C, beta, gamma = theta[3:]
            if f.drop.size:
                x = C * f.eta ** -gamma * f.sk
                out = out - B * ((1.0 - (x + 1.0) ** -beta) @ f.drop)
        else:
            raise CptError(f"unknown law {law!r} (expected one of {', '.join(LAWS)})")
    out = np.asarray(out, dtype=float)
    out[: f.p] = np.nan
    return out


def law_jacobian(law: str, theta: Sequence[float], f: _Features) -> np.ndarray:
    """d law_curve / d theta, shape (T + 1, parameters); rows inside the warmup are NaN."""
    A, alpha = theta[1], theta[2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        pw = f.s1 ** -alpha
        cols = [np.ones(f.N), pw, -A * pw * np.log(f.s1)]
        if law == "anneal":
            cols.append(-f.s2)
        else:
            B, C, beta, gamma = theta[3:]
            if f.drop.size:
                u = f.eta ** -gamma * f.sk  # x = C u
                x1 = C * u + 1.0
                g = 1.0 - x1 ** -beta
                dg_dx = beta * x1 ** (-beta - 1.0)
                cols += [-(g @ f.drop),
                         -B * ((dg_dx * u) @ f.drop),
                         -B * ((x1 ** -beta * np.log(x1)) @ f.drop),
                         B * ((dg_dx * C * u * np.log(f.eta)) @ f.drop)]
            else:
                cols += [np.zeros(f.N)] * 4
    J = np.stack(cols, axis=1)
    J[: f.p] = np.nan
    return J


def _linear_part(law: str, nonlin: Sequence[float], f: _Features) -> np.ndarray:
    """Columns of the parameters the law is linear in, for fixed nonlinear ones: anneal (L0, A, C) given
    alpha; multipower (L0, A, B) given (alpha, C, beta, gamma)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cols = [np.ones(f.N), f.s1 ** -nonlin[0]]
        if law == "anneal":
            cols.append(-f.s2)
        else:
            C, beta, gamma = nonlin[1:]
            x = C * f.eta ** -gamma * f.sk
            cols.append(-((1.0 - (x + 1.0) ** -beta) @ f.drop) if f.drop.size else np.zeros(f.N))
    return np.stack(cols, axis=1)


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


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

    ymax = float(y.max())
    if law == "anneal":
        lo = [0.0, 0.0, 0.01, 0.0]
        hi = [ymax, np.inf, 3.0, np.inf]
        grid = [(a,) for a in np.linspace(0.05, 2.0, 40)]
    else:
        lo = [0.0, 0.0, 0.01, 0.0, 1e-6, 0.01, 0.0]
        hi = [ymax, np.inf, 3.0, np.inf, 1e4, 5.0, 2.0]
        grid = [(a, c, b, g) for a in (0.2, 0.5, 1.0) for c in (0.01, 0.1, 1.0, 10.0)
                for b in (0.3, 0.6, 1.2) for g in (0.0, 0.5, 1.0)]
    starts = _grid_starts(law, grid, feats, idx, y, lo, hi)

    best = None
    for x0 in starts:
        r = least_squares(residuals, x0, jac=jacobian, bounds=(lo, hi), loss="huber", f_scale=delta,
                          x_scale="jac", max_nfev=3000, ftol=1e-7, xtol=1e-7)
        if best is None or r.cost < best.cost:
            best = r
    theta = best.x

    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + [len(i) for i in idx])
    boots = []
    for _ in range(bootstrap):
        pick = np.concatenate([off + _block_resample(len(i), rng) for off, i in zip(offsets, idx, strict=False)])

        def res_b(th, pick=pick):
            return residuals(th)[pick]

        def jac_b(th, pick=pick):
            return jacobian(th)[pick]

        r = least_squares(res_b, theta, jac=jac_b, bounds=(lo, hi), loss="huber", f_scale=delta,
                          x_scale="jac", max_nfev=500, ftol=1e-6, xtol=1e-6)
        boots.append(r.x)
    rmse = float(np.sqrt(np.mean(residuals(theta) ** 2)))
    return Fit(law, theta, ref, tps.pop(), lam, tuple(c.name for c in curves),
               np.array(boots) if boots else np.zeros((0, len(theta))), delta, rmse)


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


# --------------------------------------------------------------------------------------------------
# Comparing a prediction with a run
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Searching a schedule family
# --------------------------------------------------------------------------------------------------

FAMILIES = ("wsd", "cosine", "linear", "infinite")
_FRACTIONS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8]
_MIN_RATIOS = [0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5]


def family_candidates(family: str, template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Schedule configs of ``family`` (label -> the ``schedule:`` mapping), keeping the template's
    max_lr, warmup and warmup_from."""
    keep = {k: template[k] for k in ("max_lr", "warmup", "warmup_from") if k in template}
    top = float(keep["max_lr"])
    out: dict[str, dict[str, Any]] = {}
    if family == "wsd":
        for shape in ("linear", "cosine", "1-sqrt"):
            for fr in _FRACTIONS:
                out[f"wsd decay {fr:.0%} {shape}"] = {"kind": "wsd", **keep, "min_lr": 0.0,
                                                      "decay": {"length": f"{fr:.0%}", "shape": shape}}
    elif family in ("cosine", "linear"):
        for r in _MIN_RATIOS:
            out[f"{family} min_lr {r:g}x"] = {"kind": family, **keep, "min_lr": r * top}
    elif family == "infinite":
        for to in (0.25, 0.5, 0.75):
            for cool in (0.1, 0.25):
                for ann in (0.1, 0.2, 0.3):
                    out[f"infinite const {to:g}x cooldown {cool:.0%} anneal {ann:.0%}"] = {
                        "kind": "infinite", **keep,
                        "cooldown": {"length": f"{cool:.0%}", "shape": "cosine", "to": to * top},
                        "anneal": {"length": f"{ann:.0%}", "shape": "linear", "to": 0.0}}
    else:
        raise CptError(f"--search: unknown family {family!r} (expected {', '.join(FAMILIES)})")
    return out


@dataclass
class SearchResult:
    label: str
    schedule: dict[str, Any]
    final: float  # predicted loss of the model after the last update (n = T)
    low: float
    high: float


def search(law: Fit, candidates: dict[str, dict[str, Any]], total_tokens: int, tokens_per_step: int,
           seq_len: int | None = None, start_lr: float | None = None) -> list[SearchResult]:
    """The predicted loss after the last update of every candidate schedule at a token budget, best
    first, with its bootstrap interval. Candidates that do not build (a decay longer than what the
    warmup leaves of the budget) are left out."""
    from pydantic import TypeAdapter

    from cpt.schedules import ScheduleConfig, build_schedule

    adapter = TypeAdapter(ScheduleConfig)
    batch = tokens_per_step // seq_len if seq_len else None
    steps = total_tokens // tokens_per_step
    results = []
    for label, cfg in candidates.items():
        try:
            sched = build_schedule(adapter.validate_python(cfg), total_tokens=total_tokens,
                                   tokens_per_step=tokens_per_step, start_lr=start_lr, batch_size=batch)
        except (CptError, ValueError):
            continue
        curve = Curve(label, np.array([sched(s * tokens_per_step) for s in range(steps)]), tokens_per_step)
        lo, hi = law.band(curve)
        results.append(SearchResult(label, cfg, float(law.predict(curve)[-1]), float(lo[-1]), float(hi[-1])))
    if not results:
        raise CptError("--search: no candidate schedule fits the budget")
    results.sort(key=lambda r: r.final)
    return results


# --------------------------------------------------------------------------------------------------
# The `cpt predict` verb
# --------------------------------------------------------------------------------------------------

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
        path, stage = _split_at(first)
        _, recipe = recipe_curve(path, overrides, stage)
        if getattr(recipe, "stages", None) or recipe.schedule is None:
            raise CptError("--search: the template recipe (the first --recipe) must be single-stage with a schedule")
        template = recipe.schedule.model_dump(mode="json")
        cands: dict[str, dict[str, Any]] = {}
        for fam in families:
            cands.update(family_candidates(fam, template))
        report["search"] = {"template": str(path), "tokens": recipe.train.tokens, "laws": {}, "fragments": {}}
        for law, f in fits.items():
            res = search(f, cands, recipe.train.tokens, recipe.train.global_batch_tokens, recipe.data.seq_len)
            report["search"]["laws"][law] = [r.__dict__ for r in res]
            frag = out / f"best-schedule-{law}.yaml"
            frag.write_text(_fragment(res, law, f, recipe, Path(path), overrides))
            report["search"]["fragments"][law] = str(frag)
            echo(f"search ({law}): best {res[0].label}: predicted loss after the last step {res[0].final:.4f} "
                 f"[{res[0].low:.4f}, {res[0].high:.4f}] -> {frag}")

    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(render_report(report))
    if plotted:
        plot_predictions(plotted, fit_curves, fits, out / "curves.png", window)
    echo(render_predictions(report))
    echo(f"report: {out / 'report.md'}, {out / 'report.json'}" + (f", plot: {out / 'curves.png'}" if plotted else ""))
    return report


def _fragment(results: list[SearchResult], law: str, f: Fit, recipe: Any, template: Path,
              overrides: Sequence[str]) -> str:
    """The best schedule as a recipe that trains as it is: the template recipe, resolved (its overrides
    applied), with this schedule in place of its own and a run name and directory of its own. Resolved
    rather than ``extends:``, since a merge would keep keys of the template's schedule (a WSD ``decay``
    under a cosine)."""
    import yaml

    best = results[0]
    lines = [
        f"# Best schedule found by `cpt predict --search` under the {law} law fitted on {', '.join(f.runs)}:",
        f"# {best.label}: predicted loss after the last step {best.final:.4f} (95% bootstrap interval "
        f"{best.low:.4f}-{best.high:.4f}) at {recipe.train.tokens} tokens, {recipe.train.global_batch_tokens} per step.",
    ]
    if len(results) > 1:
        lines.append(f"# Runner-up: {results[1].label} at {results[1].final:.4f}; differences inside the interval "
                     f"are not resolved by the fit.")
    lines.append(f"# The template recipe {template}" + (f" with {' '.join(overrides)}" if overrides else "")
                 + ", resolved, with this schedule: `cpt train` this file, or paste the schedule: section into a "
                 "recipe of your own.")
    body = recipe.to_dict()
    suffix = f"-searched-{law}"
    body["run"]["name"] = recipe.run.name + suffix
    body["run"]["output_dir"] = str(recipe.run.output_dir) + suffix
    body["schedule"] = best.schedule
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


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
        if "baseline" in p:
            b = p["baseline"]
            rows.append(f"| {p['name']}{tag} | naive: {b['run']} | {b['final_pred']:.4f} | {b['final_real']:.4f} "
                        f"| {100 * b['final_err']:+.2f}% | {100 * b['mare']:.2f}% |")
    return "\n".join(rows)


def render_report(report: dict[str, Any]) -> str:
    parts = ["# cpt predict", ""]
    for law, f in report["fit"].items():
        parts += [f"## {law}: fitted on {', '.join(f['runs'])} ({report['metric']})", "",
                  "| parameter | value | 95% bootstrap interval |", "|---|---|---|"]
        for k, v in f["params"].items():
            lo, hi = f["intervals"][k]
            parts.append(f"| {k} | {v:.5g} | {lo:.4g} - {hi:.4g} |")
        extra = f", lambda {f['lambda']}" if f.get("lambda") is not None else ""
        parts += ["", f"LRs divided by {f['ref_lr']:g}{extra}; Huber scale {f['huber_scale']:.4f} on log-loss; "
                      f"{f['bootstrap']} bootstrap replicates; in-sample RMS log-residual {f['fit_rmse_rel']:.4f}.", ""]
    if report["predictions"]:
        s = report["smoothing"]
        parts += ["## Predictions", "",
                  f"Final loss: mean of the last {s['final_window']} measured points. Curve MARE: mean |pred - real| "
                  f"/ real after the warmup, both curves smoothed by a centred {s['window']}-point mean. Naive: the "
                  f"fitted run with the closest LR schedule, taken as the prediction.", "",
                  render_predictions(report), ""]
    if "search" in report:
        parts += [f"## Search at {report['search']['tokens']} tokens (template {report['search']['template']})", ""]
        for law, res in report["search"]["laws"].items():
            parts += [f"### {law}", "", "| schedule | predicted loss after the last step | 95% interval |",
                      "|---|---|---|"]
            parts += [f"| {r['label']} | {r['final']:.4f} | {r['low']:.4f} - {r['high']:.4f} |" for r in res[:15]]
            parts.append("")
    return "\n".join(parts) + "\n"


def plot_predictions(plotted, fit_curves: Sequence[Curve], fits: dict[str, Fit], path: Path, window: int = 9) -> Path:
    """Predicted curves (a band per law) over the real ones where they exist; LRs in a lower panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax, axl = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    styles = {"anneal": "-", "multipower": "--"}

    def real_line(c: Curve, **kw) -> None:
        n = c.measured(c.peak)
        ax.plot(n, smooth(c.losses, window)[n], **kw)

    for c in fit_curves:
        real_line(c, color="0.6", linewidth=0.9)
        axl.plot(np.arange(1, c.steps + 1), c.lrs, color="0.6", linewidth=0.9)
        for law, f in fits.items():
            ax.plot(np.arange(c.steps + 1), f.predict(c), color="0.35", linestyle=styles.get(law, "-"), linewidth=0.8)
    for i, (target, real, curves) in enumerate(plotted):
        color = f"C{i % 10}"
        n = np.arange(target.steps + 1)
        if real is not None:
            real_line(real, color=color, alpha=0.45, linewidth=2.5)
        for law, (mid, lo, hi) in curves.items():
            ax.plot(n, mid, color=color, linestyle=styles.get(law, "-"), linewidth=1.2, label=f"{target.name}: {law}")
            ax.fill_between(n, lo, hi, color=color, alpha=0.12, linewidth=0)
        axl.plot(np.arange(1, target.steps + 1), target.lrs, color=color)
    ax.set_ylabel("loss")
    ax.set_title(f"predicted (lines, 95% bootstrap band) vs real (thick, {window}-point mean); fitted runs in grey",
                 fontsize=10)
    vals = [c.losses[c.measured(c.peak)] for c in fit_curves]
    lo_y = min(float(np.min(v)) for v in vals)
    hi_y = max(float(np.percentile(v, 90)) for v in vals)
    ax.set_ylim(lo_y - 0.1 * (hi_y - lo_y), hi_y + 0.1 * (hi_y - lo_y))
    ax.legend(fontsize=7, ncol=2)
    axl.set_ylabel("LR (of update n)")
    axl.set_xlabel("updates done (n)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
