"""Validate `cpt plan` on the tiny English -> German (or English -> code) set-up: run the planner, then train its pick and a grid of
other recipes over the full budget (3 seeds), and compare predicted with measured losses.

    python scripts/plan_experiment.py                 # ~30 min on 2 cores (most of it the 1M-token pre-training); docs/planning-results.md
    python scripts/plan_experiment.py --workers 1     # one run at a time
    python scripts/plan_experiment.py --new code      # English -> code: runs/plan-code, docs/planning-results-code.md
    python scripts/plan_experiment.py --new es        # English -> Spanish (the Debian handbook; prepare_shared.py --handbook)

The tiny Llama of docs/reproductions.md (1.5M parameters) pre-trained on 1M English tokens, then a German stage
of FULL tokens (cosine, re-warm from 0) with English replay. The planner runs 4 pilots (25% of FULL together)
and picks the replay share and max LR that keep the English probe's final rise within --max-forgetting
with the lowest German loss. Then the pick, the rule users follow
today (25% replay at the pre-training peak LR 2e-3) and 5 more grid recipes are trained with 3 seeds each,
3 runs at a time with one thread each (OMP_NUM_THREADS=1). Finished runs are reused (delete runs/plan/ to
start over).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from _runs import ROOT, Job, K, Runner, finished, probes, table, train

OUT = ROOT / "runs" / "plan"
NEW, NAME = "de", "German"  # the new domain (--new): its source and probe set, and its name in the report
DATA = ROOT / "data" / "shared" / "prepared"
FULL = 64 * K
BATCH = 512  # tokens per step: 128 steps in the full run, 8 in each of 4 pilots
SEEDS = [1234, 7, 42]
REPLAYS = "0,0.1,0.2,0.3,0.4,0.5,0.6"
SCALES = "0.125,0.25,0.5,1"
BUDGET = 0.15  # nats on the English probe at the stage's end minus its start (set before any full-length run)
RULE = (0.25, 2.0e-3)
GRID = [(0.1, 2.0e-3), (0.5, 2.0e-3), (0.1, 5.0e-4), (0.5, 5.0e-4), (0.3, 1.0e-3), RULE]
SPARE = [(0.3, 2.5e-4), (0.6, 1.0e-3)]  # replace a grid point the pick coincides with
# the replay controller (data.mixture: {controller: ...}) with the plan's budget, from 25% within [0, 0.6] (the
# plan's candidate shares), at the rule's LR and at the pick's (or 5e-4 without a pick)
CONTROLLER = {"budget": BUDGET, "min": 0.0, "max": 0.6, "start": 0.25}


def base_recipe(pretrained: Path) -> Path:
    """The German stage as a standalone recipe (25% replay at 2e-3: the rule), probes of en and de only."""
    data = {
        "run": {"name": "plan-base", "output_dir": str(OUT / "base"), "seed": SEEDS[0]},
        "init_from": {"path": str(pretrained), "load": {"weights": True, "optimizer": False, "schedule_state": False}},
        "model": {"tokenizer": str(ROOT / "data" / "shared" / "tokenizer")},
        "data": {"seq_len": 256, "sources": {"en": f"{DATA}/en/train", NEW: f"{DATA}/{NEW}/train"},
                 "mixture": {NEW: 1 - RULE[0], "en": RULE[0]}},
        "train": {"tokens": FULL, "global_batch_tokens": BATCH, "micro_batch_size": 2,
                  "optimizer": {"name": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.1}, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "max_lr": RULE[1], "min_lr": RULE[1] / 10, "warmup": "1%", "warmup_from": 0.0},
        "probes": {"sets": {"en": f"{DATA}/en/validation", NEW: f"{DATA}/{NEW}/validation"}, "every": "16K",
                   "dense": {"every": "4K", "for": "16K"}, "max_sequences": 8},
        "checkpoint": {"every": None, "keep_last": 1},
        "tracking": {"progress": False},
    }
    path = OUT / f"base-{NEW}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by scripts/plan_experiment.py\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def plan(base: Path, out: Path) -> dict:
    args = ["plan", str(base), "--old", "en", "--new", NEW, "--max-forgetting", str(BUDGET),
            "--replay", REPLAYS, "--lr-scales", SCALES, "--out", str(out)]
    print(f"$ cpt {' '.join(args)}", flush=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "cpt.cli", *args], cwd=ROOT, env=env)
    if res.returncode != 0:
        raise SystemExit(f"cpt plan failed (exit {res.returncode})")
    rep = json.loads((out / "plan.json").read_text())
    rep["wall_s"] = time.time() - t0
    return rep


def grid_jobs(base: Path, pick: tuple[float, float] | None) -> dict[tuple[float, float], list[Job]]:
    recipes = list(GRID)
    if pick is not None:
        if pick in recipes and pick != RULE:
            recipes.remove(pick)
            recipes.append(next(s for s in SPARE if s not in recipes and s != pick))
        if pick not in recipes:
            recipes.insert(0, pick)
    jobs = {}
    for r, lr in recipes:
        over = [f"data.mixture.en={r:g}", f"data.mixture.{NEW}={1 - r:g}", f"schedule.max_lr={lr:g}",
                f"schedule.min_lr={lr / 10:g}"]
        jobs[(r, lr)] = [Job(str(base), (*over, f"run.seed={s}", f"run.name=r{r:g}-lr{lr:g}-s{s}",
                                         f"run.output_dir={OUT / 'grid' / f'r{r:g}-lr{lr:g}-s{s}'}")) for s in SEEDS]
    return jobs


def controller_jobs(base: Path, pick: tuple[float, float] | None) -> dict[tuple[str, float], list[Job]]:
    """The controller from a 25% start at the rule's LR and the pick's (5e-4 without a pick), and, with a pick,
    what cpt plan writes as controlled.yaml: the pick's LR, the controller starting at the pick's share."""
    def runs(kind: str, prefix: str, lr: float, start: float) -> tuple[tuple[str, float], list[Job]]:
        mix = json.dumps({"controller": {"old": "en", "new": NEW, **CONTROLLER, "start": start}})
        over = [f"data.mixture={mix}", f"schedule.max_lr={lr:g}", f"schedule.min_lr={lr / 10:g}"]
        return (kind, lr), [Job(str(base), (*over, f"run.seed={s}", f"run.name={prefix}-lr{lr:g}-s{s}",
                                            f"run.output_dir={OUT / 'grid' / f'{prefix}-lr{lr:g}-s{s}'}")) for s in SEEDS]

    jobs = dict(runs("controller", "ctl", lr, CONTROLLER["start"])
                for lr in dict.fromkeys([RULE[1], pick[1] if pick else 5.0e-4]))
    if pick:
        jobs.update([runs("controller-pick", "ctlpick", pick[1], pick[0])])
    return jobs


def is_controller(key: tuple) -> bool:
    """A controller arm's key ("controller" or "controller-pick", lr), not a fixed recipe's (replay, lr)."""
    return isinstance(key[0], str)


def elapsed(run_dir: Path) -> float:
    """A run's training loop wall time, as it logged it (the last time/elapsed_s)."""
    from _runs import metrics

    return max(r["time/elapsed_s"] for r in metrics(run_dir) if "time/elapsed_s" in r)


