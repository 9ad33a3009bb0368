"""The training loop end to end on a tiny Llama and real text: LR applied, exact resume (also after a
SIGKILL), refusals, checkpoint atomicity and export."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cpt import checkpoint as ckpt_lib
from cpt.errors import CptError
from cpt.schedules import build_schedule
from cpt.tracking import read_metrics
from cpt.train.loop import train


def train_losses(run_dir):
    return [r["train/loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def test_trains_logs_applied_lr_and_exports(make_recipe):
    from transformers import AutoModelForCausalLM

    recipe = make_recipe()
    result = train(recipe)
    assert result.completed and result.step == 12 and result.tokens == 12 * 1024
    records = [r for r in read_metrics(recipe.run.output_dir + "/metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    # the LR logged is the one applied before the step: the schedule at the tokens seen so far
    sched = build_schedule(recipe.schedule, total_tokens=12 * 1024, tokens_per_step=1024)
    assert [r["lr"] for r in records] == pytest.approx([sched(i * 1024) for i in range(12)], rel=1e-12)
    assert records[0]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(3e-3)
    assert records[-1]["train/loss"] < records[0]["train/loss"] - 0.5  # it learns
    probes = [r for r in read_metrics(recipe.run.output_dir + "/metrics.jsonl") if "probe/en/loss" in r]
    assert [p["step"] for p in probes] == [0, 12] and probes[1]["probe/en/loss"] < probes[0]["probe/en/loss"]
    # the export is a plain HF model dir with safetensors, loadable by from_pretrained
    final = Path(recipe.run.output_dir) / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert sum(p.numel() for p in reloaded.parameters()) > 0
    assert yaml.safe_load((Path(recipe.run.output_dir) / "recipe.yaml").read_text()) == recipe.to_dict()


def test_resume_is_exact(make_recipe):
    whole = make_recipe("whole")
    train(whole)
    split = make_recipe("split")
    first = train(split, max_steps=5)
    assert not first.completed and first.step == 5
    assert ckpt_lib.latest_checkpoint(split.run.output_dir).name == "step-00000005"
    second = train(split, resume=True)
    assert second.completed and second.step == 12
    a, b = train_losses(whole.run.output_dir), train_losses(split.run.output_dir)
    assert len(b) == 12
    assert a == b  # bit-identical per-step losses: model, optimizer, sampler and LR all restored


def test_grad_accumulation_matches_one_big_micro_batch(make_recipe):
    big = make_recipe("ga1", train__micro_batch_size=8)
    small = make_recipe("ga4", train__micro_batch_size=2)
    train(big)
    train(small)
    assert train_losses(big.run.output_dir) == pytest.approx(train_losses(small.run.output_dir), rel=1e-4)


def test_resume_refuses_changed_recipe_and_fresh_start_refuses_existing_run(make_recipe):
    r = make_recipe("guard")
    train(r, max_steps=2)
    with pytest.raises(CptError, match=r"already holds checkpoints .*--resume"):
        train(r)
    changed = make_recipe("guard", schedule__max_lr=1e-2, train__grad_clip=0.5)
    with pytest.raises(CptError) as e:
        train(changed, resume=True)
    assert "schedule.max_lr: 0.003 -> 0.01" in str(e.value) and "train.grad_clip: 1.0 -> 0.5" in str(e.value)
    out = train(changed, resume=True, allow_changes=("schedule", "train.grad_clip"))
    assert out.completed
    with pytest.raises(CptError, match="no checkpoint"):
        train(make_recipe("never-ran"), resume=True)


def test_half_written_checkpoint_is_ignored_and_keep_last_prunes(make_recipe):
    r = make_recipe("prune", checkpoint__every=2048, checkpoint__keep_last=2)
    train(r, max_steps=6)
    names = [p.name for p in ckpt_lib.checkpoint_dirs(r.run.output_dir)]
    assert names == ["step-00000004", "step-00000006"]
    # a save killed half-way leaves only a .tmp dir: it is never taken for the latest checkpoint
    junk = Path(r.run.output_dir) / "checkpoints" / ".tmp-step-00000008"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    assert ckpt_lib.latest_checkpoint(r.run.output_dir).name == "step-00000006"
    train(r, resume=True)
    assert not junk.exists()


def test_resume_after_sigkill_is_exact(make_recipe, tmp_path):
    whole = make_recipe("kill-whole", train__tokens=16 * 1024)
    train(whole)
    killed = make_recipe("killed", train__tokens=16 * 1024, checkpoint__every=3072)
    path = tmp_path / "killed.yaml"
    path.write_text(killed.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "cpt.cli", "train", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while ckpt_lib.latest_checkpoint(killed.run.output_dir) is None or \
            ckpt_lib.latest_checkpoint(killed.run.output_dir).name < "step-00000006":
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt_lib.latest_checkpoint(killed.run.output_dir) is not None
    result = train(killed, resume=True)
    assert result.completed
    assert train_losses(killed.run.output_dir) == train_losses(whole.run.output_dir)


def test_sigterm_checkpoints_then_stops(make_recipe, tmp_path):
    r = make_recipe("term", train__tokens=200 * 1024)
    path = tmp_path / "term.yaml"
    path.write_text(r.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "cpt.cli", "train", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(r.run.output_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(train_losses(r.run.output_dir)) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM  # checkpointed, then 143 as shells expect
    step = ckpt_lib.latest_checkpoint(r.run.output_dir)
    assert step is not None and "checkpoint saved, continue with --resume" in out
    assert int(step.name.split("-")[1]) == len(train_losses(r.run.output_dir)) < 200


def test_bad_data_paths_and_mismatched_seq_len(make_recipe, prepared):
    with pytest.raises(CptError, match="data.sources.en"):
        train(make_recipe("missing", data__sources={"en": "/nonexistent/en", "de": str(prepared["de"]["train"])}))
    with pytest.raises(CptError, match=r"data.sources.en: .* seq_len 128, but data.seq_len is 256"):
        train(make_recipe("seqlen", data__seq_len=256, train__global_batch_tokens=2048))


def test_world_layout_splits_the_same_global_batch():
    from cpt.train.layout import Layout

    picks = list(range(16))
    one = Layout(128, 16, 4, 1, 4).my_micro_batches(picks, 0)
    two = [Layout(128, 16, 4, 2, 2).my_micro_batches(picks, r) for r in range(2)]
    assert sorted(sum(one, [])) == sorted(sum(two[0] + two[1], [])) == picks
    assert not set(sum(two[0], [])) & set(sum(two[1], []))  # ranks see disjoint data
    assert torch.equal(torch.tensor(one), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]))


def test_source_epochs_logged_and_heavy_repeats_warned(make_recipe, capsys, prepared):
    from cpt.data.source import TokenSource

    n_en = TokenSource(prepared["en"]["train"]).num_sequences
    warn = 4 * 6 / n_en  # crossed at step 6
    r = make_recipe("epochs", data__warn_epochs=warn)
    train(r)
    records = [x for x in read_metrics(r.run.output_dir + "/metrics.jsonl") if "train/loss" in x]
    # 8 sequences per step, half from each source: after step s, en has been read 4*s/n_en times over
    assert [x["data/en/epochs"] for x in records] == pytest.approx([4 * s / n_en for s in range(1, 13)])
    out = capsys.readouterr().out
    assert f"source en has been read {warn:.1f} times over (data.warn_epochs = {warn:g})" in out
    assert out.count("source en has been read") == 1  # once, not every step


def test_compiled_runs_resume_exactly_and_follow_the_eager_curve(make_recipe):
    """train.compile: true (torch.compile in place, CPU inductor here): a compiled run stopped and resumed
    gives the uninterrupted compiled run's losses bit for bit; against eager the kernels differ, so the
    curves agree to float rounding only."""
    eager = make_recipe("eager", train__tokens=4 * 1024)
    train(eager)
    whole = make_recipe("compiled-whole", train__tokens=4 * 1024, train__compile=True)
    train(whole)
    split = make_recipe("compiled-split", train__tokens=4 * 1024, train__compile=True)
    assert not train(split, max_steps=2).completed
    assert train(split, resume=True).completed
    a, b = train_losses(whole.run.output_dir), train_losses(split.run.output_dir)
    assert len(a) == 4 and a == b
    assert max(abs(x - y) for x, y in zip(a, train_losses(eager.run.output_dir), strict=True)) < 1e-4
