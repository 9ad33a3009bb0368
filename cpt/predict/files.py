"""Curves trained elsewhere: a CSV/TSV, JSONL or JSON file of logged records (step or tokens, LR, loss), as
Megatron, OLMo-core or the HF Trainer log them once turned into a table, or a W&B history export.

``NAME=FILE[,key=value...]`` names one; the keys override what is found by column name:

* ``step=COL`` / ``tokens=COL``: the optimizer step (``step``, ``global_step``, ``trainer/global_step``,
  ``iteration``, W&B's ``_step`` last) or the tokens seen; with tokens only, ``tokens_per_step=N`` is needed;
* ``lr=COL``: the LR applied in the update of that step (``lr``, ``learning_rate``, ``optim/lr``, ...):
  any schedule, whether cpt's recipe kinds can express it or not;
* ``loss=COL``: the loss (default: the ``--metric`` column if the file has it, else the first train-loss
  name found, else a validation-loss name); ``loss_at=before|after``: a train loss is logged before the
  update of its step (n = step - 1), a validation loss after it (n = step); guessed from the name;
* ``lr_fill=linear|hold``: the LR of the steps between two records, which the laws need (they count
  every update): linear interpolation (the default; from LR 0 at step 0 to the first record), or each
  record's LR held until the next (before the first record, the first record's LR). Where the LR changes
  by 10% of its peak or more between two records, the line that says how the file was read notes it: a
  step decay logged every 128 steps is rebuilt as a ramp that starts up to 127 steps early, which the
  laws then predict (on the multi-power law paper's two-stage runs, the largest error of a run; see
  docs/prediction.md); a per-step LR column avoids it;
* ``tokens_per_step=N``: the batch in tokens (else from the step and tokens columns, else unknown).

W&B exports name columns ``RUN - METRIC`` (the ``RUN - `` is dropped; ``__MIN``/``__MAX`` columns ignored);
records of one step spread over several rows (a W&B history) are merged.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cpt.errors import CptError
from cpt.predict.curves import Curve

STEP_NAMES = ("step", "global_step", "trainer/global_step", "train/global_step", "iteration", "iter", "_step")
TOKEN_NAMES = ("tokens", "consumed_tokens", "num_tokens", "tokens_seen", "train/tokens", "throughput/total_tokens")
LR_NAMES = ("lr", "learning_rate", "learning rate", "train/lr", "train/learning_rate", "optim/lr",
            "optim/lr (group 0)", "lr-adamw", "lr/group0")
TRAIN_LOSS = ("train/loss", "loss", "train_loss", "lm loss", "lm_loss", "train/ce loss", "train/celoss")
VAL_LOSS = ("eval/loss", "eval_loss", "val/loss", "val_loss", "validation_loss", "validation/loss", "valid/loss",
            "lm loss validation")
_KEYS = ("step", "tokens", "lr", "loss", "loss_at", "lr_fill", "tokens_per_step")
_AFTER_WORDS = ("val", "eval", "valid", "probe", "test")


def parse_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    """``NAME=FILE[,key=value...]`` -> (NAME, FILE, {key: value})."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise CptError(f"--curve {spec!r}: expected NAME=FILE[,key=value...] (e.g. cosine=cosine.csv,lr=lr)")
    parts = rest.split(",")
    opts: dict[str, str] = {}
    while len(parts) > 1 and "=" in parts[-1] and parts[-1].split("=", 1)[0].strip() in _KEYS:
        k, v = parts.pop().split("=", 1)
        opts[k.strip()] = v.strip()
    bad = [k for k in opts if k not in _KEYS]
    if bad:
        raise CptError(f"--curve {spec!r}: unknown key {bad[0]!r} (keys: {', '.join(_KEYS)})")
    return name, Path(",".join(parts)), opts


