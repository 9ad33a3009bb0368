"""mitigate.distill: self-distillation from the weights the stage started from (a KL to their outputs)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from cpt.errors import CptError
from cpt.mitigate.base import Mitigation, register
from cpt.train.loss import CHUNK_ELEMENTS, IGNORE, Seen, chunk_logits, hf_model_of, saved_grads
from cpt.train.weights import Weights


def _capped(z: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if softcap is None:
        return z, None
    c = torch.tanh(z / softcap)
    return c * softcap, c


def logits_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """``T^2 * mean over rows of KL(p_t || p_s)``, ``p = softmax(logits / T)``, from whole logits ``[N, vocab]``
    (autograd through ``student``); with ``top_k``, over the teacher's k most likely tokens of each row, both
    distributions renormalised over them. The model's own loss path uses it; it is the chunked one's reference."""
    teacher = teacher.float()
    student = student.float()
    if top_k is not None:
        teacher, idx = teacher.topk(min(top_k, teacher.size(-1)), dim=-1)
        student = student.gather(-1, idx)
    lt = F.log_softmax(teacher / temperature, dim=-1)
    ls = F.log_softmax(student / temperature, dim=-1)
    return temperature**2 * (lt.exp() * (lt - ls)).sum(-1).mean()


class LinearDistill(torch.autograd.Function):
    """:func:`logits_kl` of the student's logits ``softcap(hidden @ weight.T + bias)`` against the teacher's
    (``t_hidden`` through its own head), a chunk of rows at a time, the gradients formed in the forward as
    cpt.train.loss.LinearCrossEntropy forms them: no ``[N, vocab]`` tensor is ever whole, for either model.
    With ``top_k`` the student's logits, and its gradients, are computed at the teacher's k tokens only
    (a gather of k head rows per position), so the student adds no vocabulary-sized matmul."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, temperature, top_k, softcap, chunk_rows,
                compute_dtype=None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dt = compute_dtype or weight.dtype
        w, tw = weight.to(dt), t_weight.to(dt)
        b = None if bias is None else bias.to(dt)
        tb = None if t_bias is None else t_bias.to(dt)
        n, tau = hidden.size(0), temperature
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, n, chunk_rows):
            h = hidden[s:s + chunk_rows].to(dt)
            zt, _ = chunk_logits(t_hidden[s:s + chunk_rows].to(dt), tw, tb, softcap)
            if top_k is not None:
                zt, idx = zt.topk(min(top_k, zt.size(-1)), dim=-1)
                wk = w[idx]  # [rows, k, hidden]
                z = torch.bmm(wk, h.unsqueeze(-1)).squeeze(-1)
                zs, capped = _capped((z if b is None else z + b[idx]).float(), softcap)
            else:
                zs, capped = chunk_logits(h, w, b, softcap)
            lt = F.log_softmax(zt.div_(tau), dim=-1)
            ls = F.log_softmax(zs.div_(tau), dim=-1)
            pt = lt.exp()
            total += (pt * (lt - ls)).sum()
            if not (need_h or need_w or need_b):
                continue
            g = ls.exp_().sub_(pt).mul_(tau / n)  # d(T^2 * KL / n) / d(student logits) = T (p_s - p_t) / n
            if capped is not None:
                g.mul_(1.0 - capped * capped)
            g = g.to(dt)
            rows = slice(s, s + h.size(0))
            if top_k is not None:
                if need_h:
                    grad_h[rows] = torch.bmm(g.unsqueeze(1), wk).squeeze(1).to(grad_h.dtype)
                if need_w:
                    grad_w.index_add_(0, idx.flatten(), (g.unsqueeze(-1) * h.unsqueeze(1)).flatten(0, 1).float())
                if need_b:
                    grad_b.index_add_(0, idx.flatten(), g.flatten().float())
                continue
            if need_h:
                grad_h[rows] = (g @ w).to(grad_h.dtype)
            if need_w:
                grad_w += (g.t() @ h).float()
            if need_b:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total * (tau * tau / max(n, 1))

    @staticmethod
    def backward(ctx, grad_out):
        return (*saved_grads(ctx, grad_out), *[None] * 8)


