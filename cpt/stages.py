"""Stages: how a run's token counter is cut into stages, and the LR of each. Pure arithmetic on the recipe
and an Origin (cpt.plan reads the checkpoints that give one).

A run has one token counter. It starts at 0, or at the checkpoint's count when
``init_from.load.schedule_state`` continues a schedule (a decay branch, an infinite schedule going on).
Each stage covers ``[start, end)`` of that counter with its own mixture. Its LR is the run's schedule
(built over the whole horizon ``[0, last end)``: one schedule across stages, the infinite schedule's
point) or a schedule of its own counted from the stage start (re-warming at a stage boundary). Resuming
re-plans the same stages from the counters alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpt.data.controller import ControlledSchedule
from cpt.data.mixture import MixtureSchedule
from cpt.errors import CptError
from cpt.recipe import ControlledMixture, MixturePoint, Recipe
from cpt.schedules import Phase, Schedule, build_schedule
from cpt.state import Origin


@dataclass
class StagePlan:
    index: int
    name: str
    start: int                       # tokens on the run's counter
    end: int
    mixture: MixtureSchedule         # shares along the stage, tokens counted from its start
    schedule: Schedule
    offset: int                      # the schedule is evaluated at tokens - offset
    probe_sets: list[str]
    new_domains: list[str]
    anneal_start: int | None         # counter value where a final decay/anneal begins (pre_anneal tag)

    def lr(self, tokens: int) -> float:
        return self.schedule(tokens - self.offset)


def stage_at(stages: list[StagePlan], tokens: float) -> StagePlan:
    """The stage holding ``tokens`` on the run's counter (the last one at and past the end)."""
    return next((p for p in stages if p.start <= tokens < p.end), stages[-1])


def plan_stages(recipe: Recipe, origin: Origin) -> list[StagePlan]:
    tokens_per_step = recipe.train.global_batch_tokens
    batch_size = tokens_per_step // recipe.data.seq_len  # sequences per step (the power schedule's unit)
    stages = recipe.stage_list()
    horizon = origin.tokens + sum(st.tokens for st in stages)
    run_schedule = None
    if recipe.schedule is not None:
        run_schedule = build_schedule(recipe.schedule, total_tokens=horizon, tokens_per_step=tokens_per_step,
                                      start_lr=origin.lr, batch_size=batch_size)
    plans: list[StagePlan] = []
    start, prev_lr, prev_mixture = origin.tokens, origin.lr, origin.mixture
    for i, st in enumerate(stages):
        if st.schedule is not None:
            sched, offset = build_schedule(st.schedule, total_tokens=st.tokens, tokens_per_step=tokens_per_step,
                                           start_lr=prev_lr, batch_size=batch_size), start
        else:
            sched, offset = run_schedule, 0
        end = start + st.tokens
        anneal = sched.anneal_start
        anneal = anneal + offset if anneal is not None and start <= anneal + offset < end else None
        where = f"stages[{i}].mixture" if recipe.stages is not None else "data.mixture"
        mixture = resolve_mixture(st.mixture, st.tokens, tokens_per_step, recipe.data.seq_len,
                                  None if anneal is None else anneal - start, where)
        probe_sets = st.probes if st.probes is not None else list(recipe.probes.sets)
        new = (st.new_domains if st.new_domains is not None
               else _default_new(mixture.mean(st.tokens), prev_mixture, probe_sets))
        new = [d for d in new if d in probe_sets]
        if isinstance(st.mixture, ControlledMixture):
            if st.new_domains is None:  # the replayed domain is old, whatever the start share
                new = [d for d in new if d != st.mixture.controller.probe_set]
            _check_controller(st.mixture.controller, recipe, probe_sets, new, f"{where}.controller")
        plans.append(StagePlan(i, st.name, start, end, mixture, sched, offset, probe_sets, new, anneal))
        prev_lr = sched(end - tokens_per_step - offset)  # the LR of the stage's last step
        prev_mixture, start = mixture.share_at(st.tokens), end
    return plans


