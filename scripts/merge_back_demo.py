"""Merging back toward the start on the CPU demo (English -> code), over seeds: `cpt merge FINAL --toward START
--weight ...` of the demo's no-replay continuation, every model probed, against the demo's 25% replay run.

    python scripts/merge_back_demo.py --demo DEMO_CLONE [--seeds 1234 7 42] [--out /tmp/merge_demo]

DEMO_CLONE is a checkout where `python scripts/demo.py` has run (its data/demo and runs/demo are read, never
written). Seed 1234 is the demo's own pair of continuations (runs/demo/continue-code and -no-replay); other
seeds are trained here with the demo's commands plus `run.seed=S` (run in the clone, so with its code; outputs
under --out/runs). Then, with this checkout's cpt: one `cpt merge --toward` per seed, which writes and probes
(1 - a) * English model + a * no-replay final for each a, and `cpt probe` of the replay run's final, all on
the demo's probe sample (48 held-out sequences per domain). Prints a markdown section (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _runs import ROOT, table
from reproduce import BACK_WEIGHTS, back_verdict, mean_sd

SETS = ("english", "code")
MAX_SEQUENCES = 48  # recipes/demo/base.yaml's probes.max_sequences


def cpt_in(cwd: Path, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    print(f"$ (cd {cwd}) cpt {' '.join(args)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "cpt.cli", *args], cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                             env=env)
    if res.returncode != 0:
        raise SystemExit(f"failed: cpt {' '.join(args)} (see {log})")


def continuations(demo: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """(no-replay run, 25% replay run) of ``seed``: the demo's own for 1234, else trained in the clone."""
    if seed == 1234:
        return demo / "runs/demo/continue-code-no-replay", demo / "runs/demo/continue-code"
    runs = {"noreplay": out / "runs" / f"continue-code-no-replay-s{seed}", "replay": out / "runs" / f"continue-code-s{seed}"}
    extra = {"noreplay": ["data.mixture.code=1.0", "data.mixture.english=0.0"], "replay": []}
    for kind, d in runs.items():
        if not (d / "final").is_dir():
            cpt_in(demo, ["train", "recipes/demo/continue-code.yaml", *extra[kind], f"run.seed={seed}",
                          f"run.name=demo-{d.name}", f"run.output_dir={d}", "tracking.progress=false"],
                   out / f"{d.name}.log", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return runs["noreplay"], runs["replay"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 7, 42])
    ap.add_argument("--out", type=Path, default=Path("/tmp/merge_demo"))
    args = ap.parse_args()
    demo, out = args.demo.resolve(), args.out.resolve()
    sets = [f"{d}={demo / 'data/demo/prepared' / d / 'validation'}" for d in SETS]
    start = demo / "runs/demo/pretrain-english/final"
    per: dict[str, list[tuple[float, float]]] = {}
    commands = []
    for seed in args.seeds:
        noreplay, replay = continuations(demo, out, seed)
        back = out / f"toward-s{seed}"
        merge = ["merge", str(noreplay / "final"), "--toward", str(start), "--weight", ",".join(map(str, BACK_WEIGHTS)),
                 "--out", str(back), "--sets", *sets, "--max-sequences", str(MAX_SEQUENCES), "--overwrite"]
        probe = ["probe", str(replay / "final"), "--sets", *sets, "--max-sequences", str(MAX_SEQUENCES),
                 "--out", str(out / f"replay-s{seed}.json")]
        for c, result in ((merge, back / "probe.json"), (probe, out / f"replay-s{seed}.json")):
            if not result.is_file():  # reused when there (delete --out to measure again)
                cpt_in(ROOT, c, out / f"{c[0]}-s{seed}.log")
            commands.append("cpt " + " ".join(c))
        for m in json.loads((back / "probe.json").read_text())["models"]:
            label = {"0 (base)": "a = 0: the English model (start)",
                     "1 (final)": "a = 1: the no-replay run's final"}.get(m["label"], f"a = {m['label']}")
            per.setdefault(label, []).append(tuple(m["sets"][d]["loss"] for d in SETS))
        r = json.loads((out / f"replay-s{seed}.json").read_text())["sets"]
        per.setdefault("25% replay run's final", []).append(tuple(r[d]["loss"] for d in SETS))
    mean = {k: (statistics.mean(v[0] for v in vals), statistics.mean(v[1] for v in vals)) for k, vals in per.items()}
    final = mean["a = 1: the no-replay run's final"]
    rows = [[k, mean_sd([v[0] for v in vals]), mean_sd([v[1] for v in vals]), f"{mean[k][0] - final[0]:+.3f}",
             f"{mean[k][1] - final[1]:+.3f}", f"{sum(mean[k]) / 2:.3f}"] for k, vals in per.items()]
    print("\n" + table(["model", "english", "code", "Δ english", "Δ code", "mean of both"], rows) + "\n\n"
          + "\n".join(back_verdict(mean, old="English", new="code")) + f"\n\nSeeds {', '.join(map(str, args.seeds))}."
          + "\n\n```\n" + "\n".join(commands) + "\n```")


if __name__ == "__main__":
    main()
