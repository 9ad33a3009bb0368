"""W&B across a resume, read back from W&B's own offline files (``run-<id>.wandb``: wandb's protobuf
records, wandb 0.31 having no Python reader of its own, framed as cpt.tracking.read_wandb_log reads them):
one run id, history steps strictly increasing with none repeated whether the killed segment was finished
or SIGKILLed (which loses W&B's unwritten tail), the resume marked, the config's sizes as numbers beside
their text, job_type and notes set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tracking import finished_records  # tests/ is on sys.path (pytest's rootdir conftest)

from cpt.tracking import WANDB_ID_FILE, Tracker, last_wandb_step, read_metrics, read_wandb_log, wandb_config

RECIPE = {"run": {"name": "7B", "output_dir": "x", "seed": 3},
          "train": {"tokens": "192K", "global_batch_tokens": "1K", "micro_batch_size": 4},
          "schedule": {"kind": "wsd", "warmup": "5%", "decay": {"length": "200 steps"}},
          "data": {"sources": {"en": "data/en"}, "replay_buffer": {"en": "2M tokens"}},
          "stages": [{"name": "a", "tokens": "96K"}]}
CFG = {"project": "cpt-test", "job_type": "cpt", "notes": "resumed after a kill", "tags": ["t"], "mode": "offline"}


def record(step: int, width: int = 1) -> dict:
    """A step's record; the same numbers every time (a resume is exact)."""
    return {"step": step, "tokens": step * 1024, "stage": "a", "train/loss": 5.0 - step / 64,
            **{f"probe/d{i}/loss": 3.0 + i + step / 1000 for i in range(width - 1)}}


def segments(run_dir: Path, finished: bool = False) -> tuple[str, list[list]]:
    """The run id and the records of each of its offline segments, oldest first (``finished``: once each
    holds its exit record)."""
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    logs = [d / f"run-{run_id}.wandb" for d in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))]
    return run_id, [finished_records(p) if finished else read_wandb_log(p) for p in logs]


def of(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def rows(records: list) -> list[tuple[int, dict]]:
    return [(h.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item})
            for h in of(records, "history")]


def next_second() -> None:
    # W&B names an offline segment's dir by its start time to the second: a resume in the same second
    # (only in a test) would share the killed segment's dir
    time.sleep(1.01 - time.time() % 1)


def resume(run_dir: Path, at: int, last: int, width: int = 1) -> None:
    """A resumed process: from the checkpoint at step ``at`` (one record a step up to it kept), logs the
    resume event as cpt.train.setup does, then steps ``at + 1 .. last``."""
    t = Tracker(run_dir, RECIPE, enabled=True, resume_step=at, wandb_cfg=CFG, keep_records=at + 1)
    t.log({"step": at, "tokens": at * 1024, "event": "resume", "resume/from": "step-8", "resume/processes": 2,
           "resume/processes_was": 1})
    for s in range(at + 1, last + 1):
        t.log(record(s, width))
    t.close()


def test_resume_appends_to_the_run_without_repeating_or_rewinding_steps(tmp_path):
    run_dir = tmp_path / "run"
    t = Tracker(run_dir, RECIPE, enabled=True, wandb_cfg=CFG)
    for s in range(14):  # a run killed 5 steps past its step-8 checkpoint (finish marks it failed)
        t.log(record(s))
    t.close(exit_code=1)
    segments(run_dir, finished=True)  # on disk, as it is long before any resume
    next_second()
    resume(run_dir, 8, 24)
    run_id, (first, second) = segments(run_dir, finished=True)

    # one W&B run: both segments carry its id, job type and notes
    runs = of(first, "run") + of(second, "run")
    assert [(r.run_id, r.project, r.job_type, r.notes, r.display_name) for r in runs] == \
        [(run_id, "cpt-test", "cpt", "resumed after a kill", "7B")] * 2
    # W&B's steps: 0..13, then 14..24 (9..13 recomputed, not sent again): strictly increasing, none twice
    assert [s for s, _ in rows(first)] == list(range(14))
    assert [s for s, _ in rows(second)] == list(range(14, 25))
    # the resume is an event in W&B: at the first step W&B did not hold (a step of its own would rewind)
    step, row = rows(second)[0]
    assert (row["event/resume"], row["resume/processes"], row["resume/processes_was"]) == (1, 2, 1)
    assert (row["step"], row["tokens"], row["train/loss"]) == (14, 14 * 1024, record(14)["train/loss"])
    assert not any("event/resume" in r for _, r in rows(first) + rows(second)[1:])
    # ... and in metrics.jsonl, at the checkpoint's step, whose records it continues from
    got = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["step"], r.get("event")) for r in got] == \
        [(s, None) for s in range(9)] + [(8, "resume")] + [(s, None) for s in range(9, 25)]

    # the config: the recipe's text, and numbers beside its sizes
    config = {i.key: json.loads(i.value_json) for i in runs[1].config.update}
    assert config["train"] | config["schedule"] == {
        "tokens": "192K", "tokens_n": 192 * 1024, "global_batch_tokens": "1K", "global_batch_tokens_n": 1024,
        "micro_batch_size": 4, "kind": "wsd", "warmup": "5%", "warmup_frac": 0.05,
        "decay": {"length": "200 steps", "length_steps": 200}}
    assert config["data"]["replay_buffer"] == {"en": "2M tokens", "en_n": 2 * 2**20}
    assert config["run"] == RECIPE["run"] and config["stages"] == [{"name": "a", "tokens": "96K", "tokens_n": 96 * 1024}]