def measure(run_dir: Path) -> dict[str, float]:
    recs = probes(run_dir)
    en = [r["probe/en/loss"] for r in recs]
    from _runs import metrics

    steps = [r for r in metrics(run_dir) if "train/loss" in r]
    probe_s = sum(r.get("probe/seconds", 0.0) for r in recs)
    return {"en_start": en[0], "en_rise": en[-1] - en[0], "en_worst": max(en) - en[0], "de": recs[-1][f"probe/{NEW}/loss"],
            "en_share": statistics.mean(r.get("data/en/share", 0.0) for r in steps),
            "probe_share": probe_s / (probe_s + steps[-1]["time/elapsed_s"]), "probes": len(recs)}


VARIANTS = [("plan", "drop", "soft_l1"),  # what cpt plan fits (the first must be it)
            ("least squares", "drop", "linear"),  # the fit cpt plan made first, before the robust loss
            ("area term", "area", "soft_l1")]  # the anneal law's S2 instead of the bounded drop


def predictions(base: Path, plan_dir: Path, keys, fraction: float = 0.25) -> dict:
    """The planner's fits rebuilt in-process (same pilots, same bootstrap seed: the numbers of plan.json), for
    every trained recipe; and the variants' central predictions, for comparison."""
    import cpt.planner.law as law
    from cpt.planner import design
    from cpt.planner.verb import load_setup, read_pilot

    ns = argparse.Namespace(recipe=base, overrides=[], old="en", new=NEW, old_probe=None, new_probe=None,
                            replay=REPLAYS, lr_scales=SCALES)
    s = load_setup(ns)
    specs = design.design_pilots(s.replays, s.max_lrs, 4, s.full_tokens, s.tokens_per_step, fraction)
    pairs = [read_pilot(s, p, plan_dir, "loss") for p in specs]
    out = {}
    for name, anneal, loss in VARIANTS:
        law.LOSS = loss
        fo = law.fit_domain("en", [a for a, _ in pairs], old=True, bootstrap=200 if name == "plan" else 0, anneal=anneal)
        fn = law.fit_domain(NEW, [b for _, b in pairs], old=False, bootstrap=200 if name == "plan" else 0, ref_lr=fo.ref_lr,
                            anneal=anneal)
        out[name] = {k: design.predict(fo, fn, s.lrs(*k), *k) for k in keys}
    law.LOSS = VARIANTS[0][2]
    return out


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def report(rep: dict, measured: dict, preds: dict, walls: dict, pilot_wall: float) -> str:
    pick = (rep["pick"]["replay"], rep["pick"]["max_lr"]) if rep["pick"] else None
    rows, stats = [], {}
    for k, ms in measured.items():
        if len(ms) < 2 or is_controller(k):
            continue
        rise, rs = mean_sd([m["en_rise"] for m in ms])
        worst, ws = mean_sd([m["en_worst"] for m in ms])
        de, ds = mean_sd([m["de"] for m in ms])
        p = preds["plan"][k]
        q = {name: preds[name][k] for name, _, _ in VARIANTS[1:]}
        ok = rise <= BUDGET
        stats[k] = dict(rise=rise, rs=rs, worst=worst, ws=ws, de=de, ds=ds, ok=ok, p=p, q=q)
        tag = " (pick)" if k == pick else " (rule)" if k == RULE else ""
        rows.append([f"{k[0]:g} / {k[1]:.3g}{tag}", len(ms), f"{p.old_rise[0]:+.3f} [{p.old_rise[1]:+.3f}, {p.old_rise[2]:+.3f}]",
                     f"{rise:+.3f} ± {rs:.3f}", f"{p.old_rise[0] - rise:+.3f} ({abs(p.old_rise[0] - rise) / rs:.1f})",
                     f"{p.old_worst[0]:+.3f}", f"{worst:+.3f} ± {ws:.3f}",
                     f"{p.new_final[0]:.3f} [{p.new_final[1]:.3f}, {p.new_final[2]:.3f}]", f"{de:.3f} ± {ds:.3f}",
                     f"{p.new_final[0] - de:+.3f} ({abs(p.new_final[0] - de) / ds:.1f})", "yes" if ok else "no"])
    head = ["replay / max LR", "seeds", "pred. en rise [95%]", "measured en rise", "error (/sd)", "pred. worst", "measured worst",
            f"pred. {NEW} [95%]", f"measured {NEW}", "error (/sd)", "meets budget"]
    alt = [[f"{k[0]:g} / {k[1]:.3g}"] + [x for name, _, _ in VARIANTS[1:] for x in (
            f"{v['q'][name].old_rise[0] - v['rise']:+.3f}", f"{v['q'][name].new_final[0] - v['de']:+.3f}")]
           for k, v in stats.items()]
    within = sum(abs(v["p"].old_rise[0] - v["rise"]) <= 2 * v["rs"] for v in stats.values())
    within_de = sum(abs(v["p"].new_final[0] - v["de"]) <= 2 * v["ds"] for v in stats.values())
    compliant = {k: v for k, v in stats.items() if v["ok"] and k != pick}
    best = min(compliant, key=lambda k: compliant[k]["de"]) if compliant else None
    lines = [f"# cpt plan on the tiny English -> {NAME} set-up (results)", "",
             f"Measured by `python scripts/plan_experiment.py{'' if NEW == 'de' else ' --new ' + NEW}` (2 CPU cores; "
             f"{sum(walls.values()) / 60:.0f} "
             f"min of training loops summed). Full budget {FULL // K}K {NAME}-stage tokens ({FULL // BATCH} steps of {BATCH}); budget: "
             f"English probe final rise <= {BUDGET} nats (the worst in-stage rise is predicted and measured, not "
             f"bounded); seeds {SEEDS}.", "",
             "## The plan", "",
             (f"Pick: replay {pick[0]:g}, max LR {pick[1]:.3g}." if pick else "The planner said the budget cannot be met."),
             f"Pilots: {len(rep['pilots'])} x {rep['pilots'][0]['tokens']} tokens = "
             f"{sum(p['tokens'] for p in rep['pilots']) / FULL:.0%} of one full run's tokens; their training loops "
             f"(probes after every step) took {pilot_wall:.0f} s together against {statistics.mean(walls.values()):.0f} s "
             f"for one full run's on average (time/elapsed_s; the pilots ran one at a time with 2 threads, the full runs "
             f"3 at a time with 1 thread each).", "", "Trust notes of the plan:", ""]
    lines += [f"- {n}" for n in rep["notes"]] or ["- none"]
    lines += ["", "## Predicted vs measured (3 seeds: mean ± sd)", "", table(head, rows), "",
              f"- English rise predicted within 2 sd for {within} of {len(stats)} recipes; {NAME} loss for "
              f"{within_de} of {len(stats)}.",
              (f"- Best compliant grid recipe other than the pick (measured): replay {best[0]:g}, max LR {best[1]:.3g}, {NAME} "
               f"{compliant[best]['de']:.3f}." if best else "- No trained recipe met the budget."),
              ]
    if pick and pick in stats:
        v = stats[pick]
        gap = f"; its {NAME} loss is {v['de'] - compliant[best]['de']:+.3f} from that grid recipe's" if best else ""
        lines.append(f"- The pick {'met' if v['ok'] else 'did not meet'} the budget (rise {v['rise']:+.3f}, worst "
                     f"{v['worst']:+.3f}){gap}.")
    r = stats.get(RULE)
    if r:
        lines.append(f"- The rule (25% replay at 2e-3): rise {r['rise']:+.3f}, worst {r['worst']:+.3f}, {NAME} "
                     f"{r['de']:.3f}: {'meets' if r['ok'] else 'breaks'} the budget.")
    lines += controller_section(measured, stats, pick)
    lines += ["", "## Other fits of the same pilots (errors of the central prediction: predicted - measured mean)", "",
              table(["replay / max LR"] + [f"{name}: {d}" for name, _, _ in VARIANTS[1:] for d in ("en rise", NEW)],
                    alt), "",
              "## Commands", "", "```", "python scripts/plan_experiment.py" + ("" if NEW == "de" else f" --new {NEW}"),
              *[p["command"] for p in rep["pilots"]], "```", ""]
    return "\n".join(lines)


