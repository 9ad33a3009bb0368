"""The `cpt plan` verb: pilots of a base recipe, the law fitted on them, the recipe that meets a forgetting
budget with the best new-domain loss, and the report."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpt.errors import CptError
from cpt.planner import design
from cpt.planner.law import ANNEALS, Pilot, fit_domain

REPLAYS = "0,0.05,0.1,0.2,0.3,0.4,0.5"
LR_SCALES = "0.125,0.25,0.5,1"


@dataclass
class Setup:
    """The question: the base recipe, which sources and probes are old and new, the candidates."""

    recipe: Path
    overrides: list[str]
    old: str
    new: str
    old_probe: str
    new_probe: str
    base_lr: float
    min_lr: float
    full_tokens: int
    tokens_per_step: int
    replays: list[float]
    max_lrs: list[float]
    warmup_steps: int = 0
    warmup_from: Any = None

    def candidate(self, replay: float, max_lr: float) -> list[str]:
        """The overrides that make the base recipe the candidate (min_lr scales with max_lr)."""
        out = [f"data.mixture.{self.old}={replay:g}", f"data.mixture.{self.new}={1 - replay:g}",
               f"schedule.max_lr={max_lr:.6g}"]
        if self.min_lr > 0:
            out.append(f"schedule.min_lr={self.min_lr * max_lr / self.base_lr:.6g}")
        return out

    def pilot_schedule(self, max_lr: float) -> str:
        """A pilot's schedule: WSD (the full run's warmup in steps, stable at max_lr, a linear decay over the
        last half to the candidate's min_lr): more LR area per token than a short cosine, and a decay deep and
        long enough to show the annealing term the law needs (over a quarter, the fall to min_lr took 2 of a
        10-step pilot's updates and the term was not identified)."""
        sched = {"kind": "wsd", "max_lr": float(f"{max_lr:.6g}"), "min_lr": float(f"{self.min_lr * max_lr / self.base_lr:.6g}"),
                 "warmup": f"{self.warmup_steps} steps" if self.warmup_steps else 0,
                 "decay": {"length": "50%", "shape": "linear"}}
        if self.warmup_from is not None:
            sched["warmup_from"] = self.warmup_from
        return "schedule=" + json.dumps(sched, separators=(",", ":"))

    def lrs(self, replay: float, max_lr: float, extra: tuple[str, ...] = ()) -> np.ndarray:
        from cpt.predict.curves import recipe_lrs
        from cpt.recipe import load_recipe

        return recipe_lrs(load_recipe(self.recipe, [*self.overrides, *self.candidate(replay, max_lr), *extra]))[0]


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise CptError(f"{what} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise CptError(f"{what}: no values")
    return vals


def load_setup(ns: argparse.Namespace) -> Setup:
    from cpt.recipe import load_recipe

    r = load_recipe(ns.recipe, ns.overrides)
    if r.stages:
        raise CptError(f"{ns.recipe}: cpt plan plans one stage (train.tokens, data.mixture, schedule); this recipe "
                       f"has {len(r.stages)} stages: plan the last one as a recipe of its own")
    mix = r.data.mixture
    if not isinstance(mix, dict):
        raise CptError(f"{ns.recipe}: data.mixture is a schedule; cpt plan varies a fixed mixture")
    for name in (ns.old, ns.new):
        if name not in r.data.sources:
            raise CptError(f"--old/--new {name!r}: not a source of the recipe (sources: {', '.join(r.data.sources)})")
    others = [k for k, w in mix.items() if k not in (ns.old, ns.new) and w > 0]
    if others:
        raise CptError(f"data.mixture gives weight to {', '.join(others)}: cpt plan splits the batch between --old "
                       f"{ns.old} and --new {ns.new} only; set the others to 0")
    old_probe, new_probe = ns.old_probe or ns.old, ns.new_probe or ns.new
    for name in (old_probe, new_probe):
        if name not in r.probes.sets:
            raise CptError(f"probe set {name!r} is not in probes.sets ({', '.join(r.probes.sets) or 'none'}): the "
                           f"plan reads the old and new domains' losses from the probes (--old-probe, --new-probe)")
    sched = r.schedule
    base_lr = float(sched.max_lr)
    replays = _floats(ns.replay, "--replay")
    if replays[0] < 0 or replays[-1] >= 1:
        raise CptError(f"--replay {ns.replay}: shares are in [0, 1)")
    from cpt.predict.curves import recipe_lrs

    lrs = recipe_lrs(r)[0]
    warm = int(np.argmax(lrs))  # updates before the first at the peak LR
    return Setup(Path(ns.recipe), list(ns.overrides), ns.old, ns.new, old_probe, new_probe, base_lr,
                 float(getattr(sched, "min_lr", 0.0) or 0.0), int(r.train.tokens), int(r.train.global_batch_tokens),
                 replays, [s * base_lr for s in _floats(ns.lr_scales, "--lr-scales")], warm,
                 r.to_dict()["schedule"].get("warmup_from"))


def pilot_args(s: Setup, p: design.PilotSpec, out: Path) -> list[str]:
    """`cpt train` arguments of one pilot: the candidate at the pilot's length, probed after every step."""
    return ["train", str(s.recipe), *s.overrides, *s.candidate(p.replay, p.max_lr), s.pilot_schedule(p.max_lr),
            f"train.tokens={p.tokens}",
            f"probes.every={s.tokens_per_step}", "probes.dense=null", "checkpoint.every=null",
            f"run.name={p.name}", f"run.output_dir={out / 'pilots' / p.name}", "tracking.progress=false"]


def run_pilots(s: Setup, pilots: list[design.PilotSpec], out: Path) -> None:
    """Train each pilot with `cpt train` in a subprocess unless its run dir holds it finished."""
    for p in pilots:
        run_dir = out / "pilots" / p.name
        if (run_dir / "final").is_dir():
            print(f"cpt plan: {p.name}: finished run found, reused", flush=True)
            continue
        args = pilot_args(s, p, out)
        print(f"cpt plan: {p.name}: cpt {shlex.join(args)}", flush=True)
        log = run_dir.with_name(p.name + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            res = subprocess.run([sys.executable, "-m", "cpt.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ})
        if res.returncode != 0:
            raise CptError(f"pilot {p.name} failed (exit {res.returncode}); its output: {log}")


def read_pilot(s: Setup, p: design.PilotSpec, out: Path, metric: str) -> tuple[Pilot, Pilot]:
    from cpt.predict.curves import run_curve

    pair = []
    for probe in (s.old_probe, s.new_probe):
        c = run_curve(out / "pilots" / p.name, metric=f"probe/{probe}/{metric}")
        n = c.measured(0)
        pair.append(Pilot(p.name, p.replay, c.lrs, n, c.losses[n]))
    return pair[0], pair[1]


def _recipe_tree(s: Setup, replay: float, max_lr: float, name: str, out: Path, tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with the candidate's overrides (and the run's name and folder under ``out``) applied."""
    from cpt.recipe.load import _apply_override

    for item in [*s.overrides, *s.candidate(replay, max_lr), f"run.name=plan-{name}", f"run.output_dir={out / f'{name}-run'}"]:
        _apply_override(tree, item)
    return tree


def _write_recipe(path: Path, what: str, tree: dict[str, Any]) -> Path:
    """A recipe file with a comment saying what it is and how to run it; it must load as `cpt train` loads it."""
    import yaml

    from cpt.recipe import load_recipe

    path.write_text(f"# {what}; see plan.md\n#   cpt train {path}\n" + yaml.safe_dump(tree, sort_keys=False))
    load_recipe(path)
    return path


def picked_yaml(s: Setup, replay: float, max_lr: float, out: Path) -> Path:
    """The pick as a normal recipe: extends the base recipe, with the overrides written out."""
    tree = _recipe_tree(s, replay, max_lr, "pick", out, {})
    return _write_recipe(out / "recipe.yaml", f"cpt plan's pick: replay {replay:g} of {s.old}, max LR {max_lr:.3g}",
                         {"extends": str(s.recipe.resolve()), **tree})


def controlled_yaml(s: Setup, replay: float, max_lr: float, budget: float, out: Path) -> Path:
    """The pick's LR with the replay controller (cpt.data.controller) in place of its fixed share: it starts at
    the pick's share and moves it within the candidates' shares to keep the old domain's rise under the
    budget, so a law that was wrong about the share is corrected online (on English -> code the pick alone
    broke the budget on 3 of 3 seeds; started from its share the controller kept it on 2 of 3 at the same
    new-domain loss: docs/planning.md). The whole recipe is written out (the controller replaces the base
    recipe's mixture, which ``extends:`` would merge into it)."""
    from cpt.recipe.load import _load_tree

    tree = _recipe_tree(s, replay, max_lr, "controlled", out, _load_tree(s.recipe.resolve(), chain=()))
    lo, hi = min(s.replays), max(s.replays)
    tree["data"]["mixture"] = {"controller": {"old": s.old, "new": s.new, "probe": s.old_probe, "budget": budget,
                                              "min": lo, "max": hi, "start": replay}}
    return _write_recipe(out / "controlled.yaml", f"cpt plan's pick with the replay controller: max LR {max_lr:.3g}, "
                         f"replay of {s.old} from {replay:g}, held within [{lo:g}, {hi:g}] to keep the rise <= {budget:g}",
                         tree)


def run_plan(ns: argparse.Namespace) -> int:
    from cpt.planner.report import plot_frontier, render_plan

    s = load_setup(ns)
    out = Path(ns.out)
    pilots = design.design_pilots(s.replays, s.max_lrs, ns.pilots, s.full_tokens, s.tokens_per_step, ns.pilot_budget)
    if ns.dry_run:
        print(f"cpt plan: {len(pilots)} pilots of {pilots[0].tokens} tokens each "
              f"({sum(p.tokens for p in pilots) / s.full_tokens:.1%} of the full run's {s.full_tokens} tokens), at the "
              f"corners of replay {s.replays[0]:g}-{s.replays[-1]:g} x max LR {s.max_lrs[0]:.3g}-{s.max_lrs[-1]:.3g}:")
        for p in pilots:
            print("cpt " + shlex.join(pilot_args(s, p, out)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    run_pilots(s, pilots, out)
    pairs = [read_pilot(s, p, out, ns.unit) for p in pilots]
    olds, news = [a for a, _ in pairs], [b for _, b in pairs]
    fo = fit_domain(s.old_probe, olds, old=True, bootstrap=ns.bootstrap, anneal=ns.anneal)
    fn = fit_domain(s.new_probe, news, old=False, bootstrap=ns.bootstrap, ref_lr=fo.ref_lr, anneal=ns.anneal)
    cache = {(r, lr): s.lrs(r, lr) for r in s.replays for lr in s.max_lrs}
    preds = design.predict_all(fo, fn, s.replays, s.max_lrs, lambda r, lr: cache[(r, lr)])
    chosen = design.pick(preds, ns.max_forgetting, ns.max_rise)
    loo = design.held_out(olds, news, (fo.L0, fn.L0), fo.ref_lr, ns.anneal)
    pilot_s1 = max(float(np.sum(p.lrs)) for p in olds) / fo.ref_lr
    notes = design.trust([fo, fn], loo, chosen, ns.max_forgetting, ns.max_rise, pilot_s1)
    path = picked_yaml(s, chosen.replay, chosen.max_lr, out) if chosen else None
    controlled = (controlled_yaml(s, chosen.replay, chosen.max_lr, ns.max_forgetting, out)
                  if chosen and ns.unit == "loss" else None)  # the controller's budget is in nats
    report = {"recipe": str(s.recipe), "overrides": s.overrides, "old": s.old, "new": s.new,
              "old_probe": s.old_probe, "new_probe": s.new_probe, "unit": ns.unit, "anneal": ns.anneal,
              "max_forgetting": ns.max_forgetting, "max_rise": ns.max_rise, "full_tokens": s.full_tokens,
              "tokens_per_step": s.tokens_per_step, "pilot_budget": ns.pilot_budget,
              "pilots": [{**asdict(p), "old_final": float(o.losses[-1]), "new_final": float(n.losses[-1]),
                          "old_worst": float(np.max(o.losses)), "command": "cpt " + shlex.join(pilot_args(s, p, out))}
                         for p, o, n in zip(pilots, olds, news, strict=True)],
              "fits": {d: _fit_dict(f) for d, f in (("old", fo), ("new", fn))},
              "held_out": loo, "candidates": [asdict(p) for p in preds],
              "pick": asdict(chosen) if chosen else None, "recipe_out": str(path) if path else None,
              "controlled_out": str(controlled) if controlled else None,
              "notes": notes}
    (out / "plan.json").write_text(json.dumps(report, indent=1))
    (out / "plan.md").write_text(render_plan(report))
    plot_frontier(report, [fo, fn], olds, news, out / "frontier.png")
    print(render_plan(report, brief=True))
    print(f"cpt plan: wrote {out / 'plan.md'}, {out / 'frontier.png'}" + (f", {path}" if path else "")
          + (f", {controlled}" if controlled else ""))
    return 0


def _fit_dict(f) -> dict[str, Any]:
    from cpt.predict.checks import fit_warnings

    return {"domain": f.domain, "L0": f.L0, "ref_lr": f.ref_lr, "params": dict(zip(f.names, map(float, f.theta),
            strict=True)), "intervals": {k: [lo, hi] for k, (_, lo, hi) in f.param_intervals().items()},
            "rmse": f.rmse, "points": f.points, "bootstrap": len(f.boot), "runs": list(f.runs),
            "warnings": fit_warnings(f)}


def add_plan(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="pilot runs -> the replay share and max LR that keep forgetting within a budget",
                        description="cpt plan RECIPE [key.path=value ...] --old SOURCE --new SOURCE --max-forgetting X")
    pl.add_argument("recipe", type=Path, help="the base recipe: one CPT stage (init_from, train.tokens, data.mixture "
                    "of the old and new sources, probes.sets with both domains, schedule)")
    pl.add_argument("overrides", nargs="*", metavar="key.path=value")
    pl.add_argument("--old", required=True, help="the old (replayed) data source")
    pl.add_argument("--new", required=True, help="the new data source")
    pl.add_argument("--old-probe", default=None, help="probe set of the old domain (default: the --old name)")
    pl.add_argument("--new-probe", default=None, help="probe set of the new domain (default: the --new name)")
    pl.add_argument("--max-forgetting", type=float, required=True,
                    help="the budget: old-domain probe at the stage's end minus at its start (in --unit)")
    pl.add_argument("--max-rise", type=float, default=None,
                    help="also bound the worst old-domain rise during the stage (the stability gap), in --unit")
    pl.add_argument("--unit", choices=("loss", "bpb"), default="loss", help="nats per token or bits per byte")
    pl.add_argument("--replay", default=REPLAYS, help=f"candidate replay shares of --old (default {REPLAYS})")
    pl.add_argument("--lr-scales", default=LR_SCALES,
                    help=f"candidate max LRs as multiples of the recipe's schedule.max_lr (default {LR_SCALES})")
    pl.add_argument("--pilots", type=int, default=4, help="pilot runs (2-5; default 4: the corners)")
    pl.add_argument("--pilot-budget", type=float, default=0.25,
                    help="the pilots' tokens together, as a fraction of the full run's (default 0.25)")
    pl.add_argument("--anneal", choices=ANNEALS, default="drop",
                    help="the law's annealing term: drop (the multi-power law's loss drop, bounded by the LR's fall; "
                         "default) or area (the anneal law's C*S2, growing with a decay's length)")
    pl.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for the intervals")
    pl.add_argument("--out", type=Path, default=Path("plan"), help="folder for the pilots, plan.md/.json, "
                    "frontier.png and the picked recipe.yaml")
    pl.add_argument("--dry-run", action="store_true", help="print the pilots' commands and exit")
    pl.set_defaults(func=run_plan)