def _number(v: Any) -> float | None:
    if v is None or isinstance(v, bool) or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's records as dicts (column -> value), W&B run prefixes dropped."""
    if not path.is_file():
        raise CptError(f"{path}: no such curve file")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(text)
        rows = data.get("log_history", data.get("history")) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise CptError(f"{path}: expected a list of records, or a dict with log_history (HF trainer_state.json)")
    else:
        raise CptError(f"{path}: unknown curve file type {suffix!r} (.csv, .tsv, .jsonl or .json)")
    out = []
    for r in rows:
        if isinstance(r, dict):
            out.append({k.split(" - ", 1)[-1] if " - " in k else k: v for k, v in r.items()
                        if not (k.endswith("__MIN") or k.endswith("__MAX"))})
    return out


def _column(cols: dict[str, str], names: tuple[str, ...], given: str | None, what: str, path: Path) -> str | None:
    """The column named ``given`` (exactly), else the first of ``names`` present (any case)."""
    if given is not None:
        if given not in cols.values():
            raise CptError(f"{path}: no column {given!r} for the {what} (columns: {', '.join(cols.values())})")
        return given
    return next((cols[n] for n in names if n in cols), None)


def _columns(records: list[dict[str, Any]], opts: dict[str, str], metric: str, path: Path) -> dict[str, Any]:
    """Which column is the step, the tokens, the LR and the loss; whether the loss is taken after the update."""
    cols: dict[str, str] = {}
    for r in records:
        for k in r:
            cols.setdefault(k.lower(), k)
    loss_given = opts.get("loss") or (metric if metric in cols.values() else None)
    found = {"step": _column(cols, STEP_NAMES, opts.get("step"), "step", path),
             "tokens": _column(cols, TOKEN_NAMES, opts.get("tokens"), "tokens", path),
             "lr": _column(cols, LR_NAMES, opts.get("lr"), "LR", path),
             "loss": _column(cols, TRAIN_LOSS + VAL_LOSS, loss_given, "loss", path)}
    for what, names in (("lr", "lr=COLUMN"), ("loss", "loss=COLUMN")):
        if found[what] is None:
            raise CptError(f"{path}: no {what.upper() if what == 'lr' else what} column found (columns: "
                           f"{', '.join(cols.values())}); name it with {names}")
    if found["step"] is None and found["tokens"] is None:
        raise CptError(f"{path}: no step or tokens column (columns: {', '.join(cols.values())}); name one with "
                       f"step=COLUMN or tokens=COLUMN")
    at = opts.get("loss_at") or ("after" if any(w in found["loss"].lower() for w in _AFTER_WORDS) else "before")
    if at not in ("before", "after"):
        raise CptError(f"{path}: loss_at={at!r}: expected before (a train loss) or after (a validation loss)")
    found["after"] = at == "after"
    return found


def _steps(records: list[dict[str, Any]], c: dict[str, Any], opts: dict[str, str], path: Path):
    """(the optimizer step of every record (None where it has none), tokens per step or None)."""
    tps = int(opts["tokens_per_step"]) if "tokens_per_step" in opts else None
    step = [_number(r.get(c["step"])) if c["step"] else None for r in records]
    tok = [_number(r.get(c["tokens"])) if c["tokens"] else None for r in records]
    if tps is None and c["step"] and c["tokens"]:
        pairs = sorted({(s, t) for s, t in zip(step, tok, strict=True) if s is not None and t is not None})
        rates = {round((b[1] - a[1]) / (b[0] - a[0])) for a, b in zip(pairs, pairs[1:], strict=False) if b[0] > a[0]}
        if len(rates) > 1:
            raise CptError(f"{path}: tokens per step changes within the curve ({sorted(rates)[:5]})")
        tps = rates.pop() if rates else None
    if not c["step"]:
        if not tps:
            raise CptError(f"{path}: only a tokens column ({c['tokens']}); give the batch as tokens_per_step=N")
        step = [None if t is None else t / tps for t in tok]
        if any(s is not None and abs(s - round(s)) > 1e-6 for s in step):
            raise CptError(f"{path}: tokens are not whole steps of {tps} tokens")
    return [None if s is None else int(round(s)) for s in step], tps


