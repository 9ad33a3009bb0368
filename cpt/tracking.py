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
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field

from cpt.errors import CptError
from cpt.units import StrictModel


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
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = read_metrics(self.path)
            kept = kept[:keep_records] if keep_records is not None else [
                r for r in kept if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
            self.count = len(kept)
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
    """``tracking.wandb``: mirror the metrics to Weights & Biases (one W&B run per cpt run)."""

    project: str = Field("cpt", description="W&B project.")
    group: str | None = Field(
        None, description="W&B group, e.g. one per experiment (the runs of an ablation side by side)."
    )
    tags: list[str] = Field(default_factory=list, description="W&B tags.")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline = write under RUN_DIR/wandb, upload later with `wandb sync`; "
        "online = stream (falls back to offline without an API key); disabled = JSONL only."
    )
    entity: str | None = Field(None, description="W&B user or team; null = the API key's default entity.")


WANDB_ID_FILE = "wandb_id.txt"
_INIT_TIMEOUT_S = 30  # online init with a key but no route to the server fails after this, not W&B's 90 s


class Tracker:
    """Metrics sink of a run: JSONL always (via :class:`MetricsLog`), plus W&B when configured.

    ``log(record)`` writes the JSONL record and sends its numeric values to W&B at W&B step = the
    record's ``step``, where ``tokens`` is the x-axis of every chart. The W&B run id is kept in
    ``RUN_DIR/wandb_id.txt``, so a ``--resume`` (``resume_step`` given) continues the same W&B run at the
    step it resumes from (``resume="allow"``); the steps recomputed after a resume were already sent
    and W&B keeps its first copy (a resume is exact: the same numbers; the JSONL is trimmed). Any W&B failure
    degrades to JSONL-only with one warning: tracking must never kill a training run.
    """

    def __init__(self, run_dir: str | Path, recipe_dict: dict[str, Any], *, enabled: bool,
                 resume_step: int | None = None, wandb_cfg: WandbConfig | dict[str, Any] | None = None,
                 keep_records: int | None = None):
        self.run_dir = Path(run_dir)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled, resume_step, keep_records)
        self.wandb_run = None
        if not enabled or wandb_cfg is None:
            return
        cfg = WandbConfig.model_validate(wandb_cfg)
        if cfg.mode != "disabled":
            self.wandb_run = _init_wandb(self.run_dir, recipe_dict, cfg, resume=resume_step is not None)

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)
        if self.wandb_run is not None:
            values = {k: v for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            try:
                # W&B's step is cpt's optimizer step, not its call counter: a resumed run (a new offline
                # segment, whose own counter would restart at 0 and so fall below the steps already
                # synced, which W&B drops) goes on at the step it resumes from; records of one step
                # (train, probe, events) become one history row
                self.wandb_run.log(values, step=record["step"]) if "step" in record else self.wandb_run.log(values)
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


def _init_wandb(run_dir: Path, recipe_dict: dict[str, Any], cfg: WandbConfig, resume: bool):
    mode = cfg.mode
    if mode == "online" and not wandb_api_key_configured():
        # W&B would prompt for a key (or wait on a login) in the middle of a batch job
        _warn("tracking.wandb.mode is online but no W&B API key is configured (WANDB_API_KEY or "
              f"~/.netrc); logging offline under {run_dir / 'wandb'} instead (upload later with `wandb sync`)")
        mode = "offline"
    try:
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        if resume and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:  # a fresh run is a new W&B run, even in a directory a killed run left behind
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, tags=cfg.tags,
            name=recipe_dict.get("run", {}).get("name"), config=recipe_dict, dir=str(run_dir),
            id=run_id, resume="allow", mode=mode,
            # console="off": W&B would otherwise wrap stdout/stderr, which fights the progress bar
            settings=wandb.Settings(silent=True, console="off", init_timeout=_INIT_TIMEOUT_S),
        )
        run.define_metric("tokens")
        run.define_metric("*", step_metric="tokens")  # tokens, not W&B's call counter, on every x-axis
        return run
    except Exception as e:  # ImportError, a broken service, a timeout: JSONL carries the run alone
        _warn(f"W&B init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "continuing with metrics.jsonl only")
        return None


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
