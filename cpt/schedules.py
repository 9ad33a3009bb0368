"""Learning-rate schedules as pure functions of the token count.

A schedule is a list of contiguous phases over token ranges ``[start, end)``; each phase moves the LR
from ``lr_start`` to ``lr_end`` along a named shape. Evaluating a schedule is arithmetic on the token
counter alone, so there is no scheduler state to checkpoint: resuming is evaluating the same schedule
at the restored counter, and a decay branch (WSD) is the same recipe with the decay placed elsewhere.

Recipes describe a schedule under ``schedule:`` with a ``kind`` (see :data:`ScheduleConfig`); lengths
are tokens (``2M``), optimizer steps (``200 steps``) or fractions of the stage budget (``10%``), and
:func:`build_schedule` resolves them once the budget and tokens per step are known.

Each kind's config class lays out its own phases (``layout``) and says itself what other modules need to
know of its structure: where its final anneal starts (the built :class:`Schedule`'s ``anneal_start``)
and how a decay branch is cut from it (``branch``, a :class:`Branching`). Stages and decay branches
read these rather than phase names or kinds, so a new kind is its class here and its place in the
:data:`ScheduleConfig` union.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import Field

from cpt.errors import CptError
from cpt.units import Length, LengthField, StrictModel, format_count

# --------------------------------------------------------------------------------------------------
# Shapes: each maps progress p in [0, 1] through a phase to a factor going from 1 (lr_start) to
# 0 (lr_end); the LR is factor * lr_start + (1 - factor) * lr_end. Written this way a shape works in
# both directions, so "linear" is also the warmup ramp.
# --------------------------------------------------------------------------------------------------


def _inv_sqrt_factor(p: float, phase: Phase) -> float:
    # 1/sqrt(1 + t/alpha), shifted and rescaled so the phase ends exactly at lr_end: the same
    # curve then serves as an open-ended decay (lr_end chosen on the curve) and as a cooldown
    # that must land on a given constant LR (Ibrahim et al. 2024).
    ratio = (phase.end - phase.start) / phase.params["timescale"]
    s_end = 1.0 / math.sqrt(1.0 + ratio)
    return (1.0 / math.sqrt(1.0 + p * ratio) - s_end) / (1.0 - s_end)


_FACTORS: dict[str, Callable[[float, Phase], float]] = {
    "linear": lambda p, _: 1.0 - p,
    "cosine": lambda p, _: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p, _: 1.0 - math.sqrt(p),  # Hägele et al. 2024
    "rex": lambda p, _: (1.0 - p) / (0.5 + 0.5 * (1.0 - p)),  # Chen et al. 2021
    "inv_sqrt": _inv_sqrt_factor,
}
SHAPES = ("constant", "exponential", "power", *_FACTORS)


def power_law_lr(tokens: float, max_lr: float, batch: int, a: float, b: float) -> float:
    """The Power scheduler's LR (Shen et al. 2024): ``min(max_lr, batch * a * tokens**b)``.

    ``batch`` counts *sequences* per optimizer step and ``tokens`` the tokens seen so far. That is
    the paper's convention and its authors' trainer's (IBM dolomite-engine: the coefficient is
    scaled by ``batch_size``, the law evaluated at ``steps * batch_size * sequence_length``), and
    the only one that gives sane numbers: 1024 sequences at 1T tokens gives 3.6e-3, whereas 4M
    tokens per step would give 14. Here ``tokens`` is the stage's own counter.
    """
    if tokens <= 0:
        return max_lr  # the power law is infinite at 0; the cap holds
    return min(max_lr, batch * a * tokens**b)


@dataclass(frozen=True)
class Phase:
    """One stretch of a schedule: tokens ``[start, end)``, LR ``lr_start`` -> ``lr_end`` along ``shape``.

    ``params`` holds what a shape needs beyond its edges: ``timescale`` (tokens) for ``inv_sqrt``;
    ``max_lr``, ``batch``, ``a``, ``b`` for ``power``, whose LR is a function of the absolute token
    count and for which ``lr_start`` / ``lr_end`` only record the values at the edges.
    """

    name: str
    start: int
    end: int
    lr_start: float
    lr_end: float
    shape: str
    params: dict[str, Any] = field(default_factory=dict)

    def lr(self, tokens: float) -> float:
        """LR at ``tokens``, clamped to this phase's range."""
        if self.shape == "constant":
            return self.lr_start
        if self.shape == "power":
            t = min(max(tokens, self.start), self.end)
            return power_law_lr(t, **self.params)
        p = min(max((tokens - self.start) / (self.end - self.start), 0.0), 1.0)
        if self.shape == "exponential":
            return self.lr_start * (self.lr_end / self.lr_start) ** p
        f = _FACTORS[self.shape](p, self)
        return f * self.lr_start + (1.0 - f) * self.lr_end  # exact at both edges