def controller_section(measured: dict, stats: dict, pick: tuple[float, float] | None) -> list[str]:
    """The replay controller's runs beside the plan's pick and the fixed recipes at the same LR."""
    ctl = {k: v for k, v in measured.items() if is_controller(k)}
    if not ctl:
        return []
    rows = []
    for lr in sorted({k[1] for k in ctl}, reverse=True):
        for kind in ("controller", "controller-pick"):
            if (kind, lr) in ctl:
                start = f"{pick[0]:g} start (the pick's share: controlled.yaml)" if kind != "controller" else "25% start"
                rows.append([f"controller (budget {BUDGET}, {start}, [0, 0.6]) / {lr:.3g}", len(ctl[(kind, lr)])]
                            + _cells(ctl[(kind, lr)]))
        for k, v in measured.items():
            if not is_controller(k) and k[1] == lr and len(v) > 1:
                tag = " (pick)" if k == pick else " (rule)" if k == RULE else ""
                rows.append([f"fixed {k[0]:g} / {k[1]:.3g}{tag}", len(v)] + _cells(v))
    head = ["replay / max LR", "seeds", "en rise", "worst", "met (final)", f"{NAME} loss", "en share", "probe time share"]
    return ["", "## The replay controller beside the plan (same runs, same probes)", "",
            f"`data.mixture: {{controller: {json.dumps({'old': 'en', 'new': NEW, **CONTROLLER})}}}` (gains kp 0.05, ki 1, "
            f"target 0.8 x budget), acting at the recipe's probes ({next(iter(ctl.values()))[0]['probes']} per stage, the start's included). 'met': seeds whose final "
            "English rise stayed at or under the budget; 'en share': the English share of the stage's sequences; "
            "'probe time share': probe seconds / (probe + training seconds).", "", table(head, rows)]


