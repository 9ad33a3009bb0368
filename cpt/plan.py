"""Where a run starts and what it runs: ``init_from`` resolved into an Origin (reading the checkpoint's
trainer state), the one planner :func:`plan_run` (origin + stages) that train, `cpt schedule` and
`cpt predict` share, decay branches, and what a start loaded and reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cpt.data.controller import ControlledSchedule
from cpt.errors import CptError
from cpt.recipe import Recipe, validate_recipe
from cpt.schedules import BRANCHES, build_schedule
from cpt.stages import StagePlan, plan_stages, stage_at
from cpt.state import STATE_FILE, Origin, find_checkpoint, read_trainer_state
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
        if same_data and state.mixture == first.mixture and state.sampler and "schedule" not in state.sampler:
            origin.sampler = state.sampler  # same sources, same weights: the data order goes on exactly
    return origin


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


# ------------------------------------------------------------------------------------- decay branches

def make_branch(parent: Recipe, checkpoint: str | Path, decay: str | None = None, shape: str | None = None,
                output_dir: str | None = None) -> Recipe:
    """A decay branch of a WSD or infinite run: from a stable-phase checkpoint at token X, decay over D
    tokens. The branch's LR at every step equals a single run of the same schedule decaying at X.

    ``decay`` (default: the parent's own decay/anneal length) is a length; fractions are of the parent's
    budget. The parent's fractional lengths are frozen into tokens first, so moving the horizon to X + D
    changes nothing but where the decay sits."""
    kind = parent.schedule.kind if parent.schedule is not None else None
    branch = parent.schedule.branch if parent.schedule is not None else None  # the kind says how, if at all
    if branch is None:
        raise CptError(f"--branch-from: a decay branch needs a {' or '.join(BRANCHES)} schedule "
                       f"(this recipe's schedule is {kind})")
    ckpt = find_checkpoint(checkpoint)
    state = read_trainer_state(ckpt)
    x, step = state.tokens, state.step
    step_tokens = parent.train.global_batch_tokens
    budget = sum(st.tokens for st in parent.stage_list())
    main = build_schedule(parent.schedule, total_tokens=budget, tokens_per_step=step_tokens,
                          batch_size=step_tokens // parent.data.seq_len)
    phase = next((p.name for p in main.phases if p.start <= x < p.end), "end")
    if phase != branch.phase:
        where = " or ".join(f"{b.phase} ({k})" for k, b in BRANCHES.items())
        raise CptError(f"--branch-from: {ckpt} is at token {x}, in the {phase} phase; "
                       f"branch from the {where} phase")

    data = parent.to_dict()
    sched = data["schedule"]
    for dotted in branch.lengths:
        node, key = _node(sched, dotted)
        if node is not None and node.get(key) is not None:
            node[key] = parse_length(node[key]).to_tokens(budget, step_tokens)
    block = branch.block
    if not sched.get(block):
        raise CptError(f"--branch-from: the {kind} schedule has no {block} block to branch with")
    if decay is not None:
        sched[block]["length"] = parse_length(decay).to_tokens(budget, step_tokens)
    if shape is not None:
        sched[block]["shape"] = shape
    d = sched[block]["length"]
    if branch.at is not None:
        sched[branch.at] = x
    stage = stage_at(plan_stages(parent, Origin()), x)
    data["run"]["name"] = f"{parent.run.name}-decay-at-{step}"
    data["run"]["output_dir"] = output_dir or f"{parent.run.output_dir}-decay-at-{step}"
    data["init_from"] = {"path": str(ckpt), "checkpoint": "latest",
                         "load": {"weights": True, "optimizer": True, "schedule_state": True}}
    data["model"] = {**data["model"], "preset": None, "config": {}}
    data["train"]["tokens"] = d
    data["stages"] = None
    # a mixture schedule: the shares at the branch point, or, where it switches at: decay, the shares the
    # parent's own decay starts with (the branch is all decay); a replay controller: the share it had set by
    # the branch point (its state rides in the checkpoint), held over the decay
    spec = parent.stage_list()[stage.index].mixture
    at = x
    if isinstance(spec, list) and stage.anneal_start is not None and any(p.at == "decay" for p in spec):
        at = stage.anneal_start
    if isinstance(stage.mixture, ControlledSchedule):
        stage.mixture.restore((state.sampler or {}).get("schedule"))
    data["data"]["mixture"] = stage.mixture.share_at(at - stage.start)
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
