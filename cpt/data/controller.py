"""A replay share set online: a mixture schedule whose points a controller appends at every probe, so that the
old domain's held-out loss rises at most a budget over its value at the stage start (``data.mixture:
{controller: {...}}``).

The controller (:class:`ReplayController`) is proportional-integral on the normalised error
``e = (rise - target * budget) / budget`` measured at a probe, with the share clamped to ``[min, max]``::

    P     = start + kp * e
    I    <- clamp(I + ki * e * (tokens since the previous probe) / (the stage's tokens), min - P, max - P)
    share = P + I                                          (so within [min, max])

- Proportional: a rise one budget above the target adds ``kp`` of share at once. The integral removes
  what is left (a plant whose forgetting drive moves, e.g. the re-warm's high LR then the decay): a steady
  excess of one budget over the whole stage adds ``ki``. Its time is the share of the stage's tokens, so
  the gains do not depend on the probe cadence (a dense window does not integrate faster).
- Anti-windup (the integral clamped to what keeps the share inside the bounds): a budget that cannot be
  met pins the share at ``max`` without storing up an excess that would keep it there after the rise has
  come down, and a rise far under the target cannot dig a hole below ``min``.
- Stability: the loop gain is about ``kp x (rise per unit of share) / budget``; the defaults (kp 0.05, ki 1)
  settle on synthetic plants whose rise moves 2 to 30 budgets per unit of share (tests/test_replay_controller.py).
  A tight budget on a sensitive domain can make the share swing between ``min`` and ``max`` from probe to
  probe (logged: controller/share): lower kp and ki then.
- The target sits under the budget (``target`` = 0.8 by default): the controller acts only at probes, the
  rise drifts between them, and a probe measures a fixed sample whose loss jitters from step to step;
  aiming at the budget itself would leave the rise above it about half of the time. Noise enters the
  share through the proportional term only (``kp * noise / budget``); the integral averages it out.

Determinism: the share from a probe on is a function of the probe results up to it only (the rise of each
probe, reduced over all processes by cpt.probes.HeldOutLoss before any rank reads it, so every rank
computes the same share), and the whole state (:class:`ControllerState`: share, integral, last rise, the
points of the changes) rides in the sampler's state in every checkpoint: a resume goes on with exactly
the shares the uninterrupted run had.

The schedule (:class:`ControlledSchedule`) is the piecewise-constant :class:`~cpt.data.mixture.MixtureSchedule`
of the changes so far: a change at token ``t`` of the stage appends the point ``(t, {old: s, new: 1 - s})``.
The sampler has drawn exactly up to ``t`` when the probe runs, so the integral of the shares before ``t`` is
untouched and the deficit rule goes on from where it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cpt.data.mixture import MixtureSchedule
from cpt.errors import CptError

_SAME = 1e-9  # shares closer than this are no change (no point appended)


@dataclass
class ControllerState:
    """Everything the controller carries from one probe to the next (saved in every checkpoint)."""

    share: float                      # the replay share in effect now
    integral: float = 0.0             # the integral term (share units)
    last_rise: float | None = None    # the rise the last probe measured (None before the first)
    last_tokens: int = 0              # tokens from the stage start at the last probe
    changes: list[list[float]] = field(default_factory=list)  # [tokens from the stage start, share]: the points

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ControllerState:
        """From a checkpoint's record; anything malformed is one line."""
        try:
            state = cls(**d)
            state.share, state.integral, state.last_tokens = float(state.share), float(state.integral), int(state.last_tokens)
            state.changes = [[int(t), float(s)] for t, s in state.changes]
            bad = not state.changes or state.changes[0][0] != 0 or any(
                not 0 <= s <= 1 for _, s in state.changes) or state.changes[-1][1] != state.share
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise CptError(f"replay controller state is malformed: {d!r}")
        return state