KILLED = """
import os, signal, sys
from cpt.tracking import Tracker
sys.path.insert(0, {tests!r})
from test_wandb_resume import CFG, RECIPE, record
t = Tracker({run!r}, RECIPE, enabled=True, wandb_cfg=CFG)
for s in range({steps}):
    t.log(record(s, {width}))
def parent(pid):
    try:
        with open(f"/proc/{{pid}}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
print(*[p for p in os.listdir("/proc") if p.isdigit() and parent(p) == os.getpid()], flush=True)  # W&B's service
os.kill(os.getpid(), signal.SIGKILL)
"""


def wait_gone(pids: list[str], timeout: float = 30.0) -> None:
    """Until these processes have exited (or are zombies)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                    break
            except OSError:
                break
            time.sleep(0.05)


@pytest.mark.parametrize("steps, width, at", [(14, 1, 8), (300, 20, 200)], ids=["none-written", "tail-lost"])
def test_resume_after_sigkill_backfills_what_wandb_lost(tmp_path, steps, width, at):
    """A SIGKILLed process leaves W&B's log without its unwritten tail (W&B writes 32 KiB blocks): in a
    short run all of it, so the resume sends the kept records W&B lacks (0..8) from metrics.jsonl; in a
    longer one a tail past the checkpoint, so it goes on after the last step the log holds."""
    run_dir = tmp_path / "run"
    code = KILLED.format(tests=str(Path(__file__).parent), run=str(run_dir), steps=steps, width=width)
    # its own W&B service, as a killed run had (not this process's, which W&B hands its children)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr
    # W&B's service outlives the killed process by a moment, writing what it had been sent; a resume
    # comes long after it is gone
    wait_gone(done.stdout.split())
    [killed_log] = (run_dir / "wandb").glob("offline-run-*/*.wandb")
    held = [s for s, _ in rows(read_wandb_log(killed_log))]
    assert held == list(range(len(held))) and len(held) < steps  # a prefix: the tail is lost
    assert last_wandb_step(killed_log) == (held[-1] if held else -1)  # read from the end
    if steps > 100:  # the log holds steps past the checkpoint: those are not sent again
        assert held[-1] > at, "W&B wrote less than expected of the killed run: the test no longer shows a skip"
    next_second()
    resume(run_dir, at, steps + 9, width)
    _, [_, resumed] = segments(run_dir)
    resumed = finished_records(next(p for p in (run_dir / "wandb").glob("offline-run-*/*.wandb") if p != killed_log))
    sent = [s for s, _ in rows(resumed)]
    assert held + sent == list(range(steps + 10))  # every step once, in order, across both segments
    assert sum("event/resume" in r for _, r in rows(resumed)) == 1
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r] == list(range(steps + 10))


def test_wandb_config_sizes_get_numeric_twins():
    got = wandb_config({"a": {"tokens": "2M", "warmup": "10%", "length": "50 steps", "every": "65537",
                              "kind": "auto", "path": "data/2M", "name": "1B", "lr": 0.1, "n": 5},
                        "points": [{"at": "80%"}, {"at": "decay"}]})
    assert got == {"a": {"tokens": "2M", "tokens_n": 2**21, "warmup": "10%", "warmup_frac": 0.1, "length": "50 steps",
                         "length_steps": 50, "every": "65537", "every_n": 65537, "kind": "auto", "path": "data/2M",
                         "name": "1B", "lr": 0.1, "n": 5},
                   "points": [{"at": "80%", "at_frac": 0.8}, {"at": "decay"}]}


def test_wandb_steps_only_grow(tmp_path):
    """The step rules alone, on a stand-in run: W&B holds steps up to 5 (an earlier segment)."""

    class Run:
        calls: list = []

        def log(self, values, step=None):
            self.calls.append((step, sorted(values)))

        def finish(self, exit_code=0):
            pass

    t = Tracker(tmp_path, RECIPE, enabled=True)
    t.wandb_run, t._wandb_step = Run(), 5
    for r in [{"step": 3, "train/loss": 1.0},  # held by W&B: JSONL only
              {"step": 5, "train/loss": 1.0},  # held too (W&B wrote that row already)
              {"step": 3, "event": "resume", "resume/processes": 2},  # news: to W&B's next step, 6
              {"step": 6, "train/loss": 0.5},  # the same row
              {"step": 6, "event": "loss_spike", "ok": True},  # an event of its step: in the row (a bool is not sent)
              {"step": 7, "train/loss": 0.4},
              {"step": 6, "event": "stage_end"},  # would rewind W&B: JSONL only
              {"step": 2, "event": "schedule_change", "schedule_change/lr": 0.1},  # news: into the open row, 7
              {"probe/en/loss": 2.0}]:  # no step: the open row
        t.log(r)
    t.close()
    assert t.metrics.count == 9
    assert Run.calls == [(6, ["event/resume", "resume/processes", "step"]), (6, ["step", "train/loss"]),
                         (6, ["event/loss_spike", "step"]), (7, ["step", "train/loss"]),
                         (7, ["event/schedule_change", "schedule_change/lr", "step"]), (7, ["probe/en/loss"])]
