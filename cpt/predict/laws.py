"""The loss-curve laws: the loss as a function of the LR sequence, and the exact conventions.

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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cpt.errors import CptError

LAWS = ("anneal", "multipower")
PARAMS = {"anneal": ("L0", "A", "alpha", "C"), "multipower": ("L0", "A", "alpha", "B", "C", "beta", "gamma")}
LAMBDA = 0.999  # Tissue et al.'s decay factor of the annealing momentum
_LR_FLOOR = 1e-6  # relative; eta**-gamma at an LR of exactly 0 (the end of a decay to 0)


def areas(lrs: np.ndarray, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """S1(n) and S2(n) for n = 0..T updates done (see the module docstring for the conventions)."""
    lrs = np.asarray(lrs, dtype=float)
    T = len(lrs)
    p = int(np.argmax(lrs)) + 1
    m = np.zeros(T + 1)  # m[i] for update i = 1..T; m[0] = 0 is the empty sum S2(0)
    for i in range(p + 1, T + 1):
        m[i] = lam * m[i - 1] + (lrs[i - 2] - lrs[i - 1])
    return np.concatenate([[0.0], np.cumsum(lrs)]), np.cumsum(m)



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

