"""Reproduce the continual pre-training findings of ../shared/SCIENCE.md at tiny scale: one command, one report.

    python scripts/reproduce.py --quick      # ~10M tokens in 38 runs: 25-30 minutes on 2 idle CPU cores
    python scripts/reproduce.py              # the full suite: ~55M tokens in 78 runs, ~5 h on 2 busy cores
    python scripts/reproduce.py --seeds 1    # the full budgets, one seed: ~29M tokens
    python scripts/reproduce.py --experiments 1 2 5   # a subset (5 reads the runs of 2)
    python scripts/reproduce.py --quick --experiments 6 7   # mitigations beyond replay; WSM merging vs WSD decay
    python scripts/reproduce.py --quick --experiments 8     # English -> German with and without vocabulary extension
    python scripts/reproduce.py --quick --seeds 3 --experiments 9   # self-distillation vs replay and L2-init
    python scripts/reproduce.py --quick --seeds 3 --experiments 10   # merging back toward the start (reads 6's runs)
    python scripts/reproduce.py --experiments 11            # long-context extension 128 -> 512, RoPE kinds x replay

A subset is written into the existing page: its sections replace theirs (or are added in number order), the
others stay as they were, the header gets a line on the subset's invocation and the commands are added.

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
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _runs import BASE_LR, ROOT, K, Runner, cpt, final, metrics, probes, table


@dataclass
class Budget:
    pretrain: int      # tokens of English pre-training
    cpt: int           # tokens of each continual stage
    warmups: list[str]
    lr_scales: list[float]
    seeds: list[int]
    wsd_main: int
    long_seeds: int | None = None  # seeds for experiments 3, 4 and 7 (the longest runs): the first N; None = all
    mitigate: int | None = None     # tokens of experiment 6's German stage; None = cpt (experiment 2's runs reused)
    wsm_pretrain: int | None = None  # tokens of experiment 7's pre-training runs; None = pretrain
    wsm_k: int = 6                  # experiment 7: checkpoint spacing at most a k-th of the decay window


QUICK = Budget(pretrain=1024 * K, cpt=256 * K, warmups=["0", "2%"], lr_scales=[0.5, 1.0, 2.0], seeds=[1234],
               wsd_main=512 * K, mitigate=64 * K, wsm_pretrain=256 * K, wsm_k=3)
FULL = Budget(pretrain=2048 * K, cpt=512 * K, warmups=["0", "0.5%", "1%", "2%"], lr_scales=[0.5, 1.0, 2.0],
              seeds=[1234, 7, 42], wsd_main=1024 * K, long_seeds=2)
ALL = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


@dataclass
class Suite:
    """What the experiments share: the runner, the budgets, the English model they start from, the plots."""

    run: Runner
    b: Budget
    init: list[str]   # init_from the English model
    docs: Path
    figs: str         # docs/<figs>/<experiment>/*.png
    tok: list[str] = field(init=False)
    long_seeds: list[int] = field(init=False)

    def __post_init__(self):
        self.tok = [f"train.tokens={self.b.cpt}"]
        self.long_seeds = self.b.seeds[: self.b.long_seeds] if self.b.long_seeds else self.b.seeds

    def plots(self, name: str, run_dirs: list[Path], metric: str = "loss") -> str:
        """`cpt compare`'s plots of ``run_dirs`` in docs/<figs>/<name>/, as markdown images (probes in
        ``metric``: loss, or bpb where the runs' tokenizers differ)."""
        from cpt.compare import compare

        dest = self.docs / self.figs / name
        for old in dest.glob("*.png"):  # a panel of an earlier metric must not linger
            old.unlink()
        compare(run_dirs, dest, metric=metric)
        (dest / "index.html").unlink()  # the report embeds the PNGs; the page would only duplicate them
        pngs = sorted(p.name for p in dest.glob("*.png"))
        return "\n".join(f"![{name} {p}]({self.figs}/{name}/{p})" for p in pngs)


def rise(run_dir: Path, domain: str, stage: str | None = None) -> tuple[float, float]:
    """(worst rise above the stage-start baseline, final change) of a domain's held-out loss."""
    p = probes(run_dir, stage)
    base = p[0][f"probe/{domain}/loss"]
    values = [r[f"probe/{domain}/loss"] for r in p]
    return max(values) - base, values[-1] - base


