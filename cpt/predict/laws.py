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
* Every constant counts optimizer steps: ``lam`` is per optimizer step (a half-life of
  ``ln 0.5 / ln lam`` steps), whatever the cadence at which the losses were logged; the LR must be
  known for every step (a curve logged more sparsely has its per-step LR reconstructed, see
  ``cpt.predict.files``).

Cost: ``S1`` and ``S2`` are cumulative sums and a first-order recurrence, O(T). The multi-power sum
over the K LR changes has no recurrence; it is evaluated only at the ``n`` asked for (the fit's points,
a prediction's points), in blocks of at most ``_CHUNK`` (point, change) pairs and only over the changes
``k <= n``, so memory stays at a few MB whatever T and K, and time is proportional to points x K. No
steps x changes matrix is ever built.

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
LAMBDA = 0.999  # Tissue et al.'s decay factor of the annealing momentum, per optimizer step
_LR_FLOOR = 1e-6  # relative; eta**-gamma at an LR of exactly 0 (the end of a decay to 0)
_CHUNK = 1 << 17  # (point, LR change) pairs in one block of the multi-power sum: ~1 MB an array


def areas(lrs: np.ndarray, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """S1(n) and S2(n) for n = 0..T updates done (see the module docstring for the conventions): two
    cumulative sums and a first-order recurrence, O(T) (a loop over Python floats: ~10 ms per 100K steps)."""
    lrs = np.asarray(lrs, dtype=float)
    T = len(lrs)
    p = int(np.argmax(lrs)) + 1
    m = [0.0] * (T + 1)  # m[i] for update i = 1..T; m[0] = 0 is the empty sum S2(0)
    prev, lam = 0.0, float(lam)
    for i, d in enumerate((lrs[p - 1:T - 1] - lrs[p:T]).tolist(), start=p + 1):
        prev = m[i] = lam * prev + d  # m_i = lam * m_(i-1) + (eta_(i-1) - eta_i) for i > p, m_p = 0
    return np.concatenate([[0.0], np.cumsum(lrs)]), np.cumsum(m)


@dataclass
class _Features:
    """What a law needs of one schedule, LRs already divided by the reference LR; n = 0..T. All O(T):
    the multi-power terms S_k(n) = S1(n) - S1(k-1) are formed only where they are evaluated."""

    N: int  # T + 1 points
    p: int
    s1: np.ndarray  # S1(n)
    s2: np.ndarray  # anneal: S2(n)
    k: np.ndarray  # multipower: the updates k > p whose LR differs from the one before, ascending
    drop: np.ndarray  # multipower: eta_(k-1) - eta_k for those k
    eta: np.ndarray  # multipower: eta_k (floored) for those k

    @property
    def changes(self) -> int:
        return int(self.k.size)


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
    return _Features(T + 1, p, s1, s2, k, d, np.maximum(eta[k - 1], _LR_FLOOR))


def _points(f: _Features, at) -> np.ndarray:
    return np.arange(f.N) if at is None else np.asarray(at, dtype=np.int64).reshape(-1)


def _drop_sums(f: _Features, n: np.ndarray, C: float, beta: float, gamma: float, jac: bool = False) -> np.ndarray:
    """The multi-power sums at the points ``n``: row 0 sum_k drop_k G(x_kn), x_kn = C eta_k^-gamma S_k(n);
    with ``jac`` also rows 1-3: sum_k drop_k dG/dx u, sum_k drop_k x1^-beta log x1, sum_k drop_k log(eta_k)
    dG/dx u (u = x / C, x1 = x + 1), the pieces of the derivatives in C, beta and gamma. Blocks of points
    (sorted, so each block needs only the changes k <= its largest n) of at most _CHUNK pairs."""
    out = np.zeros((4 if jac else 1, len(n)))
    if not f.changes or not len(n):
        return out
    order = np.argsort(n, kind="stable")
    ns = n[order]
    v = f.eta ** -gamma  # u = v * S_k(n), x = C * u
    w = C * v
    s1k = f.s1[f.k - 1]
    dl = f.drop * np.log(f.eta) if jac else None
    rows = max(1, _CHUNK // f.changes)
    for a in range(0, len(ns), rows):
        nb = ns[a:a + rows]
        m = int(np.searchsorted(f.k, nb[-1], side="right"))  # the changes k <= the block's largest n
        if m == 0:
            continue
        s = f.s1[nb][:, None] - s1k[None, :m]
        np.maximum(s, 0.0, out=s)  # S_k(n) = 0 for k > n
        x1 = w[:m] * s
        x1 += 1.0
        dest = order[a:a + rows]
        if not jac:
            out[0, dest] = (1.0 - x1 ** -beta) @ f.drop[:m]
            continue
        lx = np.log(x1)
        e = np.exp(-beta * lx)  # x1**-beta
        out[0, dest] = (1.0 - e) @ f.drop[:m]
        out[2, dest] = (e * lx) @ f.drop[:m]
        e /= x1
        e *= beta
        e *= v[:m] * s  # dG/dx * u
        out[1, dest] = e @ f.drop[:m]
        out[3, dest] = e @ dl[:m]
    return out


def law_curve(law: str, theta: Sequence[float], f: _Features, at=None) -> np.ndarray:
    """The law's loss after n updates, for n = 0..T (or the n in ``at``); NaN inside the warmup (n < p),
    where it does not hold."""
    if law not in LAWS:
        raise CptError(f"unknown law {law!r} (expected one of {', '.join(LAWS)})")
    n = _points(f, at)
    L0, A, alpha = theta[0], theta[1], theta[2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = L0 + A * f.s1[n] ** -alpha
        if law == "anneal":
            out = out - theta[3] * f.s2[n]
        elif f.changes:
            out = out - theta[3] * _drop_sums(f, n, *theta[4:])[0]
    out = np.array(out, dtype=float)
    out[n < f.p] = np.nan
    return out


def law_jacobian(law: str, theta: Sequence[float], f: _Features, at=None) -> np.ndarray:
    """d law_curve / d theta, shape (points, parameters) for n = 0..T (or the n in ``at``); rows inside
    the warmup are NaN."""
    return law_values_jacobian(law, theta, f, at)[1]


def law_values_jacobian(law: str, theta: Sequence[float], f: _Features, at=None) -> tuple[np.ndarray, np.ndarray]:
    """``law_curve`` and ``law_jacobian`` together, from one pass over the multi-power sum."""
    n = _points(f, at)
    L0, A, alpha = theta[0], theta[1], theta[2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s1 = f.s1[n]
        pw = s1 ** -alpha
        values = L0 + A * pw
        cols = [np.ones(len(n)), pw, -A * pw * np.log(s1)]
        if law == "anneal":
            values = values - theta[3] * f.s2[n]
            cols.append(-f.s2[n])
        else:
            B, C, beta, gamma = theta[3:]
            g, dgu, elog, dgul = _drop_sums(f, n, C, beta, gamma, jac=True)
            values = values - B * g
            cols += [-g, -B * dgu, -B * elog, B * C * dgul]
    J = np.stack(cols, axis=1)
    values = np.array(values, dtype=float)
    J[n < f.p] = np.nan
    values[n < f.p] = np.nan
    return values, J


def _linear_part(law: str, nonlin: Sequence[float], f: _Features, at=None) -> np.ndarray:
    """Columns of the parameters the law is linear in, for fixed nonlinear ones: anneal (L0, A, C) given
    alpha; multipower (L0, A, B) given (alpha, C, beta, gamma); at n = 0..T (or the n in ``at``)."""
    n = _points(f, at)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cols = [np.ones(len(n)), f.s1[n] ** -nonlin[0]]
        if law == "anneal":
            cols.append(-f.s2[n])
        else:
            cols.append(-_drop_sums(f, n, *nonlin[1:])[0])
    return np.stack(cols, axis=1)
