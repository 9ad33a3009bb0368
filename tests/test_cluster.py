"""Faults of a multi-node run, on two "nodes" on localhost (two `accelerate launch --num_machines 2`, one
gloo process each): a stop signal that reaches one rank, a frozen peer, a killed peer, a killed launcher;
and `--resume auto` for a first start and a requeue. Each fault ends in seconds with a checkpoint every
rank agrees on, or with one line that names the last intact checkpoint (docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, metric

from cpt import checkpoint as ckpt_lib
from cpt.errors import CptError
from cpt.state import read_trainer_state

pytestmark = pytest.mark.multiproc


class Nodes:
    """Two launchers of one run (machine ranks 0 and 1), their output in files."""

    def __init__(self, recipe_path: Path, *args: str, out: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        port = free_port()
        self.logs = [out / f"node{r}.err" for r in (0, 1)]
        self.procs = []
        for rank in (0, 1):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "cpt.cli", "train", str(recipe_path), *args]
            with open(self.logs[rank], "w") as err:
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                                   start_new_session=True))

    def worker(self, rank: int) -> int:
        """The pid of node ``rank``'s training process (a descendant of its launcher running cpt.cli)."""
        deadline = time.time() + 60
        while time.time() < deadline:
            for pid in _descendants(self.procs[rank].pid):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"cpt.cli" in cmd and b"accelerate.commands.launch" not in cmd:
                    return pid
            time.sleep(0.1)
        raise AssertionError(f"no worker under launcher {rank}")

    def wait(self, timeout: float, ranks=(0, 1)) -> list[int | None]:
        """Exit codes of both launchers (None for one still running after ``timeout`` seconds, or not
        waited for: not in ``ranks``)."""
        deadline = time.time() + timeout
        while time.time() < deadline and any(self.procs[r].poll() is None for r in ranks):
            time.sleep(0.1)
        return [p.poll() for p in self.procs]

    def err(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def kill(self) -> None:
        for p in self.procs:
            for pid in [*_descendants(p.pid), p.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else []:
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _steps_logged(run_dir: Path, n: int, nodes: Nodes, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ((Path(run_dir) / "metrics.jsonl").exists() and len(metric(run_dir)) >= n):
        assert all(p.poll() is None for p in nodes.procs), nodes.err(0)[-3000:] + nodes.err(1)[-3000:]
        assert time.time() < deadline, "the run did not get going"
        time.sleep(0.05)


@pytest.fixture
def faulty(two_proc_recipe, tmp_path):
    """A 40-step 2-node recipe with a short collective timeout; the launched nodes are killed at the end."""
    launched: list[Nodes] = []

    def make(name: str, *args: str, extra=None, **train):
        r, path = two_proc_recipe(name, tokens=40 * 1024, extra=extra, **{"collective_timeout": 20, **train})
        nodes = Nodes(path, *args, out=tmp_path)
        launched.append(nodes)
        return r, path, nodes

    yield make
    for nodes in launched:
        nodes.kill()


def test_a_signal_to_one_rank_stops_both_at_one_checkpoint_and_resume_is_exact(faulty, two_proc_recipe, tmp_path):
    r, path, nodes = faulty("one-signal")
    _steps_logged(r.run.output_dir, 3, nodes)
    os.kill(nodes.worker(0), signal.SIGTERM)  # Ctrl-C / kill in one node's terminal: the other never sees it
    codes = nodes.wait(120)
    assert None not in codes, "a signal to one rank must not leave the run hanging"
    last = ckpt_lib.latest_checkpoint(r.run.output_dir)
    assert last is not None, "no checkpoint: the ranks did not stop together"
    step = read_trainer_state(last).step
    assert 3 <= step < 40 and {f.name for f in last.glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}  # both ranks saved the same step
    assert codes == [1, 1], codes  # each torchrun reports its worker's 143 as a failure (exit 1)
    resumed = Nodes(path, "--resume", out=tmp_path)
    assert resumed.wait(300) == [0, 0], resumed.err(0)[-3000:]
    whole, whole_path = two_proc_recipe("never-stopped", tokens=40 * 1024, collective_timeout=20)
    straight = Nodes(whole_path, out=tmp_path)
    assert straight.wait(300) == [0, 0], straight.err(0)[-3000:]
    assert metric(r.run.output_dir) == pytest.approx(metric(whole.run.output_dir), abs=1e-6)
    assert len(metric(r.run.output_dir)) == 40


def test_a_frozen_peer_ends_the_run_within_the_timeout_with_the_checkpoint(faulty):
    r, _, nodes = faulty("frozen", collective_timeout=8)
    _steps_logged(r.run.output_dir, 3, nodes)
    frozen = nodes.worker(1)
    os.kill(frozen, signal.SIGSTOP)
    t0 = time.time()
    codes = nodes.wait(90, ranks=(0,))
    took = time.time() - t0
    os.kill(frozen, signal.SIGKILL)
    assert codes[0] not in (None, 0), f"node 0 still waiting after {took:.0f} s"
    err = nodes.err(0)
    assert "a peer process stopped answering for train.collective_timeout = 8 s" in err, err[-3000:]
    assert "relaunch every node with the same command and --resume auto" in err
    assert took < 8 + 30, f"{took:.0f} s"
    last = ckpt_lib.latest_checkpoint(r.run.output_dir)
    assert (f"the last intact checkpoint is {last}" if last else "none: the run starts over") in err
    assert "free space" not in err  # a failed collective is no disk problem


def test_a_killed_peer_ends_the_run_at_once_with_the_checkpoint(faulty):
    r, _, nodes = faulty("killed", extra={"checkpoint": {"every": 2048}})
    _steps_logged(r.run.output_dir, 4, nodes)
    os.kill(nodes.worker(1), signal.SIGKILL)
    t0 = time.time()
    codes = nodes.wait(60, ranks=(0,))
    assert codes[0] not in (None, 0) and time.time() - t0 < 30
    err = nodes.err(0)
    last = ckpt_lib.latest_checkpoint(r.run.output_dir)
    assert last is not None and "a peer process is gone" in err and f"checkpoint is {last}" in err, err[-3000:]
    read_trainer_state(last)  # intact


def test_killing_a_launcher_stops_its_worker_and_the_run_at_one_checkpoint(faulty):
    r, _, nodes = faulty("launcher-killed")
    _steps_logged(r.run.output_dir, 3, nodes)
    orphan = nodes.worker(1)
    os.killpg(nodes.procs[1].pid, signal.SIGKILL)  # the launcher's process group; torchrun's worker is not in it
    codes = nodes.wait(120, ranks=(0,))
    assert codes[0] is not None, "node 0 kept waiting"
    deadline = time.time() + 60
    while Path(f"/proc/{orphan}").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{orphan}").exists() or "Z" in Path(f"/proc/{orphan}/stat").read_text().split()[2], \
        "the worker of the killed launcher trains on"
    last = ckpt_lib.latest_checkpoint(r.run.output_dir)
    assert last is not None and len(list(last.glob("random_states_*.pkl"))) == 2, nodes.err(0)[-3000:]


def test_a_stop_signal_repeated_within_two_seconds_is_one_stop_and_later_stops_at_once():
    """SLURM signals every process of a job step and the launcher forwards the signal again: a worker gets it
    twice within milliseconds, which must not be taken for Ctrl-C pressed twice."""
    from cpt.train.signals import StopFlag

    clock = [100.0]
    stop = StopFlag(clock=lambda: clock[0])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        clock[0] += 0.01
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGUSR1
        clock[0] += 5
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


def test_resume_auto_starts_fresh_then_resumes_and_refuses_another_run(make_recipe):
    from cpt.train.loop import train

    r = make_recipe("auto", train__tokens=8 * 1024, checkpoint__every=2048)
    first = train(r, resume="auto", max_steps=3)  # a first start: nothing to resume
    assert not first.completed and first.step == 3
    again = train(r, resume="auto")  # the requeue: the same command resumes
    assert again.completed and again.step == 8
    assert [e["resume/from"] for e in _events(r, "resume")] == [str(Path(r.run.output_dir) / "checkpoints/step-00000003")]
    other = make_recipe("auto", train__tokens=8 * 1024, checkpoint__every=2048, schedule__max_lr=1e-3)
    with pytest.raises(CptError, match=r"--resume: the recipe differs from the checkpoint's in schedule.max_lr"):
        train(other, resume="auto")
    fresh_dir = make_recipe("auto-fresh", train__tokens=4 * 1024)
    Path(fresh_dir.run.output_dir).mkdir(parents=True)
    (Path(fresh_dir.run.output_dir) / "recipe.yaml").write_text(other.to_yaml())  # another run, no checkpoint
    with pytest.raises(CptError, match=r"--resume auto: the recipe differs from the one in .* \(another run\)"):
        train(fresh_dir, resume="auto")


def _events(r, name: str) -> list[dict]:
    from cpt.tracking import read_metrics

    return [e for e in read_metrics(Path(r.run.output_dir) / "metrics.jsonl") if e.get("event") == name]