@dataclass(frozen=True)
class Schedule:
    """LR as a function of tokens seen in the stage: contiguous phases, then the last LR held.

    ``anneal_start`` is the token where the schedule's final anneal begins (WSD's decay after its stable
    phase, the infinite schedule's anneal), or None where the kind has none. The kind that lays out the
    phases sets it, since the checkpoint kept just before it (pre_anneal) and a mixture's ``at: decay``
    depend on it, and reading it back from phase names would tie every such reader to every kind.
    """

    phases: tuple[Phase, ...]
    total_tokens: int
    anneal_start: int | None = None
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a schedule needs at least one phase")
        for prev, nxt in zip(self.phases, self.phases[1:], strict=False):
            if prev.end != nxt.start:
                raise ValueError(f"phases {prev.name!r} and {nxt.name!r} are not contiguous")
        for ph in self.phases:
            if ph.shape not in SHAPES:
                raise ValueError(f"phase {ph.name!r}: unknown shape {ph.shape!r}")
            if ph.end <= ph.start:
                raise ValueError(f"phase {ph.name!r} is empty: [{ph.start}, {ph.end})")
        object.__setattr__(self, "_starts", tuple(ph.start for ph in self.phases))
        if self.anneal_start is not None and self.anneal_start not in self._starts:
            raise ValueError(f"anneal_start {self.anneal_start} is not where a phase starts")

    def __call__(self, tokens: int | float) -> float:
        """LR after ``tokens`` tokens of the stage (the LR for the step that starts there)."""
        last = self.phases[-1]
        if tokens >= last.end:
            return last.lr_end
        i = max(bisect.bisect_right(self._starts, tokens) - 1, 0)
        return self.phases[i].lr(tokens)


# --------------------------------------------------------------------------------------------------
# Recipe schema
# --------------------------------------------------------------------------------------------------

DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential"]
DECAY_SHAPES: tuple[str, ...] = get_args(DecayShape)
"""The shapes a final decay may take (``decay.shape``, `cpt train --decay-shape`)."""


class DecayConfig(StrictModel):
    """The final decay of ``wsd`` and ``power``."""

    length: LengthField = Field(
        default="10%",
        validate_default=True,
        description="Length of the decay: tokens, steps or a fraction of the stage budget "
        "(MiniCPM found ~10% of the tokens enough).",
    )
    shape: DecayShape = Field(
        default="1-sqrt",
        description="Decay curve from the LR at the decay start to min_lr: linear (1-p), cosine, "
        "1-sqrt (1-sqrt(p); Hägele et al. 2024 found it better than a linear cooldown) or "
        "exponential (needs min_lr > 0).",
    )


class CooldownConfig(StrictModel):
    """The cooldown of the ``infinite`` schedule, from max_lr to the constant LR."""

    length: LengthField = Field(description="Length of the cooldown: tokens, steps or a fraction.")
    shape: Literal["cosine", "inv_sqrt"] = Field(
        default="cosine", description="cosine, or inv_sqrt (needs timescale) reaching `to` at its end."
    )
    timescale: LengthField | None = Field(
        default=None, description="inv_sqrt only: timescale alpha of 1/sqrt(1 + t/alpha), in tokens/steps/%."
    )
    to: float = Field(gt=0, description="The constant LR the cooldown ends at and training continues at.")


class AnnealConfig(StrictModel):
    """The optional final anneal of the ``infinite`` schedule, placed at the end of the budget."""

    length: LengthField = Field(description="Length of the anneal: tokens, steps or a fraction.")
    shape: Literal["exponential", "linear"] = Field(
        default="exponential",
        description="exponential (const * (to/const)^p, as in Ibrahim et al.'s code; needs to > 0) or linear.",
    )
    to: float = Field(ge=0, description="The LR at the end of the anneal (the release checkpoint's LR).")