def _per_step_lr(steps: np.ndarray, lrs: np.ndarray, T: int, fill: str) -> np.ndarray:
    """The LR of updates 1..T from the LRs logged at ``steps`` (ascending, unique)."""
    i = np.arange(1, T + 1)
    if fill == "hold":
        return lrs[np.clip(np.searchsorted(steps, i, side="right") - 1, 0, None)]
    if fill != "linear":
        raise CptError(f"lr_fill={fill!r}: expected linear or hold")
    if steps[0] > 0:
        steps, lrs = np.concatenate([[0], steps]), np.concatenate([[0.0], lrs])
    return np.interp(i, steps, lrs)


_JUMP = 0.1  # an LR change between two records this fraction of the peak or more is noted (a step, or a kink)


def _jump_note(steps: np.ndarray, lrs: np.ndarray, fill: str) -> str:
    """A note where the LR changes by _JUMP of its peak or more between two records more than a step apart:
    rebuilt there (linear: a step change starts early; hold: a ramp is a step), the laws see a schedule
    that was not run."""
    d = np.abs(np.diff(lrs)) / max(float(lrs.max()), 1e-30)
    gap = np.diff(steps)
    big = np.flatnonzero((d >= _JUMP) & (gap > 1))
    if not big.size:
        return ""
    i = big[np.argmax(d[big])]
    return (f"; note: the LR changes by {100 * d[i]:.0f}% of its peak between records {gap[i]} steps apart (steps "
            f"{steps[i]}-{steps[i + 1]}{f', and {big.size - 1} more such gaps' if big.size > 1 else ''}), "
            f"{'interpolated linearly there, so a step change starts early' if fill == 'linear' else 'held there'}"
            f": give the LR of every step where the schedule is known")


def _last_by_step(pairs: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    d = dict(sorted(pairs))  # a step logged twice: its last record
    return np.array(list(d), dtype=np.int64), np.array(list(d.values()), dtype=float)


def file_curve(spec: str, metric: str = "train/loss") -> tuple[Curve, str]:
    """The curve of ``NAME=FILE[,key=value...]`` and a line saying how it was read."""
    name, path, opts = parse_spec(spec)
    records = read_records(path)
    c = _columns(records, opts, metric, path)
    step, tps = _steps(records, c, opts, path)
    lr_at = _last_by_step([(s, v) for s, r in zip(step, records, strict=True)
                           if s is not None and (v := _number(r.get(c["lr"]))) is not None])
    loss_at = _last_by_step([(s, v) for s, r in zip(step, records, strict=True)
                             if s is not None and (v := _number(r.get(c["loss"]))) is not None])
    if len(lr_at[0]) < 2 or len(loss_at[0]) < 2:
        raise CptError(f"{path}: fewer than 2 records with an LR ({c['lr']}) or a loss ({c['loss']})")
    if (lr_at[1] < 0).any():
        raise CptError(f"{path}: negative LRs in {c['lr']}")
    T = int(lr_at[0][-1])
    fill = opts.get("lr_fill", "linear")
    lrs = _per_step_lr(*lr_at, T, fill)
    losses = np.full(T + 1, np.nan)
    n = loss_at[0] - (0 if c["after"] else 1)
    ok = (n >= 0) & (n <= T)
    losses[n[ok]] = loss_at[1][ok]
    if np.isfinite(losses).sum() < 2:
        raise CptError(f"{path}: fewer than 2 losses within the logged LRs' steps (1..{T})")
    cadence = int(np.median(np.diff(lr_at[0])))
    how = (f"{name}: {path}: {T} steps, LR ({c['lr']}) logged {len(lr_at[0])} times (every ~{cadence} steps"
           f"{f', {fill} between records' if cadence > 1 else ''}), loss ({c['loss']}) {int(ok.sum())} times, "
           f"{'after' if c['after'] else 'before'} the update of its step; tokens per step {tps or 'unknown'}"
           + _jump_note(*lr_at, fill))
    return Curve(name, lrs, tps, losses), how
