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


@pytest.mark.parametrize("script", ["reproduce", "predict_experiment", "replay_gap", "plan_experiment", "real_model"])
def test_experiment_script_help(script):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


def test_real_model_points_are_recipes_cpt_train_loads(tmp_path):
    """Every run scripts/real_model.py trains (both modes) is recipes/real/smollm2-de.yaml with overrides the
    schema accepts, of the mode's budget, with the mixture, LR and mitigation its label says."""
    import real_model

    from cpt.recipe import load_recipe

    data = {f"{d}/{s}": tmp_path / d / s for d in ("de", "en") for s in ("train", "validation")}
    for b in (real_model.FULL, real_model.QUICK):
        c = real_model.Ctx(b, tmp_path / "model", data, tmp_path / "chat.jsonl", tmp_path, _runs.Runner(tmp_path))
        pts = real_model.points(b)
        for stem in b.points:
            r = load_recipe(ROOT / real_model.RECIPE, [*c.base(7), *pts[stem].overrides])
            assert sum(st.tokens for st in r.stage_list()) == b.tokens == b.steps * r.train.global_batch_tokens
            assert r.run.seed == 7 and r.data.seq_len == b.seq and r.train.precision == "bf16"
            mix = r.stage_list()[0].mixture
            en = dict(mix)["en"] if isinstance(mix, dict) else None
            base, hi = stem.removesuffix("-1e-3"), stem.endswith("-1e-3")  # the points at max LR 1e-3
            if hi:
                assert r.schedule.max_lr == 1e-3 and r.schedule.min_lr == 1e-4
            if base.startswith("r") and en is not None:
                assert en == pytest.approx(int(base[1:]) / 100)
            if base == "l2":  # the same coefficient at both LRs: lr * c = 0.1 at 3e-4, 0.33 at 1e-3
                assert r.mitigate.l2_init * r.schedule.max_lr == pytest.approx(0.1 * (1e-3 / 3e-4 if hi else 1))
            if stem == "ema":
                assert r.mitigate.ema.decay ** b.steps == pytest.approx(0.05, abs=0.005)
            if stem == "merge":
                assert r.schedule.kind == "constant" and r.merge.last == 4
                assert b.tokens // r.checkpoint.every >= r.merge.last
            if stem == "lr1e-3":
                assert r.schedule.max_lr == 1e-3


def test_real_model_plan_trains_nothing():
    res = subprocess.run([sys.executable, str(ROOT / "scripts/real_model.py"), "--plan", "--quick"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "quick: 3 runs of 4096 tokens" in res.stdout and "merge r0-s1234 back at 0.5" in res.stdout