WarmupFrom = Annotated[float, Field(ge=0)] | Literal["checkpoint"]


@dataclass(frozen=True)
class Branching:
    """How a decay branch (`cpt train --branch-from`) is cut from a run of one kind.

    A branch starts from a checkpoint in ``phase`` and decays by the recipe's ``block`` (whose length
    and shape the branch may set). The parent's ``lengths`` (dotted keys) are frozen into tokens of its
    budget first, so that moving the horizon to the branch's end moves nothing but the decay. ``at`` is
    the key that places the decay at the branch point; a kind whose decay sits at the end of the budget
    needs none.
    """

    phase: str
    block: str
    lengths: tuple[str, ...]
    at: str | None = None


class _ScheduleBase(StrictModel):
    kind: str = Field(description="The schedule kind.")
    max_lr: float = Field(gt=0, description="Peak learning rate, reached at the end of the warmup.")
    warmup: LengthField = Field(
        default=0,
        validate_default=True,
        description="Linear warmup to max_lr: tokens (2M), steps (200 steps) or a fraction (1%); 0 = none.",
    )
    warmup_from: WarmupFrom = Field(
        default=0.0,
        description="LR the warmup starts at: 0, a value, or 'checkpoint' = the LR the continued checkpoint "
        "ended at (re-warming from where it left off; needs init_from). A step's LR is the schedule at the "
        "step's first token, so the first step runs at this LR: at 0 (the default, as transformers' linear "
        "and cosine warmups) AdamW leaves the weights as they are (weight decay too: it is scaled by the LR) "
        "but takes the step's gradient into its moments and counts the step. What that costs is one step's "
        "update (1 of a 32-step run's 32); 0 stays the default so that no recipe's LR changes. A value such "
        "as max_lr / (warmup steps) makes the first step learn.",
    )

    branch: ClassVar[Branching | None] = None
    """How a decay branch is cut from this kind; None where it cannot be branched."""

    def layout(self, budget: _Budget) -> Schedule:
        """The phases over ``budget``, with the checks that only this kind's fields involve."""
        raise NotImplementedError(f"schedule kind {self.kind!r} lays out no phases")


class ConstantScheduleConfig(_ScheduleBase):
    """Warmup, then max_lr forever."""

    kind: Literal["constant"] = Field(description="Warmup, then max_lr forever.")

    def layout(self, budget: _Budget) -> Schedule:
        T, W, top = budget.total, budget.warm.tokens, self.max_lr
        return budget.schedule(budget.warmup(top), Phase("constant", W, T, top, top, "constant"))


class DecayScheduleConfig(_ScheduleBase):
    """Warmup, then a decay over the rest of the budget to min_lr."""

    kind: Literal["linear", "cosine", "rex"] = Field(
        description="Warmup, then decay to min_lr over the rest of the budget: linear (1-p), cosine "
        "(0.5(1+cos pi p)) or rex ((1-p)/(0.5+0.5(1-p)), Chen et al. 2021)."
    )
    min_lr: float = Field(
        default=0.0, ge=0, description="LR at the end of the budget (cosine: often 0.1 max_lr)."
    )

    def layout(self, budget: _Budget) -> Schedule:
        # The decay is the whole schedule, not a final anneal after a plateau: no anneal_start.
        T, W, top = budget.total, budget.warm.tokens, self.max_lr
        return budget.schedule(budget.warmup(top), Phase("decay", W, T, top, self.min_lr, self.kind))


class InvSqrtScheduleConfig(_ScheduleBase):
    """Warmup, then max_lr * sqrt(alpha / (alpha + t)) with t counted from the end of the warmup."""

    kind: Literal["inv_sqrt"] = Field(description="Warmup, then inverse-sqrt decay with no fixed end.")
    timescale: LengthField = Field(
        description="alpha: tokens after the warmup at which the LR has fallen to max_lr / sqrt(2)."
    )

    def layout(self, budget: _Budget) -> Schedule:
        T, W, top = budget.total, budget.warm.tokens, self.max_lr
        alpha = budget.span("timescale", self.timescale).tokens
        if alpha <= 0:
            raise CptError(f"schedule.timescale: must be positive, got {self.timescale}")
        # No end of its own: the phase stops at the budget on the curve max_lr*sqrt(a/(a+t)).
        end_lr = top * math.sqrt(alpha / (alpha + T - W))
        decay = Phase("decay", W, T, top, end_lr, "inv_sqrt", {"timescale": alpha})
        return budget.schedule(budget.warmup(top), decay)


