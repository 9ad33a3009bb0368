"""mitigate.l2_init: pull the weights toward those the stage started from, after every update."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from cpt.errors import CptError
from cpt.mitigate.base import Mitigation, register
from cpt.train.masters import ParamMasters, masters
from cpt.train.weights import Weights


def check_coefficient(coeff: float) -> None:
    if not (math.isfinite(coeff) and coeff >= 0):
        raise CptError(f"l2_init coefficient {coeff!r}: expected a number >= 0")


def check_overshoot(coeff: float, groups: Sequence[Mapping]) -> None:
    """lr_g * coeff > 1 in any group would pull past the reference: refused with one line."""
    lr = max(g["lr"] for g in groups)
    if lr * coeff > 1:
        raise CptError(f"l2_init: coefficient {coeff:g} x LR {lr:.3e} = {lr * coeff:.3g} > 1 would overshoot "
                       f"the start weights; keep it below 1 / (max LR x largest lr multiplier)")


@register
class L2Init(Mitigation):
    """Decoupled L2 toward reference weights (those at construction or :meth:`attach`; the loop calls
    :meth:`on_stage_start` at every stage start, so the reference is the weights the stage started from),
    after each optimizer step::

        p <- p - lr_g * coeff * (p - p0)        (computed as torch.lerp(p, p0, lr_g * coeff))

    with ``lr_g`` the LR the step used in the parameter's group (schedule x ``lr_scale``), so the pull
    follows the schedule exactly as AdamW's decoupled weight decay ``p <- p - lr_g * wd * p`` does.
    ``lr_g * coeff = 1`` puts p back on p0; above 1 it would overshoot, and :meth:`apply` refuses it.
    Only parameters trainable at construction are pulled; references are fp32 copies on their device.
    With LoRA the trainable tensors are the adapters: lora_B starts at zeros (peft's init), so its
    reference is zeros and the pull shrinks the adapter's update B @ A toward the base model; lora_A's
    reference is its random init.

    The pull acts on the optimizer's masters (cpt.train.masters): the parameters themselves (one process;
    DDP, where every rank applies the same update after the all-reduced step; FSDP2's shards), or
    DeepSpeed's fp32 master copies and the module's weights alike. ``L2Init(model, coeff)`` pulls
    ``model``'s own parameters; ``L2Init(None, coeff)`` waits for :meth:`attach`.
    """

    name, order, writes_weights = "l2_init", 30, True

    def __init__(self, model: torch.nn.Module | None, coeff: float):
        check_coefficient(coeff)
        self.coeff = coeff
        self.masters = ParamMasters(model) if model is not None else None

    @classmethod
    def from_recipe(cls, recipe, origin, main):
        return cls(None, recipe.mitigate.l2_init) if recipe.mitigate.l2_init > 0 else None

    def attach(self, weights: Weights) -> None:
        self.masters = masters(weights)

    @property
    def refs(self) -> dict[str, torch.Tensor]:
        return self.masters.state_dict()

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return self.masters.params

    def restart(self) -> None:
        """Take the current weights as the reference (a new stage starts from them; under ZeRO-1/2 a
        collective)."""
        self.masters.snapshot()

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Pull every referenced parameter toward its reference; call right after a taken optimizer.step()."""
        if self.coeff == 0:
            return
        check_overshoot(self.coeff, self.masters.groups(optimizer))  # before anything moves
        self.masters.pull(optimizer, lambda group: group["lr"] * self.coeff)

    on_stage_start, after_update = restart, apply

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: fp32 reference}`` (this rank's pieces where they are pieces), or per DeepSpeed
        flat group: plain tensors, for safetensors (cpt.mitigate.state)."""
        return self.masters.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.masters.load_state_dict(state, "l2_init")