class ReplayController:
    """The control law (see the module docstring): a pure function of its state and each probe's rise."""

    def __init__(self, budget: float, target: float, lo: float, hi: float, start: float, kp: float, ki: float,
                 stage_tokens: int):
        self.budget, self.target, self.lo, self.hi = float(budget), float(target), float(lo), float(hi)
        self.start, self.kp, self.ki, self.stage_tokens = float(start), float(kp), float(ki), int(stage_tokens)
        self.state = ControllerState(share=self.start, changes=[[0, self.start]])

    @property
    def aim(self) -> float:
        """The rise aimed at (nats): target x budget."""
        return self.target * self.budget

    def update(self, tokens: int, rise: float) -> float:
        """The share from ``tokens`` (from the stage start) on, given the rise measured there."""
        st = self.state
        if not math.isfinite(rise):  # a diverged probe: replay as much as allowed, keep the integral
            share = self.hi
        else:
            e = (rise - self.aim) / self.budget
            dt = max(tokens - st.last_tokens, 0) / max(self.stage_tokens, 1)
            p = self.start + self.kp * e
            # the integral moves, but only as far as it takes the share to a bound (anti-windup)
            st.integral = min(max(st.integral + self.ki * e * dt, self.lo - p), self.hi - p)
            share = min(max(p + st.integral, self.lo), self.hi)
        st.last_rise, st.last_tokens = float(rise), int(tokens)
        if abs(share - st.share) > _SAME:
            st.share = share
            if st.changes[-1][0] == tokens:
                st.changes[-1][1] = share
            else:
                st.changes.append([int(tokens), share])
        return st.share


class ControlledSchedule(MixtureSchedule):
    """Two sources, ``old`` at the controller's share and ``new`` at the rest, piecewise constant between the
    probes where the share changed. ``cfg``: the recipe's ReplayControllerConfig (or anything with its
    fields); ``stage_tokens``: the stage's budget."""

    def __init__(self, cfg, stage_tokens: int, seq_len: int):
        self.cfg = cfg
        self.old, self.new, self.probe_key = cfg.old, cfg.new, f"probe/{cfg.probe_set}/forgetting"
        self.controller = ReplayController(cfg.budget, cfg.target, cfg.min, cfg.max, cfg.start_share, cfg.kp,
                                           cfg.ki, stage_tokens)
        self._seq_len = seq_len
        self._rebuild()

    def _rebuild(self) -> None:
        points = [(t, {self.old: s, self.new: 1.0 - s}, "step") for t, s in self.controller.state.changes]
        super().__init__(points, self._seq_len)

    @property
    def is_constant(self) -> bool:
        return False  # its points are state: always saved with the sampler's

    def active(self) -> list[str]:
        """The new source, and the old one where the share may rise above 0 (even if it starts at 0)."""
        return [k for k in self.names if k == self.new or self.cfg.max > 0]

    def on_probe(self, tokens: int, record: Mapping[str, Any]) -> dict[str, float]:
        """Read the old domain's rise from a probe record at ``tokens`` from the stage start, set the share
        from there on; the ``controller/*`` fields to log."""
        if self.probe_key not in record:
            raise CptError(f"data.mixture.controller: the probe record has no {self.probe_key} (the old domain "
                           f"must be probed, and not as a new domain)")
        rise = float(record[self.probe_key])
        before = self.controller.state.share
        share = self.controller.update(tokens, rise)
        self._rebuild()
        return {"controller/rise": rise, "controller/target": self.controller.aim,
                "controller/budget": self.controller.budget, "controller/share": share,
                "controller/integral": self.controller.state.integral,
                "controller/changed": float(abs(share - before) > _SAME)}

    def state(self) -> dict[str, Any]:
        return {"controller": self.controller.state.to_dict()}

    def restore(self, saved: Any) -> None:
        if not isinstance(saved, dict) or "controller" not in saved:
            raise CptError(f"mixture sampler state was saved without the replay controller's state (saved: "
                           f"{saved or 'constant'}): the data position cannot go on exactly")
        state = ControllerState.from_dict(saved["controller"])
        self.controller.state = state
        self._rebuild()

    def describe(self) -> str:
        c = self.controller
        return (f"{self.new} + {self.old} replay set online in [{c.lo:g}, {c.hi:g}] from {c.start:g}, rise of "
                f"{self.cfg.probe_set} aimed at {c.aim:g} (budget {c.budget:g})")