class WSDScheduleConfig(_ScheduleBase):
    """Warmup, stable at max_lr, decay to min_lr (MiniCPM's warmup-stable-decay)."""

    kind: Literal["wsd"] = Field(description="Warmup, stable at max_lr, then decay to min_lr.")
    min_lr: float = Field(default=0.0, ge=0, description="LR at the end of the decay.")
    decay: DecayConfig = Field(default_factory=DecayConfig, description="The final decay.")
    decay_at: LengthField | None = Field(
        default=None,
        description="Token where the decay starts, for a decay branch from a stable-phase checkpoint; the LR "
        "holds at min_lr after the decay. Default: the decay ends at the end of the budget.",
    )

    branch: ClassVar[Branching | None] = Branching(
        phase="stable", block="decay", lengths=("warmup", "decay.length"), at="decay_at"
    )

    def layout(self, budget: _Budget) -> Schedule:
        T, W, top = budget.total, budget.warm.tokens, self.max_lr
        decay = budget.span("decay.length", self.decay.length)
        _check_decay_target(self.decay.shape, self.min_lr, "schedule.min_lr")
        _check_fits(T, decay, budget.warm)
        if self.decay_at is None:
            d0 = T - decay.tokens
        else:
            at = budget.span("decay_at", self.decay_at)
            if at.tokens < W:
                raise CptError(f"{at} falls inside the warmup ({budget.warm})")
            _check_fits(T, at, decay)
            d0 = at.tokens
        d1 = d0 + decay.tokens
        # Only a decay that follows a stable stretch is a final anneal; straight after the warmup it is
        # the whole schedule, as a cosine's is.
        return budget.schedule(
            budget.warmup(top),
            Phase("stable", W, d0, top, top, "constant"),
            Phase("decay", d0, d1, top, self.min_lr, self.decay.shape),
            Phase("hold", d1, T, self.min_lr, self.min_lr, "constant"),
            anneal_start=d0 if W < d0 < d1 else None,
        )


class InfiniteScheduleConfig(_ScheduleBase):
    """Ibrahim et al. 2024: warmup, cooldown to a constant LR, constant, optional anneal at the end."""

    kind: Literal["infinite"] = Field(
        description="Warmup, cooldown to a constant LR that lasts as long as data comes, optional final anneal."
    )
    cooldown: CooldownConfig = Field(description="From max_lr down to the constant LR.")
    anneal: AnnealConfig | None = Field(
        default=None,
        description="Final anneal at the end of the budget, for a release checkpoint; omitted = the constant "
        "phase runs to the end and the next stage continues from it without re-warming.",
    )

    branch: ClassVar[Branching | None] = Branching(
        phase="constant", block="anneal",
        lengths=("warmup", "cooldown.length", "cooldown.timescale", "anneal.length"),
    )

    def layout(self, budget: _Budget) -> Schedule:
        T, W, top = budget.total, budget.warm.tokens, self.max_lr
        cool = budget.span("cooldown.length", self.cooldown.length)
        const = self.cooldown.to
        if const > top:
            raise CptError(f"schedule.cooldown.to: {const:g} exceeds schedule.max_lr: {top:g}")
        c1 = W + cool.tokens
        cooldown = Phase("cooldown", W, c1, top, const, self.cooldown.shape, self._cooldown_params(budget))
        if self.anneal is None:
            _check_fits(T, cool, budget.warm)
            constant = Phase("constant", c1, T, const, const, "constant")
            return budget.schedule(budget.warmup(top), cooldown, constant)
        ann = budget.span("anneal.length", self.anneal.length)
        if self.anneal.to > const:
            raise CptError(f"schedule.anneal.to: {self.anneal.to:g} exceeds schedule.cooldown.to: {const:g}")
        _check_decay_target(self.anneal.shape, self.anneal.to, "schedule.anneal.to")
        _check_fits(T, ann, cool, budget.warm)
        a0 = T - ann.tokens
        return budget.schedule(
            budget.warmup(top),
            cooldown,
            Phase("constant", c1, a0, const, const, "constant"),
            Phase("anneal", a0, T, const, self.anneal.to, self.anneal.shape),
            anneal_start=a0 if a0 < T else None,
        )

    def _cooldown_params(self, budget: _Budget) -> dict[str, Any]:
        # The timescale belongs to the inv_sqrt cooldown alone; given with cosine it would be silently unused.
        if self.cooldown.shape != "inv_sqrt":
            if self.cooldown.timescale is not None:
                raise CptError(
                    "schedule.cooldown.timescale: only used when schedule.cooldown.shape is inv_sqrt"
                )
            return {}
        if self.cooldown.timescale is None:
            raise CptError("schedule.cooldown.timescale: needed when schedule.cooldown.shape is inv_sqrt")
        timescale = budget.span("cooldown.timescale", self.cooldown.timescale).tokens
        if timescale <= 0:
            raise CptError(f"schedule.cooldown.timescale: must be positive, got {self.cooldown.timescale}")
        return {"timescale": timescale}


