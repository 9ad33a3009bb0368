"""What a checkpoint carries besides weights, optimizer and RNG: one typed, versioned record, and where
the records of a run directory are (its complete checkpoints, oldest first).

``Origin`` is where a run's counters start (stored in every checkpoint so that a resume re-plans the same
stages); ``TrainerState`` is the rest of the run's position. Both are plain JSON in
``trainer_state.json``; reading goes through :meth:`TrainerState.from_json`, which refuses a record of
an unknown version or shape with one line instead of a KeyError or TypeError deep in the loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cpt.errors import CptError

STATE_FILE = "trainer_state.json"  # in every checkpoint dir: what makes a dir a cpt checkpoint
STATE_VERSION = 2  # 1: unversioned records of cpt before the guard; read as such (no guard state)
STEP_DIR = re.compile(r"^step-(\d+)$")  # checkpoints/step-00000120: a complete checkpoint


@dataclass
class Origin:
    """Where a run's counters start: the init_from checkpoint or HF dir, or scratch."""

    path: str | None = None          # the init_from checkpoint or HF dir (None: from scratch)
    step: int = 0                    # counters the run starts at (non-zero with schedule_state)
    tokens: int = 0
    lr: float | None = None          # LR of the checkpoint's last step (warmup_from: checkpoint)
    next_lr: float | None = None     # LR the checkpoint's own schedule would have applied next
    mixture: dict[str, float] | None = None  # the checkpoint's last stage mixture (which domains are new)
    consumed: dict[str, int] = field(default_factory=dict)   # draws per source so far (schedule_state)
    sampler: dict[str, Any] | None = None  # the whole sampler state when the data goes on unchanged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Origin:
        """From a checkpoint's record; ``is_checkpoint``, which version 1 wrote and nothing read, is
        dropped; any other unknown field is a damaged record."""
        return cls(**_known(cls, {k: v for k, v in d.items() if k != "is_checkpoint"}, "origin"))


@dataclass
class TrainerState:
    """The run's position at a checkpoint: counters, data position, LR, probes, guard, metrics cut."""

    step: int
    tokens: int
    stage: str                       # the stage the last step belonged to
    sampler: dict[str, Any]          # MixtureSampler.state_dict() of that stage
    data_consumed: dict[str, int]    # draws per source over the whole run (offsets of a next stage)
    mixture: dict[str, float]        # that stage's mixture
    lr: float                        # the LR the last step applied
    elapsed_s: float                 # training seconds so far (steps only)
    tags: list[str]                  # stage_end:<name>, pre_anneal: kept whatever keep_last says
    origin: Origin
    next_lr: float | None = None     # the LR the schedule gives the next step (a resume checks it)
    probe_state: dict[str, Any] | None = None  # cpt.probes.Forgetting.state_dict() of the open stage
    metrics_records: int | None = None  # records in metrics.jsonl when saved: a resume cuts it there
    guard: dict[str, Any] | None = None  # StepGuard.state_dict(); None in version-1 records
    processes: int | None = None     # processes that trained it (a resume on another count is logged)
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any, where: str) -> TrainerState:
        if not isinstance(d, dict):
            raise CptError(f"{where}: not a trainer state record")
        version = d.get("version", 1)
        if version not in (1, STATE_VERSION):
            raise CptError(f"{where}: trainer state version {version!r}; this cpt reads versions 1 and "
                           f"{STATE_VERSION} (a checkpoint of a newer cpt?)")
        d = {**d, "version": STATE_VERSION}
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise CptError(f"{where}: trainer state lacks {', '.join(missing)}")
        try:
            origin = Origin.from_dict(d["origin"])
        except CptError as e:
            raise CptError(f"{where}: {e}") from None
        except (TypeError, AttributeError):
            raise CptError(f"{where}: the origin record is not a mapping") from None
        return cls(**{**_known(cls, d, where), "origin": origin})


def _known(cls, d: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CptError(f"{where}: unknown fields {', '.join(unknown)} (a checkpoint of another cpt?)")
    return d


# ------------------------------------------------------------------- where a run dir keeps its records


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def find_checkpoint(path: str | Path, selector: str = "latest") -> Path:
    """A checkpoint dir from a run dir and a selector (latest | pre_anneal | <stage name> | step-N),
    or ``path`` itself when it already is a checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    dirs = checkpoint_dirs(path)
    if not dirs:
        raise CptError(f"{path}: no checkpoints (not a cpt run dir or checkpoint)")
    if selector == "latest":
        return dirs[-1]
    if STEP_DIR.match(selector):
        if (path / "checkpoints" / selector).is_dir():
            return path / "checkpoints" / selector
        raise CptError(f"{path}: no checkpoint {selector} (have {', '.join(d.name for d in dirs)})")
    tag = selector if selector == "pre_anneal" else f"stage_end:{selector}"
    tagged = [d for d in dirs if tag in read_trainer_state(d).tags]
    if not tagged:
        have = sorted({t for d in dirs for t in read_trainer_state(d).tags})
        raise CptError(f"{path}: no checkpoint tagged {tag} (tags: {', '.join(have) or 'none'})")
    return tagged[-1]


def read_trainer_state(ckpt: str | Path) -> TrainerState:
    f = Path(ckpt) / STATE_FILE
    if not f.is_file():
        raise CptError(f"{ckpt}: not a cpt checkpoint (no {STATE_FILE})")
    try:
        return TrainerState.from_json(json.loads(f.read_text()), str(f))
    except json.JSONDecodeError as e:
        raise CptError(f"{f}: corrupt trainer state ({e})") from None
