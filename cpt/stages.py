"""Stages: where a run starts (init_from), how its token counter is cut into stages, and decay branches.

A run has one token counter. It starts at 0, or at the checkpoint's count when
``init_from.load.schedule_state`` continues a schedule (a decay branch, an infinite schedule going on).
Each stage covers ``[start, end)`` of that counter with its own mixture. Its LR is the run's schedule
(built over the whole horizon ``[0, last end)``: one schedule across stages, the infinite schedule's
point) or a schedule of its own counted from the stage start (re-warming at a stage boundary). Everything
here is pure arithmetic on the recipe and the checkpoint's trainer state, so resuming re-plans the same
stages from the counters alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cpt.checkpoint import STATE_FILE, find_checkpoint, read_trainer_state
from cpt.errors import CptError
from cpt.recipe import Recipe, validate_recipe
from cpt.schedules import Phase, Schedule, build_schedule
from cpt.train.state import Origin
from cpt.units import parse_length


def resolve_init(recipe: Recipe) -> Origin:
    """Read the init_from source: what can be loaded from it and where the counters start."""
    init = recipe.init_from
    if init is None:
        return Origin()
    path = Path(init.path)
    if not path.exists():
        raise CptError(f"init_from.path: {path} does not exist")
    is_ckpt = (path / STATE_FILE).is_file() or (path / "checkpoints").is_dir()
    if not is_ckpt:
        if not (path / "config.json").is_file():
            raise CptError(f"init_from.path: {path} is neither a cpt run/checkpoint nor a Hugging Face "
                           f"model dir (no config.json)")
        for switch in ("optimizer", "schedule_state"):
            if getattr(init.load, switch):
                raise CptError(f"init_from.load.{switch}: {path} is a Hugging Face model dir, which has no "
                               f"{switch.replace('_', ' ')} (only cpt checkpoints do)")
        return Origin(path=str(path))
    ckpt = find_checkpoint(path, init.checkpoint)
    state = read_trainer_state(ckpt)
    saved = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    origin = Origin(path=str(ckpt), lr=state.lr, next_lr=state.next_lr, mixture=state.mixture)
    if init.load.schedule_state:
        origin.step, origin.tokens = state.step, state.tokens
        origin.consumed = dict(state.data_consumed)
        same_data = saved.get("data", {}).get("sources") == recipe.data.sources
        first = recipe.stage_list()[0]
        if same_data and state.mixture == first.mixture and state.sampler:
            origin.sampler = state.sampler  # same sources, same weights: the data order goes on exactly
    return origin


@dataclass
class StagePlan:
    index: int
    name: str
    start: int                       # tokens on the run's counter
    end: int
    mixture: dict[str, float]
    schedule: Schedule
    offset: int                      # the schedule is evaluated at tokens - offset
    probe_sets: list[str]
    new_domains: list[str]
    anneal_start: int | None         # counter value where a final decay/anneal begins (pre_anneal tag)

    def lr(self, tokens: int) -> float:
        return self.schedule(tokens - self.offset)


@dataclass(frozen=True)
class RunPlan:
    """Where a run starts and the stages it runs: what train, `cpt schedule` and `cpt predict` all plan."""

    origin: Origin
    stages: list[StagePlan]
    note: str | None = None  # said when init_from does not exist yet and the plan counts from token 0

    def stage_at(self, tokens: int) -> StagePlan:
        return stage_at(self.stages, tokens)

    @property
    def end(self) -> int:
        return self.stages[-1].end


def plan_run(recipe: Recipe, origin: Origin | None = None, *, allow_missing_init: bool = False) -> RunPlan:
    """The one planner. ``origin`` is the resumed checkpoint's own record, else resolved from
    ``init_from``. With ``allow_missing_init`` (planning ahead: `cpt schedule`, `cpt predict`) an
    ``init_from.path`` that does not exist yet counts from token 0, and ``note`` says so; training
    refuses it."""
    note = None
    if origin is None:
        init = recipe.init_from
        if allow_missing_init and init is not None and not Path(init.path).exists():
            origin, note = Origin(), f"init_from.path {init.path} does not exist yet: counting from token 0"
        else:
            origin = resolve_init(recipe)
    return RunPlan(origin, plan_stages(recipe, origin), note)


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
        probe_sets = st.probes if st.probes is not None else list(recipe.probes.sets)
        new = st.new_domains if st.new_domains is not None else _default_new(st.mixture, prev_mixture, probe_sets)
        anneal = _anneal_start(sched)
        anneal = anneal + offset if anneal is not None and start <= anneal + offset < end else None
        plans.append(StagePlan(i, st.name, start, end, st.mixture, sched, offset, probe_sets,
                               [d for d in new if d in probe_sets], anneal))
        prev_lr = sched(end - tokens_per_step - offset)  # the LR of the stage's last step
        prev_mixture, start = st.mixture, end
    return plans


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


def _anneal_start(schedule: Schedule) -> int | None:
    """Token (schedule time) where the final anneal of an infinite schedule or the decay of a WSD one
    begins: the checkpoint just before it is the one the next stage continues from."""
    names = [p.name for p in schedule.phases]
    for i, p in enumerate(schedule.phases):
        if p.name == "anneal" or (p.name == "decay" and i > 0 and names[i - 1] == "stable"):
            return p.start
    return None


# ------------------------------------------------------------------------------------- decay branches

_LENGTHS = {"wsd": ["warmup", "decay.length"], "infinite": ["warmup", "cooldown.length", "cooldown.timescale",
                                                              "anneal.length"]}


def make_branch(parent: Recipe, checkpoint: str | Path, decay: str | None = None, shape: str | None = None,
                output_dir: str | None = None) -> Recipe:
    """A decay branch of a WSD or infinite run: from a stable-phase checkpoint at token X, decay over D
    tokens. The branch's LR at every step equals a single run of the same schedule decaying at X.

    ``decay`` (default: the parent's own decay/anneal length) is a length; fractions are of the parent's
    budget. The parent's fractional lengths are frozen into tokens first, so moving the horizon to X + D
    changes nothing but where the decay sits."""
    kind = parent.schedule.kind if parent.schedule is not None else None
    if kind not in _LENGTHS:
        raise CptError(f"--branch-from: a decay branch needs a wsd or infinite schedule (this recipe's "
                       f"schedule is {kind})")
    ckpt = find_checkpoint(checkpoint)
    state = read_trainer_state(ckpt)
    x, step = state.tokens, state.step
    step_tokens = parent.train.global_batch_tokens
    budget = sum(st.tokens for st in parent.stage_list())
    main = build_schedule(parent.schedule, total_tokens=budget, tokens_per_step=step_tokens,
                          batch_size=step_tokens // parent.data.seq_len)
    phase = next((p.name for p in main.phases if p.start <= x < p.end), "end")
    if phase not in ("stable", "constant"):
        raise CptError(f"--branch-from: {ckpt} is at token {x}, in the {phase} phase; branch from the "
                       f"stable (wsd) or constant (infinite) phase")

    data = parent.to_dict()
    sched = data["schedule"]
    for dotted in _LENGTHS[kind]:
        node, key = _node(sched, dotted)
        if node is not None and node.get(key) is not None:
            node[key] = parse_length(node[key]).to_tokens(budget, step_tokens)
    block = "decay" if kind == "wsd" else "anneal"
    if kind == "infinite" and not sched.get("anneal"):
        raise CptError("--branch-from: the infinite schedule has no anneal block to branch with")
    if decay is not None:
        sched[block]["length"] = parse_length(decay).to_tokens(budget, step_tokens)
    if shape is not None:
        sched[block]["shape"] = shape
    d = sched[block]["length"]
    if kind == "wsd":
        sched["decay_at"] = x
    stage = stage_at(plan_stages(parent, Origin()), x)
    data["run"]["name"] = f"{parent.run.name}-decay-at-{step}"
    data["run"]["output_dir"] = output_dir or f"{parent.run.output_dir}-decay-at-{step}"
    data["init_from"] = {"path": str(ckpt), "checkpoint": "latest",
                         "load": {"weights": True, "optimizer": True, "schedule_state": True}}
    data["model"] = {**data["model"], "preset": None, "config": {}}
    data["train"]["tokens"] = d
    data["stages"] = None
    data["data"]["mixture"] = stage.mixture
    return validate_recipe(data, source=f"branch of {parent.run.name}")


def _node(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    *parents, key = dotted.split(".")
    node: Any = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), key


def describe_origin(recipe: Recipe, origin: Origin) -> tuple[list[str], list[str]]:
    """(loaded, reset) switches, for the log line that says what a stage start took over."""
    if recipe.init_from is None:
        return [], ["weights (fresh init)", "optimizer", "schedule", "data position"]
    load = recipe.init_from.load
    loaded, reset = [], []
    (loaded if load.weights else reset).append("weights")
    (loaded if load.optimizer else reset).append("optimizer")
    if load.schedule_state:
        loaded.append(f"schedule counter (tokens {origin.tokens}, step {origin.step})")
        loaded.append("data position" + (" (exact sampler state)" if origin.sampler else " (per-source offsets)"))
    else:
        reset += ["schedule (counter restarts at 0)", "data position"]
    return loaded, reset
