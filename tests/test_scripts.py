"""The experiment scripts: the shared runner's "finished" rule on hand-made run dirs, the budget it reads
from a recipe, and every experiment script's --help."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # as `python scripts/X.py` has it

import _runs  # noqa: E402
from _runs import Job, finished, train  # noqa: E402

TPS = 8192  # recipes/paper: 8K tokens per step


def fake_run(d: Path, steps: int, first: int = 1, final: bool = True, torn: bool = False) -> Path:
    """A run dir as the trainer leaves it: train records of steps first..first+steps-1, a probe record
    after each, final/ when finished; ``torn``: the last record cut off mid-write."""
    d.mkdir(parents=True)
    if final:
        (d / "final").mkdir()
    lines = []
    for s in range(first, first + steps):
        lines.append(json.dumps({"step": s, "tokens": s * TPS, "train/loss": 3.0, "lr": 1e-3}))
        lines.append(json.dumps({"step": s, "tokens": s * TPS, "probe/en/loss": 3.1}))
    text = "\n".join(lines) + "\n"
    (d / "metrics.jsonl").write_text(text[: len(text) - 20] if torn else text)
    return d


def test_finished_needs_final_a_whole_log_and_the_budget(tmp_path):
    assert finished(fake_run(tmp_path / "done", 4), 4 * TPS, TPS)
    assert not finished(fake_run(tmp_path / "no-final", 4, final=False), 4 * TPS, TPS)
    assert not finished(fake_run(tmp_path / "short", 3), 4 * TPS, TPS)
    assert not finished(fake_run(tmp_path / "torn", 4, torn=True), 4 * TPS, TPS)
    assert not finished(tmp_path / "missing", 4 * TPS, TPS)
    # a decay branch goes on with its parent's counter: 4 steps from step 17 are its whole budget
    assert finished(fake_run(tmp_path / "branch", 4, first=17), 4 * TPS, TPS)


def test_the_budget_is_the_recipes_as_cpt_train_resolves_it(tmp_path):
    run_dir, tokens, tps = Job("recipes/paper/pretrain-en.yaml",
                               ("train.tokens=1048576", f"run.output_dir={tmp_path / 'pre'}")).plan()
    assert (run_dir, tokens, tps) == (tmp_path / "pre", 1048576, TPS)
    stages = tuple(f"stages.{i}.tokens=262144" for i in range(3))
    assert Job("recipes/paper/infinite-3stages.yaml", stages).plan()[1:] == (3 * 262144, TPS)
    # a branch from step 32 of a WSD run: its own dir, the decay as its budget
    ckpt = tmp_path / "wsd" / "checkpoints" / "step-00000032"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({
        "step": 32, "tokens": 32 * TPS, "stage": "wsd", "sampler": {}, "data_consumed": {}, "mixture": {"en": 1.0},
        "lr": 2e-3, "elapsed_s": 1.0, "tags": [], "origin": {}}))
    parent = ("train.tokens=1048576", "run.name=wsd", f"run.output_dir={tmp_path / 'wsd'}")
    run_dir, tokens, _ = Job("recipes/paper/wsd-en.yaml", parent, (str(ckpt), "98304")).plan()
    assert (run_dir, tokens) == (tmp_path / "wsd-decay-at-32", 98304)
    assert Job("recipes/paper/wsd-en.yaml", parent, (str(ckpt), "98304")).args()[-5:] == [
        "tracking.progress=false", "--branch-from", str(ckpt), "--decay", "98304"]


def test_train_reuses_a_finished_run_and_starts_an_unfinished_one_over(tmp_path, monkeypatch):
    calls = []

    def fake_cpt(args, log=None, env=None):
        calls.append(args)
        fake_run(tmp_path / "run", 2)

    monkeypatch.setattr(_runs, "cpt", fake_cpt)
    job = Job("recipes/paper/pretrain-en.yaml", ("train.tokens=16384", f"run.output_dir={tmp_path / 'run'}"))
    fake_run(tmp_path / "run", 1, final=False)  # interrupted
    run_dir, seconds, now = train(job)
    assert now and calls == [job.args()] and (run_dir / _runs.WALL_FILE).read_text() == f"{seconds:.1f}"
    assert train(job) == (run_dir, float(f"{seconds:.1f}"), False) and len(calls) == 1


@pytest.mark.parametrize("script", ["reproduce", "predict_experiment", "replay_gap", "plan_experiment"])
def test_experiment_script_help(script):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout
