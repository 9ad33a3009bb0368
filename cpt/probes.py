"""Probes: held-out loss per domain on a fixed sample of sequences spread over each set
(:func:`probe_indices`), sharded across processes; when to probe (:func:`probe_due`); and the
forgetting / adaptation bookkeeping on top of the losses (:class:`ForgettingTracker`).

Forgetting of an old domain d at token t is ``loss_d(t) - loss_d(stage start)``; adaptation of a new
domain is the drop ``loss_d(stage start) - loss_d(t)``. End-of-stage numbers hide the stability gap
(the temporary rise right after a shift), so the worst point and where it happened are tracked too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import Any

import torch

from cpt.data.source import TokenSource, read_batch
from cpt.recipe.probes import check_edges


def probe_indices(num_sequences: int, max_sequences: int) -> list[int]:
    """The sequences a probe measures out of a set of ``num_sequences``: all of them when
    ``max_sequences`` covers the set, else ``max_sequences`` indices evenly strided over the whole set,
    ``k * num_sequences // max_sequences`` for k = 0 .. max_sequences - 1 (sorted, distinct, the first
    sequence always in).

    A prepared set is its documents packed back to back in file order, so the first N sequences are the
    first few documents (8 sequences of 2048 tokens can be one long article); a stride spreads the sample
    over all of them. The sample is a pure function of the set's size and ``max_sequences``: no seed, no
    state, the same in every process, in a resumed run (which refuses a changed ``probes.max_sequences``)
    and in `cpt probe`, so their numbers agree."""
    if num_sequences < 0 or max_sequences < 1:
        raise ValueError(f"probe_indices({num_sequences}, {max_sequences}): need a set size >= 0 and max_sequences >= 1")
    if max_sequences >= num_sequences:
        return list(range(num_sequences))
    return [k * num_sequences // max_sequences for k in range(max_sequences)]


class HeldOutLoss:
    """Mean next-token loss on ``max_sequences`` sequences of each probe set spread evenly over the whole
    set (:func:`probe_indices`; all of it when it is smaller), and bits per byte.

    ``loss`` is the mean over sequences of each sequence's mean loss over its counted targets (nats per
    token). ``bpb`` (bits per byte), for sets prepared with byte counts, compares across tokenizers:

        bpb = sum over counted targets of NLL (nats) / (ln 2 * sum over the same targets of their bytes)

    over all the set's measured sequences together. The targets of a row are its tokens 1..n-1 (token 0
    is never predicted) whose label is not -100 (``frame``: document starts without the start loss);
    each target's bytes are the UTF-8 bytes of document text that token covers
    (:meth:`cpt.data.source.TokenSource.bytes_batch`, 0 for BOS / EOS, whose NLL still counts: predicting
    where a document ends is part of coding the text). Token 0 of each row and ignored targets add
    neither NLL nor bytes, so the ratio is exact for the text the counted targets cover.

    With ``by_position`` bucket edges ``[e0, e1, ..., ek]`` it also reports ``probe/<name>/loss@<lo>-<hi>``:
    the mean NLL over all counted targets whose position lies in ``[lo, hi)``, from the same forward. A
    target's position is its index in the row (the number of tokens before it), or with document masking
    its ``position_ids`` (its index in its document): the context the model had for it. Targets at or past
    the last edge are in no bucket. These means weigh every target alike (a bucket's sum of NLL over its
    count), unlike ``loss``, the mean of per-sequence means.

    Every process runs the same number of forward passes (short shards are padded with weight-0
    rows), because sharded models (ZeRO-3, FSDP) need all ranks in every forward.
    """

    def __init__(self, sources: Mapping[str, TokenSource], max_sequences: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, frame=None, loss=None, by_position: list[int] | None = None):
        """``sources``: probe sets already checked against the run (cpt.data.source.validate_source);
        ``frame``: ids -> the forward's inputs as training builds them (cpt.train.step.model_inputs), so a
        probe sees documents as training does (masking, ignored targets); ``loss``: how per-token losses
        are computed (cpt.train.loss: the run's chunked path, or the model's logits by default);
        ``by_position``: bucket edges of the loss by position (:func:`check_edges`), or None."""
        from cpt.train.loss import PlainLoss

        self.edges = check_edges(by_position) if by_position else None
        self.frame = frame
        self.loss = loss if loss is not None else PlainLoss()
        self.sources: dict[str, TokenSource] = {}
        self.counts: dict[str, int] = {}  # sequences measured per set, all processes together
        self.indices: dict[str, list[int]] = {}  # the measured sequences of each set (probe_indices)
        self.shards: dict[str, tuple[list[int], list[float]]] = {}
        for name, src in sources.items():
            sample = probe_indices(src.num_sequences, max_sequences)
            n = len(sample)
            self.counts[name] = n
            self.indices[name] = sample
            per_rank = math.ceil(n / world_size)  # each rank a slice of the sample, the last padded
            mine = sample[rank * per_rank:(rank + 1) * per_rank]
            weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
            mine += [sample[0] if sample else 0] * (per_rank - len(mine))
            self.sources[name] = src
            self.shards[name] = (mine, weights)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def __call__(self, model, accelerator) -> dict[str, float]:
        """{"probe/<name>/loss": ..., "probe/<name>/ppl": ..., "probe/<name>/bpb": ..., "probe/seconds": ...};
        no bpb for a set prepared before byte counts.

        ``accelerator`` needs only ``.device`` and ``.reduce(tensor, reduction="sum")``: an
        ``accelerate.Accelerator``, or any stand-in with those two for a single process.
        """
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        for name, (indices, weights) in self.shards.items():
            src = self.sources[name]
            # (sum of per-sequence losses, sequences, sum of target NLL, bytes of those targets), weighted
            total = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
            buckets = None if self.edges is None else torch.zeros(
                2, len(self.edges) - 1, dtype=torch.float64, device=accelerator.device)  # NLL sum, targets
            for i in range(0, len(indices), self.micro_batch_size):
                rows = indices[i:i + self.micro_batch_size]
                ids = read_batch({name: src}, [(name, j) for j in rows]).to(accelerator.device)
                w = torch.tensor(weights[i:i + self.micro_batch_size], device=accelerator.device)
                inputs = self.frame(ids) if self.frame is not None else {"input_ids": ids, "labels": ids}
                is_target = inputs["labels"][:, 1:] != -100
                counted = is_target.sum(dim=1).clamp(min=1)
                nll = self.loss.token_nll(model, inputs)
                nll_sum = nll.sum(dim=1)  # ignored targets are 0
                if buckets is not None:
                    buckets += bucket_sums(nll[:, :-1], is_target, inputs.get("position_ids"), self.edges, w)
                total[0] += (nll_sum / counted * w).sum().double()
                total[1] += w.sum().double()
                if src.has_bytes:  # position i predicts token i + 1: the targets' bytes are columns 1..n-1
                    nbytes = torch.from_numpy(src.bytes_batch(rows)[:, 1:]).to(accelerator.device)
                    total[2] += (nll_sum.double() * w.double()).sum()
                    total[3] += ((nbytes * is_target).sum(dim=1).double() * w.double()).sum()
            total = accelerator.reduce(total, reduction="sum")
            loss = (total[0] / total[1]).item()
            out[f"probe/{name}/loss"] = loss
            out[f"probe/{name}/ppl"] = math.exp(min(loss, 50.0))
            if src.has_bytes:
                out[f"probe/{name}/bpb"] = (total[2] / (math.log(2) * total[3])).item() if total[3] > 0 else math.nan
            if buckets is not None:
                buckets = accelerator.reduce(buckets, reduction="sum")
                for k, (lo, hi) in enumerate(pairwise(self.edges)):
                    count = buckets[1, k].item()
                    out[f"probe/{name}/loss@{lo}-{hi}"] = buckets[0, k].item() / count if count else math.nan
        if was_training:
            model.train()
        out["probe/seconds"] = time.perf_counter() - t0
        return out


def bucket_sums(nll: torch.Tensor, is_target: torch.Tensor, position_ids: torch.Tensor | None,
                edges: list[int], weights: torch.Tensor) -> torch.Tensor:
    """[2, buckets] float64: per position bucket, the weighted sum of the NLL of the counted targets and
    their weighted count. ``nll`` and ``is_target``: [batch, seq - 1], column i the target token i + 1;
    its position is i + 1, or ``position_ids[:, i + 1]`` (document masking); ``weights``: [batch]."""
    if position_ids is None:
        pos = torch.arange(1, nll.size(1) + 1, device=nll.device).expand_as(nll)
    else:
        pos = position_ids[:, 1:]
    bucket = torch.bucketize(pos.contiguous(), torch.tensor(edges, device=nll.device), right=True) - 1
    inside = is_target & (bucket >= 0) & (bucket < len(edges) - 1)
    w = (weights[:, None].double() * inside)[inside]
    out = torch.zeros(2, len(edges) - 1, dtype=torch.float64, device=nll.device)
    out[0].index_add_(0, bucket[inside], nll[inside].double() * w)
    out[1].index_add_(0, bucket[inside], w)
    return out


# ------------------------------------------------------------------------------------------ cadence


def crossed(before: int, after: int, every: int | None) -> bool:
    """Whether going from ``before`` to ``after`` tokens passed a multiple of ``every`` (counted from 0):
    ``before < k * every <= after``. The cadence of probes and checkpoints."""
    return every is not None and after // every > before // every


def probe_due(tokens_before: int, tokens_after: int, stage_start: int, every: int | None,
              dense_every: int | None, dense_for: int | None) -> bool:
    """Whether the step that took the run from ``tokens_before`` to ``tokens_after`` should end with a probe.

    Due when the step crossed a multiple of ``every`` (counted from token 0, so the regular cadence
    lines up across stages and runs), or when it crossed a multiple of ``dense_every`` counted from
    ``stage_start`` that lies inside the dense window ``[stage_start, stage_start + dense_for)``: the
    stability gap sits right after a shift and lasts a short while, so that is where a sparse cadence
    would miss it. "Crossed" means ``before < multiple <= after``: a step of many tokens that jumps
    over several multiples still yields one probe, and a step ending exactly on one counts.
    """
    if crossed(tokens_before, tokens_after, every):
        return True
    if dense_every is None or dense_for is None:
        return False
    # first multiple of dense_every (from the stage start) strictly after tokens_before
    first = stage_start + ((tokens_before - stage_start) // dense_every + 1) * dense_every
    return first <= tokens_after and stage_start <= first < stage_start + dense_for


# --------------------------------------------------------------------------------------- forgetting


def probe_losses(record: Mapping[str, Any], metric: str = "loss") -> dict[str, float]:
    """``{domain: value}`` from the ``probe/<domain>/<metric>`` keys of a probe record (as HeldOutLoss
    returns it; metric loss or bpb)."""
    tail = f"/{metric}"
    return {k[len("probe/"):-len(tail)]: float(v) for k, v in record.items()
            if k.startswith("probe/") and k.endswith(tail) and k.count("/") == 2}


class ForgettingTracker:
    """Per-stage forgetting (old domains) and adaptation (new domains) from probe losses. Pure Python.

    Use: ``start_stage(baseline, tokens)`` with the losses measured at the stage start, then
    ``update(tokens, losses)`` at every probe (merge the dict it returns into the probe record), then
    ``end_stage()`` for the stage summary. ``state_dict()`` / ``load_state_dict()`` carry a stage that
    is in progress across a resume (it is a handful of floats; store it with the trainer state).

    The stage start counts as a point of the curve (forgetting 0 there), so the worst forgetting of a
    stage is never below 0: if an old domain only improved, its worst point was the start.
    """

    def __init__(self, domains: Iterable[str], new_domains: Iterable[str] = (), metric: str = "loss"):
        self.domains = list(domains)
        self.suffix = "" if metric == "loss" else f"_{metric}"  # probe/<d>/forgetting_bpb, ...
        self.new_domains = self._check_new(new_domains)
        self.stage_start: int | None = None
        self.baseline: dict[str, float] = {}
        self.last: dict[str, float] = {}  # latest delta (loss - baseline) per domain
        self.worst: dict[str, tuple[float, int]] = {}  # highest delta and the tokens where it happened

    def _check_new(self, new_domains: Iterable[str]) -> set[str]:
        new = set(new_domains)
        unknown = sorted(new - set(self.domains))
        if unknown:
            raise ValueError(f"new domains {', '.join(unknown)} are not probe domains ({', '.join(self.domains)})")
        return new

    def is_old(self, domain: str) -> bool:
        return domain not in self.new_domains

    def start_stage(self, baseline_losses: Mapping[str, float], tokens: int,
                    new_domains: Iterable[str] | None = None) -> None:
        """Begin a stage at ``tokens`` with these baseline losses; ``new_domains`` (optional) replaces
        the set of new domains for this stage (in A -> B -> C, B is new in the 2nd stage, old in the 3rd)."""
        missing = [d for d in self.domains if d not in baseline_losses]
        if missing:
            raise ValueError(f"baseline lacks probe domains {', '.join(missing)}")
        if new_domains is not None:
            self.new_domains = self._check_new(new_domains)
        self.stage_start = tokens
        self.baseline = {d: float(baseline_losses[d]) for d in self.domains}
        self.last = {d: 0.0 for d in self.domains}
        self.worst = {d: (0.0, tokens) for d in self.domains}

    def update(self, tokens: int, losses: Mapping[str, float]) -> dict[str, float]:
        """Metrics to merge into the probe record at ``tokens``:

        every domain: ``probe/<d>/delta`` (loss - baseline); old domains: ``probe/<d>/forgetting``
        (the same number, under the name that says what it means), ``probe/<d>/max_forgetting`` and
        ``probe/<d>/max_forgetting_tokens`` (worst so far this stage, and where); new domains:
        ``probe/<d>/adaptation`` (baseline - loss, positive = learned).
        """
        if self.stage_start is None:
            raise RuntimeError("ForgettingTracker.update before start_stage")
        out: dict[str, float] = {}
        for d in self.domains:
            delta = float(losses[d]) - self.baseline[d]
            self.last[d] = delta
            worst = self.worst[d][0]
            # a diverged (NaN) loss is the worst point there is; the first one is where it happened
            if delta > worst or (math.isnan(delta) and not math.isnan(worst)):
                self.worst[d] = (delta, tokens)
            out[f"probe/{d}/delta{self.suffix}"] = delta
            if self.is_old(d):
                out[f"probe/{d}/forgetting{self.suffix}"] = delta
                out[f"probe/{d}/max_forgetting{self.suffix}"] = self.worst[d][0]
                out[f"probe/{d}/max_forgetting_tokens{self.suffix}"] = self.worst[d][1]
            else:
                out[f"probe/{d}/adaptation{self.suffix}"] = -delta
        return out

    def end_stage(self) -> dict[str, float]:
        """The stage summary, final and worst per domain, and close the stage:

        old domains: ``stage_end/<d>/forgetting``, ``stage_end/<d>/max_forgetting``,
        ``stage_end/<d>/max_forgetting_tokens``; new domains: ``stage_end/<d>/adaptation`` and
        ``stage_end/<d>/min_adaptation`` (+ ``_tokens``): the worst point of a new domain is where its
        loss stood highest (re-warming can raise it before it falls).
        """
        if self.stage_start is None:
            raise RuntimeError("ForgettingTracker.end_stage before start_stage")
        out: dict[str, float] = {}
        for d in self.domains:
            worst, at = self.worst[d]
            if self.is_old(d):
                out[f"stage_end/{d}/forgetting{self.suffix}"] = self.last[d]
                out[f"stage_end/{d}/max_forgetting{self.suffix}"] = worst
                out[f"stage_end/{d}/max_forgetting_tokens{self.suffix}"] = at
            else:
                out[f"stage_end/{d}/adaptation{self.suffix}"] = -self.last[d]
                out[f"stage_end/{d}/min_adaptation{self.suffix}"] = -worst
                out[f"stage_end/{d}/min_adaptation_tokens{self.suffix}"] = at
        self.stage_start = None
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state of the stage in progress (None-valued stage_start when no stage is open)."""
        return {"new_domains": sorted(self.new_domains), "stage_start": self.stage_start,
                "baseline": dict(self.baseline), "last": dict(self.last),
                "worst": {d: [w, t] for d, (w, t) in self.worst.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.new_domains = self._check_new(state["new_domains"])
        self.stage_start = state["stage_start"]
        self.baseline = {d: float(v) for d, v in state["baseline"].items()}
        self.last = {d: float(v) for d, v in state["last"].items()}
        self.worst = {d: (float(w), int(t)) for d, (w, t) in state["worst"].items()}


class Forgetting:
    """A :class:`ForgettingTracker` per metric the probes report: the loss always, and bits per byte
    (keys ``..._bpb``) where every probe set has byte counts: comparable across tokenizers, so a stage
    that changes the tokenizer (extended vocabulary) still reads right. Same use as ForgettingTracker,
    fed whole probe records."""

    METRICS = ("loss", "bpb")

    def __init__(self, domains: Iterable[str], new_domains: Iterable[str] = ()):
        self.trackers = {m: ForgettingTracker(domains, new_domains, metric=m) for m in self.METRICS}

    @property
    def stage_start(self) -> int | None:
        return self.trackers["loss"].stage_start

    def start_stage(self, record: Mapping[str, Any], tokens: int) -> None:
        for metric, tracker in list(self.trackers.items()):
            values = probe_losses(record, metric)
            if metric != "loss" and not set(tracker.domains) <= set(values):
                del self.trackers[metric]  # a set without byte counts: no bpb for this stage
                continue
            tracker.start_stage(values, tokens)

    def update(self, tokens: int, record: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric, tracker in self.trackers.items():
            out |= tracker.update(tokens, probe_losses(record, metric))
        return out

    def end_stage(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for tracker in self.trackers.values():
            out |= tracker.end_stage()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {metric: tracker.state_dict() for metric, tracker in self.trackers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "baseline" in state:  # written before bpb: the loss tracker's state alone
            state = {"loss": state}
        for metric in list(self.trackers):
            if metric in state:
                self.trackers[metric].load_state_dict(state[metric])
            else:
                del self.trackers[metric]