class PowerScheduleConfig(_ScheduleBase):
    """Shen et al. 2024: warmup, min(max_lr, batch * a * n^b) over tokens n, decay to min_lr at the end."""

    kind: Literal["power"] = Field(
        description="Warmup, power-law LR min(max_lr, batch*a*n^b) (batch: sequences per step, n: tokens "
        "seen in the stage), then decay."
    )
    a: float = Field(default=4.6, gt=0, description="Power-law coefficient a (4.6 in the paper, with muP).")
    b: float = Field(default=-0.51, lt=0, description="Power-law exponent b (-0.51 in the paper).")
    min_lr: float = Field(default=0.0, ge=0, description="LR at the end of the decay.")
    decay: DecayConfig = Field(
        default_factory=DecayConfig, description="The final decay, from the power-law LR at its start."
    )

    def layout(self, budget: _Budget) -> Schedule:
        if budget.batch_size is None or budget.batch_size <= 0:
            raise CptError("schedule: kind 'power' needs the batch size in sequences per optimizer step")
        T, W, top = budget.total, budget.warm.tokens, self.max_lr
        decay = budget.span("decay.length", self.decay.length)
        _check_decay_target(self.decay.shape, self.min_lr, "schedule.min_lr")
        _check_fits(T, decay, budget.warm)
        law = {"max_lr": top, "batch": budget.batch_size, "a": self.a, "b": self.b}
        d0 = T - decay.tokens
        lr_w, lr_d = power_law_lr(W, **law), power_law_lr(d0, **law)
        if self.min_lr > lr_d:
            raise CptError(
                f"schedule.min_lr: {self.min_lr:g} exceeds the power-law LR {lr_d:.4g} at the decay start "
                f"(token {format_count(d0)})"
            )
        # The decay follows the power law rather than a stable phase, and has never counted as a final
        # anneal: no anneal_start.
        return budget.schedule(
            budget.warmup(lr_w),  # ramps to the power law, not to max_lr
            Phase("power", W, d0, lr_w, lr_d, "power", law),
            Phase("decay", d0, T, lr_d, self.min_lr, self.decay.shape),
        )


ScheduleConfig = Annotated[
    ConstantScheduleConfig
    | DecayScheduleConfig
    | InvSqrtScheduleConfig
    | WSDScheduleConfig
    | InfiniteScheduleConfig
    | PowerScheduleConfig,
    Field(discriminator="kind"),
]
"""The ``schedule:`` section of a recipe; ``kind`` picks the model."""

KINDS: dict[str, type[_ScheduleBase]] = {
    kind: cls
    for cls in get_args(get_args(ScheduleConfig)[0])
    for kind in get_args(cls.model_fields["kind"].annotation)
}
"""Schedule kind -> its config class, read off the union so that the union is the one list of kinds."""

BRANCHES: dict[str, Branching] = {kind: cls.branch for kind, cls in KINDS.items() if cls.branch is not None}
"""The kinds a decay branch can be cut from, and how."""


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Span:
    key: str  # recipe key, for messages
    length: Length
    tokens: int

    def __str__(self) -> str:
        if self.length.unit == "tokens":
            return f"{self.key}: {self.length}"
        return f"{self.key}: {self.length} ({format_count(self.tokens)} tokens)"