def _cells(ms: list[dict]) -> list[str]:
    def ms_(key, fmt="{:+.3f}"):
        m, sd = mean_sd([x[key] for x in ms])
        return fmt.format(m) + f" ± {sd:.3f}"
    return [ms_("en_rise"), ms_("en_worst"), f"{sum(x['en_rise'] <= BUDGET for x in ms)} of {len(ms)}",
            ms_("de", "{:.3f}"), ms_("en_share", "{:.3f}"), ms_("probe_share", "{:.3f}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--report-only", action="store_true", help="no training: report the finished runs only")
    ap.add_argument("--new", choices=("de", "code", "es"), default="de", help="the new domain (default de: German)")
    args = ap.parse_args()
    global OUT, NEW, NAME
    pretrained = Runner(OUT)("pretrain-en", "recipes/paper/pretrain-en.yaml", ["train.tokens=1M"])  # one for both
    NEW, NAME = args.new, {"de": "German", "code": "code", "es": "Spanish"}[args.new]
    suffix = "" if NEW == "de" else f"-{NEW}"
    OUT = OUT.with_name("plan" + suffix)
    base = base_recipe(pretrained)
    plan_dir = OUT / "plan"
    rep = plan(base, plan_dir)
    pilot_wall = sum(elapsed(plan_dir / "pilots" / p["name"]) for p in rep["pilots"])
    pick = (rep["pick"]["replay"], rep["pick"]["max_lr"]) if rep["pick"] else None
    jobs = {**grid_jobs(base, pick), **controller_jobs(base, pick)}
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    flat = [js[i] for i in range(len(SEEDS)) for js in jobs.values()]  # seed-major: a cut-short run loses seeds
    if not args.report_only:
        with ThreadPoolExecutor(args.workers) as ex:
            list(ex.map(lambda j: train(j, env=env), flat))
    walls, measured = {}, {}
    for k, js in jobs.items():
        for j in js:
            d, tokens, per_step = j.plan()
            if finished(d, tokens, per_step):
                measured.setdefault(k, []).append(measure(d))
                walls[d.name] = elapsed(d)
    preds = predictions(base, plan_dir, [k for k in jobs if not is_controller(k)])
    text = report(rep, measured, preds, walls, pilot_wall)
    (ROOT / "docs" / f"planning-results{suffix}.md").write_text(text)
    (ROOT / "docs" / f"plan{suffix}").mkdir(exist_ok=True)
    (ROOT / "docs" / f"plan{suffix}" / "frontier.png").write_bytes((plan_dir / "frontier.png").read_bytes())
    raw = {f"{k[0]}/{k[1]:g}": ms for k, ms in measured.items()}
    (ROOT / "docs" / f"plan{suffix}" / "measured.json").write_text(json.dumps({"measured": raw, "walls": walls}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
