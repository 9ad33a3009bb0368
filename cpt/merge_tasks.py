"""Merging back after continual pre-training: interpolation toward the starting model, and task vectors
(task arithmetic, TIES, DARE) that move a CPT delta onto another model or another delta onto a CPT model.

All run on :func:`cpt.merge.write_merge`: the same checks (one architecture, one tokenizer, safetensors
only, finite weights; one line each), tensor by tensor in float32, each output tensor written before the
next is read, an HF model dir + ``merge.json`` written aside and renamed into place.

Interpolation (WiSE-FT, Wortsman et al. 2022, arXiv 2109.01903): ``theta(a) = (1 - a) * base + a * final``
for each weight ``a`` in ``[0, 1]``: ``a`` weighs the CPT result (the fine-tuned model, as WiSE-FT's alpha
and mergekit's linear weight do): ``a = 1`` is ``final`` bit for bit, ``a = 0`` is ``base``. One call
writes one model dir per weight, ``OUT/<a>/`` (:func:`weight_dir`), config and tokenizer from ``final``.

Task vectors, with an explicit ``base`` and donors ``m_i`` with weights ``w_i`` (deltas ``d_i = m_i - base``):

``task_arithmetic`` (Ilharco et al. 2023, arXiv 2212.04089)
    ``base + sum_i w_i d_i``. Weights are any finite numbers (negative: subtract a delta). With base =
    the pre-trained model and donors CPT and instruct at weight 1, this is ``instruct + (cpt - base)``:
    the "chat vector" (Huang et al. 2023, arXiv 2310.04799) added to the CPT model.
``ties`` (Yadav et al. 2023, TIES-Merging, arXiv 2306.01708)
    per tensor: trim each ``d_i`` to its ``density`` share of largest magnitudes (the others set to 0;
    ``ceil(density * numel)`` kept, more where magnitudes tie at the threshold), weigh it (``w_i d_i``),
    elect each entry's sign as the sign of ``sum_i w_i d_i`` over the trimmed deltas (the side with more
    total mass), and take the disjoint mean: ``sum w_i d_i / sum w_i`` over the donors whose trimmed entry
    is non-zero and has the elected sign (0 where none has). ``base +`` that. Weights ``> 0``, relative
    (the mean normalises them; the paper's scale lambda is 1). The paper trims over a whole task vector;
    here each tensor is trimmed on its own, so that one tensor at a time is in memory (as mergekit does).
``dare`` (Yu et al. 2023, "Language Models are Super Mario", arXiv 2311.03099)
    each entry of each ``d_i`` dropped (set to 0) with probability ``drop``, the rest rescaled by
    ``1 / (1 - drop)``, then task arithmetic. The random drops are seeded by (``seed``, donor position,
    tensor name): a rerun gives the same model, and ``drop = 0`` is task arithmetic exactly. The paper
    finds it works for deltas of small magnitude (supervised fine-tuning) and fails for continued
    pre-training deltas, which are large: measure before trusting it on a CPT delta.

Memory: task arithmetic and DARE hold 3 tensors at a time (base, sum, one donor's delta; DARE adds its
random mask and its draw), TIES the base, every donor's trimmed delta and 4 to 5 more (the elected sign,
the sum, the weights, one temporary), in float32, of the size of the largest tensor; measured in
docs/benchmarks.md ("Merging: peak memory").
Tied embeddings stay tied: the output keeps the layout and config of the input it takes its files from
(a tied head stored once, ``tie_word_embeddings`` as it was), and all inputs must share that config.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from cpt.errors import CptError
from cpt.merge import weighted_sum, write_merge

METHODS = ("task_arithmetic", "ties", "dare")


# ------------------------------------------------------------------------------------------ interpolation


def interpolation_weights(spec: str) -> list[float]:
    """``"0.25,0.5,0.75"`` -> ``[0.25, 0.5, 0.75]``: each finite, in ``[0, 1]``, none twice."""
    weights = []
    for text in spec.split(","):
        try:
            a = float(text)
        except ValueError:
            raise CptError(f"--weight {spec!r}: {text.strip()!r} is not a number") from None
        if not (math.isfinite(a) and 0 <= a <= 1):
            raise CptError(f"--weight {spec!r}: {text.strip()} is outside [0, 1] (a weighs the CPT model: "
                           f"(1 - a) * base + a * final)")
        if a in weights:
            raise CptError(f"--weight {spec!r}: {text.strip()} is given twice")
        weights.append(a)
    return weights


def weight_dir(out_root: str | Path, a: float) -> Path:
    """Where :func:`interpolate` writes the model of weight ``a``: ``OUT/<a>`` (``OUT/0.25``)."""
    return Path(out_root) / f"{a:g}"


def interpolate(final: str | Path, base: str | Path, weights: list[float], out_root: str | Path, *,
                dtype: str | None = None, overwrite: bool = False) -> list[Path]:
    """For each ``a`` of ``weights``, ``(1 - a) * base + a * final`` into ``OUT/<a>/`` (config, tokenizer and
    dtype from ``final``); the dirs, in the order of ``weights``."""
    final, base = Path(final), Path(base)
    if not weights:
        raise CptError("merge --toward: no --weight given")
    outs = []
    for a in weights:
        if not 0 <= a <= 1:
            raise CptError(f"merge --toward: weight {a} is outside [0, 1]")
        coefficients = [1 - a, a]
        record = {"method": "interpolate", "weight": a, "formula": "(1 - a) * base + a * final",
                  "coefficients": coefficients}
        outs.append(write_merge([base, final], weighted_sum(coefficients), weight_dir(out_root, a),
                                record=record, notes=[{"role": "base", "coefficient": 1 - a},
                                                      {"role": "final", "coefficient": a}],
                                dtype=dtype, overwrite=overwrite))
    return outs


# ------------------------------------------------------------------------------------------- task vectors


def merge_task_vectors(base: str | Path, donors: list[str | Path], weights: list[float], out_dir: str | Path, *,
                       method: str = "task_arithmetic", density: float = 0.2, drop: float = 0.9, seed: int = 0,
                       files_from: str | Path | None = None, dtype: str | None = None,
                       overwrite: bool = False) -> Path:
    """``base + merge(donor_i - base)`` by ``method`` (task_arithmetic, ties, dare; see the module) into
    ``out_dir``. ``density``: TIES's kept share per delta tensor, in ``(0, 1]``; ``drop``: DARE's drop
    probability, in ``[0, 1)``; ``seed``: DARE's. ``files_from``: the input (base or a donor) whose config,
    tokenizer (a chat template, say) and layout the output takes; default the last donor."""
    base, donors = Path(base), [Path(d) for d in donors]
    _check_task_request(donors, weights, method, density, drop)
    paths = [base, *donors]
    source = -1 if files_from is None else _index_of(Path(files_from), paths)
    params: dict[str, Any] = {"density": density} if method == "ties" else (
        {"drop": drop, "seed": seed} if method == "dare" else {})
    record = {"method": method, **params, "weights": list(weights),
              "formula": "base + " + ("disjoint mean of trimmed, sign-elected w_i (donor_i - base)"
                                      if method == "ties" else "sum_i w_i (donor_i - base)"
                                      + (" with entries dropped, the rest / (1 - drop)" if method == "dare" else ""))}
    notes = [{"role": "base"}] + [{"role": "donor", "weight": w} for w in weights]
    combine = (_ties(weights, density) if method == "ties" else
               _task_arithmetic(weights, drop if method == "dare" else 0.0, seed))
    return write_merge(paths, combine, out_dir, record=record, notes=notes, dtype=dtype, overwrite=overwrite,
                       files_from=source)


def _check_task_request(donors: list[Path], weights: list[float], method: str, density: float,
                        drop: float) -> None:
    if method not in METHODS:
        raise CptError(f"merge: method {method!r}: expected one of {', '.join(METHODS)}")
    if not donors:
        raise CptError(f"merge --{method.replace('_', '-')}: no --donor given (base + w * (donor - base))")
    if len(weights) != len(donors):
        raise CptError(f"merge: {len(weights)} weights for {len(donors)} donors")
    if not all(math.isfinite(w) for w in weights):
        raise CptError(f"merge: donor weights must be finite, got {weights}")
    if method == "ties" and not all(w > 0 for w in weights):
        raise CptError(f"merge --ties: donor weights must be > 0 (the disjoint mean normalises them), got {weights}")
    if method == "ties" and not 0 < density <= 1:
        raise CptError(f"merge --ties: --density {density:g} must be in (0, 1] (the share of each delta kept)")
    if method == "dare" and not 0 <= drop < 1:
        raise CptError(f"merge --dare: --drop {drop:g} must be in [0, 1) (the probability of dropping an entry)")


def _index_of(path: Path, paths: list[Path]) -> int:
    resolved = [p.resolve() for p in paths]
    if path.resolve() not in resolved:
        raise CptError(f"--files-from {path}: not one of the inputs (the base or a donor)")
    return resolved.index(path.resolve())


def dare_generator(seed: int, donor: int, name: str):
    """The random generator of DARE's drops for one donor's tensor: seeded by (seed, donor position, tensor
    name) through sha256, so that it does not depend on the order tensors are merged in."""
    import torch

    digest = hashlib.sha256(f"{seed}\0{donor}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _task_arithmetic(weights: list[float], drop: float, seed: int):
    """base + sum_i w_i d_i, each d_i DARE-dropped and rescaled first when ``drop > 0``."""
    import torch

    def combine(name: str, read) -> Any:
        base = read(0)
        acc = base.clone()
        for i, w in enumerate(weights):
            delta = read(i + 1).sub_(base)
            if drop > 0:
                keep = torch.rand(delta.shape, generator=dare_generator(seed, i, name)) >= drop
                delta.mul_(keep).div_(1 - drop)
                del keep
            acc.add_(delta, alpha=w)
            del delta
        return acc

    return combine


def trim(delta, density: float):
    """``delta`` with all but its ``density`` share of largest magnitudes set to 0 (in place): the
    ``ceil(density * numel)`` largest kept, and any that tie with the smallest of them."""
    import torch

    n = delta.numel()
    keep = min(n, math.ceil(density * n))
    if keep >= n or n == 0:
        return delta
    magnitude = delta.abs()
    threshold = torch.kthvalue(magnitude.reshape(-1), n - keep + 1).values
    return delta.masked_fill_(magnitude < threshold, 0.0)


def _ties(weights: list[float], density: float):
    """TIES: trim, elect the sign by the weighted sum, disjoint weighted mean of the agreeing entries
    (in place where it can: the base, N trimmed deltas and 3 more tensors at the most)."""

    def combine(name: str, read) -> Any:
        base = read(0)
        weighted = [trim(read(i + 1).sub_(base), density).mul_(w) for i, w in enumerate(weights)]
        elected = weighted[0].clone()
        for d in weighted[1:]:
            elected.add_(d)
        elected.sign_()
        total, mass = elected.new_zeros(elected.shape), elected.new_zeros(elected.shape)
        for i, w in enumerate(weights):
            d, weighted[i] = weighted[i], None  # each delta is dropped once counted
            agree = (d.sign() == elected).logical_and_(d != 0)
            total.add_(d.masked_fill_(agree.logical_not_(), 0.0))
            mass.add_(agree.logical_not_(), alpha=w)
            del d, agree
        del elected
        # where no donor agrees, total is 0 and so is the mean
        return base.add_(total.div_(mass.clamp_min_(1e-30)))

    return combine