@dataclass(frozen=True)
class _Budget:
    """What a kind lays its phases out over: the stage budget, the warmup resolved and checked, the LR
    the warmup starts at, and the batch size in sequences (the power law's unit)."""

    total: int
    tokens_per_step: int
    warm: _Span
    lr0: float
    batch_size: int | None

    def span(self, key: str, length: Length) -> _Span:
        return _Span(f"schedule.{key}", length, length.to_tokens(self.total, self.tokens_per_step))

    def warmup(self, to: float) -> Phase:
        return Phase("warmup", 0, self.warm.tokens, self.lr0, to, "linear")

    def schedule(self, *phases: Phase, anneal_start: int | None = None) -> Schedule:
        # Zero-length spans (no warmup, a decay that fills the stable phase) are simply left out.
        return Schedule(tuple(p for p in phases if p.end > p.start), self.total, anneal_start)


def _check_fits(total: int, *spans: _Span) -> None:
    spans = tuple(s for s in spans if s.tokens > 0)
    if sum(s.tokens for s in spans) > total:
        verb = "exceeds" if len(spans) == 1 else "exceed"
        raise CptError(
            f"{' plus '.join(map(str, spans))} {verb} the stage budget of {format_count(total)} tokens"
        )


def build_schedule(
    cfg: ScheduleConfig,
    total_tokens: int,
    tokens_per_step: int,
    start_lr: float | None = None,
    batch_size: int | None = None,
) -> Schedule:
    """Resolve every length of ``cfg`` to tokens and lay out the phases over ``total_tokens``.

    ``start_lr`` is the LR the continued checkpoint ended at (for ``warmup_from: checkpoint``);
    ``batch_size`` is sequences per optimizer step (for ``kind: power``). Every rule that involves
    several fields is checked here or in the kind's ``layout``, raising :class:`CptError` that names
    the recipe key at fault.
    """
    if total_tokens <= 0:
        raise CptError(f"schedule: the stage budget must be positive, got {total_tokens} tokens")
    if tokens_per_step <= 0:
        raise CptError(f"schedule: tokens per step must be positive, got {tokens_per_step}")

    warm = _Span("schedule.warmup", cfg.warmup, cfg.warmup.to_tokens(total_tokens, tokens_per_step))
    if cfg.warmup_from == "checkpoint":
        if start_lr is None:
            raise CptError("schedule.warmup_from: 'checkpoint' needs a checkpoint to start from (init_from)")
        lr0 = start_lr
    else:
        lr0 = cfg.warmup_from
    min_lr = getattr(cfg, "min_lr", None)
    if min_lr is not None and min_lr > cfg.max_lr:
        raise CptError(f"schedule.min_lr: {min_lr:g} exceeds schedule.max_lr: {cfg.max_lr:g}")
    _check_fits(total_tokens, warm)
    return cfg.layout(_Budget(total_tokens, tokens_per_step, warm, lr0, batch_size))


def _check_decay_target(shape: str, target: float, key: str) -> None:
    # An exponential curve never reaches 0; rather than silently substitute an epsilon, ask.
    if shape == "exponential" and target <= 0:
        raise CptError(f"{key}: an exponential decay needs a positive target LR, got {target:g}")


# --------------------------------------------------------------------------------------------------
# Showing
# --------------------------------------------------------------------------------------------------


def describe(schedule: Schedule) -> str:
    """A table of the phases: name, token range, LR at both edges, shape."""
    rows = [("phase", "tokens", "lr", "shape")]
    for ph in schedule.phases:
        shape = ph.shape
        if ph.shape == "inv_sqrt":
            shape += f" (timescale {format_count(ph.params['timescale'])})"
        elif ph.shape == "power":
            shape += " ({batch}*{a:g}*n^{b:g}, max {max_lr:g})".format(**ph.params)
        rows.append(
            (
                ph.name,
                f"{format_count(ph.start)} -> {format_count(ph.end)}",
                f"{ph.lr_start:.4g} -> {ph.lr_end:.4g}",
                shape,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
    after = schedule.phases[-1].end
    if after < schedule.total_tokens:
        lines.append(f"(LR held at {schedule.phases[-1].lr_end:.4g} from {format_count(after)} on)")
    lines.append(f"stage budget: {format_count(schedule.total_tokens)} tokens")
    return "\n".join(lines)
