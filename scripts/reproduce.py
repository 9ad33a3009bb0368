"""Reproduce the continual pre-training findings of ../shared/SCIENCE.md at tiny scale: one command, one report.

    python scripts/reproduce.py --quick      # ~8.5M tokens in 24 runs: 15-20 minutes on 2 CPU cores
    python scripts/reproduce.py              # the full suite: ~35M tokens in 49 runs, ~3 h on 2 busy cores
    python scripts/reproduce.py --seeds 1    # the full budgets, one seed: ~20M tokens
    python scripts/reproduce.py --experiments 1 2 5   # a subset (5 reads the runs of 2)

Runs the recipes of recipes/paper/ (tiny Llama, the shared English / German / code corpora) through
`cpt train` with smaller or larger budgets, then writes docs/reproductions.md (full mode) or
docs/reproductions-quick.md (--quick), with the plots in docs/repro/ or docs/repro-quick/: a table per experiment
with the measured numbers, the plots of `cpt compare`, the exact commands, seeds and wall time. Every
number in the report is read from the runs' metrics.jsonl; the verdict lines compare measured numbers
with the papers' claims, and say "not reproduced" when they disagree. Finished runs are reused when the
script runs again (delete runs/repro/ to start over).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

K = 1024


@dataclass
class Budget:
    pretrain: int      # tokens of English pre-training
    cpt: int           # tokens of each continual stage
    warmups: list[str]
    lr_scales: list[float]
    seeds: list[int]
    wsd_main: int
    long_seeds: int | None = None  # seeds for experiments 3 and 4 (the longest runs): the first N; None = all


QUICK = Budget(pretrain=1024 * K, cpt=256 * K, warmups=["0", "2%"], lr_scales=[0.5, 1.0, 2.0], seeds=[1234],
               wsd_main=512 * K)
FULL = Budget(pretrain=2048 * K, cpt=512 * K, warmups=["0", "0.5%", "1%", "2%"], lr_scales=[0.5, 1.0, 2.0],
              seeds=[1234, 7, 42], wsd_main=1024 * K, long_seeds=2)
BASE_LR = 2.0e-3


@dataclass
class Run:
    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)   # CLI flags (--branch-from ...)

    def command(self, out: Path) -> list[str]:
        return ["cpt", "train", self.recipe, *self.overrides, f"run.name={self.name}",
                f"run.output_dir={out / self.name}", "tracking.progress=false", *self.extra]


class Runner:
    def __init__(self, out: Path):
        self.out = out
        self.commands: list[str] = []
        self.wall: dict[str, float] = {}
        self.untimed: list[str] = []  # reused runs with no recorded wall time
        self.used: list[str] = []      # every run the report reads, trained now or reused
        self.trained = 0               # runs trained by this invocation

    def __call__(self, run: Run) -> Path:
        run_dir = self.out / run.name
        if run.name not in self.used:
            self.used.append(run.name)
        cmd = run.command(self.out)
        if run.extra and run.extra[0] == "--branch-from":  # a branch names its own run dir
            cmd = ["cpt", "train", run.recipe, *run.overrides, "tracking.progress=false", *run.extra]
        self.commands.append(" ".join(cmd))
        if (run_dir / "final").is_dir():
            if (run_dir / "repro_wall_s").is_file():
                self.wall[run.name] = float((run_dir / "repro_wall_s").read_text())
            elif run.name not in self.untimed:
                self.untimed.append(run.name)
            return run_dir
        t0 = time.time()
        print(f"$ {' '.join(cmd)}", flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, "-m", "cpt.cli", *cmd[1:]], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
        self.wall[run.name] = time.time() - t0
        self.trained += 1
        (run_dir / "repro_wall_s").write_text(f"{self.wall[run.name]:.1f}")
        return run_dir


def tokens_trained(run_dir: Path) -> int:
    """Tokens this run trained (a branch counts from its checkpoint): its logged steps x tokens per step."""
    steps = [r for r in metrics(run_dir) if "train/loss" in r]
    return len(steps) * steps[0]["tokens"] // steps[0]["step"]


def metrics(run_dir: Path) -> list[dict]:
    from cpt.tracking import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def probes(run_dir: Path, stage: str | None = None) -> list[dict]:
    return [r for r in metrics(run_dir) if "probe/en/loss" in r and (stage is None or r.get("stage") == stage)]


def final(run_dir: Path, domain: str) -> float:
    return probes(run_dir)[-1][f"probe/{domain}/loss"]


def rise(run_dir: Path, domain: str, stage: str | None = None) -> tuple[float, float]:
    """(worst rise above the stage-start baseline, final change) of a domain's held-out loss."""
    p = probes(run_dir, stage)
    base = p[0][f"probe/{domain}/loss"]
    values = [r[f"probe/{domain}/loss"] for r in p]
    return max(values) - base, values[-1] - base


