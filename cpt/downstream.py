"""Downstream probes from local jsonl files, scored by log-likelihood (no generation, no hub).

One item per line, either
  * multiple choice: ``{"context": str, "choices": [str, ...], "answer": int}``, or
  * cloze:           ``{"context": str, "target": str}``;
other keys (e.g. ``source``) are ignored. A continuation is scored by the sum of the log-probs of its
tokens given the context. Metrics of a set:

  ``mc_items``, ``acc`` (argmax of the summed log-prob), ``acc_norm`` (argmax of log-prob per byte
  of the choice, which removes the bias toward short choices), ``correct_logprob`` (mean over items of
  the correct choice's summed log-prob), ``correct_logprob_per_token`` (over all its tokens);
  ``cloze_items``, ``cloze_logprob`` and ``cloze_logprob_per_token`` likewise for the targets.

Tokenisation: trailing whitespace of the context moves to the front of the continuation (as in
lm-evaluation-harness), so every choice is scored from the same context tokens; the context is
prefixed with the tokenizer's bos token (or eos: ``cpt prepare`` separates documents with eos, so a
document follows an eos in training); context and context + continuation are encoded separately and
the continuation is what follows their longest common prefix, so a BPE merge across the boundary still
leaves a correct split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt.errors import CptError


@dataclass
class _Request:
    item: int
    choice: int  # -1 for a cloze target
    prefix: list[int]  # conditioning tokens (bos/eos + context)
    target: list[int]  # continuation tokens to score
    n_bytes: int  # UTF-8 bytes of the continuation text (for acc_norm)


def load_items(path: str | Path) -> list[dict[str, Any]]:
    """Items of a jsonl file, checked; a bad line is named in a CptError."""
    path = Path(path)
    if not path.is_file():
        raise CptError(f"downstream set {path}: file not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise CptError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            _check_item(item, f"{path}:{n}")
            items.append(item)
    if not items:
        raise CptError(f"downstream set {path}: no items")
    return items


def _check_item(item: Any, where: str) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("context"), str):
        raise CptError(f"{where}: expected an object with a string 'context'")
    if "choices" in item:
        ch, ans = item["choices"], item.get("answer")
        if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c for c in ch)):
            raise CptError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if not (isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(ch)):
            raise CptError(f"{where}: 'answer' must be an index into 'choices' (0..{len(ch) - 1}), got {ans!r}")
    elif not (isinstance(item.get("target"), str) and item["target"]):
        raise CptError(f"{where}: expected 'choices' + 'answer' (multiple choice) or a non-empty 'target' (cloze)")


def _encode(tokenizer, context: str, continuation: str, max_length: int | None) -> tuple[list[int], list[int]]:
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    head = [start] if start is not None else []
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    p = 0
    while p < min(len(ctx), len(whole)) and ctx[p] == whole[p]:
        p += 1
    prefix, target = head + whole[:p], whole[p:]
    if not target:
        raise CptError(f"continuation {continuation!r} adds no tokens to its context")
    if not prefix:  # no bos/eos and an empty context: the first token cannot be scored, condition on it
        prefix, target = target[:1], target[1:]
    if max_length is not None and len(prefix) + len(target) - 1 > max_length:
        keep = max_length + 1 - len(target)  # the model sees prefix + target[:-1]; cut the context's left end
        if keep < 1:
            raise CptError(f"a continuation of {len(target)} tokens does not fit in max_length {max_length}")
        prefix = prefix[-keep:]
    return prefix, target


def _requests(items: Sequence[dict[str, Any]], tokenizer, max_length: int | None) -> list[_Request]:
    out = []
    for i, item in enumerate(items):
        conts = [(j, c) for j, c in enumerate(item["choices"])] if "choices" in item else [(-1, item["target"])]
        for j, cont in conts:
            prefix, target = _encode(tokenizer, item["context"], cont, max_length)
            out.append(_Request(i, j, prefix, target, len(cont.encode("utf-8"))))
    return out


def score(model, tokenizer, items: Sequence[dict[str, Any]], *, batch_size: int = 16,
          max_length: int | None = None, device=None, rank: int = 0, world_size: int = 1,
          reduce: Callable | None = None) -> dict[str, float]:
    """Score ``items`` with ``model`` (an HF causal LM) and return the set's metrics (see the module doc).

    Sharding: every process builds the same length-sorted list of batches and takes every
    ``world_size``-th one; ``reduce`` (a sum over processes, e.g. ``lambda t: accelerator.reduce(t,
    "sum")``) merges the per-continuation log-probs, so every process returns the same metrics. Ranks
    with fewer batches repeat their last one with weight 0, so all run the same number of forwards
    (sharded models need every rank in every forward).
    """
    import torch

    device = device if device is not None else next(model.parameters()).device
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
    reqs = _requests(items, tokenizer, max_length)
    # longest first: similar lengths share a batch (little padding) and a too-long batch fails at once
    order = sorted(range(len(reqs)), key=lambda k: -(len(reqs[k].prefix) + len(reqs[k].target)))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    mine = batches[rank::world_size]
    n_rounds = math.ceil(len(batches) / world_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # per continuation: (sum of log-probs, number of tokens); zeros where another rank scored it
    scores = torch.zeros(len(reqs), 2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for r in range(n_rounds):
            batch, real = (mine[r], True) if r < len(mine) else (mine[-1] if mine else batches[0], False)
            seqs = [reqs[k].prefix + reqs[k].target[:-1] for k in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):  # right padding: positions of the real tokens are unchanged
                ids[row, :len(s)] = torch.tensor(s)
                mask[row, :len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            if not real:
                continue
            for row, k in enumerate(batch):
                req = reqs[k]
                start = len(req.prefix) - 1  # logits at position t predict token t + 1
                logp = logits[row, start:start + len(req.target)].float().log_softmax(-1)
                tgt = torch.tensor(req.target, device=logp.device)
                scores[k, 0] = logp.gather(1, tgt[:, None]).sum().double()
                scores[k, 1] = len(req.target)
    if was_training:
        model.train()
    if reduce is not None:
        scores = reduce(scores)
    return _metrics(items, reqs, scores.cpu().tolist())


def _metrics(items: Sequence[dict[str, Any]], reqs: list[_Request], scores: list[list[float]]) -> dict[str, float]:
    by_item: dict[int, list[tuple[_Request, float, float]]] = {}
    for req, (lp, n) in zip(reqs, scores, strict=True):
        by_item.setdefault(req.item, []).append((req, lp, n))
    mc = [(i, rows) for i, rows in by_item.items() if "choices" in items[i]]
    cloze = [rows[0] for i, rows in by_item.items() if "choices" not in items[i]]
    out: dict[str, float] = {}
    if mc:
        acc = acc_norm = lp_sum = tok_sum = 0.0
        for i, rows in mc:
            answer = items[i]["answer"]
            best = max(rows, key=lambda x: x[1])[0].choice
            best_norm = max(rows, key=lambda x: x[1] / x[0].n_bytes)[0].choice
            acc += best == answer
            acc_norm += best_norm == answer
            _, lp, n = rows[answer]
            lp_sum += lp
            tok_sum += n
        out.update(mc_items=len(mc), acc=acc / len(mc), acc_norm=acc_norm / len(mc),
                   correct_logprob=lp_sum / len(mc), correct_logprob_per_token=lp_sum / tok_sum)
    if cloze:
        lp_sum = sum(lp for _, lp, _ in cloze)
        out.update(cloze_items=len(cloze), cloze_logprob=lp_sum / len(cloze),
                   cloze_logprob_per_token=lp_sum / sum(n for _, _, n in cloze))
    return out
