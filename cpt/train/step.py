"""One optimizer step, top to bottom: set the LR, forward and backward each micro-batch, clip, reduce
the loss, ask the guard, update (or not). Also how a step is cut into micro-batches (:class:`Layout`)
and the optimizer it steps."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from cpt.errors import CptError
from cpt.guard import StepGuard, Verdict
from cpt.mitigate import param_groups, set_lr
from cpt.recipe import Recipe


@dataclass
class Layout:
    """How one optimizer step is cut into micro-batches across processes."""

    seq_len: int
    sequences_per_step: int  # global batch, all processes
    micro_batch_size: int
    world_size: int
    grad_accum: int

    @classmethod
    def from_recipe(cls, recipe: Recipe, world_size: int) -> Layout:
        seq_len, micro = recipe.data.seq_len, recipe.train.micro_batch_size
        sequences = recipe.train.global_batch_tokens // seq_len
        if sequences % (micro * world_size):
            raise CptError(
                f"train.global_batch_tokens = {recipe.train.global_batch_tokens} is {sequences} sequences of "
                f"{seq_len}, not divisible by train.micro_batch_size ({micro}) x processes ({world_size})"
            )
        return cls(seq_len, sequences, micro, world_size, sequences // (micro * world_size))

    def my_micro_batches(self, picks: list, rank: int) -> list[list]:
        """This rank's micro-batches of a global batch. Micro-step a of rank r holds picks
        [(a*W + r)*m, (a*W + r + 1)*m): the global batch is the same whatever W divides it."""
        m, w = self.micro_batch_size, self.world_size
        return [picks[(a * w + rank) * m:(a * w + rank + 1) * m] for a in range(self.grad_accum)]


def make_optimizer(model, cfg, lr: float, device_type: str, lr_multipliers=None):
    """AdamW over what requires grad, decay on matrices only, groups scaled by mitigate.lr_multipliers
    (cpt.mitigate.param_groups); fused where torch has the kernel (auto). Returns (optimizer, counts per
    multiplier pattern)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    groups, counts = param_groups(model, cfg.weight_decay, lr_multipliers)
    fused = device_type in _get_fused_kernels_supported_devices() if cfg.fused == "auto" else cfg.fused
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
    set_lr(optimizer, lr)
    return optimizer, counts


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


def train_step(model, optimizer, accelerator, batches: list[dict], lr: float, grad_clip: float | None,
               guard: StepGuard, loss_fn, t0: float | None = None, l2_init=None) -> StepStats:
    """One optimizer step over this rank's micro-batches (:func:`model_inputs` on the CPU). ``loss_fn``:
    (model, inputs) -> mean loss (cpt.train.loss: chunked or the model's own). ``t0``: when the step
    began, if the caller did work for it first (drawing the batch). ``l2_init``: a cpt.mitigate.L2Init
    pulling the weights toward the stage's start after the update."""
    t0 = time.perf_counter() if t0 is None else t0
    set_lr(optimizer, lr)  # times each group's lr multiplier
    loss_sum = torch.zeros((), device=accelerator.device)
    for inputs in batches:
        inputs = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
        with accelerator.accumulate(model):
            loss = loss_fn(model, inputs)
            accelerator.backward(loss)
        loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    loss = accelerator.reduce(loss_sum / len(batches), reduction="mean").item()
    norm = float(grad_norm) if grad_norm is not None else None
    verdict = guard.check(loss, norm)  # the same reduced numbers on every rank: one decision
    if verdict == "step":
        optimizer.step()
        if l2_init is not None:
            l2_init.apply(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss, norm, verdict, time.perf_counter() - t0)
