"""The measurement behind docs/prediction.md: fit the loss-curve laws on two runs, predict others.

1. data: a byte-level BPE tokenizer (English + German) and prepared shards of the shared English and
   German corpora (``../shared/data``, see shared/DATA.md) under ``data/predict/`` (gitignored);
2. runs: every recipe of ``recipes/predict/`` with ``cpt train`` (a subprocess each, skipped when the
   run finished before): constant, cosine (the fit runs), WSD with two decay fractions and linear
   decay (held out), then the continual stage on German after a re-warm (constant, cosine for the fit,
   WSD held out) from the cosine run's ``final/``; setup B's held-out runs once more with another seed;
3. report: ``cpt predict`` on those runs for both laws, plus the naive baseline and a lambda check,
   and ``docs/prediction.md`` written from the measured numbers (nothing in it is typed in).

    python scripts/predict_experiment.py            # all three, from the repository root (~40 min on 2 busy cores)
    python scripts/predict_experiment.py report     # only refit and rewrite the doc
    python scripts/predict_experiment.py scale --before c95c5b7   # the full-resolution section (synthetic curves)
    python scripts/predict_experiment.py published --repo PATH     # the published curves' section (Luo et al. 2025)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from _runs import ROOT, Job, cpt, finished, metrics, train

DATA = Path("data/predict")
RUNS = Path("runs/predict")
OUT = Path("runs/predict/report")
DOC = Path("docs/prediction.md")

# The shared corpora (shared/DATA.md): English kernel docs for pre-training, German LibreOffice help
# for the continual stage. Document counts give ~3M English and ~1.3M German tokens at vocab 4096,
# more than any run reads, so no run repeats data.
CORPORA = {"english": "en_kernel_docs", "german": "de_libreoffice_help"}
DOCS = {"english": 2500, "german": None}
TOKENIZER_DOCS = 1500  # per corpus

@dataclass(frozen=True)
class Setup:
    """One batch size / step count of the experiment: its recipes in recipes/predict/<key>/."""

    key: str          # "" = recipes/predict/*.yaml, runs/predict/<name>
    title: str
    batch: int        # tokens (and sequences of 256) per optimizer step
    steps: int
    warmup: int
    probe_every: int  # steps
    cpt_steps: int
    cpt_warmup: int
    cpt_probe_every: int
    final_window: int  # train-loss steps averaged for the final loss: 40K tokens in both setups

    def recipe(self, name: str) -> str:
        return str(Path("recipes/predict") / self.key / f"{name}.yaml")

    def run(self, name: str) -> Path:
        return RUNS / self.key / name

    def out(self, name: str) -> Path:
        return OUT / self.key / name

    def run_name(self, name: str) -> str:  # run.name in the recipes: what cpt predict reports
        return "predict-" + (f"{self.key}-" if self.key else "") + name


SETUPS = [
    Setup("", "Setup A: 4K tokens x 256 steps", 4096, 256, 16, 8, 128, 16, 4, 10),
    Setup("b1k", "Setup B: 1K tokens x 1024 steps", 1024, 1024, 64, 32, 512, 64, 16, 40),
]

PRETRAIN_FIT = ["constant", "cosine"]
PRETRAIN_HELD_OUT = ["wsd-20", "wsd-50", "linear"]
CPT_FIT = ["cpt-de-constant", "cpt-de-cosine"]
CPT_HELD_OUT = ["cpt-de-wsd-20", "cpt-de-linear"]

# Every run above reads the same batches (seed 1234), so the naive baseline shares their luck. In setup
# B the held-out schedules are trained once more with another seed (other init, other batch order) and
# predicted from the same seed-1234 fit: the error a user meets on a fresh run, and the seed-to-seed
# spread of one schedule's final loss, the floor under any law's error.
OTHER_SEED = 7
SEED_SETUP = "b1k"


def seed_name(name: str) -> str:
    return f"seed{OTHER_SEED}/{name}"


def seed_overrides(setup: Setup, name: str) -> list[str]:
    return [f"run.seed={OTHER_SEED}", f"run.name={setup.run_name(name)}-seed{OTHER_SEED}",
            f"run.output_dir={setup.run(seed_name(name))}"]


# One thread per run: on a shared 2-core machine two torch threads fight the neighbours' and a step's
# time swings 5x; one thread gives a steady ~8K tokens/s.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def shared_data(arg: str | None) -> Path:
    path = Path(arg) if arg else ROOT.parent / "shared" / "data"
    missing = [c for c in CORPORA.values() if not (path / c / "train.jsonl.gz").is_file()]
    if missing:
        sys.exit(f"shared corpora not found under {path} (missing {', '.join(missing)}); pass --shared DIR")
    return path


def data_commands(shared: Path) -> list[list[str]]:
    """The `cpt` commands that build data/predict/: the tokenizer on the first documents of each corpus."""
    train = [str(shared / c / "train.jsonl.gz") for c in CORPORA.values()]
    cmds = [["tokenizer", "train", *train, "--out", str(DATA / "tokenizer"), "--vocab-size", "4096",
             "--max-documents-per-input", str(TOKENIZER_DOCS)]]
    for name, corpus in CORPORA.items():
        for split in ("train", "validation"):
            limit = ["--max-documents", str(DOCS[name])] if DOCS[name] and split == "train" else []
            cmds.append(["prepare", str(shared / corpus / f"{split}.jsonl.gz"), "--tokenizer", str(DATA / "tokenizer"),
                         "--out", str(DATA / "prepared" / name / split), "--seq-len", "256", *limit, "--overwrite"])
    return cmds


def stage_data(shared: Path) -> None:
    tokenizer, *prepares = data_commands(shared)
    if not (ROOT / DATA / "tokenizer" / "tokenizer.json").is_file():
        cpt(tokenizer, env=ONE_THREAD)
    for args in prepares:
        if not (ROOT / args[args.index("--out") + 1] / "manifest.json").is_file():
            cpt(args, env=ONE_THREAD)


ALL_RUNS = PRETRAIN_FIT + PRETRAIN_HELD_OUT + CPT_FIT + CPT_HELD_OUT


def planned_runs() -> list[tuple[Setup, str, str, list[str]]]:
    """(setup, run key, recipe, overrides) of every training run of the experiment."""
    plan = [(st, n, st.recipe(n), []) for st in SETUPS for n in ALL_RUNS]
    st = next(st for st in SETUPS if st.key == SEED_SETUP)
    return plan + [(st, seed_name(n), st.recipe(n), seed_overrides(st, n)) for n in PRETRAIN_HELD_OUT]


def stage_runs() -> None:
    """Train every run not yet finished (a half-finished one from an interrupted experiment starts over)."""
    for _, _, recipe, overrides in planned_runs():
        train(Job(recipe, tuple(overrides)), env=ONE_THREAD)


# ------------------------------------------------------------------------------------------- report

PRE_RECIPES = PRETRAIN_HELD_OUT + PRETRAIN_FIT
CPT_RECIPES = CPT_HELD_OUT + CPT_FIT


AS_MEASURED = ["--fit-points", "0", "--bootstrap", "100"]


def predict_cmd(setup: Setup, out: str, fit: list[str], recipes: list[str], *extra: str) -> list[str]:
    """The `cpt predict` arguments of one analysis (held-out runs overlaid where their recipe matches). Every
    measured point and 100 bootstrap replicates, as the page's numbers were measured (the defaults then)."""
    held = [r for r in recipes if r not in fit]
    return ["predict", "--fit", *[str(setup.run(f)) for f in fit],
            "--recipe", *[setup.recipe(r) for r in recipes],
            *(["--runs", *[str(setup.run(r)) for r in held]] if held else []), "--out", str(setup.out(out)),
            *AS_MEASURED, *extra]


def run_analysis(args: list[str]) -> dict:
    out = ROOT / args[args.index("--out") + 1]
    cpt(args, log=out.with_name(out.name + ".log"), env=ONE_THREAD)
    return json.loads((out / "report.json").read_text())


