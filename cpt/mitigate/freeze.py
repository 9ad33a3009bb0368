"""mitigate.freeze: parameters that do not train (e.g. the bottom layers, the embeddings)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cpt.mitigate.base import Mitigation, count, keyed, match_params, print_counts, register


def freeze(model: torch.nn.Module, patterns: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Set ``requires_grad=False`` on the trainable parameters the patterns match; returns
    ``{pattern: (tensors, parameters)}`` matched (a tensor two patterns match counts under both).
    Call before the optimizer is built and before ``accelerate.prepare`` (DDP registers what requires
    grad when it wraps the model); the optimizer then never sees the frozen tensors."""
    matched = match_params(model, patterns)  # all matched first: overlapping patterns are no error
    for params in matched.values():
        for _, p in params:
            p.requires_grad_(False)
    return {pattern: count(params) for pattern, params in matched.items()}


@register
class Freeze(Mitigation):
    """The recipe's mitigate.freeze patterns, applied before the optimizer and DDP take what requires grad."""

    order = 10

    def __init__(self, patterns: Sequence[str], main: bool = False):
        self.patterns, self.main = list(patterns), main

    @classmethod
    def from_recipe(cls, recipe, origin, main):
        return cls(recipe.mitigate.freeze, main) if recipe.mitigate.freeze else None

    def before_optimizer(self, model: torch.nn.Module) -> None:
        print_counts(self.main, "frozen", keyed("mitigate.freeze", freeze, model, self.patterns))