def resolve_mixture(spec: dict[str, float] | list[MixturePoint] | ControlledMixture, budget: int, tokens_per_step: int,
                    seq_len: int, anneal: int | None, where: str) -> MixtureSchedule:
    """A stage's mixture as written in the recipe -> its MixtureSchedule, points in tokens from the stage
    start (``anneal``: where the stage's final decay starts, for ``at: decay``); a controlled one starts
    from its start share and gains points as the run probes (cpt.data.controller)."""
    if isinstance(spec, ControlledMixture):
        return ControlledSchedule(spec.controller, budget, seq_len)
    if isinstance(spec, dict):
        return MixtureSchedule.constant(spec)
    points = []
    for j, p in enumerate(spec):
        if p.at == "decay":
            if anneal is None:
                raise CptError(f"{where}.{j}.at: decay, but this stage's LR has no final decay or anneal "
                               f"starting inside it")
            t = anneal
        else:
            t = p.at.to_tokens(budget, tokens_per_step)
        if t > budget:
            raise CptError(f"{where}.{j}.at = {p.at}: {t} tokens is past the stage's end ({budget} tokens)")
        if points and t < points[-1][0]:
            raise CptError(f"{where}.{j}.at = {p.at}: {t} tokens comes before the previous point "
                           f"({points[-1][0]} tokens); points go in order")
        points.append((t, p.weights, p.ramp))
    return MixtureSchedule(points, seq_len)


def _check_controller(cfg, recipe: Recipe, probe_sets: list[str], new: list[str], key: str) -> None:
    """A replay controller needs probes inside the stage, of the old domain, measured as an old domain."""
    if recipe.probes.every is None and recipe.probes.dense is None:
        raise CptError(f"{key}: acts at each probe, but probes.every and probes.dense are unset (the stage is "
                       f"probed only at its start and end); set probes.every")
    if cfg.probe_set not in probe_sets:
        raise CptError(f"{key}.probe = {cfg.probe_set}: the old domain has no probe set in this stage (probe "
                       f"sets: {', '.join(probe_sets) or 'none'}); add it to probes.sets or name it with probe:")
    if cfg.probe_set in new:
        raise CptError(f"{key}.probe = {cfg.probe_set}: is a new domain of this stage, so its forgetting is not "
                       f"tracked; leave it out of new_domains")


@dataclass(frozen=True)
class StagedSchedule:
    """The LR over a whole run's counter, stage by stage, with the phases each stage actually runs (for
    `cpt schedule`'s table and plot; the trainer evaluates the stage plans themselves)."""

    plans: tuple[StagePlan, ...]
    phases: tuple[Phase, ...]
    total_tokens: int

    def __call__(self, tokens: float) -> float:
        return stage_at(list(self.plans), tokens).lr(tokens)


def staged_schedule(plans: list[StagePlan]) -> StagedSchedule:
    phases = []
    for plan in plans:
        for ph in plan.schedule.phases:
            a, b = max(ph.start + plan.offset, plan.start), min(ph.end + plan.offset, plan.end)
            if a < b:
                name = ph.name if len(plans) == 1 else f"{plan.name}: {ph.name}"
                phases.append(Phase(name, a, b, plan.lr(a), plan.lr(b), ph.shape, ph.params))
    return StagedSchedule(tuple(plans), tuple(phases), plans[-1].end)


def _default_new(mixture: dict[str, float], previous: dict[str, float] | None, probe_sets: list[str]) -> list[str]:
    """New data = the sources that gained weight over the previous stage; with no previous stage known
    (from scratch, or an HF model), the heaviest source of this one."""
    if previous is None:
        top = max(mixture.values())
        return [d for d, w in mixture.items() if w == top and d in probe_sets]
    return [d for d, w in mixture.items() if w > previous.get(d, 0.0) and d in probe_sets]
