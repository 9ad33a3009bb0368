"""`cpt probe`: held-out loss (nats per token, and bits per byte, which compares across tokenizers) per
prepared set, downstream scores and lm-evaluation-harness tasks for one model, outside training.

MODEL is a Hugging Face model dir (e.g. a run's ``final/``) or a cpt checkpoint dir
(``RUN/checkpoints/step-N``; see :func:`load_model`). The held-out loss is the trainer's own
:class:`~cpt.probes.HeldOutLoss` on the same sample of N sequences spread over each set
(:func:`cpt.probes.probe_indices`), so a number from `cpt probe` and a probe record of the run agree.
``--precision`` runs every forward as ``train.precision`` runs training: ``bf16`` under bf16 autocast
(fp32 weights), ``auto`` bf16 on a GPU that supports it and fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from cpt.errors import CptError


def parse_named(values: list[str], flag: str) -> dict[str, str]:
    """``["en=path", ...]`` -> ``{"en": "path"}``, naming the flag and the item at fault."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise CptError(f"{flag} {v!r}: expected NAME=PATH")
        if name in out:
            raise CptError(f"{flag}: the name {name!r} is given twice")
        out[name] = path
    return out


def load_model(path: str | Path):
    """(model in fp32 on CPU, eval mode, tokenizer) from an HF model dir or a cpt checkpoint dir
    (cpt.model.load_causal_lm); a checkpoint without its own tokenizer (older layout) takes its run's."""
    from cpt.data.tokenizer import load_tokenizer
    from cpt.model import load_causal_lm
    from cpt.state import STATE_FILE

    path = Path(path)
    try:
        model = load_causal_lm(path)
    except CptError as e:
        raise CptError(f"model {e}") from None
    is_ckpt = (path / STATE_FILE).is_file()
    tok_dir = path if (path / "tokenizer.json").is_file() or not is_ckpt else path.parent.parent / "final"
    return model.eval(), load_tokenizer(tok_dir)


PRECISIONS = ("auto", "fp32", "bf16")


