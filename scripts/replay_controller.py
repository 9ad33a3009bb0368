"""The replay controller (data.mixture: {controller: ...}) against fixed replay shares, English -> German.

    python scripts/replay_controller.py              # 3 seeds; writes docs/replay_controller.md
    python scripts/replay_controller.py --seeds 1    # seed 1234 only (a third of the runs)
    python scripts/replay_controller.py --parallel 6 # 6 runs side by side (processes)
    python scripts/replay_controller.py --report     # the page from the seeds whose runs are finished

A tiny Llama (recipes/paper/) pre-trained on English, then a German stage with re-warming (the recipe
recipes/paper/replay-de-25.yaml) at fixed English replay shares of 0, 5, 25 and 50%, and with the share set
online by the controller, whose budget is half the final English rise of no replay (each seed's own 0%
run). Every run is probed on the same cadence, so each run's worst rise is measured the same way; the
probe time is read from the runs (probe/seconds) against their training time.

Reported per recipe, mean ± sd over the seeds: the final and the worst rise of the English held-out loss
over its value at the stage start (budget met?), the final German loss, the English share of the stage's
sequences, the probes' share of the wall time. Finished runs are reused (delete runs/repro/ctrl/ to start
over). The stage is short and the model small (hidden 64: 0.6M parameters, most of them
embeddings) because the machine this was written on was shared by a dozen jobs on 2 cores; the sizes are
constants below.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _runs import ROOT, Job, K, Runner, finished, metrics, table

PRETRAIN = 64 * K           # 64 steps of 1K at LR 1e-2: more updates than 8K batches for the same (scarce) compute
LR = 1e-2                   # pre-training's peak, and the German stage re-warms to it
STAGE = 32 * K
BATCH = 2 * K               # 16 steps of 8 sequences
PROBE_EVERY = 4 * K         # 8 probes in the stage (besides its start)
SHARES = (0.0, 0.05, 0.25, 0.5)
SEEDS = (1234, 7, 42)
SMALL = ["model.config={hidden_size: 64, intermediate_size: 256, num_hidden_layers: 2, num_attention_heads: 4, "
         "num_key_value_heads: 4}", "train.micro_batch_size=8"]
PROBES = ("probes.sets={en: data/shared/prepared/en/validation, de: data/shared/prepared/de/validation}",
          f"probes.every={PROBE_EVERY}", "probes.dense=null", "probes.max_sequences=8")
CONTROLLER = {"min": 0.0, "max": 0.5, "start": 0.25}


def summary(run_dir: Path) -> dict[str, float]:
    """What the tables read from one run's metrics.jsonl."""
    recs = metrics(run_dir)
    p = [r for r in recs if "probe/en/loss" in r]
    steps = [r for r in recs if "train/loss" in r]
    base = p[0]["probe/en/loss"]
    probe_s = sum(r["probe/seconds"] for r in p)
    train_s = steps[-1]["time/elapsed_s"]
    changes = [r for r in p if r.get("controller/changed")]
    return {"final": p[-1]["probe/en/loss"] - base, "worst": max(r["probe/en/loss"] for r in p) - base,
            "de": p[-1]["probe/de/loss"], "en": p[-1]["probe/en/loss"],
            "en_share": statistics.mean(r.get("data/en/share", 0.0) for r in steps),  # 0%: en never logged
            "probe_share": probe_s / (probe_s + train_s), "probes": len(p),
            "probe_s": probe_s / len(p), "train_s_step": train_s / len(steps), "changes": len(changes),
            "shares": [round(r["controller/share"], 3) for r in p if "controller/share" in r],
            "rises": [round(r["probe/en/loss"] - base, 3) for r in p]}


class Missing(Exception):
    """A run that --report does not find finished."""


class FinishedOnly(Runner):
    """--report: the runs as they are on disk; an unfinished one ends the seeds read."""

    def run(self, job: Job) -> Path:
        run_dir, tokens, per_step = job.plan()
        if not finished(run_dir, tokens, per_step):
            raise Missing(run_dir.name)
        self.commands.append(" ".join(["cpt", *job.args()]))
        wall = run_dir / "repro_wall_s"
        if wall.is_file():
            self.wall[run_dir.name] = float(wall.read_text())
        self.used.append(run_dir.name)
        return run_dir


def ms(vals: list[float], fmt: str = "{:+.3f}") -> str:
    m = fmt.format(statistics.mean(vals))
    return m + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")


