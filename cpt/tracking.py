"""Metrics: one JSONL path, written by the main process only, optionally mirrored to W&B.

Every record carries ``step`` and ``tokens`` (the x-axis for everything in cpt) and prefixed keys:
``train/loss``, ``lr``, ``train/grad_norm``, ``train/tokens_per_s``, ``train/peak_mem_gib`` (CUDA) or
``train/peak_rss_gib`` (elsewhere: the main process's peak resident memory), ``probe/<domain>/loss``, ...

The JSONL file is the record of the run (``cpt compare`` reads it); W&B is a dashboard on top
(:class:`Tracker`), and a failing W&B never stops training.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field

from cpt.errors import CptError
from cpt.units import StrictModel, parse_length


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a kill is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class MetricsLog:
    """Append-only JSONL metrics. On resume, what was written after the checkpoint is dropped first, so
    the file always describes one consistent history (those records are about to be written again).

    ``keep_records`` (the count a checkpoint recorded when it was saved) cuts exactly; without it,
    records past ``resume_step`` are dropped (records at that very step, such as the next stage's
    baseline logged after the checkpoint, cannot be told apart by step alone)."""

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None,
                 keep_records: int | None = None):
        self.path = Path(path)
        self._f = None
        self.count = 0  # records in the file: a checkpoint stores it as its cut point
        self.kept: list[dict[str, Any]] = []  # on resume, the records kept (the Tracker takes them for W&B)
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = read_metrics(self.path)
            kept = kept[:keep_records] if keep_records is not None else [
                r for r in kept if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
            self.count, self.kept = len(kept), kept
        elif self.path.exists():
            # a fresh start where a run died before its first checkpoint: its records describe another
            # history, so they are set aside (metrics.jsonl.1, .2, ...), never appended to or deleted
            n = 1
            while self.path.with_name(f"{self.path.name}.{n}").exists():
                n += 1
            kept = self.path.rename(self.path.with_name(f"{self.path.name}.{n}"))
            print(f"cpt: note: {self.path} of an earlier start (no checkpoint) moved to {kept.name}")
        self._f = open(self.path, "a", buffering=1)  # line-buffered: a kill loses at most one record

    def log(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            try:
                self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            except OSError as e:  # e.g. disk full: say which file, not a traceback from deep in the loop
                raise CptError(f"{self.path} could not be written ({e.strerror or e}); the run's checkpoints "
                               f"are intact: free space, then --resume") from None
            self.count += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; a diverged loss must still be a valid record
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# ---------------------------------------------------------------------------------------------- W&B


class WandbConfig(StrictModel):
    """``tracking.wandb``: mirror the metrics to Weights & Biases (one W&B run per cpt run). The keys are
    ``wandb.init``'s; the run id (``RUN_DIR/wandb_id.txt``) and resuming are cpt's."""

    project: str = Field("cpt", description="W&B project.")
    entity: str | None = Field(None, description="W&B user or team; null = the API key's default entity.")
    name: str | None = Field(None, description="W&B run name; null = run.name.")
    group: str | None = Field(
        None, description="W&B group, e.g. one per experiment (the runs of an ablation side by side)."
    )
    job_type: str | None = Field(
        None, description="W&B job type, e.g. pretrain, cpt, anneal: runs filter and group by it."
    )
    tags: list[str] = Field(default_factory=list, description="W&B tags.")
    notes: str | None = Field(None, description="W&B notes: a longer description of the run.")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline = write under RUN_DIR/wandb, upload later with `wandb sync`; "
        "online = stream (falls back to offline without an API key); disabled = JSONL only."
    )
    dir: str | None = Field(
        None, description="Where W&B keeps its files (a wandb/ folder under it); null = the run dir."
    )
    save_code: bool = Field(False, description="Save the launching script to the W&B run.")


WANDB_ID_FILE = "wandb_id.txt"
_INIT_TIMEOUT_S = 30  # online init with a key but no route to the server fails after this, not W&B's 90 s
# Events about a process start rather than a training step (cpt.train.setup logs them on resume, at the
# checkpoint's step): new, where the records of the steps after the checkpoint are replays (see Tracker)
SEGMENT_EVENTS = frozenset({"resume", "processes_change", "schedule_change"})


class Tracker:
    """Metrics sink of a run: JSONL always (via :class:`MetricsLog`), plus W&B when configured.

    ``log(record)`` writes the JSONL record and sends its numbers to W&B at W&B step = the record's
    ``step`` (records of one step make one history row), with ``tokens`` the x-axis of every chart; an
    event record also sends ``event/<name>: 1``. The config is the recipe with numeric twins of its sizes
    (:func:`wandb_config`). Any W&B failure degrades to JSONL-only with one warning: tracking must never
    kill a training run.

    A ``--resume`` (``resume_step`` given) continues the same W&B run (id in ``RUN_DIR/wandb_id.txt``,
    ``resume="allow"``) without repeating or rewinding a step. W&B's steps must only grow, and an offline
    resume is a new segment synced after the first, so what W&B already holds is read back from W&B's own
    files: the last history step stored in the run's earlier segments (``RUN_DIR/wandb/*-<id>/run-<id>.wandb``),
    or on an online resume the server's (``run.starting_step``). That, not the steps cpt handed W&B, is what
    survives a SIGKILL: W&B writes its log in 32 KiB blocks, so a killed process loses its last rows (all of
    them in a short run). Then the records kept in metrics.jsonl up to the checkpoint that W&B lacks are
    sent again (backfill); the steps recomputed after the checkpoint go to metrics.jsonl, and to W&B only
    past the steps it holds (a resume is exact: the numbers it holds are the same). Events of the start
    itself (:data:`SEGMENT_EVENTS`), which belong to a step W&B already holds,
    go to W&B at its next step instead (their own ``step``/``tokens`` stay in the row until that step's
    record replaces them).
    """

    def __init__(self, run_dir: str | Path, recipe_dict: dict[str, Any], *, enabled: bool,
                 resume_step: int | None = None, wandb_cfg: WandbConfig | dict[str, Any] | None = None,
                 keep_records: int | None = None):
        self.run_dir = Path(run_dir)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled, resume_step, keep_records)
        kept, self.metrics.kept = self.metrics.kept, []
        self.wandb_run = None
        self._wandb_step = -1  # the last step W&B holds (earlier segments) or this process sent it
        self._row_open = False  # whether this process sent that step's row (records of the step merge in)
        if not enabled or wandb_cfg is None:
            return
        cfg = WandbConfig.model_validate(wandb_cfg)
        if cfg.mode != "disabled":
            started = _init_wandb(self.run_dir, recipe_dict, cfg, resume=resume_step is not None)
            if started is not None:
                self.wandb_run, self._wandb_step = started
                # backfill: what W&B lost of the run up to the checkpoint (a killed process's unwritten rows)
                lost = [r for r in kept if isinstance(r.get("step"), int) and r["step"] > self._wandb_step]
                if lost:
                    print(f"cpt: note: W&B lacks steps {lost[0]['step']}-{lost[-1]['step']} of this run (lost "
                          f"when it was killed); sending them again from metrics.jsonl")
                for record in lost:
                    self._send({k: _unclean(v) for k, v in record.items()})

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)
        if self.wandb_run is not None:
            self._send(record)

    def _send(self, record: dict[str, Any]) -> None:
        """The record's numbers to W&B at a step W&B does not hold yet (see the class doc)."""
        event = record.get("event")
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if isinstance(event, str):
            values[f"event/{event}"] = 1
        step = record.get("step", self._wandb_step if self._row_open else None)
        if not isinstance(step, int) or isinstance(step, bool):
            return
        if step < self._wandb_step or (step == self._wandb_step and not self._row_open):
            if event not in SEGMENT_EVENTS:
                return  # W&B holds this step (an earlier segment sent it) or is past it: JSONL only
            step = self._wandb_step if self._row_open else self._wandb_step + 1
        self._wandb_step, self._row_open = step, True
        try:
            self.wandb_run.log(values, step=step)
        except Exception as e:  # e.g. the W&B service died: keep training, keep the JSONL
            _warn(f"W&B logging failed ({type(e).__name__}: {e}); continuing with metrics.jsonl only")
            self.wandb_run = None

    def close(self, exit_code: int = 0) -> None:
        """Close the JSONL file and finish the W&B run (a non-zero ``exit_code`` marks it failed)."""
        self.metrics.close()
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:
                _warn(f"W&B finish failed ({type(e).__name__}: {e})")


