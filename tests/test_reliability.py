"""Faults a user meets, each with the outcome cpt promises: a non-finite loss never reaches the weights,
no file a user may have downloaded runs code when loaded, bad input is one line, and no metrics record
is lost or doubled. docs/reliability.md tabulates these tests (fault -> outcome)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpt import checkpoint as ckpt_lib
from cpt.cli import main as cli
from cpt.errors import CptError, DivergedError
from cpt.guard import StepGuard
from cpt.tracking import read_metrics
from cpt.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
TPS = 1024  # tokens per step of the tiny recipes (8 sequences of 128 in 2 micro-batches)
NAN = float("nan")


def records(run_dir, key="train/loss"):
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if key in r]


def losses(run_dir):
    return [r["train/loss"] for r in records(run_dir)]


def poison(monkeypatch, steps, factor=NAN, micro_batches_per_step=2):
    """Scale the final hidden states (so the logits, whichever path computes the loss) of the given training steps (1-based, counted from this process's start) by
    ``factor``: NaN or a loss spike injected into the real forward, data untouched. Probes (no grad)
    are not counted."""
    import cpt.train.setup as trainer

    build = trainer.build_model
    calls = [0]

    def hook(module, args, out):
        if not torch.is_grad_enabled():
            return None
        calls[0] += 1
        return out * factor if (calls[0] - 1) // micro_batches_per_step + 1 in steps else None

    def build_poisoned(*args, **kwargs):
        model = build(*args, **kwargs)
        model.model.norm.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer, "build_model", build_poisoned)


def weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


# ------------------------------------------------------------------------------------ the step guard


def test_step_guard_policy_by_hand():
    g = StepGuard("halt")
    assert g.check(2.5, 1.0) == "step" and g.check(NAN, 1.0) == "halt" and g.check(2.5, float("inf")) == "halt"
    s = StepGuard("skip", max_skipped_steps=3)
    assert [s.check(x, 1.0) for x in (NAN, 2.0, NAN, float("inf"))] == ["skip", "step", "skip", "skip"]
    assert (s.skipped, s.in_a_row) == (3, 2)
    assert s.check(2.0, NAN) == "halt"  # the third in a row
    assert StepGuard("halt", check_grad_norm=False).check(2.0, float("inf")) == "step"  # fp16: the scaler's
    sp = StepGuard(spike_factor=2.0, spike_window=8)
    assert [sp.spike(x) for x in [3.0] * 8] == [None] * 8  # 8 known before any verdict
    assert sp.spike(6.1) == 3.0 and sp.spike(5.9) is None and sp.spike(NAN) is None
    restored = StepGuard(spike_factor=2.0, spike_window=8)
    restored.load_state_dict(json.loads(json.dumps(sp.state_dict())))
    assert restored.state_dict() == sp.state_dict() and restored.recent == [3.0] * 6 + [6.1, 5.9]


# ------------------------------------------------------------------------------- NaN / inf in training


def test_nonfinite_loss_halts_saves_nothing_and_resume_is_exact(make_recipe, monkeypatch):
    clean = make_recipe("clean", train__tokens=8 * TPS)
    train(clean)
    r = make_recipe("nan-halt", train__tokens=8 * TPS, checkpoint__every=2 * TPS)
    with monkeypatch.context() as m:
        poison(m, {5})
        with pytest.raises(DivergedError, match=r"step 5 \(tokens 4096-5120\): loss nan.* not finite; the weights "
                                                r"were not updated .* Last good checkpoint: .*step-00000004"):
            train(r)
    run = Path(r.run.output_dir)
    assert [d.name for d in ckpt_lib.checkpoint_dirs(run)] == ["step-00000002", "step-00000004"]
    assert not (run / "final").exists() and all_finite(weights(run / "checkpoints/step-00000004"))
    assert read_metrics(run / "metrics.jsonl")[-1]["event"] == "nonfinite"
    # the cause gone, --resume continues from the last good checkpoint as if nothing had happened
    assert train(r, resume=True).completed
    assert losses(run) == losses(clean.run.output_dir)
    assert not any(r.get("event") == "nonfinite" for r in read_metrics(run / "metrics.jsonl"))


def test_cli_exit_code_3_on_divergence(make_recipe, monkeypatch, tmp_path, capsys):
    r = make_recipe("nan-cli", train__tokens=4 * TPS)
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    poison(monkeypatch, {2})
    assert cli(["train", str(path)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("cpt: error: step 2 ") and "Last good checkpoint: none" in err and "\n" not in err


def test_skip_drops_the_update_counts_it_and_finishes(make_recipe, monkeypatch):
    r = make_recipe("nan-skip", train__tokens=6 * TPS, train__on_nonfinite="skip", checkpoint__every=TPS,
                    checkpoint__keep_last=10)
    poison(monkeypatch, {3})
    assert train(r).completed
    run = Path(r.run.output_dir)
    recs = {x["step"]: x for x in records(run)}
    assert recs[3]["train/loss"] == "nan" and recs[3]["train/skipped_steps"] == 1
    assert "train/skipped_steps" not in recs[2] and recs[6]["train/skipped_steps"] == 1
    ck = run / "checkpoints"
    before, after = weights(ck / "step-00000002"), weights(ck / "step-00000003")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the update was dropped
    assert not torch.equal(after["lm_head.weight"], weights(ck / "step-00000004")["lm_head.weight"])  # then on
    assert all_finite(load_file(str(run / "final" / "model.safetensors")))
    assert ckpt_lib.read_trainer_state(ck / "step-00000006").guard["skipped"] == 1


def test_skip_halts_after_max_skipped_steps_in_a_row(make_recipe, monkeypatch):
    r = make_recipe("nan-skip-many", train__tokens=8 * TPS, train__on_nonfinite="skip",
                    train__max_skipped_steps=3, checkpoint__every=TPS)
    poison(monkeypatch, {2, 3, 4, 5})
    with pytest.raises(DivergedError, match=r"step 4 .*\(3 such steps in a row\)"):
        train(r)
    assert all_finite(weights(ckpt_lib.latest_checkpoint(r.run.output_dir)))


def test_loss_spike_is_an_event_and_the_step_is_taken(make_recipe, monkeypatch, capsys):
    r = make_recipe("spike", train__tokens=12 * TPS, schedule={"kind": "constant", "max_lr": 1e-3, "warmup": 0})
    poison(monkeypatch, {11}, factor=40.0)
    assert train(r).completed
    events = [x for x in read_metrics(Path(r.run.output_dir) / "metrics.jsonl") if x.get("event") == "loss_spike"]
    assert [e["step"] for e in events] == [11]
    assert events[0]["train/loss"] > 2 * events[0]["loss_spike/median"]
    assert "cpt: loss spike at step 11" in capsys.readouterr().out


def test_init_from_weights_holding_inf_are_refused(make_recipe, tmp_path):
    parent = make_recipe("inf-parent", train__tokens=2 * TPS)
    train(parent)
    bad = tmp_path / "bad-model"
    import shutil

    shutil.copytree(Path(parent.run.output_dir) / "final", bad)
    w = load_file(str(bad / "model.safetensors"))
    w["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    child = make_recipe("inf-child", model__preset=None, model__config={}, init_from={"path": str(bad)})
    with pytest.raises(CptError, match=r"init_from.path: .*bad-model: parameter model.layers.1.mlp.up_proj.weight "
                                       r"holds NaN or inf values"):
        train(child)


# ------------------------------------------------------------------------- files a user may have downloaded


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_dir, prepared):
    """A 3-step run with a checkpoint at every step, made once; tests copy it before tampering."""
    from conftest import TINY

    from cpt.recipe import validate_recipe

    out = tmp_path_factory.mktemp("finished") / "run"
    r = validate_recipe({
        "run": {"name": "finished", "output_dir": str(out), "seed": 3},
        "model": {"preset": "tiny-llama", "tokenizer": str(tokenizer_dir), "config": TINY},
        "data": {"seq_len": 128, "sources": {"en": str(prepared["en"]["train"])}, "mixture": {"en": 1.0}},
        "train": {"tokens": 3 * TPS, "global_batch_tokens": TPS, "micro_batch_size": 4},
        "schedule": {"kind": "cosine", "max_lr": 3e-3, "warmup": 0},
        "checkpoint": {"every": TPS, "keep_last": 5},
        "tracking": {"progress": False},
    })
    train(r, max_steps=2)
    return r


def copy_run(run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run.run.output_dir, out)
    return run.model_copy(update={"run": run.run.model_copy(update={"output_dir": str(out)})}), out


def resume(run):
    return train(run, resume=True, allow_changes=("run.output_dir",))  # a copy of the run, elsewhere


@pytest.mark.parametrize("file", ["optimizer.bin", "random_states_0.pkl"])
def test_a_planted_pickle_payload_never_runs_on_resume(finished_run, tmp_path, file):
    r, out = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker), "param_groups": []}, out / "checkpoints/step-00000002" / file)
    with pytest.raises(CptError, match=rf"{file}: refused: not a plain tensor file"):
        resume(r)
    assert not marker.exists()


def test_a_planted_payload_never_runs_on_init_from_optimizer(finished_run, make_recipe, tmp_path):
    r, out = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker), "param_groups": []}, out / "checkpoints/step-00000002/optimizer.bin")
    child = make_recipe("planted-child", model__preset=None, model__config={},
                        init_from={"path": str(out), "load": {"weights": True, "optimizer": True}})
    with pytest.raises(CptError, match=r"init_from.load.optimizer: .*optimizer.bin: refused"):
        train(child)
    assert not marker.exists()


def test_tampered_or_truncated_checkpoint_files_are_one_line(finished_run, tmp_path):
    r, out = copy_run(finished_run, tmp_path)
    ck = out / "checkpoints/step-00000002"
    rng = (ck / "random_states_0.pkl").read_bytes()
    torch.save({"step": 0}, ck / "random_states_0.pkl")  # loads, but is no RNG state: was silently ignored
    with pytest.raises(CptError, match=r"random_states_0.pkl: not an RNG state file"):
        resume(r)
    (ck / "random_states_0.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CptError, match=r"random_states_0.pkl: refused"):
        resume(r)
    (ck / "random_states_0.pkl").write_bytes(rng)
    opt = (ck / "optimizer.bin").read_bytes()
    (ck / "optimizer.bin").write_bytes(opt[: len(opt) // 2])
    with pytest.raises(CptError, match=r"optimizer.bin: refused: not a plain tensor file, or truncated"):
        resume(r)
    (ck / "optimizer.bin").write_bytes(opt)
    model = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(model[: len(model) - 1000])
    with pytest.raises(CptError, match=r"step-00000002: cannot restore the training state"):
        resume(r)
    (ck / "model.safetensors").write_bytes(model)
    assert resume(r).completed  # the intact files resume as before


# ----------------------------------------------------------------------------------------- bad input


def test_token_ids_outside_the_vocabulary_are_one_line(make_recipe, prepared, tmp_path):
    import shutil

    import numpy as np

    bad = tmp_path / "en-bad"
    shutil.copytree(prepared["en"]["train"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    shard = np.memmap(bad / manifest["shards"][0]["file"], dtype=manifest["dtype"], mode="r+")
    shard[:] = 4000  # same file size, ids past the 2048-token vocabulary
    shard.flush()
    r = make_recipe("oov", data__sources={"en": str(bad), "de": str(prepared["de"]["train"])})
    with pytest.raises(CptError, match=r"data source 'en': sequence \d+ holds token id 4000, outside the "
                                       r"model's vocabulary of 2048"):
        train(r)
    manifest["max_token_id"] = 4000  # a manifest that says so is refused before any step
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CptError, match=r"data.sources.en: .*en-bad holds token ids up to 4000, but the model "
                                       r"has 2048 embeddings"):
        train(r)
    manifest["tokenizer_hash"] = ""
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CptError, match=r"data.sources.en: .*en-bad: its manifest records no tokenizer hash"):
        train(r)


def test_seq_len_beyond_the_position_limit_is_refused_at_start(make_recipe, tokenizer_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    short = make_recipe("short", model__config={**make_recipe().model.config, "max_position_embeddings": 64})
    with pytest.raises(CptError, match=r"data.seq_len = 128 is longer than the model's position limit "
                                       r"\(64, model.preset tiny-llama\)"):
        train(short)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    from cpt.data.tokenizer import load_tokenizer

    load_tokenizer(tokenizer_dir).save_pretrained(gpt2)
    r = make_recipe("gpt2", model__preset=None, model__config={}, model__tokenizer=None,
                    init_from={"path": str(gpt2)})
    with pytest.raises(CptError, match=r"position limit \(64, config of .*gpt2\)"):
        train(r)
    from cpt.train.setup import check_recipe

    with pytest.raises(CptError, match=r"position limit \(64, config of .*gpt2\)"):  # --dry-run sees it too
        check_recipe(r)


def test_dry_run_checks_everything_it_can_without_training(make_recipe, prepared, tmp_path, monkeypatch, capsys):
    r = make_recipe("dry")
    path = tmp_path / "dry.yaml"
    path.write_text(r.to_yaml())
    assert cli(["train", str(path), "--dry-run", "train.tokens=2K"]) == 0  # an override after a flag too
    out = capsys.readouterr().out
    assert "tokens: 2K" in out and "# recipe checks passed: 1 stage(s) to token 2048, 2 source(s)" in out
    assert not Path(r.run.output_dir).exists()  # nothing written
    for override, message in [
        ("data.sources.de=/nowhere/de", "data.sources.de: "),
        ("probes.sets.en=" + str(prepared["en"]["train"]) + "-missing", "probes.sets.en: "),
        ("data.seq_len=64", "data.sources.en: .* seq_len 128, but data.seq_len is 64"),
    ]:
        assert cli(["train", str(path), "--dry-run", override]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cpt: error: ") and message.split(":")[0] in err
    monkeypatch.setenv("WORLD_SIZE", "3")  # as accelerate launch would set it for 3 processes
    assert cli(["train", str(path), "--dry-run"]) == 2
    assert "not divisible by train.micro_batch_size (4) x processes (3)" in capsys.readouterr().err


def test_probe_sets_are_checked_against_the_tokenizer(make_recipe, prepared, tmp_path):
    import shutil

    other = tmp_path / "other-tok"
    shutil.copytree(prepared["en"]["validation"], other)
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer_hash"] = m["tokenizer_fingerprint"] = "0" * 64  # neither the file nor what it does agrees
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CptError, match=r"probes.sets.en: .*other-tok was tokenized with another tokenizer"):
        train(make_recipe("probe-tok", probes__sets={"en": str(other)}))


# ------------------------------------------------------------------------------- records and signals


def test_a_fresh_start_never_appends_to_an_earlier_starts_metrics(make_recipe):
    r = make_recipe("restart", train__tokens=3 * TPS)
    run = Path(r.run.output_dir)
    run.mkdir(parents=True)
    stale = [{"step": 1, "tokens": TPS, "train/loss": 9.0}, {"step": 2, "tokens": 2 * TPS, "train/loss": 8.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stale))  # killed before a save
    train(r)
    assert [x["step"] for x in records(run)] == [1, 2, 3]
    assert sum(x.get("event") == "init" for x in read_metrics(run / "metrics.jsonl")) == 1
    assert read_metrics(run / "metrics.jsonl.1") == stale  # set aside, not lost


def test_extending_a_finished_run_continues_exactly(make_recipe, capsys):
    constant = {"kind": "constant", "max_lr": 2e-3, "warmup": 2 * TPS}
    whole = make_recipe("ext-whole", schedule=constant, train__tokens=8 * TPS, probes__every=2 * TPS)
    train(whole)
    short = make_recipe("ext", schedule=constant, train__tokens=4 * TPS, probes__every=2 * TPS)
    train(short)
    longer = make_recipe("ext", schedule=constant, train__tokens=8 * TPS, probes__every=2 * TPS)
    with pytest.raises(CptError, match=r"train.tokens: '4K' -> '8K'"):
        train(longer, resume=True)
    assert train(longer, resume=True, allow_changes=("train.tokens",)).completed
    assert losses(longer.run.output_dir) == losses(whole.run.output_dir)
    probe = [x["probe/en/loss"] for x in records(longer.run.output_dir, "probe/en/loss")]
    assert probe == [x["probe/en/loss"] for x in records(whole.run.output_dir, "probe/en/loss")]
    # a schedule whose shape depends on the budget moves: said, with the new end, and logged
    cos = make_recipe("ext-cos", train__tokens=4 * TPS)
    train(cos)
    capsys.readouterr()
    assert train(make_recipe("ext-cos", train__tokens=8 * TPS), resume=True, allow_changes=("train.tokens",)).completed
    assert "the LR at token 4096 goes from" in capsys.readouterr().out
    change = [x for x in read_metrics(Path(cos.run.output_dir) / "metrics.jsonl") if x.get("event") == "schedule_change"]
    assert len(change) == 1 and change[0]["schedule_change/end_tokens"] == 8 * TPS
    assert change[0]["schedule_change/lr"] > change[0]["schedule_change/lr_was"]


def test_sigint_checkpoints_then_exits_130(make_recipe, tmp_path):
    r = make_recipe("int", train__tokens=200 * TPS)
    path = tmp_path / "int.yaml"
    path.write_text(r.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cpt.cli", "train", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (Path(r.run.output_dir, "metrics.jsonl").exists() and len(losses(r.run.output_dir)) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "checkpoint saved, continue with --resume" in out
    assert ckpt_lib.latest_checkpoint(r.run.output_dir) is not None


def test_overrides_after_a_flag(make_recipe, tmp_path, capsys):
    r = make_recipe("flags")
    path = tmp_path / "flags.yaml"
    path.write_text(r.to_yaml())
    assert cli(["train", str(path), "--dry-run", "train.tokens=4K", "schedule.max_lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "tokens: 4K" in out and "max_lr: 0.001" in out
    with pytest.raises(SystemExit):
        cli(["train", str(path), "--dry-run", "--no-such-flag"])


# ------------------------------------------------------------------------------ disks and kills


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(make_recipe, monkeypatch):
    clean = make_recipe("full-clean", train__tokens=4 * TPS)
    train(clean)
    r = make_recipe("full", train__tokens=4 * TPS, checkpoint__every=TPS, checkpoint__keep_last=5)
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if ".tmp-step-00000003" in str(f):  # what torch.save raised on a full 2 MB tmpfs, measured
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return save(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(CptError, match=r"checkpoint .*step-00000003 could not be written \(RuntimeError: .*\); "
                                           r"nothing partial was kept and the earlier checkpoints are intact"):
            train(r)
    ck = Path(r.run.output_dir) / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000001", "step-00000002"]
    assert train(r, resume=True).completed  # space back: nothing was lost
    assert losses(r.run.output_dir) == losses(clean.run.output_dir)


def test_a_file_size_limit_on_the_real_write_path_is_one_line(make_recipe, tmp_path):
    """The checkpoint's optimizer.bin (2.7 MB) cannot be written under a 2 MB file-size limit: the real
    write fails inside torch.save, the run stops with one line and leaves no temporary dir."""
    r = make_recipe("fsize", train__tokens=2 * TPS, checkpoint__every=TPS)
    path = tmp_path / "fsize.yaml"
    path.write_text(r.to_yaml())
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000)); "
            f"from cpt.cli import main; sys.exit(main(['train', {str(path)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    err = [line for line in out.stderr.splitlines() if line.startswith("cpt:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(err) == 1 and "step-00000001 could not be written" in err[0]
    assert list((Path(r.run.output_dir) / "checkpoints").iterdir()) == []


def test_kill_9_at_random_moments_loses_nothing(make_recipe, tmp_path):
    """SIGKILL at seeded random moments (during steps and during checkpoint writes, every step saves),
    then --resume, until the run finishes: the same per-step losses as a run never killed."""
    import random

    import torch

    whole = make_recipe("kill-many-whole", train__tokens=12 * TPS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed runs (OMP_NUM_THREADS=1): another split of a matmul rounds otherwise
    try:
        train(whole)
    finally:
        torch.set_num_threads(threads)
    r = make_recipe("kill-many", train__tokens=12 * TPS, checkpoint__every=TPS, checkpoint__keep_last=2)
    path = tmp_path / "kill.yaml"
    path.write_text(r.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ck = Path(r.run.output_dir) / "checkpoints"
    rng, kills, mid_save = random.Random(1234), 0, 0

    def start():
        resume_flag = ["--resume"] if ckpt_lib.latest_checkpoint(r.run.output_dir) else []
        return subprocess.Popen([sys.executable, "-m", "cpt.cli", "train", str(path), *resume_flag], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    for _ in range(5):
        proc = start()
        seen = len(losses(r.run.output_dir)) if Path(r.run.output_dir, "metrics.jsonl").exists() else 0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait for this start's first new step
            if Path(r.run.output_dir, "metrics.jsonl").exists() and len(losses(r.run.output_dir)) > seen:
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            break  # finished before the kill
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_save += any(p.name.startswith(".tmp-") for p in ck.iterdir())
    if proc.returncode != 0:  # the last start was killed too: one more, left alone
        proc = start()
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert kills >= 3
    assert losses(r.run.output_dir) == losses(whole.run.output_dir)
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]  # no temporary dir left behind
    assert (Path(r.run.output_dir) / "final" / "model.safetensors").is_file()
    print(f"kill -9: {kills} kills, {mid_save} during a checkpoint write")
