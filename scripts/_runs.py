"""Training runs for the experiment scripts (reproduce.py, replay_gap.py, predict_experiment.py): one runner
that trains a recipe with `cpt train` in a subprocess unless its run dir already holds it finished, and
readers of what the runs logged.

Imported as a sibling (`from _runs import ...`): `python scripts/X.py` puts scripts/ on sys.path itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cpt, whatever an installed one points at
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every tokenizer and model here is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings in the logs
K = 1024
BASE_LR = 2.0e-3  # the max LR of recipes/paper/ (pre-training, and the re-warms' 1x)
WALL_FILE = "repro_wall_s"  # a run's training wall time, read back when a later invocation reuses the run


def cpt(args: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run `cpt ARGS` with this interpreter from the repository root, echoed first; its output goes to
    ``log`` when given. A failure ends the script with the command and the end of its output."""
    print(f"$ cpt {' '.join(args)}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-m", "cpt.cli", *args]
    if log is None:
        res = subprocess.run(cmd, cwd=ROOT, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = log.read_text()[-3000:] if log is not None else ""
        raise SystemExit(f"failed (exit {res.returncode}): cpt {' '.join(args)}\n{tail}")


@dataclass(frozen=True)
class Job:
    """One `cpt train`: a recipe with overrides, or a decay branch of it (``branch``: the checkpoint to
    branch from and the decay length, `--branch-from CKPT --decay LENGTH`)."""

    recipe: str
    overrides: tuple[str, ...] = ()
    branch: tuple[str, str] | None = None

    def args(self) -> list[str]:
        """The `cpt train` arguments; logs, not a progress bar."""
        flags = ["--branch-from", self.branch[0], "--decay", self.branch[1]] if self.branch else []
        return ["train", self.recipe, *self.overrides, "tracking.progress=false", *flags]

    def plan(self) -> tuple[Path, int, int]:
        """(run dir, tokens the run trains, tokens per step): the recipe resolved as `cpt train` does."""
        from cpt.plan import make_branch
        from cpt.recipe import load_recipe

        r = load_recipe(ROOT / self.recipe, self.overrides)
        if self.branch:
            r = make_branch(r, self.branch[0], decay=self.branch[1])
        return ROOT / r.run.output_dir, sum(st.tokens for st in r.stage_list()), r.train.global_batch_tokens


def finished(run_dir: Path, tokens: int, tokens_per_step: int) -> bool:
    """Whether ``run_dir`` holds a finished run of ``tokens`` tokens (the one rule of all the scripts):

    - ``final/`` exists: the trainer exports it once the last stage ends, written aside and renamed,
      so it is never partial;
    - ``metrics.jsonl`` is whole: no torn line (a writer killed mid-record);
    - its train records span the budget: last ``tokens`` - first ``tokens`` + one step >= ``tokens``
      (counted from the first record, since a decay branch goes on with its parent's counter). A
      ``final/`` of a shorter budget, or of an earlier run the metrics no longer describe, fails this.
    """
    from cpt.tracking import read_metrics

    path = run_dir / "metrics.jsonl"
    if not (run_dir / "final").is_dir() or not path.is_file():
        return False
    records = read_metrics(path)
    if len(records) < len(path.read_text().splitlines()):
        return False
    train = [r for r in records if "train/loss" in r]
    return bool(train) and train[-1]["tokens"] - train[0]["tokens"] + tokens_per_step >= tokens


def train(job: Job, env: dict[str, str] | None = None) -> tuple[Path, float | None, bool]:
    """Train ``job`` unless its run dir holds it finished; a run dir left unfinished (interrupted, or of
    another budget) starts over. The output goes to ``<run dir>.log``. Returns the run dir, the wall
    seconds of its training (now, or as recorded by the invocation that trained it; None if none
    did) and whether it was trained now."""
    from cpt.errors import CptError

    try:
        run_dir, tokens, per_step = job.plan()
    except CptError as e:  # a recipe or override that does not load: say so as `cpt train` would
        raise SystemExit(f"cpt {' '.join(job.args())}: {e}") from None
    wall = run_dir / WALL_FILE
    if finished(run_dir, tokens, per_step):
        return run_dir, float(wall.read_text()) if wall.is_file() else None, False
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    cpt(job.args(), log=run_dir.with_name(run_dir.name + ".log"), env=env)
    seconds = time.time() - t0
    wall.write_text(f"{seconds:.1f}")
    print(f"  {run_dir}: {seconds:.0f} s", flush=True)
    return run_dir, seconds, True


class Runner:
    """The runs one page reads, each trained or reused through :func:`train`, and what the page says of
    them: their commands, wall times and tokens."""

    def __init__(self, out: Path):
        self.out = out
        self.commands: list[str] = []
        self.wall: dict[str, float] = {}
        self.untimed: list[str] = []  # reused runs with no recorded wall time
        self.used: list[str] = []      # every run the page reads, trained now or reused
        self.trained = 0               # runs trained by this invocation

    def __call__(self, name: str, recipe: str, overrides: Sequence[str] = ()) -> Path:
        """The run ``name`` of ``recipe`` under out/."""
        return self.run(Job(recipe, (*overrides, f"run.name={name}", f"run.output_dir={self.out / name}")))

    def branch(self, recipe: str, overrides: Sequence[str], checkpoint: Path, decay: int) -> Path:
        """A decay branch from ``checkpoint`` of the run ``recipe`` + ``overrides`` names (its own dir
        beside it, RUN-decay-at-STEP)."""
        return self.run(Job(recipe, tuple(overrides), (str(checkpoint), str(decay))))

    def run(self, job: Job) -> Path:
        self.commands.append(" ".join(["cpt", *job.args()]))
        run_dir, seconds, now = train(job)
        if run_dir.name not in self.used:
            self.used.append(run_dir.name)
        if seconds is not None:
            self.wall[run_dir.name] = seconds
        elif run_dir.name not in self.untimed:
            self.untimed.append(run_dir.name)
        self.trained += int(now)
        return run_dir

    def tokens(self) -> dict[str, int]:
        """Tokens each run trained (a branch counts from its checkpoint): logged steps x tokens per step."""
        out = {}
        for name in self.used:
            steps = [r for r in metrics(self.out / name) if "train/loss" in r]
            out[name] = len(steps) * steps[0]["tokens"] // steps[0]["step"]
        return out


def metrics(run_dir: Path) -> list[dict]:
    from cpt.tracking import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def probes(run_dir: Path, stage: str | None = None) -> list[dict]:
    """The probe records of a paper run (English probed with every set), optionally of one stage."""
    return [r for r in metrics(run_dir) if "probe/en/loss" in r and (stage is None or r.get("stage") == stage)]


def final(run_dir: Path, domain: str) -> float:
    return probes(run_dir)[-1][f"probe/{domain}/loss"]


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(lines)
