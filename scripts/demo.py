"""The README's main job: a tiny continual pre-training run on CPU, offline, in a few minutes.

1. build two real corpora from the interpreter's stdlib (English prose, Python code);
2. train a byte-level BPE tokenizer and prepare token shards;
3. pre-train a tiny Llama on English (recipes/demo/pretrain-english.yaml);
4. continue on code with a re-warmed LR and 25% English replay (recipes/demo/continue-code.yaml);
5. print held-out loss on both domains before and after the continual stage.

Each step is a `cpt` command, printed before it runs, so the demo doubles as a tutorial.
    python scripts/demo.py            # from the repository root
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("data/demo")
RUNS = Path("runs/demo")


def run(*args: str) -> None:
    print(f"\n$ {' '.join(args)}", flush=True)
    # `cpt ...` and `python ...` run with this interpreter, so the demo works before PATH knows `cpt`
    cmd = [sys.executable, "-m", "cpt.cli", *args[1:]] if args[0] == "cpt" else [sys.executable, *args[1:]]
    subprocess.run(cmd, check=True, cwd=ROOT)


def probes(run_dir: Path) -> list[dict]:
    with open(ROOT / run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if any(k.startswith("probe/") for k in r)]


def main() -> None:
    t0 = time.time()
    shutil.rmtree(ROOT / RUNS, ignore_errors=True)  # the demo's own runs; data is reused if present
    if not (ROOT / DATA / "prepared").is_dir():
        shutil.rmtree(ROOT / DATA, ignore_errors=True)
        run("python", "scripts/demo_corpora.py", str(DATA / "raw"))
        run("cpt", "tokenizer", "train", str(DATA / "raw/english/train.jsonl"), str(DATA / "raw/code/train.jsonl"),
            "--out", str(DATA / "tokenizer"), "--vocab-size", "4096")
        for domain in ("english", "code"):
            for split in ("train", "validation"):
                run("cpt", "prepare", str(DATA / "raw" / domain / f"{split}.jsonl"), "--tokenizer",
                    str(DATA / "tokenizer"), "--out", str(DATA / "prepared" / domain / split), "--seq-len", "256")
    run("cpt", "schedule", "recipes/demo/pretrain-english.yaml", "recipes/demo/continue-code.yaml",
        "--out", str(RUNS / "lr_schedules.png"))
    run("cpt", "train", "recipes/demo/pretrain-english.yaml")
    run("cpt", "train", "recipes/demo/continue-code.yaml")
    run("cpt", "train", "recipes/demo/continue-code.yaml", "data.mixture.code=1.0", "data.mixture.english=0.0",
        "run.name=demo-continue-code-no-replay", f"run.output_dir={RUNS / 'continue-code-no-replay'}")

    start, before = probes(RUNS / "pretrain-english")[0], probes(RUNS / "continue-code")[0]
    print("\nheld-out loss (nats/token)          english    code   forgetting(en)  adaptation(code)")
    for label, r in [("random init", start), ("after English pre-training", before),
                     ("after code CPT, no replay", probes(RUNS / "continue-code-no-replay")[-1]),
                     ("after code CPT, 25% replay", probes(RUNS / "continue-code")[-1])]:
        en, code = r["probe/english/loss"], r["probe/code/loss"]
        deltas = "" if r is start or r is before else \
            f"{en - before['probe/english/loss']:>+16.3f}{before['probe/code/loss'] - code:>+18.3f}"
        print(f"  {label:<33}{en:>8.3f}{code:>8.3f}{deltas}")
    print(f"\n({time.time() - t0:.0f} s; runs in {RUNS}, LR plot in {RUNS / 'lr_schedules.png'})")


if __name__ == "__main__":
    main()
