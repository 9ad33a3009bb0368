"""One optimizer step, top to bottom: set the LR, forward and backward each micro-batch (the loss plus the
mitigations' loss terms), clip, reduce the loss, ask the guard, update (or not), then the mitigations'
after_update hooks. Also the forward's inputs from packed rows."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from cpt.guard import Verdict
from cpt.train.optim import set_lr


def document_starts(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[batch, seq] bool: True where a document begins inside a packed row (right after an EOS)."""
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, :-1] == eos_id
    return starts


def model_inputs(ids: torch.Tensor, eos_id: int | None, document_masking: bool = False,
                 document_start_loss: bool = True) -> dict[str, torch.Tensor | bool]:
    """The forward's keyword arguments for packed rows of token ids (data.document_masking and
    data.document_start_loss). With masking, position_ids restart at 0 at every document start;
    transformers then keeps attention inside documents (varlen flash-attention, or a block-causal mask
    for sdpa/eager, which it builds from position_ids when no cache is in use). Without the start loss,
    the targets at document starts are -100 (ignored by the loss)."""
    inputs: dict[str, torch.Tensor | bool] = {"input_ids": ids, "labels": ids}
    if eos_id is None or (not document_masking and document_start_loss):
        return inputs
    starts = document_starts(ids, eos_id)
    if document_masking:
        index = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
        last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        inputs["position_ids"] = index - last_start
        inputs["use_cache"] = False
    if not document_start_loss:
        inputs["labels"] = ids.masked_fill(starts, -100)
    return inputs


@dataclass(frozen=True)
class StepStats:
    loss: float                # mean over the step's micro-batches and processes
    grad_norm: float | None    # before clipping; None where the backend clips itself (DeepSpeed)
    verdict: Verdict           # step: updated; skip: update dropped; halt: dropped, the run must stop
    seconds: float
    terms: dict[str, float] = field(default_factory=dict)  # the mitigations' loss terms (unweighted), means as loss


def train_step(run, batches: list[dict], lr: float, t0: float | None = None) -> StepStats:
    """One optimizer step of ``run`` (a cpt.train.setup.Run: model, optimizer, accelerator, guard, loss,
    mitigations) over this rank's micro-batches (:func:`model_inputs` on the CPU). ``t0``: when the step
    began, if the caller did work for it first (drawing the batch). After a taken update every
    mitigation's ``after_update`` runs (L2-init pulls, old vocabulary rows are restored)."""
    t0 = time.perf_counter() if t0 is None else t0
    model, optimizer, accelerator = run.model, run.optimizer, run.accelerator
    set_lr(optimizer, lr)  # times each group's lr multiplier
    loss_sum = torch.zeros((), device=accelerator.device)
    term_sums: dict[str, torch.Tensor] = {}
    for inputs in batches:
        inputs = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
        with accelerator.accumulate(model):
            loss, seen = run.loss.with_outputs(model, inputs)
            total = loss
            for m in run.mitigations:
                for name, (weight, term) in m.loss_terms(inputs, seen).items():
                    total = total + weight * term
                    term_sums[name] = term_sums.get(name, 0) + term.detach()
            accelerator.backward(total)
        loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.recipe.train.grad_clip or math.inf)
    loss = accelerator.reduce(loss_sum / len(batches), reduction="mean").item()
    terms = {k: accelerator.reduce(v / len(batches), reduction="mean").item() for k, v in term_sums.items()}
    norm = float(grad_norm) if grad_norm is not None else None
    # the same reduced numbers on every rank: one decision; a non-finite term is a non-finite loss
    verdict = run.guard.check(loss + sum(terms.values()), norm)
    if verdict == "step":
        optimizer.step()
        for m in run.mitigations:
            m.after_update(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss, norm, verdict, time.perf_counter() - t0, terms)