def compute_dtype(precision: str, device):
    """The autocast dtype of ``--precision`` on ``device`` (None: fp32, no autocast); ``auto`` as
    ``train.precision: auto``: bf16 on a GPU that supports it, fp32 otherwise (a CPU included)."""
    import torch

    if precision not in PRECISIONS:
        raise CptError(f"cpt probe: --precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast(dtype, device):
    """``torch.autocast`` in ``dtype`` on ``device`` (the model's weights stay fp32), or nothing for None."""
    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def run_probe(model_path: str | Path, sets: dict[str, str], downstream: dict[str, str], *,
              max_sequences: int = 64, micro_batch_size: int = 16, lm_eval_tasks: list[str] | None = None,
              lm_eval_limit: int | None = None, lm_eval_include: str | Path | None = None,
              precision: str = "auto", by_position: list[int] | None = None) -> dict[str, Any]:
    """Held-out loss, ppl and bpb per prepared set (``bpb`` None for a set prepared before byte counts),
    downstream metrics per jsonl set and lm-evaluation-harness metrics (``lm_eval/<task>/<metric>``, see
    cpt/lm_eval.py), as a JSON-able dict.

    Runs on every process of an ``accelerate launch`` (probe sequences and downstream batches are
    sharded, results reduced); lm-eval tasks run on the main process alone, the others wait (its
    ``lm_eval`` is empty elsewhere). The caller writes and prints on the main process only.
    ``precision`` (auto | fp32 | bf16, :func:`compute_dtype`): every forward under that autocast, the
    chunked loss's head in the same dtype (as training runs it); the result records it as ``precision``.
    ``by_position`` (bucket edges, as ``probes.by_position``): each set's ``by_position`` maps ``lo-hi`` to
    the mean loss of the tokens at those positions of their row.
    """
    from cpt import downstream as ds
    from cpt.data.source import validate_source
    from cpt.data.tokenizer import tokenizer_identity
    from cpt.train.backend import eval_accelerator
    from cpt.train.loss import choose_loss

    if not sets and not downstream and not lm_eval_tasks:
        raise CptError("cpt probe: nothing to measure; give --sets NAME=PREPARED_DIR, --downstream NAME=JSONL "
                       "and/or --lm-eval TASK")
    if max_sequences < 1 or micro_batch_size < 1:
        raise CptError(f"cpt probe: --max-sequences ({max_sequences}) and --micro-batch-size "
                       f"({micro_batch_size}) must be >= 1")
    if (lm_eval_include is not None or lm_eval_limit is not None) and not lm_eval_tasks:
        raise CptError("cpt probe: --limit and --lm-eval-include go with --lm-eval TASK")
    if lm_eval_limit is not None and lm_eval_limit < 1:
        raise CptError(f"cpt probe: --limit must be >= 1, got {lm_eval_limit}")
    if by_position is not None:
        from cpt.recipe.probes import check_edges

        try:
            by_position = check_edges(by_position)
        except ValueError as e:
            raise CptError(f"cpt probe: --by-position: {e}") from None
    if lm_eval_tasks:  # a misspelt task fails before the model is loaded
        from cpt.lm_eval import check_tasks, task_manager

        check_tasks(lm_eval_tasks, task_manager(lm_eval_include))
    t0 = time.perf_counter()
    accelerator = eval_accelerator()
    dtype = compute_dtype(precision, accelerator.device)
    model, tokenizer = load_model(model_path)
    model.to(accelerator.device)
    try:  # the fingerprint prepared data carries; a tokenizer without tokenizer.json cannot be checked
        tok_id = tokenizer_identity(tokenizer.name_or_path, tokenizer)
    except CptError:
        tok_id = None
    result: dict[str, Any] = {"model": str(model_path), "precision": "fp32" if dtype is None else "bf16",
                              "sets": {}, "downstream": {}, "lm_eval": {}}
    with autocast(dtype, accelerator.device):
        # the chunked head in autocast's dtype, as training runs it (cpt.train.setup._loss); checked against
        # the model's own logits under the same autocast
        loss, _ = choose_loss("auto", model, False, model.get_input_embeddings().num_embeddings,
                              compute_dtype=dtype)
        for name, path in sets.items():
            result["sets"][name] = _held_out(model, accelerator, loss, name, validate_source(
                f"--sets {name}", path, None, tok_id), max_sequences, micro_batch_size, by_position)
        for name, path in downstream.items():
            result["downstream"][name] = ds.score(
                model, tokenizer, ds.load_items(path), batch_size=micro_batch_size, device=accelerator.device,
                rank=accelerator.process_index, world_size=accelerator.num_processes,
                reduce=lambda t: accelerator.reduce(t, reduction="sum"),
            )
        if lm_eval_tasks:
            if accelerator.is_main_process:
                from cpt.lm_eval import lm_eval_probe

                result["lm_eval"] = lm_eval_probe(model, tokenizer, lm_eval_tasks, limit=lm_eval_limit,
                                                  include_path=lm_eval_include, batch_size=micro_batch_size)
            accelerator.wait_for_everyone()
    result["seconds"] = time.perf_counter() - t0
    return result


def _held_out(model, accelerator, loss, name: str, src, max_sequences: int, micro_batch_size: int,
              by_position: list[int] | None) -> dict[str, Any]:
    """One set's entry of run_probe's ``sets``: HeldOutLoss on it (bpb None: prepared before byte counts)."""
    from cpt.probes import HeldOutLoss

    probe = HeldOutLoss({name: src}, max_sequences, micro_batch_size, accelerator.process_index,
                        accelerator.num_processes, loss=loss, by_position=by_position)
    out = probe(model, accelerator)
    entry = {"loss": out[f"probe/{name}/loss"], "ppl": out[f"probe/{name}/ppl"],
             "bpb": out.get(f"probe/{name}/bpb"), "sequences": probe.counts[name]}
    if by_position is not None:
        entry["by_position"] = {f"{lo}-{hi}": out[f"probe/{name}/loss@{lo}-{hi}"]
                                for lo, hi in pairwise(by_position)}
    return entry


def format_table(result: dict[str, Any]) -> str:
    lines = []
    if result["sets"]:
        lines.append(f"{'set':<20} {'loss':>8} {'ppl':>10} {'bpb':>8} {'sequences':>10}")
        for name, r in result["sets"].items():
            bpb = "-" if r.get("bpb") is None else f"{r['bpb']:.4f}"
            lines.append(f"{name:<20} {r['loss']:>8.4f} {r['ppl']:>10.2f} {bpb:>8} {r['sequences']:>10d}")
        for name, r in result["sets"].items():
            if r.get("by_position"):
                lines.append(f"{name} loss by position: " + ", ".join(f"{k} {v:.4f}" for k, v in r["by_position"].items()))
        old = [name for name, r in result["sets"].items() if r.get("bpb") is None]
        if old:
            lines.append(f"bpb: - for {', '.join(old)} (prepared before byte counts; re-run cpt prepare)")
    if result["downstream"]:
        lines.append(f"{'downstream':<20} {'items':>6} {'acc':>7} {'acc_norm':>9} {'logprob/token':>14}")
        for name, r in result["downstream"].items():
            items = r.get("mc_items", 0) + r.get("cloze_items", 0)
            acc = f"{r['acc']:.3f}" if "acc" in r else "-"
            norm = f"{r['acc_norm']:.3f}" if "acc_norm" in r else "-"
            lp = r.get("correct_logprob_per_token", r.get("cloze_logprob_per_token"))
            lines.append(f"{name:<20} {items:>6d} {acc:>7} {norm:>9} {lp:>14.4f}")
    if result.get("lm_eval"):
        from cpt.lm_eval import format_metrics

        lines.append(format_metrics(result["lm_eval"]))
    lines.append(f"({result['seconds']:.1f} s, {result.get('precision', 'fp32')})")
    return "\n".join(lines)


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out