def _unclean(v: Any) -> Any:
    """Inverse of :func:`_clean` (a record read back from metrics.jsonl, sent to W&B as it was logged)."""
    return float(v) if v in ("nan", "inf", "-inf") else v


def _init_wandb(run_dir: Path, recipe_dict: dict[str, Any], cfg: WandbConfig, resume: bool):
    """(the W&B run, the last step W&B holds of it: -1 for a new run), or None where W&B fails."""
    mode, wandb_dir = cfg.mode, Path(cfg.dir) if cfg.dir else run_dir
    if mode == "online" and not wandb_api_key_configured():
        # W&B would prompt for a key (or wait on a login) in the middle of a batch job
        _warn("tracking.wandb.mode is online but no W&B API key is configured (WANDB_API_KEY or "
              f"~/.netrc); logging offline under {wandb_dir / 'wandb'} instead (upload later with `wandb sync`)")
        mode = "offline"
    try:
        import wandb

        wandb_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_ID_FILE
        if resume and id_file.is_file():
            run_id = id_file.read_text().strip()
            held = max((last_wandb_step(p) for p in (wandb_dir / "wandb").glob(f"*-{run_id}/run-{run_id}.wandb")),
                       default=-1)
        else:  # a fresh run is a new W&B run, even in a directory a killed run left behind
            run_id, held = secrets.token_hex(4), -1
            id_file.write_text(run_id + "\n")
        run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, job_type=cfg.job_type, tags=cfg.tags,
            notes=cfg.notes, name=cfg.name or recipe_dict.get("run", {}).get("name"),
            config=wandb_config(recipe_dict), dir=str(wandb_dir), save_code=cfg.save_code,
            id=run_id, resume="allow", mode=mode,
            # console="off": W&B would otherwise wrap stdout/stderr, which fights the progress bar
            settings=wandb.Settings(silent=True, console="off", init_timeout=_INIT_TIMEOUT_S),
        )
        if run.resumed and not run.offline:  # online: the server says what it holds
            held = run.starting_step - 1
        run.define_metric("tokens")
        run.define_metric("*", step_metric="tokens")  # tokens, not W&B's call counter, on every x-axis
        return run, held
    except Exception as e:  # ImportError, a broken service, a timeout: JSONL carries the run alone
        _warn(f"W&B init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "continuing with metrics.jsonl only")
        return None


# numeric twins of the recipe's sizes: suffix by what the number counts
TWIN_SUFFIXES = {"tokens": "_n", "fraction": "_frac", "steps": "_steps"}


def wandb_config(recipe_dict: Any) -> Any:
    """The recipe as the W&B config: every size keeps the text the recipe wrote and gets a number beside
    it, so runs filter and group on it: ``tokens: 192K`` adds ``tokens_n: 196608`` (a count: tokens),
    ``warmup: 5%`` adds ``warmup_frac: 0.05`` (a fraction of the stage budget), ``length: 200 steps`` adds
    ``length_steps: 200`` (optimizer steps). Names (``name`` keys) are left as text."""
    if isinstance(recipe_dict, list):
        return [wandb_config(v) for v in recipe_dict]
    if not isinstance(recipe_dict, dict):
        return recipe_dict
    out = {}
    for key, value in recipe_dict.items():
        out[key] = wandb_config(value)
        if isinstance(value, str) and key != "name":
            try:  # parse_length takes sizes only (2M, 65537, 5%, 200 steps, 2M tokens): not auto, paths
                length = parse_length(value)
            except ValueError:
                continue
            twin = f"{key}{TWIN_SUFFIXES[length.unit]}"
            if twin not in recipe_dict:
                out[twin] = int(length.value) if length.unit != "fraction" else length.value
    return out


# ---------------------------------------------------------- W&B's transaction log (run-<id>.wandb)

_BLOCK, _HEADER = 32768, 7  # LevelDB-log blocks; the file opens with b":W&B", a magic and a version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_log(path: str | Path, first_block: int = 0) -> list:
    """The records (``wandb.proto.wandb_internal_pb2.Record``) of a W&B transaction log, the file W&B
    writes for every run (``wandb sync`` uploads it), from block ``first_block`` on (records begun in
    an earlier block are skipped). LevelDB-log framing: chunks of crc32 (of type + data, 4 bytes LE),
    length (2), type (1: full, 2: first, 3: middle, 4: last), data; never across a 32 KiB block. Reading
    stops at a torn or damaged chunk (the tail a killed process left)."""
    from wandb.proto import wandb_internal_pb2 as pb

    base = first_block * _BLOCK
    with open(path, "rb") as f:
        if f.read(4) != b":W&B":
            raise CptError(f"{path}: not a W&B transaction log")
        f.seek(base)
        data = f.read()
    records, pending, pos, end = [], None, max(base, _HEADER), base + len(data)
    while pos + 7 <= end:
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # a block's last bytes, too few for a chunk header: zero padding
            pos += room
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos - base)
        body = data[pos - base + 7:pos - base + 7 + length]
        if len(body) < length or kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or \
                zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            break
        pos += 7 + length
        if kind in (_FULL, _FIRST):
            pending = [body]
        elif pending is not None:
            pending.append(body)
        if kind in (_FULL, _LAST) and pending is not None:
            record = pb.Record()
            try:
                record.ParseFromString(b"".join(pending))
            except Exception:  # a damaged record: what follows cannot be trusted either
                break
            records.append(record)
            pending = None
    return records


def last_wandb_step(path: str | Path) -> int:
    """The last history step a W&B transaction log holds (-1: none), read from its end: W&B's steps only
    grow within a log, so the last block holding a history row tells."""
    try:
        size = os.path.getsize(path)
        for block in range(max(size - 1, 0) // _BLOCK, -1, -1):
            steps = [r.history.step.num for r in read_wandb_log(path, block) if r.HasField("history")]
            if steps:
                return max(steps)
    except (OSError, CptError) as e:
        _warn(f"{path} could not be read ({e}); W&B may get steps of it again")
    return -1


def wandb_api_key_configured() -> bool:
    """Whether W&B has a key to log in with: ``WANDB_API_KEY`` or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _warn(msg: str) -> None:
    print(f"cpt: warning: {msg}", file=sys.stderr)