def shell(args: list[str]) -> str:
    return "cpt " + " ".join(args)


def records(setup: Setup, name: str) -> list[dict]:
    return metrics(ROOT / setup.run(name))


def run_summary(setup: Setup, name: str, probe: str) -> dict:
    recs = records(setup, name)
    train = [r for r in recs if "train/loss" in r]
    probes = [r[probe] for r in recs if probe in r]
    recipe = yaml.safe_load((ROOT / setup.run(name) / "recipe.yaml").read_text())
    return {"name": name, "schedule": describe_schedule(recipe["schedule"]), "steps": len(train),
            "train": sum(r["train/loss"] for r in train[-setup.final_window:]) / setup.final_window,
            "probe": probes[-1] if probes else None, "start_probe": probes[0] if probes else None, "seconds": train[-1]["time/elapsed_s"]}


def describe_schedule(s: dict) -> str:
    head = f"{s['kind']} {s['max_lr']:g}, warmup {s['warmup']}"
    if s["kind"] == "wsd":
        return f"{head}, {s['decay']['shape']} decay over the last {s['decay']['length']} to {s['min_lr']:g}"
    if s["kind"] in ("cosine", "linear"):
        return f"{head}, to {s['min_lr']:g}"
    return head


def pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def held_out(report: dict) -> list[dict]:
    return [p for p in report["predictions"] if p["real_run"] and not p["in_fit"]]


def naive(p: dict) -> dict | None:
    """A prediction row's naive baseline, None where there is none (the row then says why)."""
    b = p.get("baseline")
    return b if b and b.get("run") else None


def target_met(e: dict, b: dict | None) -> bool:
    """The target: a final-loss error within 1% and smaller than the naive baseline's (``b``)."""
    return abs(e["final_err"]) <= 0.01 and b is not None and abs(e["final_err"]) < abs(b["final_err"])


def law_score(report: dict, law: str) -> dict:
    """A law's errors on the held-out runs and the naive baseline's, and how many runs are within 1%,
    better than the baseline, and both (the target)."""
    rows = held_out(report)
    based = [p for p in rows if naive(p)]
    errs = [abs(p["laws"][law]["final_err"]) for p in rows]
    return {"n": len(rows), "errs": errs, "mares": [p["laws"][law]["mare"] for p in rows],
            "base": [abs(p["baseline"]["final_err"]) for p in based], "base_mare": [p["baseline"]["mare"] for p in based],
            "within": sum(e <= 0.01 for e in errs),
            "better": sum(abs(p["laws"][law]["final_err"]) < abs(p["baseline"]["final_err"]) for p in based),
            "met": sum(target_met(p["laws"][law], naive(p)) for p in rows)}


def score(report: dict, law: str) -> tuple[int, int, float, float]:
    """(held-out runs meeting the target, held-out runs, mean |final error|, the naive baseline's)."""
    s = law_score(report, law)
    return s["met"], s["n"], sum(s["errs"]) / len(s["errs"]), sum(s["base"]) / max(len(s["base"]), 1)


