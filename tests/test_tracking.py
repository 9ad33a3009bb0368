"""Tracking: JSONL always; W&B offline really writes a run (config = the recipe, tokens as x-axis) that
a resume continues; no key online falls back to offline; a broken W&B never stops training."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from cpt.tracking import (
    WANDB_ID_FILE,
    Tracker,
    WandbConfig,
    read_metrics,
    read_wandb_log,
    wandb_api_key_configured,
)

RECIPE = {"run": {"name": "track-me", "output_dir": "x", "seed": 3}, "schedule": {"kind": "wsd", "max_lr": 0.001}}
RECORDS = [
    {"step": 0, "tokens": 0, "probe/en/loss": 5.0, "stage": "a"},
    {"step": 1, "tokens": 1024, "train/loss": 4.5, "lr": 1e-3, "stage": "a"},
    {"step": 2, "tokens": 2048, "train/loss": float("nan"), "lr": 1e-3, "stage": "b"},
]


def finished_records(path: Path, timeout: float = 30.0) -> list:
    """The records of a finished run. finish() returns before W&B's service process has written the
    offline log to disk (it flushes in the background), so wait for the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_log(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_disabled_and_absent_wandb_write_jsonl_only(tmp_path):
    for cfg in (None, {"mode": "disabled"}):
        run = tmp_path / str(cfg is None)
        run.mkdir()
        t = Tracker(run, RECIPE, enabled=True, wandb_cfg=cfg)
        for r in RECORDS:
            t.log(r)
        t.close()
        assert t.wandb_run is None
        assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
        got = read_metrics(run / "metrics.jsonl")
        assert [r["step"] for r in got] == [0, 1, 2] and got[2]["train/loss"] == "nan" and got[0]["stage"] == "a"
    # a non-main process writes nothing at all
    other = tmp_path / "rank1"
    other.mkdir()
    t = Tracker(other, RECIPE, enabled=False, wandb_cfg={"mode": "offline"})
    t.log(RECORDS[0])
    t.close()
    assert list(other.iterdir()) == []


def test_wandb_offline_run_and_resume_continue_one_run(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    cfg = {"project": "cpt-test", "group": "ablation", "tags": ["tiny"], "mode": "offline"}
    t = Tracker(run_dir, RECIPE, enabled=True, wandb_cfg=cfg)
    assert t.wandb_run is not None
    for r in RECORDS:
        t.log(r)
    t.close()
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    [first] = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    records = finished_records(first / f"run-{run_id}.wandb")
    [run_rec] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run_rec.run_id, run_rec.project, run_rec.display_name, run_rec.run_group) == \
        (run_id, "cpt-test", "track-me", "ablation")
    assert list(run_rec.tags) == ["tiny"]
    config = {item.key: json.loads(item.value_json) for item in run_rec.config.update}
    assert config["run"] == RECIPE["run"] and config["schedule"] == RECIPE["schedule"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["tokens"] for h in history] == [0, 1024, 2048]
    assert [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"] == [0, 1, 2]
    assert history[1]["train/loss"] == 4.5 and "stage" not in history[1]  # numbers only
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "tokens" for m in metrics)

    # --resume: the same W&B run id. "online" without any key configured falls back to offline.
    # W&B names offline dirs by start time to the second: a resume within the same second (only in a
    # test) would share the first segment's dir, so start it in the next second.
    time.sleep(1.01 - time.time() % 1)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    t = Tracker(run_dir, RECIPE, enabled=True, resume_step=1, wandb_cfg={**cfg, "mode": "online"})
    t.log({"step": 2, "tokens": 2048, "train/loss": 4.0})
    t.log({"step": 3, "tokens": 3072, "train/loss": 3.5})
    t.close()
    assert "no W&B API key is configured" in capsys.readouterr().err
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2 and segments[0] == first  # the resumed segment: same W&B run id, own dir
    resumed = finished_records(segments[1] / f"run-{run_id}.wandb")
    assert [r.run.run_id for r in resumed if r.WhichOneof("record_type") == "run"] == [run_id]
    # W&B's own step is cpt's: the resumed segment goes on past the steps the first one holds (step 2,
    # recomputed, is not sent again), not at its own counter's 0
    steps = [r.history.step.num for r in resumed if r.WhichOneof("record_type") == "history"]
    assert steps == [3]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]  # trimmed, then appended


def test_api_key_detection(tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    assert not wandb_api_key_configured()
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    assert wandb_api_key_configured()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not wandb_api_key_configured()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_api_key_configured()


def test_broken_wandb_degrades_to_jsonl(tmp_path, monkeypatch, capsys):
    import wandb

    def boom(**kwargs):
        raise RuntimeError("service crashed")

    monkeypatch.setattr(wandb, "init", boom)
    t = Tracker(tmp_path, RECIPE, enabled=True, wandb_cfg={"mode": "offline"})
    t.log(RECORDS[1])
    t.close()
    assert "W&B init failed (RuntimeError: service crashed); continuing with metrics.jsonl only" in capsys.readouterr().err
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["train/loss"] == 4.5

    class DyingRun:
        def log(self, values, step=None):
            raise OSError("pipe closed")

    t = Tracker(tmp_path / "b", RECIPE, enabled=False)
    t.metrics = type(t.metrics)(tmp_path / "b.jsonl", enabled=True)
    t.wandb_run = DyingRun()
    t.log(RECORDS[1])
    t.log(RECORDS[2])  # W&B dropped after the first failure, JSONL goes on
    t.close()
    assert capsys.readouterr().err.count("W&B logging failed") == 1
    assert len(read_metrics(tmp_path / "b.jsonl")) == 2


def test_wandb_config_schema():
    assert WandbConfig().mode == "offline" and WandbConfig().project == "cpt"
    with pytest.raises(ValidationError):
        WandbConfig(projekt="x")
    with pytest.raises(ValidationError):
        WandbConfig(mode="sometimes")
    assert all(f.description for f in WandbConfig.model_fields.values())
    # wandb.init's common keys, each passed on
    cfg = WandbConfig(entity="team", name="n", group="g", job_type="cpt", tags=["t"], notes="why", dir="d",
                      save_code=True)
    assert (cfg.job_type, cfg.notes, cfg.dir, cfg.save_code) == ("cpt", "why", "d", True)
