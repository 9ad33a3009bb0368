"""mitigate.ema: an exponential moving average of the weights, probed and exported beside them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from cpt.errors import CptError
from cpt.mitigate.base import Mitigation, register
from cpt.train.weights import Weights, lent, load_into, local, trainable


@register
class EMA(Mitigation):
    """Exponential moving average of the trainable weights, in fp32::

        ema <- decay * ema + (1 - decay) * p          on every step with step % every == 0

    It starts from the weights at construction (the run's start), not from the first update's
    weights: after n updates the start keeps weight decay**n, so choose 1 / (1 - decay) well below the
    number of updates (with ``every`` > 1, decay applies per update, not per step). Frozen parameters are
    not averaged (they do not move). :meth:`applied` lends the averaged weights to the model (probes as
    probe_ema/..., the final_ema/ export) and restores the raw ones bit for bit. Whole weights (one
    process, DDP, ZeRO-1/2): identical on every rank; FSDP2 and ZeRO-3: each rank averages its pieces
    (cpt.train.weights.local), and ``settle`` makes the lent weights the ones a forward gathers.
    ``EMA(None, decay)`` waits for :meth:`attach`.
    """

    name, order, writes_weights = "ema", 50, True

    def __init__(self, model: torch.nn.Module | None, decay: float, every: int = 1,
                 settle: Callable[[], None] | None = None):
        if not 0 < decay < 1:
            raise CptError(f"ema decay {decay!r}: expected a number in (0, 1)")
        if every < 1:
            raise CptError(f"ema every {every!r}: expected a step count >= 1")
        self.decay, self.every = decay, every
        if model is not None:
            self._take(model, settle)

    @classmethod
    def from_recipe(cls, recipe, origin, main):
        cfg = recipe.mitigate.ema
        return cls(None, cfg.decay, cfg.every) if cfg is not None else None

    def attach(self, weights: Weights) -> None:
        self._take(weights.model, weights.settle)

    def _take(self, model: torch.nn.Module, settle: Callable[[], None] | None) -> None:
        self.model, self.settle = model, settle
        self.params = dict(trainable(model))
        self.shadow = {n: local(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Average in the current weights if ``step % every == 0`` (step: the count after this step)."""
        if step % self.every:
            return False
        for name, p in self.params.items():
            self.shadow[name].lerp_(local(p).detach().float(), 1.0 - self.decay)
        return True

    def after_step(self, step: int) -> None:
        self.update(step)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the EMA weights (cast to the parameters' dtype); after it, the
        raw weights exactly as before (kept as a copy meanwhile: one more copy of the trainable weights)."""
        with lent(self.model, self.params, self.shadow, self.settle, is_local=True):
            yield

    def variants(self):
        return {"ema": self.applied}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: fp32 average}`` (this rank's pieces; cpt.mitigate.state gathers them)."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_into(self.shadow, state, "ema", self.params)
