"""`accelerate launch` with 2 gloo processes on CPU: same global batches, same losses as 1 process, and
checkpoints that move between world sizes. Marked `multiproc`; the README's test command runs them
(deselect with `-m "not multiproc"`)."""

from pathlib import Path

import pytest
from conftest import launch  # tests/ is on sys.path (pytest's rootdir conftest)

from cpt.tracking import read_metrics
from cpt.train.loop import train

pytestmark = pytest.mark.multiproc


def losses(run_dir, key="train/loss"):
    return [r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r]


def test_two_processes_match_one_and_resume_across_world_sizes(two_proc_recipe):
    def recipe(name):
        return two_proc_recipe(name, tokens=8192)

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


def test_activation_checkpointing_and_document_masking_under_ddp(two_proc_recipe):
    """Both issue-14 switches on, 2 gloo processes under DDP: the 1-process curve without them is the
    reference for checkpointing (same math), and masking must give the 1-process masked curve."""
    one, _ = two_proc_recipe("one-masked", tokens=4096, data={"document_masking": True})
    train(one)
    two, path = two_proc_recipe("two-ac-masked", tokens=4096, activation_checkpointing=True,
                                data={"document_masking": True})
    launch(path)
    assert len(losses(two.run.output_dir)) == 4
    assert losses(two.run.output_dir) == pytest.approx(losses(one.run.output_dir), abs=2e-5)
