"""mitigate.lr_multipliers: layer-wise LR, a factor on the schedule's LR per parameter pattern."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from cpt.errors import CptError
from cpt.mitigate.base import Mitigation, count, keyed, match_params, print_counts, register
from cpt.train import optim


def param_groups(model: torch.nn.Module, weight_decay: float, lr_multipliers: Mapping[str, float] | None = None
                 ) -> tuple[list[dict], dict[str, tuple[int, int]]]:
    """AdamW parameter groups of the trainable parameters, and ``{pattern: (tensors, parameters)}``.

    Weight decay on matrices (ndim >= 2) only, as :func:`cpt.train.optim.param_groups`. Each group carries
    ``lr_scale``; :func:`cpt.train.optim.set_lr` gives it ``lr * lr_scale``. A parameter takes the
    multiplier of the *first* pattern (in the mapping's order) that matches it; a pattern left with
    nothing by earlier ones is an error, and so is a multiplier <= 0 (0 would only waste optimizer state:
    freeze those instead). Order: the two plain groups (scale 1, even when empty; without multipliers
    they are exactly the plain optimizer's groups, so optimizer checkpoints stay compatible), then per
    pattern its decay and no-decay groups (those that hold something). ``param_groups[0]`` thus always
    runs at the schedule's LR."""
    multipliers = dict(lr_multipliers or {})
    for pattern, m in multipliers.items():
        if m == 0:
            raise CptError(f"lr multiplier for {pattern!r} is 0: freeze those parameters instead")
        if not (math.isfinite(m) and m > 0):
            raise CptError(f"lr multiplier for {pattern!r} is {m!r}: expected a number > 0")
    owner: dict[int, str] = {}
    counts: dict[str, tuple[int, int]] = {}
    for pattern, params in match_params(model, list(multipliers)).items():
        taken = [(n, p) for n, p in params if id(p) not in owner]
        if not taken:
            raise CptError(f"lr multiplier pattern {pattern!r} matches only parameters an earlier pattern "
                           f"already scales (the first matching pattern wins)")
        owner.update((id(p), pattern) for _, p in taken)
        counts[pattern] = count(taken)
    return optim.param_groups(model, weight_decay, multipliers, owner), counts


@register
class LayerwiseLR(Mitigation):
    """The recipe's mitigate.lr_multipliers, as the optimizer's parameter groups."""

    order = 20

    def __init__(self, multipliers: Mapping[str, float], main: bool = False):
        self.multipliers, self.main = dict(multipliers), main

    @classmethod
    def from_recipe(cls, recipe, origin, main):
        return cls(recipe.mitigate.lr_multipliers, main) if recipe.mitigate.lr_multipliers else None

    def optimizer_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        groups, counts = keyed("mitigate.lr_multipliers", param_groups, model, weight_decay, self.multipliers)
        print_counts(self.main, "lr x", counts, self.multipliers)
        return groups
