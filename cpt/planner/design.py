"""What the planner decides, as pure functions: the pilot design, the candidates' predictions, the pick,
and the checks that say when the fit is not to be trusted."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cpt.errors import CptError
from cpt.planner.law import DomainFit, Pilot, fit_domain

THIN_MARGIN = "the pick may break the budget"  # the note's words; the report recommends controlled.yaml on it
PLAN_ADVICE = ("longer pilots pin it better (--pilot-budget), or more of them (--pilots 5 adds the centre of the "
               "box); read the candidates' intervals")
LrsOf = Callable[[float, float], np.ndarray]  # (replay share, max LR) -> the LR of every update


@dataclass(frozen=True)
class PilotSpec:
    name: str
    replay: float
    max_lr: float
    tokens: int


def design_pilots(replays: Sequence[float], max_lrs: Sequence[float], count: int, full_tokens: int,
                  tokens_per_step: int, fraction: float, min_steps: int = 6) -> list[PilotSpec]:
    """``count`` short runs of the base recipe, together ``fraction`` of the full run's tokens, at the
    corners of the candidates' (replay share, max LR) box, then its centre.

    Why corners: the law's amplitude is linear in the replay share and its LR terms are areas of the
    schedule, so pilots at the extreme shares and LRs make every candidate an interpolation in both (an
    extrapolation in length only, the law's job). The first two are the diagonal that varies both at
    once, the next two separate them, a fifth (the centre) tests the linearity the fit assumes."""
    if count < 2:
        raise CptError(f"--pilots {count}: the law's replay term needs at least 2 pilots")
    r_lo, r_hi = min(replays), max(replays)
    lr_lo, lr_hi = min(max_lrs), max(max_lrs)
    if r_lo == r_hi:
        raise CptError("the candidate replay shares are all the same: nothing for the pilots to vary")
    corners = [(r_lo, lr_hi), (r_hi, lr_lo), (r_hi, lr_hi), (r_lo, lr_lo),
               ((r_lo + r_hi) / 2, float(np.sqrt(lr_lo * lr_hi)))]
    points = list(dict.fromkeys(corners))  # one LR only: the corners collapse
    if count > len(points):
        raise CptError(f"--pilots {count}: the design has {len(points)} distinct points for these candidates")
    steps = int(fraction * full_tokens / count // tokens_per_step)
    if steps < min_steps:
        raise CptError(f"a pilot budget of {fraction:g} x {full_tokens} tokens gives each of {count} pilots "
                       f"{steps} steps of {tokens_per_step} tokens; a pilot needs at least {min_steps} steps for "
                       f"its probe curve to pin the law: raise --pilot-budget or lower --pilots")
    return [PilotSpec(f"pilot-r{r:g}-lr{lr:.3g}", float(r), float(lr), steps * tokens_per_step)
            for r, lr in points[:count]]


@dataclass(frozen=True)
class Prediction:
    """A candidate recipe's predicted old-domain rise (final and worst in the stage) and new-domain final
    loss, each (central, 2.5%, 97.5%) over the bootstrap."""

    replay: float
    max_lr: float
    old_final: tuple[float, float, float]  # loss
    old_rise: tuple[float, float, float]  # final loss - the stage's start
    old_worst: tuple[float, float, float]  # highest loss in the stage - the stage's start
    new_final: tuple[float, float, float]
    s1: float  # the candidate's LR area, in updates at the reference LR

    def meets(self, max_rise: float, max_worst: float | None) -> bool:
        return self.old_rise[0] <= max_rise and (max_worst is None or self.old_worst[0] <= max_worst)


def _triple(mid: float, reps: np.ndarray) -> tuple[float, float, float]:
    if not len(reps):
        return mid, mid, mid
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return float(mid), float(lo), float(hi)


def predict(old: DomainFit, new: DomainFit, lrs: np.ndarray, replay: float, max_lr: float) -> Prediction:
    om, oreps = old.curves(lrs, replay)
    nm, nreps = new.curves(lrs, replay)
    worst = lambda c: np.max(c, axis=-1) - old.L0  # noqa: E731 (the stage's highest point, n >= 0)
    s1 = float(np.sum(lrs) / old.ref_lr)
    return Prediction(replay, max_lr, _triple(om[-1], oreps[:, -1]), _triple(om[-1] - old.L0, oreps[:, -1] - old.L0),
                      _triple(worst(om), worst(oreps) if len(oreps) else oreps), _triple(nm[-1], nreps[:, -1]), s1)


def predict_all(old: DomainFit, new: DomainFit, replays: Sequence[float], max_lrs: Sequence[float],
                lrs_of: LrsOf) -> list[Prediction]:
    return [predict(old, new, lrs_of(r, lr), r, lr) for r in replays for lr in max_lrs]


def pick(preds: Sequence[Prediction], max_rise: float, max_worst: float | None = None) -> Prediction | None:
    """The candidate whose central prediction meets the budget with the lowest new-domain loss; None when
    none does."""
    ok = [p for p in preds if p.meets(max_rise, max_worst)]
    return min(ok, key=lambda p: p.new_final[0]) if ok else None


def held_out(old_pilots: Sequence[Pilot], new_pilots: Sequence[Pilot], L0: tuple[float, float],
             ref_lr: float, anneal: str = "drop") -> dict[str, dict[str, float]]:
    """Leave one pilot out: fit both laws on the others, predict the left-out pilot's last probe of each
    domain; {pilot: {"old": error, "new": error}} (predicted - measured), skipping a pilot whose removal
    leaves a single replay share."""
    out: dict[str, dict[str, float]] = {}
    for i, p in enumerate(old_pilots):
        rest_o = [q for j, q in enumerate(old_pilots) if j != i]
        rest_n = [q for j, q in enumerate(new_pilots) if j != i]
        if len({q.replay for q in rest_o}) < 2:
            continue
        errs = {}
        for key, rest, me, l0 in (("old", rest_o, p, L0[0]), ("new", rest_n, new_pilots[i], L0[1])):
            try:
                f = fit_domain(key, rest, old=key == "old", L0=l0, bootstrap=0, ref_lr=ref_lr, anneal=anneal)
            except CptError:
                break
            mid, _ = f.curves(me.lrs, me.replay)
            errs[key] = float(mid[int(me.n[-1])] - me.losses[-1])
        if len(errs) == 2:
            out[p.name] = errs
    return out


def trust(fits: Sequence[DomainFit], loo: dict[str, dict[str, float]], chosen: Prediction | None,
          max_rise: float, max_worst: float | None, pilot_s1: float) -> list[str]:
    """Plain reasons not to trust the pick: degenerate parameters, held-out pilots missed by more than the
    pick's margin to the budget, an LR area far beyond the pilots'."""
    from cpt.predict.checks import ADVICE, fit_warnings

    notes = [w.replace(ADVICE, PLAN_ADVICE) for f in fits for w in fit_warnings(f)]
    if not loo:
        notes.append("no pilot could be held out (too few pilots or replay shares): the law's error on a run it "
                     "did not see is unknown")
    if chosen is None:
        return notes
    if loo:
        e_old = max(abs(e["old"]) for e in loo.values())
        margin = max_rise - chosen.old_rise[0]
        if max_worst is not None:
            margin = min(margin, max_worst - chosen.old_worst[0])
        if e_old > margin:
            notes.append(f"the law misses a held-out pilot's old-domain loss by up to {e_old:.3f}, more than the "
                         f"pick's margin to the budget ({margin:.3f}): {THIN_MARGIN}")
    if chosen.s1 > 20 * pilot_s1:
        notes.append(f"the pick's LR area ({chosen.s1:.3g} updates at the reference LR) is {chosen.s1 / pilot_s1:.0f}x "
                     f"the largest pilot's: the law extrapolates far; longer pilots would pin it")
    return notes
