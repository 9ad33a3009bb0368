"""The planner's law: one domain's probe loss during a continual pre-training stage, as a function of the
stage's LR schedule and its replay share.

For a probe domain (the old one or the new one), after n updates of a stage that replays a share ``r``
of old data and applies the LRs ``eta_1..eta_T`` (peak ``eta_max``)::

    L(n) = L0 + (a + b * r) * eta_max ** kappa * (1 - (1 + S1(n) / s) ** -beta) - c * w * anneal(n)

* ``L0`` is the domain's loss at the stage's start (measured: every pilot starts from the same checkpoint).
* The middle term is Wang et al. 2025's distribution-shift term (arXiv 2505.07796): a saturating power law
  in the LR area ``S1`` of the stage (warmup included), the same for every schedule and independent of the
  starting point. Its amplitude is linear in the replay share, the first-order form of the data mixing
  laws (Ye et al. 2024) and the D-CPT law (Que et al. 2024) over the range of shares a plan considers:
  for the old domain ``a > 0`` is the rise without replay and ``b < 0`` what replay takes off it; for
  the new domain ``a < 0`` is what it learns with no replay and ``b > 0`` what replay costs it.
* ``eta_max ** kappa``: the level the shift saturates at grows with the stage's peak LR (beyond its area).
  Wang et al.'s law lets the LR act through its area only; on the tiny English -> German runs the final
  English rise at 5e-4 was half that at 2e-3 long after both had passed the area where the shift saturates
  (docs/planning.md), which an area term cannot say.
* ``w`` is the domain's own share of the batch (``r`` for the old domain, ``1 - r`` for the new): annealing
  lowers the loss of the data being trained on (its gradient noise), so with no replay the old domain gets
  nothing back from the decay (the 0%-replay pilots' English loss did not fall over their decay, the 60%
  ones' did). With ``kappa`` this form cut the old domain's mean final error on the full runs from 0.41 to
  0.16 nats on English -> German and from 0.29 to 0.08 on English -> code, where it was not chosen
  (docs/planning.md).
* ``anneal``. ``area``: ``S2(n)``, the anneal law's term
  (Tissue et al. 2024; ``cpt.predict.laws``), as Wang et al.'s CPT law has it; ``S2`` is the
  momentum-smoothed sum of the LR's falls after the peak, about the area between the peak LR and the
  schedule, so its benefit grows with the length of a decay. ``drop``: the multi-power law's loss-drop
  term (Luo et al. 2025, gamma = 0, beta = 1), ``sum_k (eta_(k-1) - eta_k) * (1 - 1 / (1 + C S_k(n)))``:
  each LR fall lowers the loss by ``c`` times its size once the LR area since the fall passes ``1 / C``,
  bounded by ``c * (peak - final LR)`` whatever the length (one more parameter; the default). On pilots
  generated from each form (tests/test_plan.py) both recover the pick about as often, but on real pilots of
  the tiny English -> German set-up the ``area`` term took c from an 8-step pilot's decay and extrapolated a
  3-nat recovery of English over the full run (docs/planning.md); ``drop`` cannot.
* LRs are divided by a reference LR (the largest pilot LR), as in ``cpt.predict``; ``s`` counts updates
  at that LR.

Six free parameters per domain (``a``, ``b``, ``log10 s``, ``beta``, ``c``, ``kappa``; ``drop`` adds ``log10 C``),
the same form for both domains. Fitted on the pilots' probe curves: the parameters the law is linear in (``a``, ``b``, ``c``) are
solved exactly by least squares on a grid of the others, the best start is refined with all free under a robust
(soft L1) loss; intervals come from a moving-block bootstrap of each pilot's residuals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cpt.errors import CptError
from cpt.predict.laws import LAMBDA, _drop_sums, _features

NAMES = ("a", "b", "log10_s", "beta", "c", "kappa", "log10_C")
LOWER = (-np.inf, -np.inf, -3.0, 0.02, 0.0, -1.0, -3.0)
UPPER = (np.inf, np.inf, 5.0, 5.0, np.inf, 3.0, 3.0)
_GRID_S = np.linspace(-2.0, 4.0, 13)
_GRID_BETA = np.array([0.1, 0.3, 0.7, 1.5, 3.0])
_GRID_KAPPA = np.array([0.0, 0.5, 1.0])
_GRID_C = np.linspace(-2.0, 2.0, 5)
ANNEALS = ("area", "drop")  # the anneal law's C * S2 (Tissue et al.; Wang et al.'s CPT law), or the bounded drop
# The residuals' loss: soft L1 beyond 0.05 nats (a robust fit, as cpt predict's Huber loss): on the tiny English ->
# German pilots the first steps at 2e-3 spike both domains (+1.8 nats on English for one probe: fresh Adam
# moments after a 2-step warmup), which the law has no term for; least squares bent the whole fit to them. The
# held-out pilots' old-domain error fell from 0.29 to 0.08 nats (mean of 4) with it (docs/planning.md).
LOSS, F_SCALE = "soft_l1", 0.05
_BLOCK = 3  # residuals resampled in blocks of this many consecutive probe points


@dataclass(frozen=True)
class Pilot:
    """One run's probe curve of one domain: the LR of every update, the replay share, and the losses
    measured after the updates ``n`` (n = 0 is the stage's start)."""

    name: str
    replay: float
    lrs: np.ndarray
    n: np.ndarray
    losses: np.ndarray


def shift(s1: np.ndarray, log10_s: float, beta: float) -> np.ndarray:
    """The distribution-shift curve 1 - (1 + S1/s)^-beta: 0 at the start, rising to 1."""
    return 1.0 - (1.0 + s1 / 10.0 ** log10_s) ** -beta


def own_share(r, old: bool):
    """The domain's share of the batch: the replay share for the old domain, the rest for the new."""
    return np.asarray(r) if old else 1.0 - np.asarray(r)


class Schedule:
    """What the law needs of one LR sequence (divided by the reference LR), at the points ``n``."""

    def __init__(self, lrs: np.ndarray, ref_lr: float, n: np.ndarray | None = None):
        self.f = _features(np.asarray(lrs, dtype=float), ref_lr, LAMBDA)
        self.n = np.arange(self.f.N) if n is None else np.asarray(n, dtype=np.int64)
        self.s1 = self.f.s1[self.n]
        self.s2 = self.f.s2[self.n]
        self.peak = float(np.max(lrs)) / ref_lr if len(lrs) else 0.0

    def drop(self, log10_C: float) -> np.ndarray:
        """sum_k (eta_(k-1) - eta_k) (1 - 1 / (1 + C S_k(n))) at the points: the multi-power sum, gamma 0."""
        return _drop_sums(self.f, self.n, 10.0 ** log10_C, 1.0, 0.0)[0]

    def anneal(self, theta: Sequence[float]) -> np.ndarray:
        """The annealing feature: S2 (six parameters, the ``area`` law) or the drop sum at C = theta[6]."""
        return self.s2 if len(theta) == 6 else self.drop(theta[6])


def law(theta: Sequence[float], L0: float, r, sched: Schedule, old: bool) -> np.ndarray:
    a, b, log10_s, beta, c, kappa = theta[:6]
    amp = (a + b * np.asarray(r)) * sched.peak ** kappa
    return L0 + amp * shift(sched.s1, log10_s, beta) - c * own_share(r, old) * sched.anneal(theta)


@dataclass
class _Data:
    """The pilots' points: one Schedule per pilot, and stacked replay share, own share, peak LR, loss and
    pilot index."""

    scheds: list[Schedule]
    r: np.ndarray
    y: np.ndarray
    run: np.ndarray
    old: bool

    def __post_init__(self):
        self.s1 = np.concatenate([s.s1 for s in self.scheds])
        self.w = own_share(self.r, self.old)
        self.peak = np.concatenate([np.full(len(s.n), s.peak) for s in self.scheds])

    def anneal(self, theta: Sequence[float]) -> np.ndarray:
        return np.concatenate([s.anneal(theta) for s in self.scheds])

    def values(self, theta: Sequence[float], L0: float) -> np.ndarray:
        a, b, log10_s, beta, c, kappa = theta[:6]
        return (L0 + (a + b * self.r) * self.peak ** kappa * shift(self.s1, log10_s, beta)
                - c * self.w * self.anneal(theta))


def _stack(pilots: Sequence[Pilot], ref_lr: float, old: bool) -> _Data:
    scheds = [Schedule(p.lrs, ref_lr, p.n) for p in pilots]
    r = np.concatenate([np.full(len(p.n), p.replay) for p in pilots])
    y = np.concatenate([np.asarray(p.losses, float) for p in pilots])
    run = np.concatenate([np.full(len(p.n), i) for i, p in enumerate(pilots)])
    return _Data(scheds, r, y, run, old)


def _solve(d: _Data, L0: float, anneal: str, max_nfev: int | None = None, start: np.ndarray | None = None) -> np.ndarray:
    """Grid starts (a, b, c exact by least squares, c >= 0) on (s, beta, kappa[, C]), then all refined."""
    from scipy.optimize import least_squares

    k = len(names(anneal))
    if start is None:
        best, best_sse, y = None, np.inf, d.y - L0
        for lc in (_GRID_C if k == 7 else [None]):
            dr = d.w * d.anneal([0.0] * 6 + ([lc] if k == 7 else []))
            for ls in _GRID_S:
                for beta in _GRID_BETA:
                    g0 = shift(d.s1, ls, beta)
                    for kappa in _GRID_KAPPA:
                        g = g0 * d.peak ** kappa
                        X = np.stack([g, d.r * g, -dr], axis=1)
                        coef = np.linalg.lstsq(X, y, rcond=None)[0]
                        if coef[2] < 0:
                            coef[:2], coef[2] = np.linalg.lstsq(X[:, :2], y, rcond=None)[0], 0.0
                        res = X @ coef - y
                        if res @ res < best_sse:
                            best = np.array([coef[0], coef[1], ls, beta, coef[2], kappa, lc][:k], float)
                            best_sse = float(res @ res)
        start = best
    lo, hi = LOWER[:k], UPPER[:k]
    x0 = np.clip(start, np.add(lo, 1e-9), np.subtract(hi, 1e-9))
    return least_squares(lambda th: d.values(th, L0) - d.y, x0, bounds=(lo, hi), max_nfev=max_nfev,
                         x_scale="jac", loss=LOSS, f_scale=F_SCALE).x


def names(anneal: str) -> tuple[str, ...]:
    if anneal not in ANNEALS:
        raise CptError(f"unknown annealing term {anneal!r} (expected one of {', '.join(ANNEALS)})")
    return NAMES if anneal == "drop" else NAMES[:6]


@dataclass
class DomainFit:
    """A fitted law of one domain, with bootstrap replicates; quacks like ``cpt.predict.Fit`` where
    ``cpt.predict.checks.fit_warnings`` reads it (law, bounds, boot, param_intervals)."""

    domain: str
    L0: float
    theta: np.ndarray
    ref_lr: float
    old: bool                         # the old (replayed) domain: annealing gives it back in proportion to r
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))
    rmse: float = float("nan")
    points: int = 0
    runs: tuple[str, ...] = ()

    @property
    def law(self) -> str:
        return f"{self.domain} law"

    @property
    def names(self) -> tuple[str, ...]:
        return NAMES[:len(self.theta)]

    @property
    def anneal(self) -> str:
        return "drop" if len(self.theta) == 7 else "area"

    @property
    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return LOWER[:len(self.theta)], UPPER[:len(self.theta)]

    def curves(self, lrs: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
        """The central prediction over n = 0..T, and one row per bootstrap replicate (none: empty)."""
        sched = Schedule(lrs, self.ref_lr)
        mid = law(self.theta, self.L0, r, sched, self.old)
        reps = np.stack([law(th, self.L0, r, sched, self.old) for th in self.boot]) if len(self.boot) else np.zeros((0, len(mid)))
        return mid, reps

    def param_intervals(self, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
        q = 100 * (1 - level) / 2
        out = {}
        for j, name in enumerate(self.names):
            lo, hi = (np.percentile(self.boot[:, j], [q, 100 - q]) if len(self.boot)
                      else (self.theta[j], self.theta[j]))
            out[name] = (float(self.theta[j]), float(lo), float(hi))
        return out


def fit_domain(domain: str, pilots: Sequence[Pilot], *, old: bool, L0: float | None = None, bootstrap: int = 200,
               seed: int = 0, ref_lr: float | None = None, anneal: str = "drop") -> DomainFit:
    """Fit the law of one domain on its pilot curves. ``old``: the replayed domain (else the new one);
    ``L0``: the loss at the stage's start (default: the mean of the pilots' n = 0 points, which must exist);
    ``anneal``: the annealing term (ANNEALS)."""
    k = len(names(anneal))
    if len(pilots) < 2:
        raise CptError(f"{domain}: {len(pilots)} pilot curve(s); the law's replay term needs at least 2 "
                       f"pilots with different replay shares")
    if len({round(p.replay, 6) for p in pilots}) < 2:
        raise CptError(f"{domain}: every pilot replays the same share ({pilots[0].replay:g}), so the law's "
                       f"replay term cannot be fitted: run pilots at two shares at least")
    if L0 is None:
        starts = [float(p.losses[list(p.n).index(0)]) for p in pilots if 0 in list(p.n)]
        if not starts:
            raise CptError(f"{domain}: no pilot has a probe at the stage's start (n = 0): the baseline is unknown")
        L0 = float(np.mean(starts))
    ref = float(ref_lr or max(float(np.max(p.lrs)) for p in pilots))
    keep = [Pilot(p.name, p.replay, p.lrs, np.asarray(p.n)[np.asarray(p.n) > 0],
                  np.asarray(p.losses, float)[np.asarray(p.n) > 0]) for p in pilots]
    d = _stack(keep, ref, old)
    if len(d.y) < 3 * k:
        raise CptError(f"{domain}: {len(d.y)} probe points after the stage's start in the pilots; the law's "
                       f"{k} parameters need at least {3 * k} (probe the pilots more densely)")
    if not np.all(np.isfinite(d.y)):
        raise CptError(f"{domain}: a pilot's probe loss is not finite (a diverged pilot cannot be fitted)")
    theta = _solve(d, L0, anneal)
    fitted = d.values(theta, L0)
    resid = d.y - fitted
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(bootstrap):
        y = fitted + _block_resample(resid, d.run, rng)
        boot.append(_solve(_Data(d.scheds, d.r, y, d.run, old), L0, anneal, max_nfev=60, start=theta))
    return DomainFit(domain, L0, theta, ref, old, np.array(boot).reshape(-1, k),
                     float(np.sqrt(np.mean(resid ** 2))), len(d.y), tuple(p.name for p in pilots))


def _block_resample(resid: np.ndarray, run: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each pilot's residuals, resampled in moving blocks of _BLOCK consecutive points (keeps their
    serial correlation: probes of one run drift together)."""
    out = np.empty_like(resid)
    for i in np.unique(run):
        idx = np.flatnonzero(run == i)
        m, w = len(idx), min(_BLOCK, len(idx))
        picks: list[int] = []
        while len(picks) < m:
            a = int(rng.integers(0, m - w + 1))
            picks.extend(range(a, a + w))
        out[idx] = resid[idx[np.array(picks[:m])]]
    return out