def fixed(run: Runner, base: list[str], share: float, seed: int) -> dict:
    return summary(run(f"replay{share * 100:g}-s{seed}", "recipes/paper/replay-de-25.yaml",
                       [*base, f"run.seed={seed}", f"data.mixture={{de: {1 - share}, en: {share}}}"]))


def controlled(run: Runner, base: list[str], seed: int) -> dict[str, dict]:
    """No replay (its final rise sets the seed's budget), then the controller at that budget."""
    got = {"fixed 0%": fixed(run, base, 0.0, seed)}
    budget = round(max(0.5 * got["fixed 0%"]["final"], 0.005), 4)  # (a model that forgot nothing: 0.005)
    ctl = ", ".join(f"{k}: {v}" for k, v in {"old": "en", "new": "de", "budget": budget, **CONTROLLER}.items())
    got["controller"] = summary(run(f"controller-s{seed}", "recipes/paper/replay-de-25.yaml",
                                    [*base, f"run.seed={seed}", f"data.mixture={{controller: {{{ctl}}}}}"]))
    got["budget"] = {"budget": budget}
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="how many of the seeds 1234, 7, 42")
    ap.add_argument("--parallel", type=int, default=1, help="runs trained at the same time")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "repro" / "ctrl")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "replay_controller.md")
    ap.add_argument("--report", action="store_true", help="train nothing: the page from the seeds whose runs "
                    "are all finished")
    args = ap.parse_args()
    t0 = time.time()
    run = (FinishedOnly if args.report else Runner)(args.out)
    pre = run("pretrain-en-1k", "recipes/paper/pretrain-en.yaml",
              [*SMALL, f"train.tokens={PRETRAIN}", "train.global_batch_tokens=1024", "train.micro_batch_size=4",
               f"schedule.max_lr={LR}", f"schedule.min_lr={LR / 10}"])
    base = [f"init_from.path={pre}", f"train.tokens={STAGE}", f"train.global_batch_tokens={BATCH}",
            "train.micro_batch_size=8", f"schedule.max_lr={LR}", f"schedule.min_lr={LR / 10}", *PROBES]
    seeds, per_seed = SEEDS[:args.seeds], {}
    # each seed's no-replay run then its controller run, side by side with the other fixed shares (by share)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        pairs = {seed: pool.submit(controlled, run, base, seed) for seed in seeds}
        others = {(share, seed): pool.submit(fixed, run, base, share, seed) for share in (0.25, 0.5, 0.05)
                  for seed in seeds}
        for seed in seeds:
            try:
                per_seed[seed] = pairs[seed].result()
            except Missing as e:
                print(f"--report: {e} is not finished; seed {seed} left out")
                continue
            for share in SHARES[1:]:
                try:
                    per_seed[seed][f"fixed {share:.0%}"] = others[share, seed].result()
                except Missing as e:
                    print(f"--report: {e} is not finished; fixed {share:.0%} left out")
    if not per_seed:
        raise SystemExit("no seed has its no-replay and controller runs finished")
    rows: dict[str, list[dict]] = {}
    for name in ["fixed 0%", *(f"fixed {s:.0%}" for s in SHARES[1:]), "controller", "budget"]:
        if all(name in got for got in per_seed.values()):  # a recipe is shown for every seed shown, or not at all
            rows[name] = [got[name] for got in per_seed.values()]
    args.doc.write_text(page(rows, tuple(per_seed), run, time.time() - t0))
    print(f"wrote {args.doc} ({(time.time() - t0) / 60:.1f} min)")