@register
class Distill(Mitigation):
    """Self-distillation (LwF-style) from the weights the stage started from: each micro-batch's loss gains
    ``weight * T^2 * KL(p_teacher || p_student)`` at temperature T (forward KL; the T^2 keeps the gradient's
    scale independent of T), averaged over the micro-batch's target positions or a seeded sample of them.
    The teacher is a frozen copy of the model (eval mode, no grad, run under the training's autocast), set to
    the student's weights at every stage start (:meth:`on_stage_start`) and kept in every checkpoint, so a run
    resumed inside a stage distils from the same weights. Constrains the outputs, not the weights, and needs
    no replay data; it costs the teacher's forward on every micro-batch and one more copy of the weights.

    On the chunked loss path (cpt.train.loss) the KL is taken from the final hidden states chunk by chunk
    (:class:`LinearDistill`); on the model's own path from its logits (:func:`logits_kl`). One process and DDP
    (a whole teacher per process); refused under DeepSpeed and FSDP, whose shards the teacher would need."""

    name, order = "distill", 60

    def __init__(self, weight: float, temperature: float = 1.0, positions: float = 1.0, top_k: int | None = None,
                 seed: int = 0):
        if not (math.isfinite(weight) and weight > 0):
            raise CptError(f"distill weight {weight!r}: expected a number > 0")
        if not (math.isfinite(temperature) and temperature > 0):
            raise CptError(f"distill temperature {temperature!r}: expected a number > 0")
        if not 0 < positions <= 1:
            raise CptError(f"distill positions {positions!r}: expected a share in (0, 1]")
        self.weight, self.temperature, self.positions, self.top_k = weight, temperature, positions, top_k
        self.seed, self.calls = seed, 0
        self.teacher: torch.nn.Module | None = None
        self.student: torch.nn.Module | None = None

    @classmethod
    def from_recipe(cls, recipe, origin, main):
        cfg = recipe.mitigate.distill
        if cfg is None:
            return None
        return cls(cfg.weight, cfg.temperature, cfg.positions, cfg.top_k, recipe.run.seed)

    def before_optimizer(self, model: torch.nn.Module) -> None:
        """The teacher: a copy of the model as built (before the optimizer, accelerate's wrappers, compile and
        the loss's hooks), frozen; its weights are the student's from :meth:`attach` on."""
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def attach(self, weights: Weights) -> None:
        if weights.zero_optimizer is not None or not weights.in_place:
            raise CptError("mitigate.distill: one process or DDP only: under DeepSpeed and FSDP the teacher "
                           "would have to be sharded as the model is (not built)")
        if self.teacher is None:
            self.before_optimizer(weights.model)
        self.student = weights.model
        self.teacher.to(next(self.student.parameters()).device)
        self.restart()

    @torch.no_grad()
    def restart(self) -> None:
        """The teacher takes the student's current weights (a stage starts from them)."""
        student = dict(self.student.named_parameters())
        for name, t in self.teacher.named_parameters():
            t.copy_(student[name])

    on_stage_start = restart

    def _rows(self, targets: torch.Tensor) -> torch.Tensor:
        """The positions the KL is taken on: every target position, or a sample of ``positions`` of them
        drawn from a generator seeded by (seed, call count), so a resumed run draws the same."""
        rows = (targets != IGNORE).nonzero().squeeze(1)
        self.calls += 1
        if self.positions < 1 and rows.numel():
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
            keep = max(1, round(self.positions * rows.numel()))
            rows = rows[torch.randperm(rows.numel(), generator=g)[:keep].sort().values.to(rows.device)]
        return rows

    def loss_terms(self, inputs: dict, seen: Seen) -> dict[str, tuple[float, torch.Tensor]]:
        rows = self._rows(seen.targets)
        feed = {k: v for k, v in inputs.items() if k != "labels"} | {"use_cache": False}
        device = seen.targets.device
        cast = torch.autocast(device.type, dtype=seen.compute_dtype, enabled=seen.compute_dtype is not None)
        if seen.hidden is None:  # the model's own path: whole logits
            with torch.no_grad(), cast:
                zt = self.teacher(**feed).logits.flatten(0, 1)[rows]
            return {"distill_kl": (self.weight, logits_kl(seen.logits[rows], zt, self.temperature, self.top_k))}
        hf = hf_model_of(self.teacher)
        with torch.no_grad(), cast:
            t_hidden = getattr(hf, hf.base_model_prefix)(**feed)[0].flatten(0, 1)[rows]
        head, t_head = seen.head, hf.get_output_embeddings()
        # a quarter of the CE's rows: about five [rows, vocab] fp32 temporaries (both models' logits and log-probs)
        chunk = max(1, CHUNK_ELEMENTS // (4 * head.out_features))
        kl = LinearDistill.apply(seen.hidden[rows], head.weight, head.bias, t_hidden, t_head.weight, t_head.bias,
                                 self.temperature, self.top_k, seen.softcap, chunk, seen.compute_dtype)
        return {"distill_kl": (self.weight, kl)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's weights ``{parameter name: tensor}`` and the sample's call count (``calls``)."""
        return {"calls": torch.tensor([self.calls], dtype=torch.int64),
                **{n: p.detach() for n, p in self.teacher.named_parameters()}}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = dict(self.teacher.named_parameters())
        if set(state) != {"calls", *own}:
            missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys() - {"calls"})
            raise CptError(f"distill: the saved teacher does not fit this model (missing {missing[:3]}, "
                           f"unknown {extra[:3]})")
        for name, p in own.items():
            if state[name].shape != p.shape:
                raise CptError(f"distill: teacher {name}: saved shape {tuple(state[name].shape)}, model "
                               f"{tuple(p.shape)}")
            p.copy_(state[name])
        self.calls = int(state["calls"][0])
