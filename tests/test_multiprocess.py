"""`accelerate launch` with 2 gloo processes on CPU: same global batches, same losses as 1 process, and
checkpoints that move between world sizes. Marked `multiproc`; the README's test command runs them
(deselect with `-m "not multiproc"`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpt.recipe import validate_recipe
from cpt.tracking import read_metrics
from cpt.trainer import train

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parents[1]


def launch(recipe_path, *args, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "cpt.cli", "train", str(recipe_path), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture
def recipe(tmp_path, tokenizer_dir, prepared):
    def make(name):
        r = validate_recipe({
            "run": {"name": name, "output_dir": str(tmp_path / name), "seed": 5},
            "model": {"preset": "tiny-llama", "tokenizer": str(tokenizer_dir),
                      "config": {"hidden_size": 64, "intermediate_size": 128}},
            "data": {"seq_len": 128, "sources": {"en": str(prepared["en"]["train"]),
                                                 "de": str(prepared["de"]["train"])},
                     "mixture": {"en": 0.25, "de": 0.75}},
            "train": {"tokens": 8192, "global_batch_tokens": 1024, "micro_batch_size": 2},
            "schedule": {"kind": "cosine", "max_lr": 3e-3, "warmup": 2048},
            "probes": {"sets": {"en": str(prepared["en"]["validation"])}, "max_sequences": 7},
            "tracking": {"progress": False},
        })
        path = tmp_path / f"{name}.yaml"
        path.write_text(r.to_yaml())
        return r, path
    return make


def losses(run_dir, key="train/loss"):
    return [r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r]


def test_two_processes_match_one_and_resume_across_world_sizes(recipe):
    one, _ = recipe("one")
    train(one)
    two, two_path = recipe("two")
    out = launch(two_path)
    assert out.stdout.count("cpt: done") == 1  # only the main process reports
    assert "2 process(es), grad accum 2" in out.stdout
    assert losses(two.run.output_dir) == pytest.approx(losses(one.run.output_dir), abs=2e-5)
    # 7 probe sequences over 2 ranks: rank 1's short shard is padded with a weight-0 row
    assert losses(two.run.output_dir, "probe/en/loss") == pytest.approx(losses(one.run.output_dir, "probe/en/loss"), abs=2e-5)

    # a checkpoint written by 2 processes resumes on 1, and continues the same curve
    moved, moved_path = recipe("moved")
    launch(moved_path, "--max-steps", "4")
    assert len(losses(moved.run.output_dir)) == 4
    train(moved, resume=True)
    assert losses(moved.run.output_dir) == pytest.approx(losses(one.run.output_dir), abs=2e-5)
