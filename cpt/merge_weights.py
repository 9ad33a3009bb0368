"""Merge coefficients: the weights that ``cpt merge`` and ``merge:`` in a recipe give each checkpoint.

Pure arithmetic on a spec string and a count, free of tensors and files, so that the recipe schema
(:mod:`cpt.recipe`) can check ``merge.weights`` without importing the merging itself (:mod:`cpt.merge`,
which re-exports these names). The specs (``uniform``, ``w1,w2,...``, ``ema:<decay>``, ``wsm:<shape>``)
are described in :mod:`cpt.merge`.
"""

from __future__ import annotations

import math

from cpt.errors import CptError
from cpt.schedules import Phase

WSM_SHAPES = ("linear", "cosine", "1-sqrt", "rex")  # the decay shapes of cpt.schedules that end at 0


def merge_coefficients(spec: str, n: int) -> list[float]:
    """The ``n`` merge coefficients (oldest checkpoint first, summing to 1) that ``spec`` names:
    ``uniform``, ``w1,w2,...`` (normalised to sum 1), ``ema:<decay>`` or ``wsm:<shape>``."""
    if n < 1:
        raise CptError(f"merge: nothing to merge ({n} checkpoints)")
    spec = spec.strip()
    if spec == "uniform":
        return [1.0 / n] * n
    if spec.startswith("ema:"):
        return ema_coefficients(_number(spec, spec[4:]), n)
    if spec.startswith("wsm:"):
        return wsm_coefficients(spec[4:], n)
    if "," not in spec and not _is_number(spec):
        raise CptError(f"merge weights {spec!r}: expected uniform, w1,w2,... (one per checkpoint), ema:<decay> "
                       f"or wsm:<shape> ({', '.join(WSM_SHAPES)})")
    weights = [_number(spec, w) for w in spec.split(",")]
    if len(weights) != n:
        raise CptError(f"merge weights {spec!r}: {len(weights)} weights for {n} checkpoints")
    if any(w < 0 for w in weights):
        raise CptError(f"merge weights {spec!r}: weights must be >= 0")
    total = sum(weights)
    if total <= 0:
        raise CptError(f"merge weights {spec!r}: all weights are zero")
    return [w / total for w in weights]


def ema_coefficients(decay: float, n: int) -> list[float]:
    """The exponential moving average of ``n`` checkpoints started at the first one: newest ``1 - d``,
    ``k`` places older ``d^k (1 - d)``, the first ``d^(n-1)`` (the remainder), oldest first."""
    if not 0 <= decay < 1:
        raise CptError(f"merge weights 'ema:{decay:g}': the decay must be in [0, 1)")
    return [decay ** (n - 1)] + [decay ** (n - 1 - i) * (1 - decay) for i in range(1, n)]


def wsm_coefficients(shape: str, n: int) -> list[float]:
    """WSM merge coefficients of ``n`` checkpoints (oldest first) that emulate a decay of ``shape``.

    Tian et al. 2025, "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM Pre-training"
    (arXiv 2507.17634), Section 3, Theorem 3.1: merging checkpoints ``theta_n .. theta_{n+k}`` of a
    constant-LR run, ``sum_{j=0..k} c_j theta_{n+j} = theta_n - sum_{i=1..k} w_i g_{n+i-1}``, applies the
    weight ``w_i = sum_{j>=i} c_j`` to the update ``g`` made between checkpoints ``i-1`` and ``i``: a decay
    sequence ``1 >= w_1 >= .. >= w_k >= 0`` is emulated by ``c_0 = 1 - w_1``, ``c_j = w_j - w_{j+1}``,
    ``c_k = w_k``.

    Here the ``n`` checkpoints stand for ``n`` equal parts of the emulated decay, and ``w_i`` is the decay
    factor ``f`` of ``shape`` (1 at its start, 0 at its end; :class:`cpt.schedules.Phase` computes it)
    where part ``i`` starts: ``w_i = f(i / n)``. So checkpoint ``j`` (0 = oldest) gets
    ``c_j = f(j / n) - f((j + 1) / n)``, the LR drop over the part it stands for; the coefficients sum to
    ``f(0) - f(1) = 1``, and ``linear`` gives the uniform mean (the mean of checkpoints is a linear decay).
    """
    if shape not in WSM_SHAPES:
        raise CptError(f"merge weights 'wsm:{shape}': unknown decay shape (expected one of {', '.join(WSM_SHAPES)})")
    decay = Phase("merge", 0, n, 1.0, 0.0, shape)  # LR factor from 1 at the oldest checkpoint to 0 past the newest
    factors = [decay.lr(j) for j in range(n + 1)]
    drops = [max(a - b, 0.0) for a, b in zip(factors, factors[1:], strict=False)]
    total = sum(drops)  # 1 up to rounding
    return [d / total for d in drops]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(spec: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CptError(f"merge weights {spec!r}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise CptError(f"merge weights {spec!r}: {text.strip()!r} is not finite")
    return value