def mean_sd(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(lines)


def plots(docs: Path, sub: str, name: str, run_dirs: list[Path]) -> str:
    from cpt.compare import compare

    dest = docs / sub / name
    compare(run_dirs, dest)
    (dest / "index.html").unlink()  # the report embeds the PNGs; the page would only duplicate them
    pngs = sorted(p.name for p in dest.glob("*.png"))
    return "\n".join(f"![{name} {p}]({sub}/{name}/{p})" for p in pngs)


def main() -> None:
    ap = argparse.ArgumentParser(description="reproduce the papers' CPT findings at tiny scale")
    ap.add_argument("--quick", action="store_true", help="small budgets, one seed (~8.5M tokens, 15-20 min)")
    ap.add_argument("--out", type=Path, default=None, help="runs folder (default runs/repro/{quick,full})")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--experiments", type=int, nargs="+", default=[1, 2, 3, 4, 5], choices=[1, 2, 3, 4, 5],
                    help="run and report only these experiments (5 reads the runs of 2)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds for experiments 2-5 (default: 1 in quick mode, 3 in full)")
    args = ap.parse_args()
    b = QUICK if args.quick else FULL
    if args.seeds is not None:
        b.seeds = [1234, 7, 42, 3, 11][: args.seeds]
    mode = "quick" if args.quick else "full"
    figs = "repro" if mode == "full" else "repro-quick"  # docs/<figs>/<experiment>/*.png
    out = args.out or ROOT / "runs" / "repro" / mode
    t_start = time.time()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_shared.py")], check=True, cwd=ROOT)
    run = Runner(out)
    sections: list[str] = []
    tok = [f"train.tokens={b.cpt}"]

    # ------------------------------------------------------------------ upstream model: English
    pre = run(Run("pretrain-en", "recipes/paper/pretrain-en.yaml", [f"train.tokens={b.pretrain}"]))
    init = [f"init_from.path={pre}"]
    long_seeds = b.seeds[: b.long_seeds] if b.long_seeds else b.seeds

    # ------------------------------------------------------------------ 1. re-warming (Gupta et al.)
    if 1 in args.experiments:
        def rewarm(domain: str, prefix: str, w: str, scale: float) -> tuple[Path, list]:
            """One re-warmed continuation on ``domain``: its run dir and its table row."""
            lr = BASE_LR * scale
            d = run(Run(f"{prefix}-w{w.replace('%', 'pct')}-lr{scale:g}x", f"recipes/paper/rewarm-{domain}.yaml",
                        [*init, *tok, f"schedule.warmup={w}", f"schedule.max_lr={lr}", f"schedule.min_lr={lr / 10}"]))
            en_rise, en_final = rise(d, "en")
            return d, [w, f"{scale:g}x ({lr:.0e})", en_rise, rise(d, domain)[0], final(d, domain), final(d, "en"),
                       en_final]

        dirs, rows = map(list, zip(*[rewarm("de", "rewarm", w, s) for w in b.warmups for s in b.lr_scales],
                                   strict=True))
        by_lr = {s: statistics.mean(r[6] for r in rows if r[1].startswith(f"{s:g}x")) for s in b.lr_scales}
        by_lr_de = {s: statistics.mean(r[4] for r in rows if r[1].startswith(f"{s:g}x")) for s in b.lr_scales}
        lo, hi = min(b.lr_scales), max(b.lr_scales)
        by_w = {w: statistics.mean(r[4] for r in rows if r[0] == w) for w in b.warmups}
        verdict = [
            f"- Higher max LR forgets more: mean English forgetting {by_lr[lo]:+.3f} at {lo:g}x vs {by_lr[hi]:+.3f} at "
            f"{hi:g}x: {'reproduced' if by_lr[hi] > by_lr[lo] else 'not reproduced'}.",
            f"- Higher max LR adapts more: mean final German loss {by_lr_de[lo]:.3f} at {lo:g}x vs {by_lr_de[hi]:.3f} at "
            f"{hi:g}x: {'reproduced' if by_lr_de[hi] < by_lr_de[lo] else 'not reproduced'}.",
            f"- Warmup length matters little: final German loss spans {min(by_w.values()):.3f}..{max(by_w.values()):.3f} "
            f"across warmups {', '.join(b.warmups)} (spread {max(by_w.values()) - min(by_w.values()):.3f}).",
        ]
        # the same re-warm on the other new domain, code, at one warmup across the max LRs
        w = b.warmups[-1]
        code_dirs, code_rows = map(list, zip(*[rewarm("code", "rewarm-code", w, s) for s in b.lr_scales], strict=True))
        de_forget = {r[1]: r[6] for r in rows if r[0] == w}

        def trend(col: int, up: bool) -> str:
            """Whether a column moves one way with the max LR over every step of the sweep, or where it turns."""
            vals = [r[col] for r in code_rows]
            steps = [vals[i + 1] - vals[i] for i in range(len(vals) - 1)]
            if all((d > 0) == up for d in steps):
                return "reproduced"
            best = (max if up else min)(range(len(vals)), key=vals.__getitem__)
            return f"not monotone: {'highest' if up else 'lowest'} at {b.lr_scales[best]:g}x, not reproduced past it"

        def along(col: int, fmt: str) -> str:
            return " / ".join(format(r[col], fmt) for r in code_rows) + " at " + "/".join(f"{x:g}x" for x in b.lr_scales)

        code_verdict = [
            f"- Higher max LR forgets more: English forgetting {along(6, '+.3f')}: {trend(6, True)}.",
            f"- Higher max LR adapts more: final code loss {along(4, '.3f')}: {trend(4, False)}.",
            "- Code vs German at the same warmup: English forgetting " + ", ".join(
                f"{r[6]:+.3f} vs {de_forget[r[1]]:+.3f} at {r[1].split()[0]}" for r in code_rows) + ".",
        ]
        sections.append("## 1. Re-warming (Gupta et al. 2023)\n\nPre-train on English, continue on German with the LR "
                        "re-warmed from 0 and re-decayed (cosine to max/10). 'rise' = the highest held-out loss "
                        "after the shift minus the stage-start baseline (dense probes), 'forgetting' = final minus "
                        "baseline.\n\n" + table(
                            ["warmup", "max LR", "en rise", "de rise", "de final", "en final", "en forgetting"], rows)
                        + "\n\n" + "\n".join(verdict) + "\n\n" + plots(args.docs, figs, "rewarm", dirs)
                        + f"\n\n### Continuing on code instead of German\n\nThe same re-warm and re-decay on "
                        f"Python code (`recipes/paper/rewarm-code.yaml`, warmup {w}), {b.cpt // K}K tokens.\n\n"
                        + table(["warmup", "max LR", "en rise", "code rise", "code final", "en final",
                                 "en forgetting"], code_rows)
                        + "\n\n" + "\n".join(code_verdict) + "\n\n"
                        + plots(args.docs, figs, "rewarm-code", code_dirs))

    # ------------------------------------------------------------------ 2. replay vs retraining (Ibrahim et al.)
    if 2 in args.experiments:
        rows, dirs, per = [], [], {}
        specs = [("constant LR 2e-4", "recipes/paper/constant-lr-de.yaml"),
                 ("re-warm + re-decay, 0% replay", "recipes/paper/replay-de-0.yaml"),
                 ("re-warm + re-decay, 5% replay", "recipes/paper/replay-de-5.yaml"),
                 ("re-warm + re-decay, 25% replay", "recipes/paper/replay-de-25.yaml")]
        for seed in b.seeds:
            for label, recipe in specs:
                d = run(Run(f"{Path(recipe).stem}-s{seed}", recipe, [*init, *tok, f"run.seed={seed}"]))
                per.setdefault(label, []).append((final(d, "en"), final(d, "de")))
                dirs.append(d) if seed == b.seeds[0] else None
            d = run(Run(f"union-retrain-s{seed}", "recipes/paper/union-retrain.yaml",
                        [f"train.tokens={b.pretrain + b.cpt}", f"run.seed={seed}",
                         f"data.mixture.en={b.pretrain / (b.pretrain + b.cpt):.6f}",
                         f"data.mixture.de={b.cpt / (b.pretrain + b.cpt):.6f}"]))
            per.setdefault("retrain on en ∪ de", []).append((final(d, "en"), final(d, "de")))
            dirs.append(d) if seed == b.seeds[0] else None
        union = per["retrain on en ∪ de"]
        u_en, u_de = statistics.mean(x[0] for x in union), statistics.mean(x[1] for x in union)

        def spread(xs):
            return f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else ""

        for label, vals in per.items():
            en, de = [v[0] for v in vals], [v[1] for v in vals]
            rows.append([label, f"{statistics.mean(en):.3f}{spread(en)}", f"{statistics.mean(de):.3f}{spread(de)}",
                         f"{statistics.mean(en) - u_en:+.3f}", f"{statistics.mean(de) - u_de:+.3f}",
                         f"{(statistics.mean(en) + statistics.mean(de)) / 2 - (u_en + u_de) / 2:+.3f}"])
        r25 = per["re-warm + re-decay, 25% replay"]
        r0 = per["re-warm + re-decay, 0% replay"]
        gap25 = statistics.mean((a + c) / 2 for a, c in r25) - (u_en + u_de) / 2
        verdict = [
            f"- Replay reduces forgetting: English loss {statistics.mean(x[0] for x in r0):.3f} (0%) vs "
            f"{statistics.mean(x[0] for x in r25):.3f} (25%): "
            f"{'reproduced' if statistics.mean(x[0] for x in r25) < statistics.mean(x[0] for x in r0) else 'not reproduced'}.",
            f"- Re-warm + re-decay + 25% replay vs retraining on the union, mean of both domains: {gap25:+.3f} nats "
            f"({'matches retraining within 0.05' if abs(gap25) <= 0.05 else 'does not match retraining within 0.05'}).",
        ]
        if (args.docs / "replay_gap.md").is_file():
            verdict.append("- Why it does or does not match at this scale (stage length, re-warm LR, replay share, the "
                           "regime): [replay_gap.md](replay_gap.md), measured by `python scripts/replay_gap.py`.")
        sections.append(f"## 2. Re-warm + re-decay + replay vs retraining (Ibrahim et al. 2024)\n\nFrom the English "
                        f"model, {b.cpt // K}K tokens of German with each strategy; retraining = from scratch on "
                        f"English ∪ German with the same total tokens ({(b.pretrain + b.cpt) // K}K). Seeds: "
                        f"{', '.join(map(str, b.seeds))} (mean ± std over seeds). Final held-out loss; Δ = minus "
                        f"retraining.\n\n" + table(["strategy", "en final", "de final", "Δ en", "Δ de", "Δ mean"], rows)
                        + "\n\n" + "\n".join(verdict) + "\n\n" + plots(args.docs, figs, "replay", dirs))

    # ------------------------------------------------------------------ 3. infinite vs repeated cosine
    if 3 in args.experiments:
        stage_tok = [f"stages.{i}.tokens={b.cpt}" for i in range(3)]
        cols = {}
        first: dict[str, Path] = {}
        for seed in long_seeds:
            inf = run(Run(f"infinite-3stages-s{seed}", "recipes/paper/infinite-3stages.yaml",
                          [*stage_tok, f"schedule.warmup={b.cpt // 16}", f"schedule.cooldown.length={b.cpt * 7 // 16}",
                           f"schedule.anneal.length={b.cpt // 4}", f"run.seed={seed}"]))
            cos = run(Run(f"cosine-3stages-s{seed}", "recipes/paper/cosine-3stages.yaml",
                          [*stage_tok, *[f"stages.{i}.schedule.warmup={b.cpt // 16}" for i in range(3)], f"run.seed={seed}"]))
            for label, d in [("infinite (one schedule, no re-warm)", inf), ("repeated cosine (re-warm each stage)", cos)]:
                first.setdefault(label, d)
                en_code, en_de, code_de = rise(d, "en", "code"), rise(d, "en", "de"), rise(d, "code", "de")
                cols.setdefault(label, []).append([en_code[0], en_code[1], en_de[1], code_de[0], code_de[1],
                                                   final(d, "en"), final(d, "code"), final(d, "de")])

        rows = [[label] + [mean_sd([v[i] for v in vals]) for i in range(8)] for label, vals in cols.items()]
        means = {label: [statistics.mean(v[i] for v in vals) for i in range(8)] for label, vals in cols.items()}
        (li, lc) = list(means)
        per_seed = sum(a[3] < c[3] for a, c in zip(cols[li], cols[lc], strict=True))
        verdict = [f"- Forgetting of code during the German stage (worst): infinite {means[li][3]:+.3f} vs cosine "
                   f"{means[lc][3]:+.3f} (mean of {len(long_seeds)} seed(s); infinite lower in {per_seed} of {len(long_seeds)}): "
                   f"{'less with infinite (reproduced)' if means[li][3] < means[lc][3] else 'not less with infinite (not reproduced)'}.",
                   f"- English forgetting during the code stage (worst): infinite {means[li][0]:+.3f} vs cosine {means[lc][0]:+.3f}.",
                   f"- Final losses (en, code, de): infinite {means[li][5]:.3f}, {means[li][6]:.3f}, {means[li][7]:.3f}; "
                   f"cosine {means[lc][5]:.3f}, {means[lc][6]:.3f}, {means[lc][7]:.3f}."]
        sections.append("## 3. Infinite schedule vs repeated cosine, English → code → German\n\n"
                        f"Three stages of {b.cpt // K}K tokens; seeds {', '.join(map(str, long_seeds))} (mean ± std). "
                        "Columns: worst and final rise of English loss during the code stage, final English rise "
                        "during the German stage, worst and final rise of code loss during the German stage, then "
                        "final losses.\n\n" + table(
                            ["schedule", "en worst (code st.)", "en final (code st.)", "en final (de st.)",
                             "code worst (de st.)", "code final (de st.)", "en", "code", "de"], rows)
                        + "\n\n" + "\n".join(verdict) + "\n\n" + plots(args.docs, figs, "infinite", list(first.values())))

    # ------------------------------------------------------------------ 4. WSD branches vs cosine
    if 4 in args.experiments:
        steps = b.wsd_main // (8 * K)
        decay = b.wsd_main // 10 // (8 * K) * (8 * K)
        diffs: dict[str, list[tuple[float, float]]] = {}
        plot_dirs: list[Path] = []
        for seed in long_seeds:
            main_over = [f"train.tokens={b.wsd_main}", f"checkpoint.every={b.wsd_main // 4}", "checkpoint.keep_last=8",
                         f"run.seed={seed}"]
            main_run = run(Run(f"wsd-en-s{seed}", "recipes/paper/wsd-en.yaml", main_over))
            plot_dirs += [main_run] if seed == b.seeds[0] else []
            for q in (1, 2, 3):
                at = steps * q // 4
                ckpt = main_run / "checkpoints" / f"step-{at:08d}"
                branch_dir = Path(f"{main_run}-decay-at-{at}")
                run(Run(branch_dir.name, "recipes/paper/wsd-en.yaml",
                        [*main_over, f"run.name={main_run.name}", f"run.output_dir={main_run}"],
                        ["--branch-from", str(ckpt), "--decay", f"{decay}"]))
                total = at * 8 * K + decay
                c = run(Run(f"cosine-en-{total // K}K-s{seed}", "recipes/paper/pretrain-en.yaml",
                            [f"train.tokens={total}", f"run.seed={seed}"]))
                plot_dirs += [branch_dir, c] if seed == b.seeds[0] else []
                diffs.setdefault(f"{total // K}K|step {at} + {decay // K}K decay", []).append(
                    (final(branch_dir, "en"), final(c, "en")))
        rows = []
        for key, vals in diffs.items():
            tokens, branch = key.split("|")
            w, c = [v[0] for v in vals], [v[1] for v in vals]
            d = [x - y for x, y in vals]
            rows.append([tokens, branch, mean_sd(w), mean_sd(c), mean_sd(d), f"{sum(x < 0 for x in d)} of {len(d)}"])
        wins = sum(statistics.mean(x - y for x, y in vals) < 0 for vals in diffs.values())
        sections.append("## 4. WSD decay branches vs cosine at equal tokens\n\nOne WSD run on English "
                        f"({b.wsd_main // K}K tokens) per seed, three branches decaying 10% of it (1-sqrt) from "
                        "stable-phase checkpoints at 25/50/75%, each against a cosine run of the same total tokens. "
                        f"Seeds {', '.join(map(str, long_seeds))} (mean ± std).\n\n"
                        + table(["tokens", "branch", "WSD branch en", "cosine en", "WSD − cosine", "WSD lower in"], rows)
                        + f"\n\n- WSD branch below cosine on average in {wins} of 3 budgets (MiniCPM: WSD matches or "
                        f"beats cosine): {'reproduced' if wins >= 2 else 'not reproduced'}.\n\n"
                        + plots(args.docs, figs, "wsd", plot_dirs))

    # ------------------------------------------------------------------ 5. stability gap
    if 5 in args.experiments:
        rows, gaps = [], 0
        for label, stem in [("re-warm, 0% replay", "replay-de-0"), ("re-warm, 25% replay", "replay-de-25"),
                            ("constant LR", "constant-lr-de")]:
            worst, at, last = [], [], []
            for seed in b.seeds:
                p = probes(out / f"{stem}-s{seed}")
                base = p[0]["probe/en/loss"]
                top = max(p, key=lambda r: r["probe/en/loss"])
                worst.append(top["probe/en/loss"] - base)
                at.append(top["tokens"] // K)
                last.append(p[-1]["probe/en/loss"] - base)
            gaps += sum(w > f + 1e-3 for w, f in zip(worst, last, strict=True))
            rows.append([label, mean_sd(worst), "/".join(map(str, at)), mean_sd(last), len(p)])
        sections.append("## 5. The stability gap: worst-case vs final forgetting\n\nEnglish held-out loss after the "
                        "shift to German (the runs of experiment 2), probed every 16K tokens for the first 128K, then "
                        "every 128K. The worst point is what end-of-stage evaluation hides. Seeds "
                        f"{', '.join(map(str, b.seeds))} (mean ± std; 'at' per seed).\n\n"
                        + table(["run", "worst forgetting", "at (K tokens)", "final forgetting", "probes"], rows)
                        + f"\n\n- Worst above final (a gap that recovers) in {gaps} of {len(rows) * len(b.seeds)} runs.\n")

    wall = time.time() - t_start
    flags = (" --quick" if args.quick else "") + (f" --seeds {args.seeds}" if args.seeds is not None else "")
    if args.experiments != [1, 2, 3, 4, 5]:
        flags += " --experiments " + " ".join(map(str, args.experiments))
    runs_s = sum(run.wall.values())
    tokens = {n: tokens_trained(out / n) for n in run.used}
    first_seed = sum(t for n, t in tokens.items() if not re.search(r"-s\d+(-|$)", n) or f"-s{b.seeds[0]}" in n)
    timed = sum(tokens[n] for n in run.wall)
    head = (f"# Reproductions at tiny scale ({mode} mode)\n\nMeasured by `python scripts/reproduce.py{flags}` "
            f"on this machine (2 CPU cores, no GPU). Wall time: this invocation {wall / 60:.1f} min"
            + ("" if run.trained else " (it trained nothing: every run was reused)") + "; "
            f"{runs_s / 60:.1f} min summed over the {len(run.wall)} runs with a recorded time"
            + (f", plus {len(run.untimed)} runs reused from an earlier invocation that recorded none"
               if run.untimed else "")
            + f". Tokens trained: {sum(tokens.values()) / 2**20:.1f}M in {len(tokens)} runs"
            + (f" ({first_seed / 2**20:.1f}M of them in the runs of seed {b.seeds[0]} and the seed-free ones)"
               if len(b.seeds) > 1 else "")
            + (f"; {timed / runs_s:.0f} tokens/s over the timed runs" if runs_s else "")
            + ". " + ("" if args.experiments == [1, 2, 3, 4, 5] else
                      f"Only experiments {', '.join(map(str, args.experiments))} are in this page. ")
            + "Other jobs shared the cores during parts of it, so times are upper bounds. Model: tiny Llama (hidden 128, 2 layers, 1.5M "
            "parameters), byte-level BPE 4096, seq 256, 8K tokens per step; data: the shared corpora "
            "(en: kernel docs, de: LibreOffice help, code: CPython stdlib). Every number below is read from "
            "the runs' metrics.jsonl; verdicts compare them with the papers' claims and say so when a "
            "finding does not reproduce at this scale.\n")
    cmds = "## Commands\n\n```\n" + "\n".join(dict.fromkeys(run.commands)).replace(f"{ROOT}/", "") + "\n```\n"
    doc = head + "\n" + "\n\n".join(sections) + "\n\n" + cmds
    args.docs.mkdir(parents=True, exist_ok=True)
    page = args.docs / ("reproductions.md" if mode == "full" else "reproductions-quick.md")
    page.write_text(doc)
    print(f"wrote {page} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