def page(rows: dict[str, list[dict]], seeds, run: Runner, seconds: float) -> str:
    from cpt.recipe import ReplayControllerConfig

    gains = {k: ReplayControllerConfig.model_fields[k].default for k in ("kp", "ki", "target")}
    budgets = [b["budget"] for b in rows.pop("budget")]
    header = ["recipe", "final en rise", "worst en rise", "final met", "worst met", "final de loss", "en share",
              "probe time share"]
    body = []
    for name, ss in rows.items():
        body.append([name, ms([s["final"] for s in ss]), ms([s["worst"] for s in ss]),
                     f"{sum(s['final'] <= b for s, b in zip(ss, budgets, strict=True))}/{len(ss)}",
                     f"{sum(s['worst'] <= b for s, b in zip(ss, budgets, strict=True))}/{len(ss)}",
                     ms([s["de"] for s in ss], "{:.3f}"), ms([s["en_share"] for s in ss], "{:.3f}"),
                     ms([s["probe_share"] for s in ss], "{:.3f}")])
    ctl = rows["controller"]

    def met(name: str) -> int:
        return sum(s["final"] <= b for s, b in zip(rows[name], budgets, strict=True))

    compliant = [n for n in rows if n != "controller" and met(n) == len(seeds)]
    best = min(compliant, key=lambda n: statistics.mean(s["de"] for s in rows[n])) if compliant else None
    de_ctl = statistics.mean(s["de"] for s in ctl)
    how = (" --parallel 6` (the runs, 6 side by side; this page from them by `--report`" if isinstance(run, FinishedOnly)
           else f"` (this invocation {seconds / 60:.1f} min")
    lines = [
        "# The replay controller against fixed replay shares",
        "",
        f"Measured by `python scripts/replay_controller.py --seeds {len(seeds)}{how}; "
        f"{sum(run.wall.values()) / 60:.1f} min of runs summed, on 2 CPU cores shared with "
        f"a dozen other jobs; runs under runs/repro/ctrl/). Seeds {', '.join(map(str, seeds))} (the stage's data "
        f"order; one English model, pre-trained on {PRETRAIN // K}K tokens in {PRETRAIN // K} steps, cosine from {LR:g}, seed 1234). Every number is read "
        "from the runs' metrics.jsonl.",
        "",
        f"Set-up: a Llama of hidden size 64 (2 layers, 0.66M parameters, most of them embeddings; the tokenizer and "
        f"data of recipes/paper/), a German stage of {STAGE // K}K tokens ({STAGE // BATCH} steps of {BATCH // K}K) "
        f"re-warmed to {LR:g} (pre-training's peak) with cosine re-decay (recipes/paper/replay-de-25.yaml), probed every "
        f"{PROBE_EVERY // K}K tokens on 8 held-out sequences of English and of German. Fixed English replay "
        f"{', '.join(n.split()[1] for n in rows if n.startswith('fixed'))}; the controller with `{{old: en, new: de, budget: B, "
        f"min: {CONTROLLER['min']}, max: {CONTROLLER['max']}, start: {CONTROLLER['start']}}}` and the default gains "
        f"(kp {gains['kp']}, ki {gains['ki']}, target {gains['target']}), where B, each seed's budget, is half the "
        f"final English rise of that seed's 0% run (B = {ms(budgets)}). 'met': seeds whose English rise stayed "
        "at or under their budget, at the end and at the worst probe of the stage. 'en share': the English "
        "share of the stage's sequences. 'probe time share': probe seconds / (probe + training seconds).",
        "",
        table(header, body),
        "",
        "## Reading",
        "",
        f"- The controller: final rise {ms([s['final'] for s in ctl])} against budgets {ms(budgets)}, met by "
        f"{met('controller')}/{len(seeds)} seeds at the end; worst {ms([s['worst'] for s in ctl])}; German "
        f"{de_ctl:.3f}; {statistics.mean(s['changes'] for s in ctl):.1f} share changes per run; mean English "
        f"share {statistics.mean(s['en_share'] for s in ctl):.3f}.",
        (f"- The fixed share with the best German loss among those that met every seed's budget at the end: "
         f"{best} (German {statistics.mean(s['de'] for s in rows[best]):.3f}; the controller "
         f"{de_ctl - statistics.mean(s['de'] for s in rows[best]):+.3f} against it)." if best else
         "- No fixed share met every seed's budget at the end."),
        f"- Probe overhead: the controller needs the probe cadence ({ctl[0]['probes']} probes in the stage, "
        f"{statistics.mean(s['probe_s'] for s in ctl):.1f} s each against "
        f"{statistics.mean(s['train_s_step'] for s in ctl):.1f} s a training step here): "
        f"{ms([s['probe_share'] for s in ctl], '{:.3f}')} of the run's time went to probes, which a fixed recipe "
        "probed only at the start and end of the stage would mostly save.",
        "",
        "Each controller run's share after each probe, and the English rise there:",
        "",
    ]
    for seed, s in zip(seeds, ctl, strict=True):
        lines.append(f"- seed {seed}: shares {s['shares']}; rises {s['rises'][1:]}")
    commands = [c.replace(f"{ROOT}/", "") for c in dict.fromkeys(run.commands)]
    lines += ["", "## Commands", "", "```", *commands, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