def prediction_table(report: dict) -> list[str]:
    rows = ["| run (held out) | law | predicted final (95% interval) | real final | final-loss error | curve MARE "
            "| naive: closest fitted run | naive error | naive MARE | target met |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in held_out(report):
        b = naive(p)
        base = f"{b['run']} | {pct(b['final_err'])} | {100 * b['mare']:.2f}%" if b else "- | - | -"
        for law, e in p["laws"].items():
            rows.append(f"| {p['name']} | {law} | {e['final']:.4f} ({e['final_low']:.4f}-{e['final_high']:.4f}) "
                        f"| {e['final_real']:.4f} | {pct(e['final_err'])} | {100 * e['mare']:.2f}% "
                        f"| {base} | {'yes' if target_met(e, b) else 'no'} |")
    return rows


def verdict(report: dict) -> list[str]:
    lines = []
    fitted = [p for p in report["predictions"] if p["in_fit"]]
    for law in report["fit"]:
        s = law_score(report, law)
        errs, mares, base, base_mare = s["errs"], s["mares"], s["base"], s["base_mare"]
        lines.append(
            f"- **{law}**: final-loss error within 1% on {s['within']} of {s['n']} held-out runs, smaller than the naive "
            f"baseline's on {s['better']} of {len(base)}; both (the target) on **{s['met']} of {s['n']}**. Mean |final "
            f"error| {100 * sum(errs) / len(errs):.2f}% (naive {100 * sum(base) / max(len(base), 1):.2f}%), mean "
            f"curve MARE {100 * sum(mares) / len(mares):.2f}% (naive {100 * sum(base_mare) / max(len(base_mare), 1):.2f}%)."
        )
        if fitted:
            lines.append("  On the fitted runs themselves (in sample): final-loss error "
                         + ", ".join(f"{p['name']} {pct(p['laws'][law]['final_err'])}" for p in fitted)
                         + ", curve MARE " + ", ".join(f"{100 * p['laws'][law]['mare']:.2f}%" for p in fitted) + ".")
    return lines


def weak(f: dict) -> list[str]:
    """Parameters the data do not pin down: a bootstrap interval wider than the value itself."""
    return [k for k, v in f["params"].items()
            if abs(f["intervals"][k][1] - f["intervals"][k][0]) > abs(v)]


def analysis(args: list[str], report: dict, params: bool = True, table: bool = True,
             note: tuple[str, ...] = (), indent: str = "") -> list[str]:
    """One analysis as the page shows it: its command, fitted parameters, predictions, a note, the verdict."""
    lines = [f"`{shell(args)}`", ""]
    if params:
        lines += param_table(report) + [""]
    if table:
        lines += prediction_table(report) + [""]
    lines += [*note, *verdict(report), ""]
    return [indent + line if line else line for line in lines]


def param_table(report: dict) -> list[str]:
    rows = []
    for law, f in report["fit"].items():
        vals = ", ".join(f"{k} = {v:.4g} [{f['intervals'][k][0]:.3g}, {f['intervals'][k][1]:.3g}]"
                         for k, v in f["params"].items())
        loose = weak(f)
        note = f" Weakly identified (interval wider than the value): {', '.join(loose)}." if loose else ""
        rows.append(f"- **{law}** ({f['bootstrap']} bootstrap replicates; in-sample RMS log-residual "
                    f"{f['fit_rmse_rel']:.4f}): {vals}.{note}")
    return rows


def noise_stats(setup: Setup, names: list[str]) -> dict:
    """Per-step noise of the train loss and how much of it the runs share (they read the same batches)."""
    import numpy as np

    from cpt.predict import run_curve, smooth

    resid = []
    for n in names:
        c = run_curve(ROOT / setup.run(n))
        y = np.log(c.losses[c.peak:c.steps])
        resid.append(y - np.log(smooth(np.exp(y), 9)))
    m = min(len(r) for r in resid)
    r = np.stack([x[:m] for x in resid])
    corr = np.corrcoef(r)
    return {"sd": float(np.mean(np.std(r, axis=1))),
            "corr": float(np.mean(corr[np.triu_indices(len(names), 1)])),
            "sd_diff": float(np.std(r[0] - r[1]))}


def analyses(setup: Setup) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Run every `cpt predict` analysis of one setup; returns (commands, reports) by key."""
    fams = ["--search", "wsd", "cosine", "linear", "infinite"]
    probe_opts = ["--smooth", "1", "--final-window", "1"]
    win = [] if setup.final_window == 10 else ["--final-window", str(setup.final_window)]  # 10 = the default
    cmds = {
        "pre": predict_cmd(setup, "pretrain", PRETRAIN_FIT, PRE_RECIPES, *win, *fams),
        "pre_probe": predict_cmd(setup, "pretrain-probe", PRETRAIN_FIT, PRE_RECIPES, "--metric",
                                 "probe/english/loss", *probe_opts),
        "pre_one": predict_cmd(setup, "pretrain-cosine-only", ["cosine"], PRE_RECIPES, *win),
        "cpt": predict_cmd(setup, "cpt", CPT_FIT, CPT_RECIPES, *win, *fams),
        "cpt_probe": predict_cmd(setup, "cpt-probe", CPT_FIT, CPT_RECIPES, "--metric", "probe/german/loss", *probe_opts),
    }
    if setup.key == SEED_SETUP:
        held = [setup.recipe(n) for n in PRETRAIN_HELD_OUT]
        fit_dirs = [str(setup.run(f)) for f in PRETRAIN_FIT]
        seed_dirs = [str(setup.run(seed_name(n))) for n in PRETRAIN_HELD_OUT]
        for key, extra in [("seed", win), ("seed_probe", ["--metric", "probe/english/loss", *probe_opts])]:
            cmds[key] = ["predict", "--fit", *fit_dirs, "--recipe", *held, f"run.seed={OTHER_SEED}", "--runs",
                         *seed_dirs, "--out", str(setup.out(f"seed{OTHER_SEED}" + key[4:].replace("_", "-"))), *extra]
    for lam in LAMS:
        cmds[f"lam{lam}"] = predict_cmd(setup, f"pretrain-lambda-{lam}", PRETRAIN_FIT, PRETRAIN_HELD_OUT, "--law",
                                        "anneal", "--lam", str(lam), "--bootstrap", "20", *win)
    reps = {k: run_analysis(v) for k, v in cmds.items()}
    # train the schedule each law's search found best (once per distinct schedule), then score the law on it
    for src, fit_names in (("pre", PRETRAIN_FIT), ("cpt", CPT_FIT)):
        trained: dict[str, str] = {}
        for law, frag in reps[src]["search"]["fragments"].items():
            recipe = yaml.safe_load((ROOT / frag).read_text())
            key = json.dumps(recipe["schedule"], sort_keys=True)
            if key not in trained:
                train(Job(frag), env=ONE_THREAD)
                trained[key] = str(Path(recipe["run"]["output_dir"]))
            name = searched_key(src, law)
            cmds[name] = ["predict", "--fit", *[str(setup.run(f)) for f in fit_names], "--recipe", frag, "--runs",
                          trained[key], "--law", law, *win, "--out", str(setup.out(name.replace("_", "-")))]
            reps[name] = run_analysis(cmds[name])
    return cmds, reps


LAMS = [0.99, 0.9, 0.0]


def searched_key(src: str, law: str) -> str:
    """The analysis key of a searched schedule's run: searched_<law> (pre-training), cpt_searched_<law>."""
    return ("" if src == "pre" else f"{src}_") + f"searched_{law}"


def search_best(rep: dict[str, dict], src: str) -> list[str]:
    """The search's best schedule per law, with its top 5."""
    L = []
    for law, res in rep[src]["search"]["laws"].items():
        top = ", ".join(f"{r['label']} {r['final']:.4f}" for r in res[:5])
        L.append(f"- **{law}**: best `{res[0]['label']}`, predicted {res[0]['final']:.4f} "
                 f"[{res[0]['low']:.4f}, {res[0]['high']:.4f}] (`{rep[src]['search']['fragments'][law]}`); top 5: {top}.")
    return L + [""]


def search_trained(rep: dict[str, dict], src: str, probe: str, runs: dict[str, dict], what: str) -> list[str]:
    """Each law's best schedule trained and scored like a held-out run, against the best trained one."""
    L = ["**Training the searched schedules.** Each law's best schedule (the `best-schedule-<law>.yaml` above, "
         "the template recipe with that schedule) was then trained and scored like a held-out run:", "",
         "| law | searched schedule | predicted final (95% interval) | real final train loss | final-loss error "
         f"| real final held-out loss | vs the best trained of the {what} (held-out) |", "|---|---|---|---|---|---|---|"]
    best = min(r["probe"] for r in runs.values())
    for law in rep[src]["fit"]:
        p = rep[searched_key(src, law)]["predictions"][0]
        e = p["laws"][law]
        last = [x[probe] for x in metrics(ROOT / p["real_run"]) if probe in x][-1]
        L.append(f"| {law} | {rep[src]['search']['laws'][law][0]['label']} | {e['final']:.4f} ({e['final_low']:.4f}-"
                 f"{e['final_high']:.4f}) | {e['final_real']:.4f} | {pct(e['final_err'])} | {last:.4f} "
                 f"| {pct(last / best - 1)} |")
    return L + [""]


@dataclass
class Measured:
    """One setup's numbers besides the analyses' reports, and what they decide."""

    runs: dict[str, dict]        # pre-training runs (run_summary on the English probe)
    cpts: dict[str, dict]        # continual-stage runs (the German probe; "english": its first and last)
    noise: dict                  # noise_stats of the pre-training runs
    noise_cpt: dict              # and of the stage's
    sigma: float                 # step-to-step noise of log train loss: the anneal fit's Huber scale / 1.345
    best_train: str              # lowest final train loss
    best_probe: str              # lowest final held-out loss
    decay_pays: bool             # WSD-20 ends more than 0.5% below constant on held-out loss
    lam_errs: dict[float, dict[str, float]]  # anneal final-loss error per lambda and held-out run
    best_lam: dict[str, float]   # the lambda with the smallest |error| per held-out run
    lam_spread: float            # the largest range of one run's error over the lambdas


def measure(setup: Setup, rep: dict[str, dict]) -> Measured:
    runs = {n: run_summary(setup, n, "probe/english/loss") for n in PRETRAIN_FIT + PRETRAIN_HELD_OUT}
    cpts = {n: run_summary(setup, n, "probe/german/loss") for n in CPT_FIT + CPT_HELD_OUT}
    for n in cpts:
        eng = [r["probe/english/loss"] for r in records(setup, n) if "probe/english/loss" in r]
        cpts[n]["english"] = (eng[0], eng[-1])
    lam_errs = {lam: {p["name"]: p["laws"]["anneal"]["final_err"] for p in held_out(rep[key])}
                for lam, key in [(0.999, "pre")] + [(lam, f"lam{lam}") for lam in LAMS]}
    best_lam = {n: min(lam_errs, key=lambda lam, n=n: abs(lam_errs[lam][n])) for n in lam_errs[0.999]}
    return Measured(
        runs, cpts, noise_stats(setup, PRETRAIN_FIT + PRETRAIN_HELD_OUT), noise_stats(setup, CPT_FIT + CPT_HELD_OUT),
        rep["pre"]["fit"]["anneal"]["huber_scale"] / 1.345,
        min(runs, key=lambda n: runs[n]["train"]), min(runs, key=lambda n: runs[n]["probe"]),
        runs["wsd-20"]["probe"] / runs["constant"]["probe"] - 1 < -0.005, lam_errs, best_lam,
        max(max(v[n] for v in lam_errs.values()) - min(v[n] for v in lam_errs.values()) for n in best_lam))


def pretrain_runs(setup: Setup, m: Measured) -> list[str]:
    """The setup's opening: model, data, the five pre-training runs, which schedule ends lowest."""
    seqs = setup.batch // 256
    L = [f"## {setup.title}", "",
         f"A tiny Llama (hidden 128, 2 layers, 1.48M parameters, vocab 4096) on the shared English corpus "
         f"(Linux kernel docs, `shared/DATA.md`), seq 256, {setup.batch // 1024}K tokens ({seqs} sequences) per step, "
         f"1M tokens = {setup.steps} steps, warmup {setup.warmup} steps, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, "
         "seed 1234 for all runs in the tables, so **every run reads the same batches in the same order** and only "
         "the LR schedule differs" + (f" (the held-out runs once more with seed {OTHER_SEED}: see *Another seed*)"
                                      if setup.key == SEED_SETUP else "") + "."
         f" Held-out English loss (64 fixed validation sequences) is probed every {setup.probe_every} steps. "
         f"Final train loss: mean of the last {setup.final_window} steps ({setup.final_window * setup.batch // 1024}K "
         "tokens in both setups: with 4-sequence batches, 10 steps are mostly the luck of 40 sequences). Time: the trainer's time/elapsed_s at the last step (one "
         "thread, on 2 cores shared with other jobs). Recipes: `" + setup.recipe("*") + "`.", "",
         "| run | role | schedule | steps | final train loss | final held-out loss | time s |",
         "|---|---|---|---|---|---|---|"]
    for n, r in m.runs.items():
        role = "fit" if n in PRETRAIN_FIT else "held out"
        L.append(f"| {n} | {role} | {r['schedule']} | {r['steps']} | {r['train']:.4f} | {r['probe']:.4f} | {r['seconds']:.0f} |")
    c, k, w20 = m.runs["constant"], m.runs["cosine"], m.runs["wsd-20"]
    L += ["",
          f"Lowest final train loss: **{m.best_train}**; lowest final held-out loss: **{m.best_probe}**. WSD-20 ends "
          f"{pct(w20['probe'] / c['probe'] - 1)} from the constant run on held-out loss: "
          f"{'the final decay pays' if m.decay_pays else 'the final decay buys next to nothing here'}. The cosine run "
          f"ends {'above' if k['train'] > c['train'] else 'below'} the constant run on train loss "
          f"({pct(k['train'] / c['train'] - 1)}) and {'above' if k['probe'] > c['probe'] else 'below'} it on held-out "
          f"loss ({pct(k['probe'] / c['probe'] - 1)}).", ""]
    return L


def pretrain_fit(setup: Setup, cmds: dict[str, list[str]], rep: dict[str, dict], m: Measured) -> list[str]:
    """The fit on constant + cosine, then its noise, the held-out probe, lambda and a single fitted run."""
    import numpy as np

    L = ["### Fit on constant + cosine (train loss), predict the others", ""]
    L.extend(analysis(cmds["pre"], rep["pre"], note=(
        "Target: final-loss error <= 1% and smaller than the naive baseline's (the fitted run with the closest "
        "LR schedule, its real curve taken as the prediction). Curve MARE: mean |pred - real| / real after the "
        f"warmup, both curves smoothed by the same centred 9-step mean; final loss: mean of the last "
        f"{setup.final_window} logged steps on both sides.", "")))
    sigma, noise = m.sigma, m.noise
    L += ["### Noise, the shared batches, the held-out probe, lambda", "",
          f"- **Noise.** The step-to-step noise of log train loss is sigma = {sigma:.4f} ({100 * sigma:.1f}% per "
          f"step); the mean of {setup.final_window} steps still carries about "
          f"{100 * sigma / np.sqrt(setup.final_window):.2f}% if the steps were "
          f"independent. Because all runs read the same batches, much of it is shared: the deviations of the runs "
          f"from their own 9-step means correlate at r = {noise['corr']:.2f} between runs (sd of one run's "
          f"deviations {100 * noise['sd']:.2f}%, of the difference between constant and cosine "
          f"{100 * noise['sd_diff']:.2f}%). A law predicts the expected loss and cannot know which batches are "
          f"hard; the naive baseline is a real run on the same batches and carries their difficulty for free.",
          "- **On the held-out probe** (64 fixed sequences, no batch noise), fitted and compared on "
          "`probe/english/loss` at the probed steps (final = the last probe):", ""]
    L.extend(analysis(cmds["pre_probe"], rep["pre_probe"], params=False, indent="  "))
    L += ["- **lambda** (anneal law, train loss, 20 bootstrap replicates): held-out final-loss error / curve MARE "
          "for the momentum factor:", "",
          "  | lambda | " + " | ".join(PRETRAIN_HELD_OUT) + " |",
          "  |---|" + "---|" * len(PRETRAIN_HELD_OUT)]
    for lam, key in [(0.999, "pre")] + [(lam, f"lam{lam}") for lam in LAMS]:
        cells = []
        for n in PRETRAIN_HELD_OUT:
            p = next(p for p in rep[key]["predictions"] if p["real_run"] and p["real_run"].endswith("/" + n))
            e = p["laws"]["anneal"]
            cells.append(f"{pct(e['final_err'])} / {100 * e['mare']:.2f}%")
        L.append(f"  | {lam:g} | " + " | ".join(cells) + " |")
    L += ["", "- **One run is enough?** Fitted on the cosine run alone:", ""]
    L.extend(analysis(cmds["pre_one"], rep["pre_one"], params=False, table=False, indent="  "))
    return L


def pretrain_search(setup: Setup, rep: dict[str, dict], m: Measured) -> list[str]:
    """The schedule search at the pre-training budget: its best, the trained ranking against the predicted."""
    L = ["### Schedule search", "",
         "The `--search` of the first analysis minimises the predicted loss after the last update at the "
         f"template's budget (wsd-20.yaml: 1M tokens, max LR 2e-3, {setup.warmup} warmup steps) over WSD (decay "
         "5-80%, linear / cosine / 1-sqrt, to 0), cosine and linear (min LR 0-0.5x), and infinite schedules "
         "(constant 0.25-0.75x after a 10% or 25% cooldown, linear anneal to 0 over 10-30%):", ""]
    L.extend(search_best(rep, "pre"))
    L += ["Besides training the best schedules (below), the ranking of the five trained schedules checks the "
          "search, measured against predicted:", "",
          f"- measured (final train loss, best first): {', '.join(sorted(m.runs, key=lambda n: m.runs[n]['train']))}"]
    for law in rep["pre"]["fit"]:
        pred = {p["real_run"].split("/")[-1]: p["laws"][law]["final"] for p in rep["pre"]["predictions"] if p["real_run"]}
        L.append(f"- predicted by {law}: {', '.join(sorted(pred, key=pred.get))}")
    L.append("")
    L.extend(search_trained(rep, "pre", "probe/english/loss", m.runs, "five"))
    return L


def cpt_stage(setup: Setup, cmds: dict[str, list[str]], rep: dict[str, dict], m: Measured) -> list[str]:
    """The continual stage on German: its runs, the fits on train and probe loss, the search."""
    L = ["### Continual pre-training: within a stage after a re-warm", "",
         f"The final model of cosine.yaml continued on the shared German corpus (LibreOffice help) for 512K "
         f"tokens ({setup.cpt_steps} steps), LR re-warmed from 0 to 1e-3 over {setup.cpt_warmup} steps, then constant / "
         "cosine to 1e-4 (fit) or WSD 20% 1-sqrt / linear to 0 (held out). The laws are fitted within the stage, "
         "counted from its first step (`S1` starts at 0 at the re-warm; the pre-training before it is in the "
         f"parameters). German validation loss probed every {setup.cpt_probe_every} steps (48 sequences).", "",
         "| run | role | schedule | final train loss | German held-out: start -> end | English held-out: start -> end | time s |",
         "|---|---|---|---|---|---|---|"]
    for n, r in m.cpts.items():
        role = "fit" if n in CPT_FIT else "held out"
        L.append(f"| {n} | {role} | {r['schedule']} | {r['train']:.4f} | {r['start_probe']:.3f} -> {r['probe']:.3f} "
                 f"| {r['english'][0]:.3f} -> {r['english'][1]:.3f} | {r['seconds']:.0f} |")
    L.append("")
    L.extend(analysis(cmds["cpt"], rep["cpt"]))
    L += [f"Train-loss noise in the stage: deviations from the 9-step mean {100 * m.noise_cpt['sd']:.2f}% per step, "
          f"correlated at r = {m.noise_cpt['corr']:.2f} between runs (same batches). On the German probe:", ""]
    L.extend(analysis(cmds["cpt_probe"], rep["cpt_probe"], params=False))
    L += ["**Schedule search within the stage.** The first analysis of the stage also searched the same families "
          f"at the stage's budget (template cpt-de-wsd-20.yaml: 512K tokens from the pre-trained model, re-warm to "
          f"1e-3 over {setup.cpt_warmup} steps), fitted on the stage's constant and cosine runs:", ""]
    L.extend(search_best(rep, "cpt"))
    L.extend(search_trained(rep, "cpt", "probe/german/loss", m.cpts, "four"))
    return L


SUMMARY_KEYS = [("pre", "Pre-training, fit on constant + cosine, **train loss**"),
                ("pre_probe", "Same runs, held-out English **probe** loss"),
                ("seed", f"Held-out runs retrained with seed {OTHER_SEED} (other init and batches), same "
                         "seed-1234 fit, **train loss**"),
                ("seed_probe", f"Seed-{OTHER_SEED} runs, held-out English **probe** loss"),
                ("cpt", "Continual stage on German after a re-warm, **train loss**"),
                ("cpt_probe", "Continual stage, German **probe** loss")]


def summary(setup: Setup, rep: dict[str, dict], m: Measured, seed_summary: list[str]) -> list[str]:
    """The setup's lines of the page's summary: the target per analysis, then the findings."""
    c, k, w20 = m.runs["constant"], m.runs["cosine"], m.runs["wsd-20"]
    S: list[str] = [f"**{setup.title}** (WSD-20 ends {pct(w20['probe'] / c['probe'] - 1)} from constant on "
                    "held-out loss):", ""]
    for key, what in SUMMARY_KEYS:
        if key not in rep:
            continue
        scores = {law: score(rep[key], law) for law in rep[key]["fit"]}
        n, base = next(iter(scores.values()))[1], next(iter(scores.values()))[3]
        S.append(f"- {what}: target met on " + ", ".join(f"**{v[0]} of {n}** ({law})" for law, v in scores.items())
                 + "; mean |final error| " + ", ".join(f"{100 * v[2]:.2f}% ({law})" for law, v in scores.items())
                 + f", naive baseline {100 * base:.2f}%.")
    fit_pre = {p["name"]: p for p in rep["pre"]["predictions"] if p["in_fit"]}
    pc = fit_pre[setup.run_name("constant")]["laws"]["anneal"]
    pk = fit_pre[setup.run_name("cosine")]["laws"]["anneal"]
    w20_row = next(p for p in held_out(rep["pre"]) if p["name"] == setup.run_name("wsd-20"))
    err_train = score(rep["pre"], "anneal")[2]
    err_probe = score(rep["pre_probe"], "anneal")[2]
    S += [""]
    if not m.decay_pays:
        S.append(
            f"- **LR decay does not pay in this setup.** {m.best_probe} ends lowest on held-out loss; WSD-20 ends "
            f"{pct(w20['probe'] / c['probe'] - 1)} from constant and cosine {pct(k['probe'] / c['probe'] - 1)}. Both "
            f"laws only let annealing lower the loss (C, B >= 0). The anneal law fitted on train loss puts the cosine "
            f"run {pct(pk['final'] / pc['final'] - 1)} above the constant one where it measures "
            f"{pct(pk['final_real'] / pc['final_real'] - 1)}, and misses the constant run's own final train loss by "
            f"{pct(pc['final_err'])} in sample. WSD-20 is that constant run for 80% of its steps and inherits the "
            f"miss; the naive baseline for it is the constant run itself ({pct(w20_row['baseline']['final_err'])}).")
    else:
        S.append(
            f"- **LR decay pays here**: WSD-20 ends {pct(w20['probe'] / c['probe'] - 1)} from constant on held-out "
            f"loss. In sample the anneal law misses the constant run's final train loss by {pct(pc['final_err'])} "
            f"and the cosine run's by {pct(pk['final_err'])}.")
    S.append(
        f"- **Train-loss noise is shared.** Per-step deviations from the 9-step mean correlate at r = "
        f"{m.noise['corr']:.2f} across runs (same batches). On the held-out probe the anneal law's mean |final error| "
        f"is {100 * err_probe:.2f}% against {100 * err_train:.2f}% on train loss.")
    S += seed_summary
    S.append(
        f"- **lambda** (anneal): over lambda in {', '.join(f'{lam:g}' for lam in m.lam_errs)} the final-loss error "
        f"of a single held-out run moves by up to {100 * m.lam_spread:.2f} points; the best value per run: "
        + ", ".join(f"{n} {lam:g}" for n, lam in m.best_lam.items())
        + (" (the same for all)." if len(set(m.best_lam.values())) == 1 else " (no single value is best for all)."))
    S.append("")
    return S


def setup_report(setup: Setup, cmds: dict[str, list[str]], rep: dict[str, dict]) -> tuple[list[str], list[str]]:
    """The section of one setup, and its lines of the summary."""
    m = measure(setup, rep)
    L = pretrain_runs(setup, m) + pretrain_fit(setup, cmds, rep, m) + pretrain_search(setup, rep, m)
    seed_summary = []
    if "seed" in rep:
        body, seed_summary = seed_section(setup, cmds, rep, m.runs)
        L.extend(body)
    return L + cpt_stage(setup, cmds, rep, m), summary(setup, rep, m, seed_summary)


def seed_section(setup: Setup, cmds: dict[str, list[str]], rep: dict[str, dict],
                 runs: dict[str, dict]) -> tuple[list[str], list[str]]:
    """The held-out schedules retrained with another seed: the seed-to-seed spread and the laws' errors
    (the section, and its line of the summary)."""
    other = {n: run_summary(setup, seed_name(n), "probe/english/loss") for n in PRETRAIN_HELD_OUT}
    L = ["### Another seed: the held-out runs on other batches", "",
         f"The three held-out schedules trained again with `run.seed={OTHER_SEED}` (another init and another batch "
         f"order; the `cpt train` commands are under Reproduce, the runs in `{setup.run(f'seed{OTHER_SEED}')}/`), "
         "and predicted by the same fit on the seed-1234 constant and cosine runs. The naive baseline (a "
         "seed-1234 fitted run) no longer shares their batches. First the floor: how far one schedule's final "
         "loss moves with the seed alone.", "",
         f"| schedule | final train loss, seed 1234 | seed {OTHER_SEED} | difference | final held-out loss, seed 1234 "
         f"| seed {OTHER_SEED} | difference |", "|---|---|---|---|---|---|---|"]
    for n in PRETRAIN_HELD_OUT:
        a, b = runs[n], other[n]
        L.append(f"| {n} | {a['train']:.4f} | {b['train']:.4f} | {pct(b['train'] / a['train'] - 1)} | {a['probe']:.4f} "
                 f"| {b['probe']:.4f} | {pct(b['probe'] / a['probe'] - 1)} |")
    corpus_tokens = json.loads((ROOT / DATA / "prepared" / "english" / "train" / "manifest.json").read_text())["tokens"]
    d_probe = [other[n]["probe"] / runs[n]["probe"] - 1 for n in PRETRAIN_HELD_OUT]
    d_train = [other[n]["train"] / runs[n]["train"] - 1 for n in PRETRAIN_HELD_OUT]
    same_sign = all(d > 0 for d in d_probe) or all(d < 0 for d in d_probe)
    L += ["", f"The seed alone moves a schedule's final held-out loss by {pct(min(d_probe, key=abs))} to "
          f"{pct(max(d_probe, key=abs))} and its final train loss by {pct(min(d_train, key=abs))} to "
          f"{pct(max(d_train, key=abs))}" + (", all in one direction" if same_sign else "") + ". "
          + ("That is more than the 1% target: at this scale a law fitted on one seed's runs predicts that seed's "
             "level, and a run of another seed can sit further from it than the target allows." if min(map(abs, d_probe)) > 0.01
             else "The 1% target stays above this floor.")
          + f" Each seed also reads another part of the corpus ({setup.steps * setup.batch / 2**20:.0f}M of its "
          f"{corpus_tokens / 2**20:.1f}M tokens).", ""]
    L.append("Train loss:")
    L.append("")
    L.extend(analysis(cmds["seed"], rep["seed"], params=False))
    L.append("Held-out English probe loss:")
    L.append("")
    L.extend(analysis(cmds["seed_probe"], rep["seed_probe"], params=False))
    summary = [f"- **The seed is a floor.** Retrained with seed {OTHER_SEED}, the held-out schedules end "
               f"{pct(min(d_probe, key=abs))} to {pct(max(d_probe, key=abs))} from their seed-1234 runs on held-out "
               "loss; the seed-1234 fit's mean |final error| on them is "
               + ", ".join(f"{100 * score(rep['seed_probe'], law)[2]:.2f}% ({law})" for law in rep["seed_probe"]["fit"])
               + " (see *Another seed*)."]
    return L, summary


def page_intro() -> list[str]:
    """The page's opening: what `cpt predict` fits, exactly as implemented, how to give it curves, what it
    warns about, and the two setups."""
    L: list[str] = []
    add = L.append
    add("# Predicting loss curves across LR schedules: `cpt predict`")
    add("")
    add("*Written by `scripts/predict_experiment.py` from the runs it trained; every number below is measured.*")
    add("")
    add("`cpt predict` fits a loss-curve law on any number of runs' logged curves (the loss at each step together "
        "with the LR the trainer actually applied: cpt run dirs, or curves logged by other trainers) and predicts "
        "the curve of any other schedule, step by step. Two laws are implemented in `cpt/predict/laws.py`:")
    add("")
    add("- **anneal**, the scaling law with LR annealing (Tissue et al. 2024): "
        "`L(n) = L0 + A*S1(n)^-alpha - C*S2(n)`, `S1` the summed LR, `S2` the annealing area "
        "`sum m_i`, `m_i = lam*m_(i-1) + (eta_(i-1) - eta_i)`, lam = 0.999 per optimizer step by default;")
    add("- **multipower**, the multi-power law (Luo et al. 2025): `L(n) = L0 + A*S1(n)^-alpha - LD(n)`, "
        "`LD(n) = B*sum_k (eta_(k-1) - eta_k)*G(eta_k^-gamma*S_k(n))`, `G(x) = 1 - (C*x + 1)^-beta`, "
        "`S_k(n) = sum_(tau=k..n) eta_tau` (the form of the authors' README).")
    add("")
    add("Exactly as implemented (see the module docstring): `n` counts updates done; the train loss logged "
        "with step `i` is measured before update `i`, so it is `L(i-1)`, and a probe logged with step `i` is "
        "`L(i)`; `S1` includes the warmup (the multi-power law's `S_W`); the annealing terms count LR changes "
        "only after the LR first reaches its peak (a warmup counted as negative annealing would make a "
        "constant-LR run look like one whose LR keeps rising); both laws are fitted and evaluated after the "
        "warmup. LRs are divided by the fitted runs' peak LR. Fit: scipy least squares with a Huber loss on "
        "log-loss (scale 1.345 x the robust step-to-step noise), from the 3 best points of a grid over the "
        "nonlinear parameters with the linear ones solved exactly (grid and starts on up to 64 points of each "
        "run, the best start then refined on all the fit points); intervals: moving-block bootstrap replicates "
        "over each run's fit points (blocks of ~sqrt(n)), 2.5-97.5 percentiles, each replicate refitted from the "
        "best fit in at most 30 evaluations. They carry the noise of the fitted runs, not the law's own misfit. "
        "A fit refuses data that cannot identify the law.")
    add("")
    add("**Fit points.** A run is fitted on at most 256 points (`--fit-points`; 0: every measured point): past "
        "that, means of log-loss over blocks of consecutive measured points, each at its block's mean step, "
        "weighted by the block's size. Blocks are narrower where the curve bends: at most 5% of their first "
        "step wide (early on) and at most 2% of the peak LR of LR change within one (a decay). The laws are "
        "still evaluated exactly at those steps from every step's LR; only the noise is averaged. The "
        "default bootstrap is 20 replicates (`--bootstrap`); the fit's and the bootstrap's seconds are printed "
        "and in the report. The two setups below were measured with every point and 100 replicates (the "
        "defaults then; the script passes `--fit-points 0 --bootstrap 100`).")
    add("")
    add("**Cost.** `S1` and `S2` are cumulative sums and a recurrence, O(steps). The multi-power sum has no "
        "recurrence: it is evaluated only at the steps where a loss is needed (the fit points, a prediction's "
        "points), over the LR changes before each, in blocks of at most 131,072 (point, change) pairs, so memory "
        "stays at a few MB however long the run. A predicted multi-power curve is exact at every step when that "
        "costs at most 2e8 pairs, else at an even grid within that budget plus the final-loss steps, linear in "
        "between (the anneal law is exact everywhere). Measured below (*Curves at full resolution*).")
    add("")
    add("**Units.** Every constant counts optimizer steps of the fitted runs: lambda is per optimizer step, "
        "printed with its half-life in steps and (the batch known) tokens, never per log record; "
        "`--lam-half-life 693steps` or `--lam-half-life 2.8M` (tokens, converted with the fitted runs' tokens "
        "per step) give it as a length. A curve logged every k steps is read with its step numbers and its LR "
        "for every step reconstructed, so the same curve at 1 and 16 steps per record predicts the same "
        "(tests/test_predict_scale.py). The laws do not carry across batch sizes: runs of another tokens per "
        "step are refused.")
    add("")
    add("**Curves from other trainers.** `--curve NAME=FILE[,key=value...]` (fitted) and `--held-out "
        "NAME=FILE|RUN_DIR` (predicted from its own logged LR, any schedule, and scored against its own loss) "
        "read .csv, .tsv, .jsonl or .json (a list of records, or an HF `trainer_state.json`) with a step (or "
        "tokens) column, an LR column and a loss column, found by name (`step`, `global_step`, "
        "`trainer/global_step`, `iteration`, W&B's `_step` last; `lr`, `learning_rate`, `optim/LR (group 0)`; "
        "`train/loss`, `loss`, `lm loss`, `train/CE loss`, else `eval/loss`, `val/loss`) or named with "
        "`step=`, `tokens=`, `lr=`, `loss=`. W&B exports' `RUN - METRIC` columns are read as `METRIC` "
        "(`__MIN`/`__MAX` ignored) and a step's records spread over rows are merged. A validation loss "
        "(a name with val, eval, valid, probe or test) is taken after its step's update, a train loss before "
        "(`loss_at=` overrides). Between two records the LR is interpolated linearly (from 0 at step 0 to the "
        "first record), or held (`lr_fill=hold`: each record's LR until the next). Tokens only: "
        "`tokens_per_step=N`. Each file's reading is printed: steps, records, columns, cadence, and a note where "
        "the LR changes by 10% of its peak or more between two records (a step decay logged every 128 steps, "
        "rebuilt as a ramp that starts early; give the LR of every step where the schedule is known).")
    add("")
    add("**Warnings.** The report and the command line say, with what to do (fit on more schedule shapes, e.g. "
        "three runs as in the papers' protocol, or the other law): a parameter on (or within 0.5% of the range "
        "of) its bound, or a bootstrap interval that reaches a bound; an interval over more than 2 orders of "
        "magnitude; and an in-sample error (the law on its own fitted runs, scored like a held-out run) far "
        "below the held-out one (3x, and 0.5 points at least). The naive baseline (the fitted run with the "
        "closest LR schedule, its loss taken at the same tokens) is given for every run with a real curve, or "
        "why not (no fitted run reaches its end).")
    add("")
    add("The measurement is made twice, on the same model, data and token budget (1M tokens of English, then "
        "512K of German): **setup A** with 4K-token batches (256 steps), where LR decay turned out not to pay, "
        "and **setup B** with 1K-token batches (1024 steps), where it does. Setup B was added after setup A's "
        "misses, to test the laws where annealing matters; setup A's numbers are kept as measured.")
    add("")
    return L


def reproduce_lines(done: dict[str, tuple[dict[str, list[str]], dict[str, dict]]]) -> list[str]:
    """The Reproduce section: every command of the experiment, in the order it runs them."""
    L: list[str] = []
    add = L.append
    add("## Reproduce")
    add("")
    add("```")
    add("python scripts/predict_experiment.py   # data/predict/, the runs under runs/predict/, the analyses, this page")
    add("```")
    add("")
    add("It runs, in order (each `cpt train` single-threaded, `OMP_NUM_THREADS=1`; `../shared/data` = the shared "
        "corpora):")
    add("")
    add("```")
    for args in data_commands(Path("../shared/data")):
        add(shell(args))
    for _, _, recipe, overrides in planned_runs():
        add(shell(["train", recipe, *overrides]))
    for st in SETUPS:
        cmds = done[st.key][0]
        for k in ("pre", "pre_probe", "pre_one", "lam0.99", "seed", "seed_probe", "cpt", "cpt_probe"):
            if k in cmds:
                add(shell(cmds[k]))
        for k in [k for k in cmds if "searched_" in k]:
            add(shell(["train", cmds[k][cmds[k].index("--recipe") + 1]]))
            add(shell(cmds[k]))
    add("```")
    add("")
    add("Each `cpt predict` writes `report.md`, `report.json` and `curves.png` (predicted curves with their "
        f"bootstrap bands over the real ones) under `{OUT}/`; `--search` also writes `best-schedule-<law>.yaml`.")
    add("")
    return L


def refused() -> tuple[list[str], tuple[int, str]]:
    """A fit `cpt predict` must refuse (a constant LR alone): the command, its exit status and last line."""
    first = SETUPS[0]
    refuse = ["predict", "--fit", str(first.run("constant")), "--recipe", first.recipe("wsd-20"),
              "--out", str(first.out("refused"))]
    r = subprocess.run([sys.executable, "-m", "cpt.cli", *refuse], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **ONE_THREAD})
    return refuse, (r.returncode, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")


def page_closing(refuse: list[str], refusal: tuple[int, str]) -> list[str]:
    """The refusal and the limits of the measurement."""
    L: list[str] = []
    add = L.append
    add("## Refusal")
    add("")
    add(f"`{shell(refuse)}` exits with status {refusal[0]}:")
    add("")
    add(f"> {refusal[1]}")
    add("")
    add("## Limits and what was not measured")
    add("")
    add("- One model size (1.48M parameters), one peak LR (2e-3 pre-training, 1e-3 in the continual stage), two "
        f"batch sizes, one seed for the fitted runs (a second, {OTHER_SEED}, for setup B's held-out runs only): the "
        "laws' parameters belong to each setup. The laws count optimizer steps; "
        "`cpt predict` refuses to carry a fit to another tokens-per-step.")
    add("- Across the domain shift the laws were fitted within the continual stage (S1 from the re-warm). A "
        "pre-training fit was not carried into the stage: the stage starts from another loss level on another "
        "domain, which the laws have no term for; compare the two stages' fitted parameters above.")
    add("- The warmup and the re-warm transient are outside both laws (fitted and scored after the LR peak).")
    add("- Bootstrap intervals carry the noise of the fitted runs, not the laws' misfit: the in-sample errors "
        "above show how large that is.")
    add("- Published curves (the papers' 25M-400M models) are not reachable from here: the full-resolution "
        "measurements use curves drawn from the multi-power law with known parameters (*Curves at full "
        "resolution*); tests/test_predict_scale.py recovers such a law's parameters and predictions.")
    add("")
    return L


# --- scale: curves at full resolution (synthetic, from the multi-power law) ------------------------------

SCALE = RUNS / "scale"
SCALE_SIZES = (24_000, 100_000)  # steps, one record per step
BEFORE_SIZES = (1_000, 2_000, 4_000)  # the matrix code: time and memory grow as steps x changes
SCALE_TOP = 3e-4
SCALE_THETA = [3.0, 23.0, 0.45, 0.15, 0.05, 0.55, 0.55]  # multipower, LRs / 3e-4 (the paper's B = 500 x 3e-4)
SCALE_BEGIN, SCALE_END = "<!-- scale:begin -->", "<!-- scale:end -->"
_API_BENCH = r"""
import json, os, resource, sys, time
import numpy as np
import cpt.predict.laws
from cpt.predict import Curve, fit

assert cpt.predict.laws.__file__.startswith(os.getcwd()), cpt.predict.laws.__file__  # the code under test

def read(path):
    a = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 2, 3))
    losses = np.full(len(a) + 1, np.nan)
    losses[:-1] = a[:, 2]
    return Curve(path, a[:, 1], 4096, losses)

every = sys.argv[1] == "every"  # every measured point (--fit-points 0), else the defaults of the code under test
curves = [read(p) for p in sys.argv[2:]]
t = time.perf_counter()
for law in ("anneal", "multipower"):
    f = fit(curves[:-1], law, bootstrap=0, **({"max_points": 0} if every else {}))
    f.predict(curves[-1])
print(json.dumps({"seconds": time.perf_counter() - t, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
_CLI_BENCH = r"""
import json, resource, sys, time
from cpt.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def scale_lrs(kind: str, T: int) -> list[float]:
    """LR of each of T steps: 1% linear warmup, then constant / cosine to 0.1x / WSD (1-sqrt decay over the last
    20% to 0.01x) / two steps (0.3x at 50%, 0.1x at 75%)."""
    import numpy as np

    W, s = T // 100, np.arange(T)
    w = np.minimum((s + 1) / W, 1.0)
    p = np.clip((s - W) / (T - W), 0, 1)
    lr = {"constant": w, "cosine": np.where(s < W, w, 0.1 + 0.45 * (1 + np.cos(np.pi * p))),
          "wsd": np.where(s < 0.8 * T, w, 1 - 0.99 * np.sqrt(np.clip((s - 0.8 * T) / (0.2 * T), 0, 1))),
          "steps": np.where(s < W, w, np.where(s < 0.5 * T, 1.0, np.where(s < 0.75 * T, 0.3, 0.1)))}[kind]
    return (lr * SCALE_TOP).tolist()


def scale_curve(kind: str, T: int, seed: int) -> Path:
    """A train-loss curve drawn from the multi-power law (1% noise per step; the warmup a straight line from
    10), one CSV record per step (step, tokens at 4096 a step, LR, loss); written once."""
    import numpy as np

    from cpt.predict.laws import _features, law_curve

    path = SCALE / f"{kind}-{T // 1000}k.csv"
    if path.is_file():
        return path
    lrs = np.array(scale_lrs(kind, T))
    y = law_curve("multipower", SCALE_THETA, _features(lrs, SCALE_TOP, 0.999))
    W = int(np.argmax(lrs)) + 1
    y[:W] = np.linspace(10.0, y[W], W)
    y *= np.exp(np.random.default_rng(seed).normal(0.0, 0.01, T + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["step,tokens,lr,train/loss"] + [f"{i},{4096 * i},{lrs[i - 1]:.9g},{y[i - 1]:.6f}" for i in range(1, T + 1)]
    path.write_text("\n".join(rows) + "\n")
    return path


def bench(code: str, args: list[str], pythonpath: Path) -> dict:
    """Run ``code`` with ``args`` in a fresh interpreter (one thread) on the cpt under ``pythonpath`` (its working
    directory, first on sys.path): its JSON."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(pythonpath)}
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=pythonpath, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"benchmark failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def scale_cli(T: int) -> tuple[list[str], dict, dict]:
    """`cpt predict` on three per-step curves of T steps (constant, cosine, WSD: the papers' protocol), a
    two-step decay held out (and, at 24K, a 72K-step cosine): (the command, time and peak RSS, report)."""
    fit_k = {k: scale_curve(k, T, i) for i, k in enumerate(["constant", "cosine", "wsd"])}
    held = [f"steps={scale_curve('steps', T, 3)}"] + ([f"cosine72k={scale_curve('cosine', 72_000, 4)}"]
                                                       if T == 24_000 else [])
    out = SCALE / f"report-{T // 1000}k"
    args = ["predict", "--curve", *(f"{k}={v}" for k, v in fit_k.items()), "--held-out", *held, "--out", str(out)]
    print(f"$ cpt {' '.join(args)}", flush=True)
    m = bench(_CLI_BENCH, args, ROOT)
    return args, m, json.loads((out / "report.json").read_text())


def scale_before(rev: str) -> list[tuple[int, dict, dict, dict]]:
    """Fit both laws (no bootstrap) and predict one curve at BEFORE_SIZES, with the code of ``rev`` (the
    matrix, every point) and this checkout's (every point, and its default fit points):
    [(steps, before, now on every point, now)]."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(f"git archive {rev} cpt | tar -x -C {tmp}", shell=True, cwd=ROOT, check=True)
        for T in BEFORE_SIZES:
            files = [str(ROOT / scale_curve(k, T, i)) for i, k in enumerate(["constant", "cosine", "wsd"])]
            print(f"benchmark at {T} steps: {rev} and this checkout", flush=True)
            rows.append((T, bench(_API_BENCH, ["default", *files], Path(tmp)),
                         bench(_API_BENCH, ["every", *files], ROOT), bench(_API_BENCH, ["default", *files], ROOT)))
    return rows


def scale_section(cli: list[tuple[int, list[str], dict, dict]], before: list[tuple[int, dict, dict, dict]], rev: str | None,
                  seconds: float) -> list[str]:
    """The page's section on full-resolution curves, from the measurements."""
    L = [SCALE_BEGIN, "## Curves at full resolution: memory and time", "",
         f"Synthetic curves drawn from the multi-power law (L0, A, alpha, B, C, beta, gamma = "
         f"{', '.join(f'{v:g}' for v in SCALE_THETA)}, LRs / {SCALE_TOP:g}; 1% noise per step), one record per "
         "optimizer step, fitted as they come (`--curve`), on one thread of a 2-core machine shared with other "
         "jobs (times are upper bounds). The protocol is the papers': fit constant, cosine and WSD, predict what "
         "was held out (on the multi-power law paper's own curves: *On published curves*).", "",
         "| steps per run | command | wall s | peak RSS | fit s (anneal / multipower) | bootstrap s (20 replicates) "
         "| fit points per law | held out: final-loss error (anneal / multipower) | warnings |",
         "|---|---|---|---|---|---|---|---|---|"]
    for T, args, m, rep in cli:
        fa, fm = rep["fit"]["anneal"], rep["fit"]["multipower"]
        errs = "; ".join(f"{p['name']} {pct(p['laws']['anneal']['final_err'])} / {pct(p['laws']['multipower']['final_err'])}"
                         for p in rep["predictions"])
        L.append(f"| {T:,} | `cpt {' '.join(args)}` | {m['seconds']:.0f} | {m['rss'] / 2**20:.0f} MiB "
                 f"| {fa['seconds']:.1f} / {fm['seconds']:.1f} | {fa['bootstrap_seconds']:.1f} / "
                 f"{fm['bootstrap_seconds']:.1f} | {fm['fit_points']} of {fm['measured_points']} | {errs} "
                 f"| {len(fa['warnings']) + len(fm['warnings'])} |")
    if before:
        L += ["", f"Before (commit {rev}: a steps x changes matrix per run, every measured point) and now (on every "
                  "point, `--fit-points 0`, and with the default 256 fit points a run), both laws fitted without a "
                  "bootstrap on the constant and cosine runs and the WSD run predicted at every step, the same curves:",
              "", "| steps per run | before: s | before: peak RSS | now, every point: s | peak RSS | now: s | peak RSS |",
              "|---|---|---|---|---|---|---|"]
        L += [f"| {T:,} | " + " | ".join(f"{m['seconds']:.1f} | {m['rss'] / 2**20:.0f} MiB" for m in ms) + " |"
              for T, *ms in before]
        L += ["", "The matrix grows as steps x LR changes (8 bytes each, several copies at once): at 24,001 steps "
                  "one copy is 3.9 GiB, at 100K steps 75 GiB; the table stops at 4K, where one fit already takes minutes."]
    return L + ["", f"*(scale measurements: {seconds:.0f} s; `python scripts/predict_experiment.py scale"
                    f"{' --before ' + rev if rev else ''}`)*", SCALE_END]


def stage_scale(rev: str | None) -> None:
    """Measure `cpt predict` on full-resolution curves and write that section of the page (in place)."""
    t0 = time.time()
    cli = [(T, *scale_cli(T)) for T in SCALE_SIZES]
    before = scale_before(rev) if rev else []
    from predict_published import write_block

    write_block(DOC, SCALE_BEGIN, SCALE_END, scale_section(cli, before, rev, time.time() - t0))
    print(f"wrote the scale section of {DOC}")


def kept_scale_section() -> list[str]:
    """The scale and published-curves sections as the page has them now (the report stage rewrites the rest)."""
    from predict_published import BEGIN, END_MARK

    text = (ROOT / DOC).read_text() if (ROOT / DOC).is_file() else ""
    kept = []
    for begin, end in ((SCALE_BEGIN, SCALE_END), (BEGIN, END_MARK)):
        if begin in text:
            kept += text[text.index(begin):text.index(end) + len(end)].splitlines() + [""]
    return kept


def stage_report() -> None:
    t0 = time.time()
    missing = [str(st.run(n)) for st, n, recipe, over in planned_runs() if not finished(*Job(recipe, tuple(over)).plan())]
    if missing:
        sys.exit(f"runs missing: {', '.join(missing)} (python scripts/predict_experiment.py runs)")
    done = {st.key: analyses(st) for st in SETUPS}
    refuse, refusal = refused()
    sections = [setup_report(st, *done[st.key]) for st in SETUPS]
    L = page_intro() + kept_scale_section() + ["## Summary", "",
                        "Target: final-loss error <= 1% and smaller than the naive baseline's (the fitted run with "
                        "the closest schedule), on runs not used in the fit.", ""]
    for _, lines in sections:
        L.extend(lines)
    L.extend(reproduce_lines(done))
    for body, _ in sections:
        L.extend(body)
    L += page_closing(refuse, refusal) + [f"*(analyses: {time.time() - t0:.0f} s)*"]
    (ROOT / DOC).write_text("\n".join(L) + "\n")
    print(f"wrote {DOC}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="*", default=["data", "runs", "report"],
                   choices=["data", "runs", "report", "scale", "published"])
    p.add_argument("--shared", default=None, help="the shared corpora dir (default: ../shared/data)")
    p.add_argument("--before", default=None, metavar="REV",
                   help="scale: also time the code of this git revision (the steps x changes matrix) at 2K-8K steps")
    p.add_argument("--repo", type=Path, default=None,
                   help="published: the Multi-Power Law repository (github.com/thu-yao-01-luo/MultiPowerLaw), a git "
                        "dir (bare or not) or a checkout")
    p.add_argument("--rev", default="HEAD", help="published: the commit of --repo to read (default HEAD)")
    ns = p.parse_args()
    if "published" in ns.stages:
        if ns.repo is None:
            p.error("published needs --repo PATH (the source's git dir or checkout)")
        from predict_published import stage_published

        stage_published(ns.repo, ns.rev, DOC)
    if "scale" in ns.stages:
        stage_scale(ns.before)
    if "data" in ns.stages:
        stage_data(shared_data(ns.shared))
    if "runs" in ns.stages:
        stage_runs()
    if "report" in ns.stages:
        stage_report()


if __name__ == "__main__":
    main()
