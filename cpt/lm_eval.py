"""lm-evaluation-harness tasks on a model already in memory (`cpt probe --lm-eval`, and the building block of
an in-training ``probes.lm_eval``).

The model is wrapped in lm-eval's ``HFLM`` as it is: nothing is saved or re-loaded, LoRA (peft) models
included. It runs on the **main process only**: ``HFLM`` given a model object evaluates with rank 0 of
world size 1, so a multi-process caller runs it on its main process (the unwrapped model, not a DDP
wrapper) while the others wait at a barrier. A model sharded across processes (FSDP, ZeRO-3) cannot be
probed this way, since the other ranks would not join its forwards.

Results come back flat, like every cpt probe: ``lm_eval/<task>/<metric>`` (lm-eval's ``acc,none`` is
``acc``; a filter other than ``none`` keeps lm-eval's spelling, ``exact_match,strict-match``), the standard
error beside it as ``lm_eval/<task>/<metric>_stderr`` when lm-eval computed one (an ``N/A`` is left out),
and ``lm_eval/<task>/items``, the number of documents scored. Groups' aggregates come as tasks do.

Conventions, for comparing with cpt's own scorer (cpt/downstream.py): lm-eval moves a context's trailing
whitespace into the continuation as cpt does; it conditions on what the tokenizer itself adds (a BOS for
Llama-style tokenizers, nothing for GPT-2 / Qwen / cpt's own tokenizer) where cpt always prefixes bos or
eos, so the two agree exactly on tokenizers that add a BOS; and lm-eval's ``acc_norm`` divides the log-prob
by the choice's length in characters, its ``acc_bytes`` by UTF-8 bytes, which is cpt's ``acc_norm``.

lm-eval is an optional dependency: ``pip install -e ".[eval]"`` (or ``pip install lm_eval``).
"""

from __future__ import annotations

import copy
import difflib
import logging
import numbers
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cpt.errors import CptError

PREFIX = "lm_eval"
# fewshot example order is lm-eval's own seeded sampler; the global random / numpy / torch generators are
# left alone (simple_evaluate would reseed them, which changes a training run that probes mid-way)
FEWSHOT_SEED = 1234
_task_managers: dict[tuple[str, ...], Any] = {}  # indexing lm-eval's ~15k task entries takes seconds


def _import_lm_eval():
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise CptError(f"lm-eval tasks need lm-evaluation-harness ({e}): pip install -e \".[eval]\" "
                       "(or pip install lm_eval)") from None
    return evaluator, HFLM, TaskManager


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None):
    """lm-eval's ``TaskManager`` over its built-in tasks plus the task YAMLs under ``include_path``
    (cached per include path: building the index takes seconds)."""
    _, _, TaskManager = _import_lm_eval()
    paths = [] if include_path is None else [include_path] if isinstance(include_path, str | Path) else include_path
    key = tuple(str(Path(p).resolve()) for p in paths)
    for p in key:
        if not Path(p).is_dir():
            raise CptError(f"lm-eval include path {p}: not a directory")
    if key not in _task_managers:
        with _quiet():
            _task_managers[key] = TaskManager(include_path=list(key) or None)
    return _task_managers[key]


def check_tasks(tasks: Sequence[str], manager) -> None:
    """A CptError naming the first task lm-eval does not know, with the closest names it does."""
    if not tasks:
        raise CptError("lm-eval: no task given")
    known = manager.all_tasks
    for name in tasks:
        if name not in known and not Path(name).is_file():  # lm-eval also takes a task YAML's path
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise CptError(f"lm-eval task {name!r} not found{hint}; local task YAMLs: --lm-eval-include DIR")