def mean_sd(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")


def said(ok: bool) -> str:
    return "reproduced" if ok else "not reproduced"


# ------------------------------------------------------------------ 1. re-warming (Gupta et al.)


def rewarm_run(s: Suite, domain: str, prefix: str, w: str, scale: float) -> tuple[Path, list]:
    """One re-warmed continuation on ``domain``: its run dir and its table row."""
    lr = BASE_LR * scale
    d = s.run(f"{prefix}-w{w.replace('%', 'pct')}-lr{scale:g}x", f"recipes/paper/rewarm-{domain}.yaml",
              [*s.init, *s.tok, f"schedule.warmup={w}", f"schedule.max_lr={lr}", f"schedule.min_lr={lr / 10}"])
    en_rise, en_final = rise(d, "en")
    return d, [w, f"{scale:g}x ({lr:.0e})", en_rise, rise(d, domain)[0], final(d, domain), final(d, "en"), en_final]


def rewarm_claims(rows: list[list], b: Budget) -> dict:
    """The German sweep against the claims: means by max LR (lowest, highest) and by warmup."""
    def by_lr(col: int, s: float) -> float:
        return statistics.mean(r[col] for r in rows if r[1].startswith(f"{s:g}x"))

    lo, hi = min(b.lr_scales), max(b.lr_scales)
    by_w = {w: statistics.mean(r[4] for r in rows if r[0] == w) for w in b.warmups}
    forget, adapt = (by_lr(6, lo), by_lr(6, hi)), (by_lr(4, lo), by_lr(4, hi))
    return {"lo": lo, "hi": hi, "forget": forget, "adapt": adapt, "forgets_more": forget[1] > forget[0],
            "adapts_more": adapt[1] < adapt[0], "warmup_span": (min(by_w.values()), max(by_w.values()))}


def turn(vals: list[float], up: bool) -> int | None:
    """None when ``vals`` move one way (up or down) over every step of the sweep, else the index of
    their extreme (where the trend turns)."""
    if all((b - a > 0) == up for a, b in zip(vals, vals[1:], strict=False)):
        return None
    return (max if up else min)(range(len(vals)), key=vals.__getitem__)


def rewarm_section(s: Suite, rows: list[list], dirs: list[Path], code_rows: list[list], code_dirs: list[Path],
                   w: str) -> str:
    b = s.b
    c = rewarm_claims(rows, b)
    lo, hi, (span_lo, span_hi) = c["lo"], c["hi"], c["warmup_span"]
    verdict = [
        f"- Higher max LR forgets more: mean English forgetting {c['forget'][0]:+.3f} at {lo:g}x vs {c['forget'][1]:+.3f} at "
        f"{hi:g}x: {said(c['forgets_more'])}.",
        f"- Higher max LR adapts more: mean final German loss {c['adapt'][0]:.3f} at {lo:g}x vs {c['adapt'][1]:.3f} at "
        f"{hi:g}x: {said(c['adapts_more'])}.",
        f"- Warmup length matters little: final German loss spans {span_lo:.3f}..{span_hi:.3f} "
        f"across warmups {', '.join(b.warmups)} (spread {span_hi - span_lo:.3f}).",
    ]
    de_forget = {r[1]: r[6] for r in rows if r[0] == w}

    def trend(col: int, up: bool) -> str:
        best = turn([r[col] for r in code_rows], up)
        if best is None:
            return "reproduced"
        return f"not monotone: {'highest' if up else 'lowest'} at {b.lr_scales[best]:g}x, not reproduced past it"

    def along(col: int, fmt: str) -> str:
        return " / ".join(format(r[col], fmt) for r in code_rows) + " at " + "/".join(f"{x:g}x" for x in b.lr_scales)

    code_verdict = [
        f"- Higher max LR forgets more: English forgetting {along(6, '+.3f')}: {trend(6, True)}.",
        f"- Higher max LR adapts more: final code loss {along(4, '.3f')}: {trend(4, False)}.",
        "- Code vs German at the same warmup: English forgetting " + ", ".join(
            f"{r[6]:+.3f} vs {de_forget[r[1]]:+.3f} at {r[1].split()[0]}" for r in code_rows) + ".",
    ]
    return ("## 1. Re-warming (Gupta et al. 2023)\n\nPre-train on English, continue on German with the LR "
            "re-warmed from 0 and re-decayed (cosine to max/10). 'rise' = the highest held-out loss "
            "after the shift minus the stage-start baseline (dense probes), 'forgetting' = final minus "
            "baseline.\n\n" + table(
                ["warmup", "max LR", "en rise", "de rise", "de final", "en final", "en forgetting"], rows)
            + "\n\n" + "\n".join(verdict) + "\n\n" + s.plots("rewarm", dirs)
            + f"\n\n### Continuing on code instead of German\n\nThe same re-warm and re-decay on "
            f"Python code (`recipes/paper/rewarm-code.yaml`, warmup {w}), {b.cpt // K}K tokens.\n\n"
            + table(["warmup", "max LR", "en rise", "code rise", "code final", "en final",
                     "en forgetting"], code_rows)
            + "\n\n" + "\n".join(code_verdict) + "\n\n"
            + s.plots("rewarm-code", code_dirs))


def rewarming(s: Suite) -> str:
    b = s.b
    dirs, rows = map(list, zip(*[rewarm_run(s, "de", "rewarm", w, x) for w in b.warmups for x in b.lr_scales],
                               strict=True))
    # the same re-warm on the other new domain, code, at one warmup across the max LRs
    w = b.warmups[-1]
    code_dirs, code_rows = map(list, zip(*[rewarm_run(s, "code", "rewarm-code", w, x) for x in b.lr_scales],
                                         strict=True))
    return rewarm_section(s, rows, dirs, code_rows, code_dirs, w)


# ------------------------------------------------------------------ 2. replay vs retraining (Ibrahim et al.)

REPLAY = [("constant LR 2e-4", "recipes/paper/constant-lr-de.yaml"),
          ("re-warm + re-decay, 0% replay", "recipes/paper/replay-de-0.yaml"),
          ("re-warm + re-decay, 5% replay", "recipes/paper/replay-de-5.yaml"),
          ("re-warm + re-decay, 25% replay", "recipes/paper/replay-de-25.yaml")]
UNION = "retrain on en ∪ de"


def replay_finals(s: Suite) -> tuple[dict[str, list[tuple[float, float]]], list[Path]]:
    """Final (English, German) loss per strategy and seed, and the first seed's run dirs (for the plots)."""
    b = s.b
    per: dict[str, list[tuple[float, float]]] = {}
    dirs = []
    for seed in b.seeds:
        for label, recipe in REPLAY:
            d = s.run(f"{Path(recipe).stem}-s{seed}", recipe, [*s.init, *s.tok, f"run.seed={seed}"])
            per.setdefault(label, []).append((final(d, "en"), final(d, "de")))
            dirs += [d] if seed == b.seeds[0] else []
        d = s.run(f"union-retrain-s{seed}", "recipes/paper/union-retrain.yaml",
                  [f"train.tokens={b.pretrain + b.cpt}", f"run.seed={seed}",
                   f"data.mixture.en={b.pretrain / (b.pretrain + b.cpt):.6f}",
                   f"data.mixture.de={b.cpt / (b.pretrain + b.cpt):.6f}"])
        per.setdefault(UNION, []).append((final(d, "en"), final(d, "de")))
        dirs += [d] if seed == b.seeds[0] else []
    return per, dirs


def replay_claims(per: dict[str, list[tuple[float, float]]]) -> dict:
    """Replay against no replay and against retraining on the union (means over seeds)."""
    union = per[UNION]
    u_en, u_de = statistics.mean(x[0] for x in union), statistics.mean(x[1] for x in union)
    r25, r0 = per["re-warm + re-decay, 25% replay"], per["re-warm + re-decay, 0% replay"]
    en0, en25 = statistics.mean(x[0] for x in r0), statistics.mean(x[0] for x in r25)
    gap25 = statistics.mean((a + c) / 2 for a, c in r25) - (u_en + u_de) / 2
    return {"union": (u_en, u_de), "en": (en0, en25), "replay_helps": en25 < en0, "gap25": gap25,
            "matches": abs(gap25) <= 0.05}


def replay_section(s: Suite, per: dict[str, list[tuple[float, float]]], dirs: list[Path]) -> str:
    b, c = s.b, replay_claims(per)
    u_en, u_de = c["union"]

    def spread(xs):
        return f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else ""

    rows = []
    for label, vals in per.items():
        en, de = [v[0] for v in vals], [v[1] for v in vals]
        rows.append([label, f"{statistics.mean(en):.3f}{spread(en)}", f"{statistics.mean(de):.3f}{spread(de)}",
                     f"{statistics.mean(en) - u_en:+.3f}", f"{statistics.mean(de) - u_de:+.3f}",
                     f"{(statistics.mean(en) + statistics.mean(de)) / 2 - (u_en + u_de) / 2:+.3f}"])
    verdict = [
        f"- Replay reduces forgetting: English loss {c['en'][0]:.3f} (0%) vs {c['en'][1]:.3f} (25%): "
        f"{said(c['replay_helps'])}.",
        f"- Re-warm + re-decay + 25% replay vs retraining on the union, mean of both domains: {c['gap25']:+.3f} nats "
        f"({'matches retraining within 0.05' if c['matches'] else 'does not match retraining within 0.05'}).",
    ]
    if (s.docs / "replay_gap.md").is_file():
        verdict.append("- Why it does or does not match at this scale (stage length, re-warm LR, replay share, the "
                       "regime): [replay_gap.md](replay_gap.md), measured by `python scripts/replay_gap.py`.")
    return (f"## 2. Re-warm + re-decay + replay vs retraining (Ibrahim et al. 2024)\n\nFrom the English "
            f"model, {b.cpt // K}K tokens of German with each strategy; retraining = from scratch on "
            f"English ∪ German with the same total tokens ({(b.pretrain + b.cpt) // K}K). Seeds: "
            f"{', '.join(map(str, b.seeds))} (mean ± std over seeds). Final held-out loss; Δ = minus "
            f"retraining.\n\n" + table(["strategy", "en final", "de final", "Δ en", "Δ de", "Δ mean"], rows)
            + "\n\n" + "\n".join(verdict) + "\n\n" + s.plots("replay", dirs))


def replay(s: Suite) -> str:
    return replay_section(s, *replay_finals(s))


# ------------------------------------------------------------------ 3. infinite vs repeated cosine


def infinite_columns(s: Suite) -> tuple[dict[str, list[list[float]]], list[Path]]:
    """Per schedule and seed: the rises of English and code loss in the later stages and the final losses;
    and the first seed's run dirs."""
    b = s.b
    stage_tok = [f"stages.{i}.tokens={b.cpt}" for i in range(3)]
    cols: dict[str, list[list[float]]] = {}
    first: dict[str, Path] = {}
    for seed in s.long_seeds:
        inf = s.run(f"infinite-3stages-s{seed}", "recipes/paper/infinite-3stages.yaml",
                    [*stage_tok, f"schedule.warmup={b.cpt // 16}", f"schedule.cooldown.length={b.cpt * 7 // 16}",
                     f"schedule.anneal.length={b.cpt // 4}", f"run.seed={seed}"])
        cos = s.run(f"cosine-3stages-s{seed}", "recipes/paper/cosine-3stages.yaml",
                    [*stage_tok, *[f"stages.{i}.schedule.warmup={b.cpt // 16}" for i in range(3)], f"run.seed={seed}"])
        for label, d in [("infinite (one schedule, no re-warm)", inf), ("repeated cosine (re-warm each stage)", cos)]:
            first.setdefault(label, d)
            en_code, en_de, code_de = rise(d, "en", "code"), rise(d, "en", "de"), rise(d, "code", "de")
            cols.setdefault(label, []).append([en_code[0], en_code[1], en_de[1], code_de[0], code_de[1],
                                               final(d, "en"), final(d, "code"), final(d, "de")])
    return cols, list(first.values())


def infinite_section(s: Suite, cols: dict[str, list[list[float]]], dirs: list[Path]) -> str:
    rows = [[label] + [mean_sd([v[i] for v in vals]) for i in range(8)] for label, vals in cols.items()]
    means = {label: [statistics.mean(v[i] for v in vals) for i in range(8)] for label, vals in cols.items()}
    (li, lc) = list(means)
    n = len(s.long_seeds)
    per_seed = sum(a[3] < c[3] for a, c in zip(cols[li], cols[lc], strict=True))
    less = means[li][3] < means[lc][3]
    verdict = [f"- Forgetting of code during the German stage (worst): infinite {means[li][3]:+.3f} vs cosine "
               f"{means[lc][3]:+.3f} (mean of {n} seed(s); infinite lower in {per_seed} of {n}): "
               f"{'less with infinite (reproduced)' if less else 'not less with infinite (not reproduced)'}.",
               f"- English forgetting during the code stage (worst): infinite {means[li][0]:+.3f} vs cosine {means[lc][0]:+.3f}.",
               f"- Final losses (en, code, de): infinite {means[li][5]:.3f}, {means[li][6]:.3f}, {means[li][7]:.3f}; "
               f"cosine {means[lc][5]:.3f}, {means[lc][6]:.3f}, {means[lc][7]:.3f}."]
    return ("## 3. Infinite schedule vs repeated cosine, English → code → German\n\n"
            f"Three stages of {s.b.cpt // K}K tokens; seeds {', '.join(map(str, s.long_seeds))} (mean ± std). "
            "Columns: worst and final rise of English loss during the code stage, final English rise "
            "during the German stage, worst and final rise of code loss during the German stage, then "
            "final losses.\n\n" + table(
                ["schedule", "en worst (code st.)", "en final (code st.)", "en final (de st.)",
                 "code worst (de st.)", "code final (de st.)", "en", "code", "de"], rows)
            + "\n\n" + "\n".join(verdict) + "\n\n" + s.plots("infinite", dirs))


def infinite(s: Suite) -> str:
    return infinite_section(s, *infinite_columns(s))


# ------------------------------------------------------------------ 4. WSD branches vs cosine


def wsd_pairs(s: Suite) -> tuple[dict[str, list[tuple[float, float]]], list[Path]]:
    """Final English loss of each WSD decay branch and of the cosine run of the same tokens, per budget
    ("tokens|branch") and seed; and the first seed's run dirs."""
    b = s.b
    steps = b.wsd_main // (8 * K)
    decay = b.wsd_main // 10 // (8 * K) * (8 * K)
    pairs: dict[str, list[tuple[float, float]]] = {}
    plot_dirs: list[Path] = []
    for seed in s.long_seeds:
        main_over = [f"train.tokens={b.wsd_main}", f"checkpoint.every={b.wsd_main // 4}", "checkpoint.keep_last=8",
                     f"run.seed={seed}"]
        main_run = s.run(f"wsd-en-s{seed}", "recipes/paper/wsd-en.yaml", main_over)
        plot_dirs += [main_run] if seed == b.seeds[0] else []
        for q in (1, 2, 3):
            at = steps * q // 4
            branch = s.run.branch("recipes/paper/wsd-en.yaml",
                                  [*main_over, f"run.name={main_run.name}", f"run.output_dir={main_run}"],
                                  main_run / "checkpoints" / f"step-{at:08d}", decay)
            total = at * 8 * K + decay
            c = s.run(f"cosine-en-{total // K}K-s{seed}", "recipes/paper/pretrain-en.yaml",
                      [f"train.tokens={total}", f"run.seed={seed}"])
            plot_dirs += [branch, c] if seed == b.seeds[0] else []
            pairs.setdefault(f"{total // K}K|step {at} + {decay // K}K decay", []).append(
                (final(branch, "en"), final(c, "en")))
    return pairs, plot_dirs


def wsd_section(s: Suite, pairs: dict[str, list[tuple[float, float]]], dirs: list[Path]) -> str:
    rows = []
    for key, vals in pairs.items():
        tokens, branch = key.split("|")
        w, c = [v[0] for v in vals], [v[1] for v in vals]
        d = [x - y for x, y in vals]
        rows.append([tokens, branch, mean_sd(w), mean_sd(c), mean_sd(d), f"{sum(x < 0 for x in d)} of {len(d)}"])
    wins = sum(statistics.mean(x - y for x, y in vals) < 0 for vals in pairs.values())
    return ("## 4. WSD decay branches vs cosine at equal tokens\n\nOne WSD run on English "
            f"({s.b.wsd_main // K}K tokens) per seed, three branches decaying 10% of it (1-sqrt) from "
            "stable-phase checkpoints at 25/50/75%, each against a cosine run of the same total tokens. "
            f"Seeds {', '.join(map(str, s.long_seeds))} (mean ± std).\n\n"
            + table(["tokens", "branch", "WSD branch en", "cosine en", "WSD − cosine", "WSD lower in"], rows)
            + f"\n\n- WSD branch below cosine on average in {wins} of 3 budgets (MiniCPM: WSD matches or "
            f"beats cosine): {said(wins >= 2)}.\n\n"
            + s.plots("wsd", dirs))


def wsd(s: Suite) -> str:
    return wsd_section(s, *wsd_pairs(s))


# ------------------------------------------------------------------ 5. stability gap


def stability_gap(s: Suite) -> str:
    """The runs of experiment 2: the worst English loss after the shift against the final one."""
    rows, gaps = [], 0
    for label, stem in [("re-warm, 0% replay", "replay-de-0"), ("re-warm, 25% replay", "replay-de-25"),
                        ("constant LR", "constant-lr-de")]:
        worst, at, last = [], [], []
        for seed in s.b.seeds:
            p = probes(s.run.out / f"{stem}-s{seed}")
            base = p[0]["probe/en/loss"]
            top = max(p, key=lambda r: r["probe/en/loss"])
            worst.append(top["probe/en/loss"] - base)
            at.append(top["tokens"] // K)
            last.append(p[-1]["probe/en/loss"] - base)
        gaps += sum(w > f + 1e-3 for w, f in zip(worst, last, strict=True))
        rows.append([label, mean_sd(worst), "/".join(map(str, at)), mean_sd(last), len(p)])
    return ("## 5. The stability gap: worst-case vs final forgetting\n\nEnglish held-out loss after the "
            "shift to German (the runs of experiment 2), probed every 16K tokens for the first 128K, then "
            "every 128K. The worst point is what end-of-stage evaluation hides. Seeds "
            f"{', '.join(map(str, s.b.seeds))} (mean ± std; 'at' per seed).\n\n"
            + table(["run", "worst forgetting", "at (K tokens)", "final forgetting", "probes"], rows)
            + f"\n\n- Worst above final (a gap that recovers) in {gaps} of {len(rows) * len(s.b.seeds)} runs.\n")


# ------------------------------------------------------------------ 6. mitigations beyond replay

STEP = 8 * K  # tokens per step of recipes/paper/
L2_LR_COEFF = [1e-3, 1e-2, 1e-1]  # lr * l2_init at the stage's max LR (the pull per step toward the start)
TOL = 0.01  # nats: a difference from "none" smaller than this is no change (one seed's noise is larger)
EMA_START_SHARE = 0.05  # the EMA decay is set so that the start weights keep this share at the stage end
MIT_BASE = "recipes/paper/replay-de-0.yaml"  # re-warm + re-decay on German, no replay: experiment 2's "0%"


def bottom_half() -> tuple[str, int]:
    """The pattern of the bottom half of the paper model's layers (its preset), and the layer count."""
    from cpt.model import PRESETS
    from cpt.recipe import load_recipe

    n = PRESETS[load_recipe(ROOT / "recipes/paper/pretrain-en.yaml").model.preset]["num_hidden_layers"]
    return "layers\\.(" + "|".join(str(i) for i in range(n // 2)) + ")\\.", n


@dataclass
class Mitigation:
    label: str
    stem: str                       # run name without the seed
    recipe: str
    overrides: list[str]
    prefix: str = "probe"           # probe_ema: the row reads the EMA weights' probes
    candidate: bool = True          # may be picked as the best mitigation (not the replay rows)


def ema_decay(tokens: int) -> float:
    """The EMA decay (updated every step) whose start weights keep EMA_START_SHARE after ``tokens``."""
    return round(EMA_START_SHARE ** (STEP / tokens), 3)


def mitigations(tokens: int) -> list[Mitigation]:
    half, n = bottom_half()
    rows = [Mitigation("none (re-warm + re-decay, 0% replay)", "replay-de-0", MIT_BASE, [], candidate=False),
            Mitigation("replay 5%", "replay-de-5", "recipes/paper/replay-de-5.yaml", [], candidate=False),
            Mitigation("replay 25%", "replay-de-25", "recipes/paper/replay-de-25.yaml", [], candidate=False)]
    for x in L2_LR_COEFF:
        c = x / BASE_LR
        rows.append(Mitigation(f"L2-init {c:g} (lr·c = {x:.0e})", f"mit-l2-{c:g}", MIT_BASE, [f"mitigate.l2_init={c:g}"]))
    decay = ema_decay(tokens)
    ema = f"mitigate.ema={{decay: {decay}, every: 1}}"
    rows.append(Mitigation(f"EMA {decay:g} (EMA weights)", "mit-ema", MIT_BASE, [ema], prefix="probe_ema"))
    rows.append(Mitigation(f"freeze layers {' '.join(map(str, range(n // 2)))} of {n}", "mit-freeze", MIT_BASE,
                           [f"mitigate.freeze=['{half}']"]))
    rows.append(Mitigation(f"layer-wise LR (embeddings 0.1x, layers {' '.join(map(str, range(n // 2)))} 0.5x)",
                           "mit-lrmult", MIT_BASE, [f"mitigate.lr_multipliers={{'embed_tokens': 0.1, '{half}': 0.5}}"]))
    return rows


def en_de(run_dir: Path, prefix: str) -> list[float]:
    """[final English loss, worst English forgetting (max English loss of the stage minus its start, the
    start counting), final English forgetting, final German loss] of a one-stage CPT run. The baseline is
    the stage-start probe (raw weights; an EMA starts from them)."""
    p = probes(run_dir)
    base = p[0]["probe/en/loss"]
    rs = [r for r in p[1:] if f"{prefix}/en/loss" in r]
    en = [r[f"{prefix}/en/loss"] for r in rs]
    return [en[-1], max([base, *en]) - base, en[-1] - base, rs[-1][f"{prefix}/de/loss"]]


def mitigate_cols(s: Suite) -> tuple[dict[str, list[list[float]]], dict[str, str], list[Path], dict]:
    """Per row and seed: en_de(); the rows' overrides; the first seed's run dirs; the best mitigation."""
    per: dict[str, list[list[float]]] = {}
    how: dict[str, str] = {}
    dirs: list[Path] = []
    tokens = s.b.mitigate or s.b.cpt
    rows = mitigations(tokens)
    tag = "" if tokens == s.b.cpt else f"-{tokens // K}K"  # experiment 2's runs at its budget, else their own

    def go(m: Mitigation) -> None:
        how[m.label] = " ".join(m.overrides) or Path(m.recipe).stem
        for seed in s.b.seeds:
            d = s.run(f"{m.stem}{tag}-s{seed}", m.recipe,
                      [*s.init, f"train.tokens={tokens}", f"run.seed={seed}", *m.overrides])
            per.setdefault(m.label, []).append(en_de(d, m.prefix))
            dirs.extend([d] if seed == s.b.seeds[0] else [])

    for m in rows:
        go(m)
    # the best mitigation: lowest mean of final English and German loss (both domains weigh the same)
    best = min((m for m in rows if m.candidate),
               key=lambda m: statistics.mean((v[0] + v[3]) / 2 for v in per[m.label]))
    combo = Mitigation(f"{best.label} + replay 25%", f"{best.stem}-replay25", "recipes/paper/replay-de-25.yaml",
                       best.overrides, best.prefix, candidate=False)
    go(combo)
    # a check: the EMA run's raw weights train as "none" does (the average only watches)
    ema_raw = [en_de(s.run.out / f"mit-ema{tag}-s{seed}", "probe")[0] for seed in s.b.seeds]
    return per, how, dirs, {"best": best.label, "combo": combo.label, "ema_raw_en": ema_raw, "tokens": tokens}


def mitigate_section(s: Suite, per: dict[str, list[list[float]]], how: dict[str, str], dirs: list[Path],
                     info: dict) -> str:
    mean = {k: [statistics.mean(v[i] for v in vals) for i in range(4)] for k, vals in per.items()}
    none_label = next(iter(per))
    n = mean[none_label]
    rows = [[k, *[mean_sd([v[i] for v in vals]) for i in range(4)], f"{mean[k][0] - n[0]:+.3f}",
             f"{mean[k][1] - n[1]:+.3f}", f"{mean[k][3] - n[3]:+.3f}"] for k, vals in per.items()]
    verdict = []
    for k, m in mean.items():
        if k == none_label:
            continue
        final_less, worst_less = m[0] < n[0] - TOL, m[1] < n[1] - TOL
        what = ("reduces final and worst-case forgetting" if final_less and worst_less else
                "reduces final forgetting only" if final_less else
                "reduces worst-case forgetting only" if worst_less else "reduces neither")
        de = m[3] - n[3]
        verdict.append(f"- {k}: final English {m[0] - n[0]:+.3f}, worst forgetting {m[1] - n[1]:+.3f} vs none: "
                       f"{what}; German {de:+.3f} ({'a cost in adaptation' if de > TOL else 'no German cost'}).")
    helped = [k for k, m in mean.items() if k != none_label and m[0] < n[0] - TOL and m[1] < n[1] - TOL]
    best, combo = info["best"], info["combo"]
    r25 = mean["replay 25%"]
    verdict += [
        f"- Reduce both final and worst-case forgetting vs none by more than {TOL}: {len(helped)} of {len(mean) - 1} rows"
        + (f" ({'; '.join(helped)})." if helped else "."),
        f"- Best mitigation beyond replay (lowest mean of final English and German loss): {best}, "
        f"{(mean[best][0] + mean[best][3]) / 2:.3f} vs none {(n[0] + n[3]) / 2:.3f}.",
        f"- {combo} vs replay 25% alone: final English {mean[combo][0] - r25[0]:+.3f}, worst forgetting "
        f"{mean[combo][1] - r25[1]:+.3f}, German {mean[combo][3] - r25[3]:+.3f}: "
        + ("adds to replay." if mean[combo][0] + mean[combo][3] < r25[0] + r25[3] else "does not add to replay "
           "(mean of both domains not lower)."),
        f"- Check: the EMA run's raw weights end at English {statistics.mean(info['ema_raw_en']):.3f} vs none's "
        f"{n[0]:.3f}: " + ("the same run, the average only watches." if abs(statistics.mean(info["ema_raw_en"]) - n[0])
                            < 1e-3 else "not the same numbers (the EMA run's training differs from none's)."),
    ]
    b = s.b
    setting = "\n".join(f"- {k}: `{v}`" for k, v in how.items())
    _, layers = bottom_half()
    return ("## 6. Mitigations beyond replay, English → German\n\nFrom the English model, "
            f"{info['tokens'] // K}K tokens of German, re-warmed to {BASE_LR:g} (1% warmup) and re-decayed (cosine) "
            "as experiment 2's 0% replay run (`recipes/paper/replay-de-0.yaml`), one mitigation "
            f"(`mitigate.*`, cpt/mitigate/) per row; the none / replay rows are experiment 2's recipes"
            + (" and runs" if info["tokens"] == b.cpt else f" at this stage's {info['tokens'] // K}K tokens")
            + ". Seeds "
            f"{', '.join(map(str, b.seeds))} (mean ± std). 'en worst' = the highest English loss of the "
            "stage minus its start (probed every 16K tokens for the first 128K, then every 128K), 'en "
            f"forgetting' = final minus start; Δ = minus none; a verdict counts a change only beyond {TOL} nats. The EMA row reads the EMA weights' probes "
            f"(probe_ema/, updated every step with decay {ema_decay(info['tokens']):g}, from the start weights, which "
            f"keep {EMA_START_SHARE:.0%} of it at the stage end). L2-init "
            f"pulls toward the stage's start weights, coefficient c with lr·c = "
            f"{'/'.join(f'{x:.0e}' for x in L2_LR_COEFF)} at the max LR. The model has {layers} layers: "
            "freezing the bottom half leaves the embeddings, the top layer, the final norm and the (untied) LM "
            "head trained. The best mitigation (lowest mean of both final losses) is rerun with 25% replay.\n\n"
            + table(["mitigation", "en final", "en worst", "en forgetting", "de final", "Δ en final",
                     "Δ en worst", "Δ de final"], rows)
            + "\n\n" + "\n".join(verdict) + "\n\nOverrides of each row:\n\n" + setting + "\n\n"
            + s.plots("mitigate", dirs))


def mitigate(s: Suite) -> str:
    return mitigate_section(s, *mitigate_cols(s))


# ------------------------------------------------------------------ 7. merging instead of decay (WSM)

DECAY = 0.1  # WSD's decay, of each run's tokens (wsd-en.yaml's 10%)


def merge_window(tokens: int, k_target: int) -> tuple[int, int]:
    """(checkpoint spacing, k): the spacing is the largest power-of-two number of steps that is at most a
    k_target-th of the window the WSD decay covers, k = how many checkpoints (the last at the end) fit in it."""
    window = int(tokens * DECAY)
    every = STEP
    while every * 2 <= window // k_target:
        every *= 2
    return every, max(2, window // every)


def probe_model(s: Suite, model: Path, out: Path, sets: list[str]) -> dict[str, float]:
    """`cpt probe` of a model dir (the same first 64 held-out sequences per set for every model); reused while
    newer than the model."""
    args = ["probe", str(model), "--sets", *[f"{d}=data/shared/prepared/{d}/validation" for d in sets],
            "--out", str(out)]
    s.run.commands.append("cpt " + " ".join(args))
    if not out.is_file() or out.stat().st_mtime < model.stat().st_mtime:
        cpt(args, log=out.with_suffix(".log"))
    return {d: v["loss"] for d, v in json.loads(out.read_text())["sets"].items()}


def merge_ckpts(s: Suite, run_dir: Path, k: int, weights: str) -> Path:
    """`cpt merge` of the run's last k checkpoints into RUN-merge-<weights>; redone when the run is newer."""
    dest = run_dir.with_name(f"{run_dir.name}-merge-{weights.replace(':', '-')}-k{k}")
    args = ["merge", str(run_dir), "--last", str(k), "--weights", weights, "--out", str(dest), "--overwrite"]
    s.run.commands.append("cpt " + " ".join(args))
    if not (dest / "merge.json").is_file() or dest.stat().st_mtime < (run_dir / "final").stat().st_mtime:
        cpt(args, log=dest.with_name(dest.name + ".log"))
    return dest


def wsm_part(s: Suite, name: str, wsd: tuple[str, list[str]], const: tuple[str, list[str]], tokens: int,
             k_target: int, sets: list[str]) -> tuple[dict[str, list[dict[str, float]]], list[Path], int, int]:
    """One comparison at ``tokens``: per row and seed the held-out loss per domain; first seed's runs; k, spacing."""
    every, k = merge_window(tokens, k_target)
    per: dict[str, list[dict[str, float]]] = {}
    dirs: list[Path] = []
    for seed in s.long_seeds:
        w = s.run(f"{name}-wsd-s{seed}", wsd[0], [*wsd[1], f"run.seed={seed}"])
        c = s.run(f"{name}-constant-s{seed}", const[0],
                  [*const[1], f"run.seed={seed}", f"checkpoint.every={every}", f"checkpoint.keep_last={k}"])
        dirs += [w, c] if seed == s.long_seeds[0] else []
        models = {f"WSD ({DECAY:.0%} 1-sqrt decay to {BASE_LR / 10:g})": w / "final",
                  "constant LR, last checkpoint": c / "final",
                  f"constant + WSM merge (1-sqrt) of last {k}": merge_ckpts(s, c, k, "wsm:1-sqrt"),
                  f"constant + WSM merge (cosine) of last {k}": merge_ckpts(s, c, k, "wsm:cosine"),
                  f"constant + uniform mean of last {k}": merge_ckpts(s, c, k, "uniform")}
        for label, m in models.items():
            out = s.run.out / "probes" / f"{m.parent.name if m.name == 'final' else m.name}.json"
            per.setdefault(label, []).append(probe_model(s, m, out, sets))
    return per, dirs, k, every


def wsm_table(per: dict[str, list[dict[str, float]]], sets: list[str]) -> tuple[str, dict[str, dict[str, float]]]:
    mean = {k: {d: statistics.mean(v[d] for v in vals) for d in sets} for k, vals in per.items()}
    ref = next(iter(mean))
    rows = [[k, *[mean_sd([v[d] for v in vals]) for d in sets], *[f"{mean[k][d] - mean[ref][d]:+.3f}" for d in sets]]
            for k, vals in per.items()]
    return table(["model", *sets, *[f"Δ {d} vs WSD" for d in sets]], rows), mean


def wsm_verdict(mean: dict[str, dict[str, float]], domain: str, where: str) -> str:
    ref, *rest = list(mean)
    wsm = next(k for k in rest if "WSM merge (1-sqrt)" in k)
    uni = next(k for k in rest if "uniform" in k)
    const = next(k for k in rest if "last checkpoint" in k)

    def word(d: float) -> str:
        return "matches it (within 0.02)" if abs(d) <= 0.02 else "beats it" if d < 0 else "falls short of it"

    d, du, dc = (mean[k][domain] - mean[ref][domain] for k in (wsm, uni, const))
    return (f"- {where}: WSM merge (1-sqrt) vs the WSD decay on {domain}: {d:+.3f} nats, {word(d)}; uniform "
            f"mean {du:+.3f} ({word(du)}); the constant run's last checkpoint {dc:+.3f}; merging recovers "
            f"{(dc - d) / dc:.0%} of the decay's gain over the constant run." if dc > 0 else
            f"- {where}: WSM merge (1-sqrt) vs the WSD decay on {domain}: {d:+.3f} nats, {word(d)}; uniform "
            f"mean {du:+.3f}; the constant run's last checkpoint {dc:+.3f} (the decay gained nothing here).")


def wsm(s: Suite) -> str:
    b = s.b
    p_tok = b.wsm_pretrain or b.pretrain
    pre, pre_dirs, kp, ep = wsm_part(
        s, f"wsm-en-{p_tok // K}K", ("recipes/paper/wsd-en.yaml", [f"train.tokens={p_tok}"]),
        ("recipes/paper/constant-en.yaml", [f"train.tokens={p_tok}"]), p_tok, b.wsm_k, ["en", "de"])
    stage, st_dirs, ks, es = wsm_part(
        s, f"wsm-de-{b.cpt // K}K", ("recipes/paper/wsd-de.yaml", [*s.init, *s.tok]),
        ("recipes/paper/constant-rewarm-de.yaml", [*s.init, *s.tok]), b.cpt, b.wsm_k, ["en", "de"])
    t_pre, m_pre = wsm_table(pre, ["en", "de"])
    t_st, m_st = wsm_table(stage, ["de", "en"])
    return ("## 7. Merging instead of decay: WSM (Tian et al. 2025) vs WSD\n\nWSD (warmup, stable at "
            f"{BASE_LR:g}, {DECAY:.0%} 1-sqrt decay to {BASE_LR / 10:g}) against a constant-LR run of the same "
            "warmup, max LR and tokens whose last k checkpoints are merged by `cpt merge` (WSM weights "
            "emulating a 1-sqrt or cosine decay to 0 over the span the checkpoints cover, or their uniform mean); "
            "every model probed by `cpt probe` on the first 64 held-out sequences per domain. Seeds "
            f"{', '.join(map(str, s.long_seeds))} (mean ± std); Δ = minus WSD.\n\n"
            f"### Pre-training on English, {p_tok // K}K tokens\n\n"
            + ("" if p_tok == b.pretrain else f"(Shorter than the suite's {b.pretrain // K}K pre-training, to fit "
               "quick mode.) ")
            + f"Checkpoints every {ep // K}K tokens; the last {kp} (at {(p_tok - (kp - 1) * ep) // K}K..{p_tok // K}K "
            f"tokens) lie in the last {int(p_tok * DECAY) // K}K, where WSD decays "
            f"(`recipes/paper/wsd-en.yaml` vs `recipes/paper/constant-en.yaml`).\n\n" + t_pre
            + f"\n\n### Continual pre-training English → German, {b.cpt // K}K tokens\n\nFrom the English model "
            f"(re-warm from 0 over 1%), checkpoints every {es // K}K tokens; the last {ks} (at "
            f"{(b.cpt - (ks - 1) * es) // K}K..{b.cpt // K}K tokens of the stage) lie in the last "
            f"{int(b.cpt * DECAY) // K}K, where WSD decays (`recipes/paper/wsd-de.yaml` vs "
            "`recipes/paper/constant-rewarm-de.yaml`).\n\n" + t_st + "\n\n"
            + wsm_verdict(m_pre, "en", "Pre-training") + "\n" + wsm_verdict(m_st, "de", "CPT stage")
            + "\n\n" + s.plots("wsm", pre_dirs + st_dirs))


# ------------------------------------------------------------------ 8. vocabulary extension for a new language

SHARED = Path(os.environ.get("CPT_SHARED_DATA", ROOT.parent / "shared" / "data"))  # ../shared/data beside the repo
VOCAB_ADD = 512  # German tokens appended to the 4096 of data/shared/tokenizer
VOCAB_SEEDS = [1234, 7, 42]  # cheap runs (one CPT stage): three seeds in either mode


def vocab_sets(s: Suite) -> dict[str, dict[str, Path]]:
    """An English-only tokenizer (as the tokenizer of an English model knows little German) and its German
    extension; per tokenizer (base, ext), German train / validation and English validation prepared with
    byte counts (bits per byte), and English train for the base's pre-training; under the runs folder, once."""
    out = s.run.out / "vocab"
    base_tok, ext_tok = out / "tokenizer-en", out / "tokenizer-en+de"
    de, en = SHARED / "de_libreoffice_help", SHARED / "en_kernel_docs"
    if not (base_tok / "tokenizer.json").is_file():
        cpt(["tokenizer", "train", str(en / "train.jsonl.gz"), "--out", str(base_tok), "--vocab-size", "4096"],
            log=out / "tokenizer.log")
    if not (ext_tok / "tokenizer.json").is_file():
        # the English probe text keeps its exact tokens (--keep), so forgetting compares like with like
        cpt(["tokenizer", "extend", str(base_tok), "--train", str(de / "train.jsonl.gz"), "--add", str(VOCAB_ADD),
             "--out", str(ext_tok), "--old", str(en / "validation.jsonl.gz"), "--keep", str(en / "validation.jsonl.gz")],
            log=out / "extend.log")
    sets: dict[str, dict[str, Path]] = {}
    for name, tok in (("base", base_tok), ("ext", ext_tok)):
        sets[name] = {"tok": tok}
        todo = [("de", de / "train.jsonl.gz"), ("de_val", de / "validation.jsonl.gz"),
                ("en_val", en / "validation.jsonl.gz")] + ([("en", en / "train.jsonl.gz")] if name == "base" else [])
        for key, src in todo:
            dest = out / name / key
            if not (dest / "manifest.json").is_file():
                cpt(["prepare", str(src), "--tokenizer", str(tok), "--out", str(dest), "--seq-len", "256",
                     "--num-proc", "2", "--overwrite"], log=out / f"prepare-{name}-{key}.log")
            sets[name][key] = dest
    return sets


def vocab_pretrain(s: Suite, base: dict[str, Path]) -> Path:
    """The English model of this experiment: experiment 2's pre-training recipe with the English-only tokenizer."""
    return s.run(f"vocab-pretrain-en-{s.b.pretrain // K}K", "recipes/paper/pretrain-en.yaml",
                 [f"train.tokens={s.b.pretrain}", f"model.tokenizer={base['tok']}", f"data.sources={{en: {base['en']}}}",
                  f"probes.sets={{en: {base['en_val']}, de: {base['de_val']}}}"])


def bytes_per_token(prepared: Path) -> float:
    """UTF-8 bytes per token over a prepared set's sequences (its manifest's per-token byte total)."""
    from cpt.data.source import TokenSource

    src = TokenSource(prepared)
    return src.bytes_total / (len(src) * src.seq_len)


def vocab_cols(s: Suite) -> tuple[dict[str, list[list[float]]], dict, list[Path]]:
    """Per arm and seed: [German bpb, English bpb at the start, final English forgetting (bpb), worst
    English forgetting (bpb), tokens trained, German bytes trained, wall s]."""
    sets = vocab_sets(s)
    init = [f"init_from.path={vocab_pretrain(s, sets['base'])}"]
    bpt = {arm: bytes_per_token(sets[arm]["de"]) for arm in sets}
    german_bytes = s.b.cpt * bpt["base"]  # what the base run reads; the extended run reads as many
    tokens = {"base": s.b.cpt, "ext": max(STEP, round(german_bytes / bpt["ext"] / STEP) * STEP)}
    per: dict[str, list[list[float]]] = {}
    dirs: list[Path] = []
    for arm in ("base", "ext"):
        d = sets[arm]
        over = [*init, f"train.tokens={tokens[arm]}", f"model.tokenizer={d['tok']}",
                f"data.sources={{de: {d['de']}}}", "data.mixture={de: 1.0}",
                f"probes.sets={{en: {d['en_val']}, de: {d['de_val']}}}"]
        if arm == "ext":
            over.append("model.extend_vocab={init: subword_mean}")
        for seed in VOCAB_SEEDS:
            name = f"vocab-{arm}-{s.b.cpt // K}K-s{seed}"
            run_dir = s.run(name, MIT_BASE, [*over, f"run.seed={seed}"])
            p = [r for r in metrics(run_dir) if "probe/en/bpb" in r]
            en = [r["probe/en/bpb"] for r in p]
            per.setdefault(arm, []).append([p[-1]["probe/de/bpb"], en[0], en[-1] - en[0], max(en) - en[0],
                                            tokens[arm], tokens[arm] * bpt[arm], s.run.wall.get(name, float("nan"))])
            dirs.extend([run_dir] if seed == VOCAB_SEEDS[0] else [])
    return per, {"bpt": bpt, "tokens": tokens}, dirs


def vocab_section(s: Suite, per: dict[str, list[list[float]]], info: dict, dirs: list[Path]) -> str:
    mean = {k: [statistics.mean(v[i] for v in vals) for i in range(7)] for k, vals in per.items()}
    b, e = mean["base"], mean["ext"]
    label = {"base": "English tokenizer (4096)", "ext": f"extended (+{VOCAB_ADD} German, subword_mean init)"}
    rows = [[label[k], f"{1 / info['bpt'][k]:.3f}", f"{int(m[4]):,}", f"{m[5] / 1e6:.2f} MB",
             *[mean_sd([v[i] for v in per[k]]) for i in range(4)], f"{m[6]:.0f}"]
            for k, m in mean.items()]
    de_gain = b[0] - e[0]
    verdict = [
        f"- Tokens per German byte: {1 / info['bpt']['base']:.3f} -> {1 / info['bpt']['ext']:.3f} "
        f"({info['bpt']['base'] / info['bpt']['ext'] - 1:+.1%}): the same German bytes in "
        f"{info['tokens']['ext'] / info['tokens']['base']:.1%} of the tokens and steps.",
        f"- German bits per byte after the same bytes: {b[0]:.3f} (base) vs {e[0]:.3f} (extended): "
        + ("the extended tokenizer wins by" if de_gain > 0.005 else "the base tokenizer wins by" if de_gain < -0.005
           else "no difference beyond 0.005:") + f" {abs(de_gain):.3f} bpb.",
        f"- English forgetting (bpb, final minus start): {b[2]:+.3f} (base) vs {e[2]:+.3f} (extended), final English "
        f"{b[1] + b[2]:.3f} vs {e[1] + e[2]:.3f} bpb; worst "
        f"{b[3]:+.3f} vs {e[3]:+.3f}. English starts at {b[1]:.3f} vs {e[1]:.3f} bpb: the English text has the "
        f"same tokens under both tokenizers (`--keep`), but the {VOCAB_ADD} new rows of the extended head take "
        "probability mass from every prediction until training pushes them down.",
        f"- Wall time: {e[6]:.0f} s vs {b[6]:.0f} s ({e[6] / b[6]:.2f}x; other jobs may have shared the cores).",
    ]
    criteria = (("German bpb", e[0] < b[0] - 0.005), ("final English bpb", e[1] + e[2] < b[1] + b[2] - 0.005),
                ("English forgetting", e[2] < b[2] - 0.005), ("tokens (compute) for the same bytes", e[4] < b[4]))
    wins = [what for what, better in criteria if better]
    verdict.append(f"- Verdict: the extended tokenizer wins on {len(wins)} of {len(criteria)} "
                   f"({', '.join(wins) or 'none'}; a difference counts beyond 0.005 bpb) at this scale.")
    return ("## 8. Vocabulary extension for a new language, English → German\n\n"
            "An English model with an English tokenizer, as users bring: a byte-level BPE of 4096 tokens trained on "
            f"the English text only, and the suite's pre-training recipe (`recipes/paper/pretrain-en.yaml`, "
            f"{s.b.pretrain // K}K tokens) with it. `cpt tokenizer extend` adds {VOCAB_ADD} tokens learned from the "
            "German training text (English validation text kept token for token, `--keep`); the "
            "extended run starts from the same English model with its embeddings and head resized "
            "(`model.extend_vocab: {init: subword_mean}`: a new row is the mean of the rows of the old tokens its "
            "text encodes to). Both runs are experiment 2's 0% replay recipe (`recipes/paper/replay-de-0.yaml`: "
            f"re-warm to {BASE_LR:g}, cosine re-decay) on German only, the base run for {b[4] // K:.0f}K tokens "
            "and the extended run for the same German bytes (its token budget rounded to whole 8K-token steps). "
            "Probes in bits per byte (comparable across the tokenizers) on the German and English validation "
            f"text, prepared with each tokenizer. Seeds {', '.join(map(str, VOCAB_SEEDS))} (mean ± std).\n\n"
            + table(["tokenizer", "tokens / German byte", "tokens trained", "German trained", "de bpb final",
                     "en bpb start", "en forgetting (bpb)", "en worst (bpb)", "wall s"], rows)
            + "\n\n" + "\n".join(verdict) + "\n\n" + s.plots("vocab", dirs, metric="bpb"))


def vocab(s: Suite) -> str:
    return vocab_section(s, *vocab_cols(s))


# ------------------------------------------------------------------ 9. self-distillation vs replay and L2-init

DISTILL_WEIGHTS = [1.0, 3.0, 10.0]  # beta of mitigate.distill (T = 1, all positions, full vocabulary)


def distill_rows(tokens: int) -> list[Mitigation]:
    """Experiment 6's none, replay 25% and two strongest L2-init rows (the same runs), then distillation at each
    weight."""
    keep = ["replay-de-0", "replay-de-25", *[f"mit-l2-{x / BASE_LR:g}" for x in L2_LR_COEFF[1:]]]
    rows = [m for m in mitigations(tokens) if m.stem in keep]
    return rows + [Mitigation(f"distill β = {w:g}", f"mit-distill-{w:g}", MIT_BASE,
                              [f"mitigate.distill={{weight: {w:g}}}"]) for w in DISTILL_WEIGHTS]


def step_seconds(run_dir: Path) -> float:
    """Training seconds per step (probes and checkpoints excluded): the run's last time/elapsed_s over its steps."""
    steps = [r for r in metrics(run_dir) if "train/loss" in r]
    return steps[-1]["time/elapsed_s"] / len(steps)


def distill(s: Suite) -> str:
    tokens = s.b.mitigate or s.b.cpt
    tag = "" if tokens == s.b.cpt else f"-{tokens // K}K"
    per: dict[str, list[list[float]]] = {}
    for seed in s.b.seeds:  # seed by seed: a cut-short invocation leaves whole seeds behind
        for m in distill_rows(tokens):
            d = s.run(f"{m.stem}{tag}-s{seed}", m.recipe, [*s.init, f"train.tokens={tokens}", f"run.seed={seed}",
                                                           *m.overrides])
            kl = [r["train/distill_kl"] for r in metrics(d) if "train/distill_kl" in r]
            per.setdefault(m.label, []).append([*en_de(d, m.prefix), step_seconds(d), kl[-1] if kl else 0.0])
    mean = {k: [statistics.mean(v[i] for v in vals) for i in range(6)] for k, vals in per.items()}
    none = next(iter(mean.values()))
    rows = [[k, *[mean_sd([v[i] for v in per[k]]) for i in range(4)], f"{m[0] - none[0]:+.3f}",
             f"{m[3] - none[3]:+.3f}", f"{m[4] / none[4]:.2f}x", f"{m[5]:.3f}" if m[5] else "-"] for k, m in mean.items()]
    l2 = [k for k in mean if k.startswith("L2-init")]
    both = {k: (m[0] + m[3]) / 2 for k, m in mean.items()}  # the mean of both final losses
    l2_best = min(l2, key=both.get)

    def beats(m: list[float], o: list[float]) -> bool:  # less English forgetting at no more German loss
        return m[0] < o[0] - TOL and m[3] < o[3] + TOL

    verdict = []
    for k, m in mean.items():
        if not k.startswith("distill"):
            continue
        vs = [(name, mean[name]) for name in ("replay 25%", l2_best)]
        verdict.append(f"- {k}: final English {m[0] - none[0]:+.3f} / German {m[3] - none[3]:+.3f} vs none; "
                       + "; ".join(f"{m[0] - o[0]:+.3f} / {m[3] - o[3]:+.3f} vs {name}: "
                                   + ("beats it" if beats(m, o) else "does not beat it") for name, o in vs)
                       + f"; {m[4] / none[4]:.2f}x none's seconds per step.")
    same_worst = [k for k in mean if k.startswith("distill") and abs(mean[k][1] - none[1]) < 1e-3]
    if same_worst:  # the worst point comes before the KL has anything to pull back
        verdict.append(f"- {', '.join(same_worst)}: the worst English rise is none's ({none[1]:.3f}) to 3 decimals: it "
                       "comes with the stage's first updates, while the student is still the teacher (the KL and "
                       "its gradient are 0 there), so distillation only pulls back afterwards.")
    best = min((k for k in mean if k.startswith("distill")), key=both.get)
    verdict.append(f"- The best distillation row by the mean of both final losses: {best} ({both[best]:.3f}), against "
                   f"none {both[next(iter(mean))]:.3f}, replay 25% {both['replay 25%']:.3f}, "
                   + ", ".join(f"{k} {both[k]:.3f}" for k in l2) + ".")
    b = s.b
    return ("## 9. Self-distillation from the stage's start weights, English → German\n\nFrom the English model, "
            f"{tokens // K}K tokens of German as in experiment 6 (`{MIT_BASE}`: re-warm + re-decay, no replay), "
            "with `mitigate.distill` (cpt/mitigate/distill.py): the loss is CE + β·T²·KL(teacher ‖ student), the "
            "teacher a frozen copy of the stage's start weights, T = 1, every position, the full vocabulary. It "
            "needs no English data; replay 25% does. The none, replay and L2-init rows are experiment 6's recipes and "
            "run names (one set of runs where both experiments ran in the same runs folder). "
            f"Seeds {', '.join(map(str, b.seeds))} (mean ± std); columns as in experiment 6; 's/step' = training "
            "seconds per step (probes and checkpoints excluded) over none's, on a shared 2-core machine (other "
            "jobs ran beside these runs, so these ratios are rough; scripts/bench_distill.py measures the cost "
            "interleaved); 'KL end' = train/distill_kl at the last step (T²-scaled). A row 'beats' another when its "
            f"final English loss is lower by more than {TOL} and its final German loss not higher by more than {TOL}."
            + (" One seed: no spread is measured here; experiment 6's seed std (about 0.01-0.1 nats) is the scale "
               "below which a difference says nothing." if len(b.seeds) == 1 else "") + "\n\n"
            + table(["mitigation", "en final", "en worst", "en forgetting", "de final", "Δ en final", "Δ de final",
                     "s/step", "KL end"], rows)
            + "\n\n" + "\n".join(verdict) + "\n\n"
            + s.plots("distill", [s.run.out / f"{m.stem}{tag}-s{b.seeds[0]}" for m in distill_rows(tokens)]))


# ------------------------------------------------------------------ 10. merging back toward the start (WiSE-FT)

BACK_WEIGHTS = [0.1, 0.25, 0.5, 0.75, 0.9]  # the CPT model's weight a: (1 - a) * start + a * final


def merge_toward(s: Suite, run_dir: Path, start: Path) -> list[dict]:
    """`cpt merge RUN/final --toward START --weight ... --sets en de`: one model per weight, each probed by the
    merge itself (with the start and the final model: `cpt probe`, the first 64 held-out sequences); its
    probe.json rows, redone when the run is newer."""
    dest = run_dir.with_name(f"{run_dir.name}-toward")
    args = ["merge", str(run_dir / "final"), "--toward", str(start), "--weight", ",".join(map(str, BACK_WEIGHTS)),
            "--out", str(dest), "--sets", *[f"{d}=data/shared/prepared/{d}/validation" for d in ("en", "de")],
            "--overwrite"]
    s.run.commands.append("cpt " + " ".join(args))
    result = dest / "probe.json"
    if not result.is_file() or result.stat().st_mtime < (run_dir / "final").stat().st_mtime:
        cpt(args, log=dest.with_name(dest.name + ".log"))
    return json.loads(result.read_text())["models"]


def back_cols(s: Suite) -> tuple[dict[str, list[tuple[float, float]]], int, list[str]]:
    """Per row and seed (English, German) held-out loss: the start, each weight, the CPT run's final, and
    experiment 6's replay 25% and L2-init (lr·c = 1e-1) runs where they were trained (not trained here)."""
    from _runs import Job, finished

    tokens = s.b.mitigate or s.b.cpt
    tag = "" if tokens == s.b.cpt else f"-{tokens // K}K"  # experiment 6's runs
    start = Path(s.init[0].split("=", 1)[1]) / "final"
    per: dict[str, list[tuple[float, float]]] = {}
    missing: list[str] = []
    for seed in s.b.seeds:
        d = s.run(f"replay-de-0{tag}-s{seed}", MIT_BASE, [*s.init, f"train.tokens={tokens}", f"run.seed={seed}"])
        for m in merge_toward(s, d, start):
            label = {"0 (base)": "a = 0: the English model (start)", "1 (final)": "a = 1: the CPT run's final"}.get(
                m["label"], f"a = {m['label']}")
            per.setdefault(label, []).append((m["sets"]["en"]["loss"], m["sets"]["de"]["loss"]))
        for label, stem, recipe, over in [
                ("replay 25% (experiment 6)", "replay-de-25", "recipes/paper/replay-de-25.yaml", []),
                (f"L2-init {1e-1 / BASE_LR:g} (lr·c = 1e-01, experiment 6)", f"mit-l2-{1e-1 / BASE_LR:g}", MIT_BASE,
                 [f"mitigate.l2_init={1e-1 / BASE_LR:g}"])]:
            job = Job(recipe, (*s.init, f"train.tokens={tokens}", f"run.seed={seed}", *over,
                               f"run.name={stem}{tag}-s{seed}", f"run.output_dir={s.run.out / f'{stem}{tag}-s{seed}'}"))
            r_dir, r_tokens, per_step = job.plan()
            if not finished(r_dir, r_tokens, per_step):
                missing.append(r_dir.name)
                continue
            out = s.run.out / "probes" / f"{r_dir.name}.json"
            v = probe_model(s, r_dir / "final", out, ["en", "de"])
            per.setdefault(label, []).append((v["en"], v["de"]))
    order = [k for k in per if k.startswith("a = 0:")] + sorted(
        (k for k in per if k.startswith("a = 0.")), key=lambda k: float(k.split()[2])) + [
        k for k in per if k.startswith("a = 1")] + [k for k in per if not k.startswith("a = ")]
    return {k: per[k] for k in order}, tokens, missing


def back_verdict(mean: dict[str, tuple[float, float]], old: str = "English", new: str = "German") -> list[str]:
    """Verdicts on a merge-back frontier: ``mean`` maps rows (the start "a = 0: ...", weights "a = 0.x", the
    final "a = 1: ...", then other models to compare) to (old-domain, new-domain) held-out loss."""
    keys = list(mean)
    start, final = mean[keys[0]], mean[next(k for k in keys if k.startswith("a = 1"))]
    weights = [k for k in keys if k.startswith("a = 0.")]
    forgot, learned = final[0] - start[0], start[1] - final[1]
    out = []
    for k in weights:
        en, de = mean[k]
        out.append(f"- {k}: recovers {(final[0] - en) / forgot:.0%} of the {old} forgetting ({en - final[0]:+.3f} "
                   f"vs final) and keeps {(start[1] - de) / learned:.0%} of the {new} gain ({de - final[1]:+.3f}).")
    curve = keys[: len(weights) + 2]  # start, the weights, final: the frontier
    falls = all(mean[a][1] >= mean[b][1] for a, b in zip(curve, curve[1:], strict=False))
    low = min(curve, key=lambda k: mean[k][0])
    out.append(f"- {new} loss falls with a at every step: {'yes' if falls else 'no'}. {old} loss is lowest at {low} "
               f"({mean[low][0]:.3f}; start {start[0]:.3f}, final {final[0]:.3f})"
               + (", below both ends: a little of the CPT run helps the old domain too." if low not in
                  (curve[0], curve[-1]) and mean[low][0] < start[0] else "."))
    best = min(curve, key=lambda k: sum(mean[k]) / 2)
    out.append(f"- Lowest mean of both domains on the frontier: {best}, {sum(mean[best]) / 2:.3f} (final "
               f"{sum(final) / 2:.3f}, start {sum(start) / 2:.3f}).")
    for ref in [k for k in keys if not k.startswith("a = ")]:
        en_r, de_r = mean[ref]
        dominating = [k for k in weights if mean[k][0] <= en_r and mean[k][1] <= de_r]
        close = min(weights, key=lambda k: abs(mean[k][1] - de_r))  # the weight nearest in German loss
        out.append(f"- vs {ref} ({old} {en_r:.3f}, {new} {de_r:.3f}): "
                   + (f"beaten on both domains by {', '.join(dominating)}." if dominating else
                      "no weight beats it on both domains.")
                   + f" At about its {new} loss ({close}: {mean[close][1]:.3f}) the merge's {old} loss is "
                   f"{mean[close][0]:.3f} ({mean[close][0] - en_r:+.3f}).")
    return out


def merge_back(s: Suite) -> str:
    per, tokens, missing = back_cols(s)
    mean = {k: (statistics.mean(v[0] for v in vals), statistics.mean(v[1] for v in vals)) for k, vals in per.items()}
    final = mean[next(k for k in mean if k.startswith("a = 1"))]
    rows = [[k, mean_sd([v[0] for v in vals]), mean_sd([v[1] for v in vals]), f"{mean[k][0] - final[0]:+.3f}",
             f"{mean[k][1] - final[1]:+.3f}", f"{sum(mean[k]) / 2:.3f}"] for k, vals in per.items()]
    return ("## 10. Merging back toward the start (WiSE-FT interpolation), English → German\n\n"
            f"Experiment 6's run without mitigation (from the English model, {tokens // K}K tokens of German, "
            f"re-warmed to {BASE_LR:g} and re-decayed, `recipes/paper/replay-de-0.yaml`), its final weights "
            "interpolated toward the English model it started from: `cpt merge FINAL --toward START --weight "
            f"{','.join(map(str, BACK_WEIGHTS))}` writes (1 - a) · start + a · final for each a (a weighs the CPT "
            "model, as WiSE-FT's alpha), and probes every model on the first 64 held-out sequences per domain "
            "(`cpt probe`). One run per seed, many merges: no extra training. Replay 25% and L2-init are "
            "experiment 6's runs of the same stage, probed the same way. Seeds "
            f"{', '.join(map(str, s.b.seeds))} (mean ± std); Δ = minus the CPT run's final.\n\n"
            + table(["model", "en", "de", "Δ en", "Δ de", "mean of both"], rows) + "\n\n"
            + "\n".join(back_verdict(mean))
            + (f"\n\nNot compared (experiment 6 has not trained them in this runs folder): {', '.join(missing)}."
               if missing else ""))


# ------------------------------------------------------------------ 11. long-context extension, 128 -> 512

LONG = ROOT / "data" / "shared" / "long"  # the paths recipes/long_context/ name
LONG_KINDS = {"none": "RoPE as it was", "theta": "rope_theta 10000 -> 44000", "linear": "linear x4 (PI)",
              "yarn": "YaRN x4"}
LONG_SEEDS = [1234, 7, 42]
# Sized for a shared 2-core machine: a 0.34M-parameter model (hidden 64), 128K tokens at 128, stages of 32K
# tokens at 512 (16 steps of 4 rows); the recipes' own sizes (hidden 128, 512K + 96K) are the next step up.
LONG_MODEL = "{max_position_embeddings: 128, hidden_size: 64, intermediate_size: 128}"
LONG_PRETRAIN, LONG_STAGE = 128 * K, 32 * K
LONG_BUCKETS = ("0-128", "128-256", "256-512")


def long_sets() -> None:
    """English kernel docs for recipes/long_context/: at 128 tokens (pre-training, the short probe), documents of
    384 tokens or more whole at 512 (the long data and probe) and the corpus as it is at 512 (the replay)."""
    en = SHARED / "en_kernel_docs"
    todo = [("en-128/train", "train", 128, ["--max-documents", "1500"]), ("en-128/validation", "validation", 128, []),
            ("long-512/train", "train", 512, ["--max-documents", "1500", "--min-doc-tokens", "384", "--whole-documents"]),
            ("long-512/validation", "validation", 512, ["--min-doc-tokens", "384", "--whole-documents"]),
            ("short-512/train", "train", 512, ["--max-documents", "1500"])]
    for dest, split, seq, extra in todo:
        if not (LONG / dest / "manifest.json").is_file():
            cpt(["prepare", str(en / f"{split}.jsonl.gz"), "--tokenizer", str(ROOT / "data" / "shared" / "tokenizer"),
                 "--out", str(LONG / dest), "--seq-len", str(seq), "--overwrite", *extra],
                log=LONG / f"prepare-{dest.replace('/', '-')}.log")


def long_point(record: dict) -> list[float]:
    """[long loss per position bucket ..., short-context loss] of a probe record."""
    return [record[f"probe/long/loss@{b}"] for b in LONG_BUCKETS] + [record["probe/short/loss"]]


def long_cols(s: Suite) -> tuple[dict[tuple[str, int], list[list[float]]], float, list[Path], dict]:
    """Per (kind, replay %) and seed: long_point at the stage's start and end (8 numbers) and the wall s; the
    pre-trained model's short loss; the first seed's run dirs; the long data's manifest lengths."""
    long_sets()
    tokens = LONG_STAGE
    pre = s.run(f"long-pretrain-128-h64-{LONG_PRETRAIN // K}K", "recipes/long_context/pretrain-128.yaml",
                [f"train.tokens={LONG_PRETRAIN}", f"model.config={LONG_MODEL}", "train.micro_batch_size=32"])
    short0 = [r for r in metrics(pre) if "probe/short/loss" in r][-1]["probe/short/loss"]
    per: dict[tuple[str, int], list[list[float]]] = {}
    dirs: list[Path] = []
    for kind in LONG_KINDS:
        for replay in (0, 25):
            mix = "{long: 1.0}" if replay == 0 else "{long: 0.75, short: 0.25}"
            for seed in LONG_SEEDS:
                name = f"long-{kind}-r{replay}-{tokens // K}K-s{seed}"
                run_dir = s.run(name, f"recipes/long_context/extend-{kind}.yaml",
                                [f"init_from.path={pre}", f"train.tokens={tokens}", f"data.mixture={mix}",
                                 f"run.seed={seed}", f"probes.every={tokens}", "probes.max_sequences=16",
                                 "train.global_batch_tokens=2K", "train.micro_batch_size=4"])
                p = [r for r in metrics(run_dir) if "probe/long/loss" in r]
                per.setdefault((kind, replay), []).append(
                    long_point(p[0]) + long_point(p[-1]) + [s.run.wall.get(name, float("nan"))])
                dirs.extend([run_dir] if seed == LONG_SEEDS[0] and kind in ("none", "yarn") else [])
    lengths = json.loads((LONG / "long-512" / "train" / "manifest.json").read_text())["lengths"]
    return per, short0, dirs, lengths


def spread(per: dict, a: tuple, b: tuple, i: int) -> str:
    """Whether the means of column ``i`` of rows ``a`` and ``b`` differ by more than the larger seed std."""
    va, vb = [v[i] for v in per[a]], [v[i] for v in per[b]]
    sd = max(statistics.pstdev(va), statistics.pstdev(vb))
    return "beyond the seeds' spread" if abs(statistics.mean(va) - statistics.mean(vb)) > sd else "within the seeds' spread"


def long_section(s: Suite, per: dict, short0: float, dirs: list[Path], lengths: dict) -> str:
    mean = {k: [statistics.mean(v[i] for v in vals) for i in range(9)] for k, vals in per.items()}
    rows = [[LONG_KINDS[k], f"{r}%", *[mean_sd([v[i] for v in per[(k, r)]]) for i in (2, 4, 5, 6, 7)],
             f"{mean[(k, r)][7] - short0:+.3f}", f"{mean[(k, r)][8]:.0f}"] for k, r in per]
    base = mean[("none", 0)]
    best = min(per, key=lambda k: mean[k][6])
    verdict = [
        f"- The unextended model (pre-trained at 128, plain RoPE, measured at the start of the `none` stage): "
        f"loss {base[0]:.3f} / {base[1]:.3f} / {base[2]:.3f} at positions 0-128 / 128-256 / 256-512: "
        + ("it does not extrapolate past its context." if base[2] > base[0] + 0.1 else
           "no worse past its context than inside it."),
    ]
    if max(base[:3]) - min(base[:3]) < 0.1:
        verdict.append(f"- Read this with care: the pre-trained model's loss ({short0:.2f} at 128 tokens) is nearly flat "
                       "across positions (within 0.1 nats), so it uses little of any context and the RoPE kinds have "
                       "little to differ on. This budget is what a shared 2-core machine allowed; the recipes' own "
                       "sizes (hidden 128, 512K tokens at 128, 96K at 512) are the next step, on a GPU.")
    for k in LONG_KINDS:
        m = mean[(k, 0)]
        verdict.append(
            f"- {LONG_KINDS[k]}, no replay: long positions end at {m[6]:.3f} (256-512) vs {m[4]:.3f} (0-128): "
            + ("loss falls past the old context more than at the start, a use of the longer context"
               if (m[6] - m[4]) < (m[2] - m[0]) - 0.02 else
               f"the gap between positions is what it was at the start ({m[2] - m[0]:+.3f}): the data's, not a use "
               "of the longer context") + f"; {m[6] - base[2]:+.3f} against the unextended model there"
            + ("." if k == "none" else f", {m[6] - mean[('none', 0)][6]:+.3f} against training with RoPE as it was "
               f"({spread(per, (k, 0), ('none', 0), 6)})."))
    for k in LONG_KINDS:
        a, b = mean[(k, 0)], mean[(k, 25)]
        verdict.append(f"- Replay 25% with {LONG_KINDS[k]}: short-context loss {b[7]:.3f} vs {a[7]:.3f} without "
                       f"({b[7] - a[7]:+.3f}, {spread(per, (k, 25), (k, 0), 7)}), long 256-512 {b[6]:.3f} vs "
                       f"{a[6]:.3f} ({b[6] - a[6]:+.3f}, {spread(per, (k, 25), (k, 0), 6)}).")
    verdict.append(f"- Lowest loss at 256-512: {LONG_KINDS[best[0]]} with {best[1]}% replay ({mean[best][6]:.3f}).")
    q = lengths["written"]["quantiles"]
    return ("## 11. Long-context extension, 128 → 512 tokens, with and without short-context replay\n\n"
            f"A tiny Llama pre-trained at 128 tokens (`recipes/long_context/pretrain-128.yaml`, "
            f"`max_position_embeddings: 128`, here hidden 64 (0.34M parameters), {LONG_PRETRAIN // K}K tokens of English "
            f"kernel docs) is extended to 512 by a stage of {LONG_STAGE // K}K tokens (16 steps of 4 rows) (`recipes/long_context/extend-<kind>.yaml`: cosine, "
            "re-warm to 1e-3) that changes RoPE through `model.config` overrides of the init_from model. Long data: "
            "kernel docs of 384 tokens or more (`cpt prepare --min-doc-tokens 384 --whole-documents`; written "
            f"lengths p50 {q['p50']}, p90 {q['p90']}, {100 * lengths['written']['share_of_tokens_over_seq_len']:.0f}% "
            "of tokens in documents longer than a row); replay: the pre-training corpus as it is, packed into "
            "512-token rows (every source of a run has one seq_len), 25% of the sequences or none. Probes: held-out "
            "long documents at 512 with the loss by position (`probes.by_position: [0, 128, 256, 512]`), and the "
            "held-out corpus at 128 tokens (short: what the extension costs at the old context; the pre-trained "
            f"model's is {short0:.3f}). Seeds {', '.join(map(str, LONG_SEEDS))} of the stage (mean ± std), one "
            "pre-trained model. The stage's first probe is the model with its new RoPE before any training.\n\n"
            + table(["RoPE", "replay", "256-512 at start", "0-128 final", "128-256 final", "256-512 final",
                     "short final", "short vs pre-trained", "wall s"], rows)
            + "\n\n" + "\n".join(verdict) + "\n\n" + s.plots("long", dirs))


def long_context(s: Suite) -> str:
    return long_section(s, *long_cols(s))


EXPERIMENTS = {1: rewarming, 2: replay, 3: infinite, 4: wsd, 5: stability_gap, 6: mitigate,
               7: wsm, 8: vocab, 9: distill, 10: merge_back, 11: long_context}


# ------------------------------------------------------------------ the page


def _flags(args: argparse.Namespace) -> str:
    return ((" --quick" if args.quick else "") + (f" --seeds {args.seeds}" if args.seeds is not None else "")
            + (f" --long-seeds {args.long_seeds}" if args.long_seeds is not None else ""))


def header(args: argparse.Namespace, b: Budget, run: Runner, wall: float) -> str:
    """The page's opening: how it was measured, wall time and tokens."""
    mode = "quick" if args.quick else "full"
    flags = _flags(args)
    if args.experiments != ALL:
        flags += " --experiments " + " ".join(map(str, args.experiments))
    runs_s = sum(run.wall.values())
    tokens = run.tokens()
    first_seed = sum(t for n, t in tokens.items() if not re.search(r"-s\d+(-|$)", n) or f"-s{b.seeds[0]}" in n)
    timed = sum(tokens[n] for n in run.wall)
    return (f"# Reproductions at tiny scale ({mode} mode)\n\nMeasured by `python scripts/reproduce.py{flags}` "
            f"on this machine (2 CPU cores, no GPU). Wall time: this invocation {wall / 60:.1f} min"
            + ("" if run.trained else " (it trained nothing: every run was reused)") + "; "
            f"{runs_s / 60:.1f} min summed over the {len(run.wall)} runs with a recorded time"
            + (f", plus {len(run.untimed)} runs reused from an earlier invocation that recorded none"
               if run.untimed else "")
            + f". Tokens trained: {sum(tokens.values()) / 2**20:.1f}M in {len(tokens)} runs"
            + (f" ({first_seed / 2**20:.1f}M of them in the runs of seed {b.seeds[0]} and the seed-free ones)"
               if len(b.seeds) > 1 else "")
            + (f"; {timed / runs_s:.0f} tokens/s over the timed runs" if runs_s else "")
            + ". " + ("" if args.experiments == ALL else
                      f"Only experiments {', '.join(map(str, args.experiments))} are in this page. ")
            + "Other jobs shared the cores during parts of it, so times are upper bounds. Model: tiny Llama (hidden 128, 2 layers, 1.5M "
            "parameters), byte-level BPE 4096, seq 256, 8K tokens per step; data: the shared corpora "
            "(en: kernel docs, de: LibreOffice help, code: CPython stdlib). Every number below is read from "
            "the runs' metrics.jsonl; verdicts compare them with the papers' claims and say so when a "
            "finding does not reproduce at this scale.\n")


def commands_block(commands: list[str]) -> str:
    return "## Commands\n\n```\n" + "\n".join(commands) + "\n```\n"


def subset_note(args: argparse.Namespace, b: Budget, run: Runner, wall: float) -> str:
    """The paragraph a page's header gets when only some experiments were (re)measured into it."""
    flags = _flags(args)
    exps = " ".join(map(str, args.experiments))
    tokens = run.tokens()
    runs_s = sum(run.wall.values())
    return (f"Experiments {', '.join(map(str, args.experiments))} measured by `python scripts/reproduce.py{flags} "
            f"--experiments {exps}` (seeds {', '.join(map(str, b.seeds))}"
            + (f"; experiment 8: {', '.join(map(str, VOCAB_SEEDS))}" if 8 in args.experiments else "")
            + f"): wall time {wall / 60:.1f} min"
            + ("" if run.trained else " (it trained nothing: every run was reused)")
            + f", {runs_s / 60:.1f} min summed over the {len(run.wall)} runs with a recorded time; "
            f"{sum(tokens.values()) / 2**20:.1f}M tokens in the {len(tokens)} runs those sections read"
            + (" (English pre-training included)." if "pretrain-en" in run.used else "."))


def merge_page(old: str, new: dict[int, str], note: str, commands: list[str]) -> str:
    """``old`` page with the sections of ``new`` (experiment number -> section) put in place of theirs or
    added in number order, ``note`` added to the header (replacing earlier notes on no other experiments)
    and ``commands`` added to the commands block (each once)."""
    parts = re.split(r"(?m)^(?=## )", old)
    head, body = parts[0], parts[1:]
    numbered: dict[int, str] = {}
    cmd_lines: list[str] = []
    for part in body:
        if m := re.match(r"## (\d+)\. ", part):
            numbered[int(m.group(1))] = part.rstrip()
        elif part.startswith("## Commands"):
            cmd_lines = [ln for ln in part.split("```")[1].splitlines() if ln.strip()] if "```" in part else []
    numbered |= {n: text.rstrip() for n, text in new.items()}
    def measured(line: str) -> set[int]:  # the experiments an "Experiments 6, 7 measured by ..." note covers
        m = re.match(r"Experiments ([\d, ]+) measured by ", line)
        return {int(n) for n in m.group(1).split(",")} if m else set()

    lines = [ln for ln in head.rstrip().split("\n\n") if not measured(ln) or not measured(ln) <= measured(note)]
    head = "\n\n".join([*lines, note]) + "\n"
    return (head + "\n" + "\n\n".join(numbered[n] for n in sorted(numbered)) + "\n\n"
            + commands_block(list(dict.fromkeys([*cmd_lines, *commands]))))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="reproduce the papers' CPT findings at tiny scale")
    ap.add_argument("--quick", action="store_true", help="small budgets, one seed (~10M tokens, 25-30 min)")
    ap.add_argument("--out", type=Path, default=None, help="runs folder (default runs/repro/{quick,full})")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--experiments", type=int, nargs="+", default=ALL, choices=ALL,
                    help="run and report only these experiments (5 reads the runs of 2; 6 reuses 2's runs at its "
                    "budget); their sections go into the existing page, the others are kept")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds for experiments 2-5 (default: 1 in quick mode, 3 in full)")
    ap.add_argument("--long-seeds", type=int, default=None,
                    help="of those, how many experiments 3, 4 and 7 (the longest runs) take (default: 2 in full)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    b = QUICK if args.quick else FULL
    if args.seeds is not None:
        b.seeds = [1234, 7, 42, 3, 11][: args.seeds]
    if args.long_seeds is not None:
        b.long_seeds = args.long_seeds
    mode = "quick" if args.quick else "full"
    out = args.out or ROOT / "runs" / "repro" / mode
    t_start = time.time()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_shared.py")], check=True, cwd=ROOT)
    run = Runner(out)
    # experiment 11 pre-trains its own 128-token model: the English model only for the others
    pre = run("pretrain-en", "recipes/paper/pretrain-en.yaml", [f"train.tokens={b.pretrain}"]) \
        if set(args.experiments) - {11} else None
    suite = Suite(run, b, [f"init_from.path={pre}"] if pre else [], args.docs, "repro" if mode == "full" else "repro-quick")
    sections = [experiment(suite) for n, experiment in EXPERIMENTS.items() if n in args.experiments]
    wall = time.time() - t_start
    commands = [c.replace(f"{ROOT}/", "") for c in dict.fromkeys(run.commands)]
    args.docs.mkdir(parents=True, exist_ok=True)
    page = args.docs / ("reproductions.md" if mode == "full" else "reproductions-quick.md")
    if args.experiments != ALL and page.is_file():  # a subset: into the page, the other sections kept
        doc = merge_page(page.read_text(), dict(zip(args.experiments, sections, strict=True)),
                         subset_note(args, b, run, wall), commands)
    else:
        doc = header(args, b, run, wall) + "\n" + "\n\n".join(sections) + "\n\n" + commands_block(commands)
    page.write_text(doc)
    print(f"wrote {page} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
