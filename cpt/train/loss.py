"""The next-token loss of training and probes, and the memory-lean way to compute it (``train.loss``).

The plain path, ``model(input_ids, labels=...).loss``, projects every position onto the vocabulary:
logits ``[batch, seq, vocab]`` in the model's dtype, upcast to fp32 for the loss, whose backward keeps a
gradient of the same size. At a 128K vocabulary and seq 4096 each of those is 2 GiB per sequence.

The chunked path never holds them. The model runs with ``logits_to_keep=1`` (its head projects one
position, as in generation), a forward hook on the decoder keeps the final hidden states ``[batch, seq,
hidden]``, and :class:`LinearCrossEntropy` projects them a chunk of positions at a time. Each chunk's
logits are turned into the loss and, while they exist, into the gradients of the hidden states and of
the head (``softmax - onehot`` times the head weight / hidden states): the same matmuls the plain path
does, no recomputation, and only one chunk's logits alive at a time. The price is one fp32 buffer the
size of the head weight for its gradient.

Under mixed precision (autocast, ``train.precision: bf16``, the GPU default) the chunked matmuls run in
the compute dtype the model's own head would use (the head weight cast once per call, as autocast casts
it), the softmax and the loss in fp32, and the head's gradient is summed over chunks in fp32; without
that the head would run in fp32 beside a bf16 model, and its logits would not be the model's.

The chunked path needs the head to be a plain ``nn.Linear`` whose weights can be whole on this rank (not
ZeRO-3 / FSDP1 partitions, which exist only inside the module's own forward; an FSDP2 head's unit is
gathered for it, and FSDP2 reduce-scatters its gradient as any unit's) and the model's logits to be
``head(hidden)`` (with Gemma's final soft-capping, which it applies too). :func:`choose_loss` checks the
last point by running both paths on a few tokens, so a model that post-processes its logits otherwise
(a logit scale, a second head) falls back to the plain path instead of training on a different loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cpt.errors import CptError

IGNORE = -100
CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MiB in fp32): 4K positions at vocab 8K, 256 at 128K


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] labels -> [batch, seq] targets: position i predicts labels[i+1]; the last predicts
    nothing (IGNORE). Shifting the targets, not the logits, keeps the logits uncopied."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def chunk_logits(h, weight, bias, softcap):
    """fp32 logits ``softcap(h @ weight.T + bias)`` of a chunk of hidden rows, the matmul in ``weight``'s
    dtype, and the tanh of the cap (None without one) for the gradient."""
    logits = F.linear(h.to(weight.dtype), weight, bias).float()
    if softcap is None:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


class LinearCrossEntropy(torch.autograd.Function):
    """mean over non-ignored targets of cross_entropy(softcap(hidden @ weight.T + bias), targets), computed
    a chunk of rows at a time; the gradients are formed in the forward, chunk by chunk. The head's fp32
    gradient starts as the first chunk's product (no zero-filled buffer to add it to) and the chunks are of
    equal size (no short last chunk paying a whole head-sized sum for a few rows): issue 28, where these
    passes, not the matmuls, made it slower than the model's own loss on a CPU. The log-softmax is
    logsumexp and a subtraction in place, not ``torch.log_softmax``: that one is faster on a CPU, but with
    it a compiled run (train.compile) resumed differed from the uninterrupted run in the 7th digit on 4 of
    15 tries (tests/test_trainer.py), this form on none of 13."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_rows, compute_dtype=None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dt = compute_dtype or weight.dtype
        w = weight.to(dt)  # once per call (a no-op in the weights' own dtype), as autocast casts it
        b = None if bias is None else bias.to(dt)
        valid = targets != IGNORE
        count = valid.sum().clamp(min=1).float()
        safe = targets.clamp(min=0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = grad_b = None  # fp32 sums over chunks, from the first chunk's
        n = hidden.size(0)
        chunk_rows = -(-n // -(-n // chunk_rows)) if n else chunk_rows  # ceil(n / chunks): equal chunks
        for s in range(0, n, chunk_rows):
            h, t, v = hidden[s:s + chunk_rows].to(dt), safe[s:s + chunk_rows], valid[s:s + chunk_rows]
            logp, capped = _chunk_log_softmax(h, w, b, softcap)
            total -= (logp.gather(1, t[:, None])[:, 0] * v).sum()
            if not (need_h or need_w or need_b):
                continue
            g = logp.exp_()  # softmax, in the log-probabilities' memory
            g[torch.arange(g.size(0), device=g.device), t] -= 1.0
            scale = (v / count)[:, None]
            if capped is not None:  # d(c * tanh(x / c)) / dx = 1 - tanh^2
                scale = scale * (1.0 - capped * capped)
            g = g.mul_(scale).to(dt)  # two passes, faster on a CPU than one multiply into a bf16 output
            if need_h:
                if grad_h.dtype == dt:
                    torch.mm(g, w, out=grad_h[s:s + chunk_rows])
                else:
                    grad_h[s:s + chunk_rows] = g @ w
            if need_w:  # the chunk's product in dt, summed over chunks in fp32; in place where dtypes allow
                if grad_w is not None and dt == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w = _fp32_sum(grad_w, g.t() @ h)
            if need_b:
                grad_b = _fp32_sum(grad_b, g.sum(0, dtype=torch.float32))
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        return (*saved_grads(ctx, grad_out), None, None, None, None)


def _chunk_log_softmax(h, w, b, softcap):
    """fp32 log-softmax of a chunk's logits ``softcap(h @ w.T + b)`` (the matmul in ``w``'s dtype), in the
    logits' memory, and the tanh of the cap (None without one) for the gradient."""
    logits, capped = chunk_logits(h, w, b, softcap)
    return logits.sub_(torch.logsumexp(logits, dim=-1)[:, None]), capped


def _fp32_sum(acc, part):
    """``acc + part`` in fp32, in ``acc``'s memory (``part`` upcast when ``acc`` is None)."""
    return part.float() if acc is None else acc.add_(part)


def saved_grads(ctx, grad_out) -> tuple:
    """Backward of a function that formed the gradients of (hidden, weight, bias) in its forward and saved
    them (fp32 for the head's, cast back to the parameters' dtypes in ``ctx.dtypes``): scaled by grad_out."""
    grad_h, grad_w, grad_b = ctx.saved_tensors
    w_dtype, b_dtype = ctx.dtypes
    return (grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            (grad_w * grad_out).to(w_dtype) if grad_w is not None else None,
            (grad_b * grad_out).to(b_dtype) if grad_b is not None else None)


@dataclass(frozen=True)
class Seen:
    """What the training loss saw of one micro-batch, for a mitigation that adds a term to it (its
    ``loss_terms`` hook): the next-token targets ``[N]`` flattened (IGNORE where none) and either the final
    hidden states ``[N, hidden]`` (the chunked path; in the graph) with the head that projects them, or the
    logits ``[N, vocab]`` (the model's own path). ``compute_dtype``: autocast's dtype (None: the weights')."""

    targets: torch.Tensor
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    head: torch.nn.Module | None = None
    softcap: float | None = None
    compute_dtype: torch.dtype | None = None


class PlainLoss:
    """The model's own loss: ``model(**inputs).loss``; per-token losses from its full logits."""

    name = "model"

    def __init__(self, compute_dtype: torch.dtype | None = None):
        self.compute_dtype = compute_dtype

    def __call__(self, model, inputs: dict) -> torch.Tensor:
        return model(**inputs).loss

    def with_outputs(self, model, inputs: dict) -> tuple[torch.Tensor, Seen]:
        """The loss and what it saw (:class:`Seen`: the logits)."""
        out = model(**inputs)
        targets = next_token_targets(inputs["labels"]).flatten()
        return out.loss, Seen(targets, logits=out.logits.flatten(0, 1), compute_dtype=self.compute_dtype)

    @torch.no_grad()
    def token_nll(self, model, inputs: dict) -> torch.Tensor:
        """[batch, seq] fp32 loss of each position's next token (0 where the target is ignored)."""
        inputs = dict(inputs)
        targets = next_token_targets(inputs.pop("labels"))
        logits = model(**inputs).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                               ignore_index=IGNORE).view_as(targets)


class ChunkedLoss:
    """The chunked path (module docstring). ``hf_model``: the transformers model inside any wrapper
    (DDP, DeepSpeed, peft); calls go through the wrapped model, so the wrappers see every forward."""

    name = "chunked"

    def __init__(self, hf_model, chunk_elements: int = CHUNK_ELEMENTS, compute_dtype: torch.dtype | None = None):
        self.head = hf_model.get_output_embeddings()
        self.compute_dtype = compute_dtype  # autocast's dtype under mixed precision; None: the weights' own
        self.softcap = getattr(hf_model.config, "final_logit_softcapping", None)
        self.chunk_rows = max(1, chunk_elements // self.head.out_features)
        self._hidden = None
        self._armed = False
        getattr(hf_model, hf_model.base_model_prefix).register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if self._armed:
            self._hidden = output[0]

    def hidden(self, model, inputs: dict) -> torch.Tensor:
        """The decoder's final hidden states for ``inputs`` (no labels), the head run on one position."""
        self._armed = True
        try:
            model(**inputs, logits_to_keep=1)
            hidden, self._hidden = self._hidden, None
        finally:
            self._armed = False
        return hidden

    def __call__(self, model, inputs: dict) -> torch.Tensor:
        return self.with_outputs(model, inputs)[0]

    def with_outputs(self, model, inputs: dict) -> tuple[torch.Tensor, Seen]:
        """The loss and what it saw (:class:`Seen`: the final hidden states and the head)."""
        inputs = dict(inputs)
        targets = next_token_targets(inputs.pop("labels")).flatten()
        h = self.hidden(model, inputs).flatten(0, 1)
        self._gather_head()
        loss = LinearCrossEntropy.apply(h, self.head.weight, self.head.bias, targets, self.softcap, self.chunk_rows,
                                        self.compute_dtype)
        return loss, Seen(targets, h, head=self.head, softcap=self.softcap, compute_dtype=self.compute_dtype)

    def _gather_head(self) -> None:
        """FSDP2: make the head's weights whole on this rank (its unit's all-gather; a no-op when the forward
        left them gathered). The gradient then reaches the gathered weight, which FSDP2 reduce-scatters
        into the shards at the end of the backward as for any unit."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.head, FSDPModule):
            self.head.unshard()

    def _head(self):
        """The head's weight and bias in the compute dtype (cast once per call)."""
        self._gather_head()
        dt = self.compute_dtype or self.head.weight.dtype
        bias = self.head.bias
        return self.head.weight.to(dt), None if bias is None else bias.to(dt)

    @torch.no_grad()
    def token_nll(self, model, inputs: dict) -> torch.Tensor:
        inputs = dict(inputs)
        targets = next_token_targets(inputs.pop("labels"))
        h = self.hidden(model, inputs).flatten(0, 1)
        flat = targets.flatten()
        out = torch.empty(flat.shape, dtype=torch.float32, device=h.device)
        weight, bias = self._head()
        for s in range(0, h.size(0), self.chunk_rows):
            logits, _ = chunk_logits(h[s:s + self.chunk_rows], weight, bias, self.softcap)
            out[s:s + self.chunk_rows] = F.cross_entropy(logits, flat[s:s + self.chunk_rows], reduction="none",
                                                         ignore_index=IGNORE)
        return out.view_as(targets)


def hf_model_of(model):
    """The transformers model inside a peft wrapper (already unwrapped from DDP/DeepSpeed)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunked_unsupported(hf_model, partitioned: bool) -> str | None:
    """Why the chunked path cannot run on this model, or None. ``partitioned``: the engine owns flat
    partitions of the weights (ZeRO-3, FSDP1; FSDP2's head is gathered by :meth:`ChunkedLoss._gather_head`)."""
    from torch.distributed.fsdp import FSDPModule

    if partitioned:
        return "the weights are partitioned (ZeRO-3 / FSDP1): the head exists whole only inside its own forward"
    if getattr(hf_model.config, "output_router_logits", False):
        return "the model adds a router auxiliary loss to its own (MoE, output_router_logits)"
    head = hf_model.get_output_embeddings()
    kind = type(head).__bases__[-1] if isinstance(head, FSDPModule) else type(head)  # FSDP2: FSDP<cls>(FSDPModule, cls)
    if kind is not torch.nn.Linear:
        return f"the output head is a {type(head).__name__}, not a plain Linear (e.g. LoRA on the head)"
    if not hasattr(hf_model, hf_model.base_model_prefix):
        return f"{type(hf_model).__name__} has no decoder at .{hf_model.base_model_prefix}"
    return None


@torch.no_grad()
def same_logits(model, loss: ChunkedLoss, vocab: int) -> str | None:
    """Run both paths on a few tokens: None when the chunked path's logits are the model's, else why not."""
    head = loss.head
    ids = torch.randint(vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(head.weight.device)
    was_training = model.training
    model.eval()
    try:
        want = model(input_ids=ids).logits.float()
        got, _ = chunk_logits(loss.hidden(model, {"input_ids": ids}), *loss._head(), loss.softcap)
    except Exception as e:  # noqa: BLE001 - any failure means: use the model's own path
        return f"{type(e).__name__}: {e}"
    finally:
        model.train(was_training)
    if got.shape != want.shape:
        return f"its logits have shape {tuple(want.shape)}, head(hidden) {tuple(got.shape)}"
    tol = 1e-4 if (loss.compute_dtype or head.weight.dtype) == torch.float32 else 2e-2
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    return None if err <= tol else f"its logits are not head(final hidden states) (relative difference {err:.2e})"


def choose_loss(mode: str, model, partitioned: bool, vocab: int, compute_dtype: torch.dtype | None = None):
    """(loss, note) for train.loss = auto | chunked | model; ``model`` unwrapped from DDP/DeepSpeed (its
    autocast wrapper kept). ``compute_dtype``: autocast's dtype under mixed precision (None: the weights').
    ``note`` says why auto fell back to the plain path (None otherwise)."""
    if mode == "model":
        return PlainLoss(compute_dtype), None
    hf = hf_model_of(model)
    why = chunked_unsupported(hf, partitioned)
    loss = None
    if why is None:
        loss = ChunkedLoss(hf, compute_dtype=compute_dtype)
        why = same_logits(model, loss, vocab)
    if why is None:
        return loss, None
    if mode == "chunked":
        raise CptError(f"train.loss: chunked cannot run here: {why} (use auto or model)")
    return PlainLoss(compute_dtype), f"train.loss: auto uses the model's own loss: {why}"