def evaluate(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None,
             include_path: str | Path | Sequence[str | Path] | None = None, batch_size: int = 16,
             num_fewshot: int | None = None, bootstrap_iters: int = 1000, log_samples: bool = False) -> dict:
    """lm-eval's own result dict (``results``, ``n-samples``, ``configs``, and ``samples`` per document
    when ``log_samples``) for ``tasks`` on ``model`` (a transformers causal LM or a peft model around one,
    on its device, used as it is) and ``tokenizer``. Main process only (see the module doc).

    ``limit``: the first N documents of each task. ``num_fewshot``: None keeps each task's own (0 where
    it sets none). ``bootstrap_iters``: lm-eval's bootstrap for metrics without a closed-form standard
    error (means, i.e. acc, have one); 0 computes no standard errors. The model is put in eval mode and
    back in train mode if it was; the tokenizer is copied (lm-eval sets a pad token on the one it gets).
    """
    evaluator, HFLM, _ = _import_lm_eval()
    if limit is not None and limit < 1:
        raise CptError(f"lm-eval: limit must be >= 1 documents, got {limit}")
    manager = task_manager(include_path)
    check_tasks(list(tasks), manager)
    was_training = model.training
    try:
        with _quiet():
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            try:
                return evaluator.simple_evaluate(
                    model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                    bootstrap_iters=bootstrap_iters, log_samples=log_samples, random_seed=None,
                    numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=FEWSHOT_SEED)
            except (OSError, ConnectionError, FileNotFoundError) as e:  # a data set not reachable offline
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CptError(f"lm-eval tasks {', '.join(tasks)}: data not available ({first})") from None
    finally:
        if was_training:
            model.train()


def lm_eval_probe(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None,
                  include_path: str | Path | Sequence[str | Path] | None = None, batch_size: int = 16,
                  num_fewshot: int | None = None, bootstrap_iters: int = 1000) -> dict[str, float]:
    """:func:`evaluate`, flattened to ``{"lm_eval/<task>/<metric>": float}`` (:func:`flatten_results`)."""
    return flatten_results(evaluate(model, tokenizer, tasks, limit=limit, include_path=include_path,
                                    batch_size=batch_size, num_fewshot=num_fewshot,
                                    bootstrap_iters=bootstrap_iters))


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's result dict -> ``{"lm_eval/<task>/<metric>": float}``: ``<metric>,none`` -> ``<metric>``,
    ``<metric>,<filter>`` kept as it is, ``<metric>_stderr,<filter>`` likewise; non-numeric values
    (``alias``, a stderr of ``N/A``) left out; ``lm_eval/<task>/items`` from ``n-samples`` (effective)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            out[f"{PREFIX}/{task}/{metric if filt == 'none' else key}"] = float(value)
    for task, n in results.get("n-samples", {}).items():
        if isinstance(n, dict) and isinstance(n.get("effective"), numbers.Real):
            out[f"{PREFIX}/{task}/items"] = float(n["effective"])
    return out


def format_metrics(metrics: dict[str, float]) -> str:
    """A table of the flat metrics: one row per task, its metrics as ``name value (± stderr)``."""
    by_task: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        _, task, metric = key.split("/", 2)
        by_task.setdefault(task, {})[metric] = value
    width = max([len("lm-eval task"), *map(len, by_task)])
    lines = [f"{'lm-eval task':<{width}} {'items':>6}  metrics"]
    for task, m in by_task.items():
        items = f"{int(m['items']):d}" if "items" in m else "-"
        cells = []
        for name, value in m.items():
            if name == "items" or name.endswith("_stderr") or "_stderr," in name:
                continue
            base, sep, filt = name.partition(",")
            err = m.get(f"{base}_stderr{sep}{filt}")
            cells.append(f"{name} {value:.4f}" + (f" (± {err:.4f})" if err is not None else ""))
        lines.append(f"{task:<{width}} {items:>6}  {', '.join(cells)}")
    return "\n".join(lines)


@contextmanager
def _quiet():
    """lm-eval logs every step at INFO and warns on each model object it is given (as this module
    always does): keep its loggers at ERROR for the call, as they were afterwards."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
