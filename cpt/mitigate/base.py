"""The mitigation protocol: what every forgetting mitigation beyond replay is to the trainer.

A mitigation is built from its recipe section (:meth:`Mitigation.from_recipe`; None when the recipe does
not ask for it) and registered with :func:`register`. Setup and the loop then call the same hooks on every
mitigation of the run, in ``order``, and know none of them by name:

===================  ===========================================================================
hook                 when
===================  ===========================================================================
before_optimizer     the unwrapped model before the optimizer and accelerate see it (requires_grad)
optimizer_groups     the optimizer's parameter groups (at most one mitigation shapes them)
attach               after accelerate prepared model and optimizer and a resumed checkpoint's weights
                     are in: the backend's cpt.train.weights.Weights (pieces, settle, masters)
on_stage_start       a stage starts (not when a run resumes inside it)
loss_terms           each micro-batch, after the loss: {metric: (weight, term)}; the step backpropagates
                     loss + sum of weight x term and logs each term as train/<metric> (distillation's KL)
after_update         right after an optimizer update was taken (skipped steps have none)
after_step           after every counted step, with the step count
variants             weights to probe and export beside the raw ones: name -> context manager
state_dict           the mitigation's tensors, saved in every checkpoint under ``name``
===================  ===========================================================================

Parameters are chosen by regular expressions that are *searched* (``re.search``, not fullmatch) in the
names of ``model.named_parameters()``: ``embed_tokens|lm_head`` or ``layers\\.([0-7])\\.`` match
wherever they occur, so the same pattern works on a plain HF model (``model.layers.0.mlp.up_proj.weight``)
and on a peft-wrapped one, whose names carry a ``base_model.model.`` prefix and ``lora_A.default`` /
``lora_B.default`` (or ``modules_to_save.default``) infixes. Anchor with ``^``/``$`` where you mean it.
Only trainable parameters are candidates (with LoRA: the adapters and modules_to_save), and a pattern
that matches none is an error. Tied weights (an LM head sharing the embedding) are one tensor: either
name selects it, and it is counted and stored once, under its first name.

Everything acts on the unwrapped model: DDP's ``module.`` prefix never reaches the names, so checkpoint
keys are the model's own. Where a backend shards the parameters, a mitigation's tensors are sharded alike
and every update is elementwise on this rank's piece (cpt.train.weights); a checkpoint holds the whole
tensors (gathered one at a time), so it loads at any process count.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from cpt.errors import CptError
from cpt.train.weights import Weights

Named = list[tuple[str, torch.nn.Parameter]]


class Mitigation:
    """Base of every mitigation: each hook does nothing until a subclass overrides it."""

    name: str = ""             # key of its state in a checkpoint ("" = it keeps none)
    order: int = 50            # hooks run in this order across mitigations (lower first)
    writes_weights = False     # writes into the weights outside a step: refused where the backend cannot

    @classmethod
    def from_recipe(cls, recipe, origin: str | None, main: bool) -> Mitigation | None:
        """The mitigation the recipe asks for, or None. ``origin``: the weights the run starts from (a path,
        None from scratch); ``main``: this is the process that prints."""
        return None

    def before_optimizer(self, model: torch.nn.Module) -> None:
        pass

    def optimizer_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict] | None:
        return None

    def attach(self, weights: Weights) -> None:
        pass

    def on_stage_start(self) -> None:
        pass

    def loss_terms(self, inputs: dict, seen) -> dict[str, tuple[float, torch.Tensor]]:
        """Terms added to the micro-batch's loss: ``{metric: (weight, term)}``. ``inputs``: the forward's
        (on the device); ``seen``: what the loss saw (cpt.train.loss.Seen: hidden states and head, or logits)."""
        return {}

    def after_update(self, optimizer) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def variants(self) -> dict[str, Callable[[], AbstractContextManager]]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pass


REGISTRY: list[type[Mitigation]] = []


def register(cls: type[Mitigation]) -> type[Mitigation]:
    """Class decorator: the trainer builds this mitigation whenever its from_recipe returns one."""
    REGISTRY.append(cls)
    REGISTRY.sort(key=lambda c: c.order)
    return cls


def keyed(key: str, fn: Callable[..., Any], *args, **kwargs):
    """``fn(*args)``, any CptError prefixed with the recipe key that asked for it."""
    try:
        return fn(*args, **kwargs)
    except CptError as e:
        raise CptError(f"{key}: {e}") from None


def print_counts(main: bool, what: str, counts: dict[str, tuple[int, int]], factors=None) -> None:
    """One line per pattern: what it matched."""
    for pattern, (tensors, params) in counts.items() if main else ():
        factor = f" {factors[pattern]:g}" if factors else ""
        print(f"cpt: mitigate: {what}{factor} {pattern!r}: {tensors} tensors, {params / 1e6:.3f}M parameters")


def match_params(model: torch.nn.Module, patterns: Sequence[str]) -> dict[str, Named]:
    """``{pattern: [(name, param)]}``: the trainable parameters whose name ``re.search`` finds each pattern
    in, model order, each tensor once. Raises CptError for a bad expression or one that matches nothing."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    pool = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    out: dict[str, Named] = {}
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise CptError(f"parameter pattern {pattern!r}: not a regular expression ({e})") from None
        found = {id(p): (canonical[id(p)], p) for n, p in pool if rx.search(n)}
        if not found:
            names = [n for n, _ in pool]
            examples = ", ".join(dict.fromkeys([*names[:2], *names[len(names) // 2:][:1], *names[-1:]]))
            raise CptError(f"parameter pattern {pattern!r} matches no trainable parameter (searched in "
                           f"{len(names)} names such as {examples or 'none'})")
        out[pattern] = list(found.values())
    return out


def count(params: Named) -> tuple[int, int]:
    return len(params), sum(p.numel() for _, p in params)
