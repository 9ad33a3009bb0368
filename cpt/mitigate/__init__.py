"""Forgetting mitigations beyond replay, one module each behind one protocol (:mod:`cpt.mitigate.base`):
freeze parameters (:mod:`.freeze`), scale their LR (:mod:`.lr`), pull them toward the weights the stage
started from (:mod:`.l2_init`), average them over steps (:mod:`.ema`), keep an extended vocabulary's old
rows (:mod:`.rows`). Every module of this package is imported here, so a mitigation registers itself by
existing: adding one is its module and its recipe section (cpt.recipe's MitigateConfig); docs/extending.md.

:func:`build` makes the run's list; the trainer calls the protocol's hooks on it and knows no mitigation by
name. :func:`state_tensors`, :func:`write_state` and :func:`load_state` carry their state through a
checkpoint's ``mitigate.safetensors`` (whole tensors, keys ``<name>/<parameter>``; no pickle).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Mapping
from pathlib import Path

import torch

from cpt.errors import CptError
from cpt.mitigate.base import REGISTRY, Mitigation, match_params  # noqa: F401  (API)
from cpt.train.optim import set_lr  # noqa: F401  (API: the LR each group's lr_scale applies to)
from cpt.train.weights import pieces_unwritable, whole

for _info in pkgutil.iter_modules(__path__):  # each module registers its mitigation
    importlib.import_module(f"{__name__}.{_info.name}")

from cpt.mitigate.ema import EMA  # noqa: E402, F401  (API)
from cpt.mitigate.freeze import freeze  # noqa: E402, F401  (API)
from cpt.mitigate.l2_init import L2Init  # noqa: E402, F401  (API)
from cpt.mitigate.lr import param_groups  # noqa: E402, F401  (API)

STATE_FILE = "mitigate.safetensors"  # in a checkpoint dir, beside accelerate's files


def build(recipe, origin: str | None, main: bool) -> list[Mitigation]:
    """The mitigations ``recipe`` asks for, in the order their hooks run."""
    return [m for cls in REGISTRY if (m := cls.from_recipe(recipe, origin, main)) is not None]


def stateful(mitigations: list[Mitigation]) -> dict[str, Mitigation]:
    """The mitigations with state of their own (saved in every checkpoint), by name."""
    return {m.name: m for m in mitigations if m.name}


def unsupported(accelerator) -> str | None:
    """Why mitigations that write into the weights outside a step (L2-init, EMA) cannot run under this
    accelerator's backend, or None where they can: single process, DDP, DeepSpeed ZeRO-1/2/3 (their fp32
    masters move too) and FSDP2; see cpt.train.weights.pieces_unwritable for the rest. Freezing and LR
    multipliers work everywhere (they only shape the optimizer's groups)."""
    why = pieces_unwritable(accelerator)
    return f"l2_init / ema: {why}" if why else None


def state_tensors(parts: Mapping[str, Mitigation], keep: bool = True) -> dict[str, torch.Tensor]:
    """The parts' whole tensors on the CPU, keys ``<part>/<parameter name>``. Every rank calls it (FSDP2
    shards and ZeRO-3 slices are gathered one tensor at a time); ranks with ``keep=False`` (all but the
    writer) get {}."""
    out = {}
    for key, part in parts.items():
        params = getattr(part, "params", {})
        for name, t in part.state_dict().items():
            full = whole(t.detach(), params.get(name))
            if keep:
                out[f"{key}/{name}"] = full.cpu().contiguous()
    return out


def write_state(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write :func:`state_tensors` into one safetensors file (no pickle)."""
    from safetensors.torch import save_file

    parts = sorted({k.split("/", 1)[0] for k in tensors})
    save_file(dict(tensors), str(path), metadata={"format": "cpt.mitigate/1", "parts": json.dumps(parts)})


def save_state(path: str | Path, parts: Mapping[str, Mitigation]) -> None:
    """One process: :func:`state_tensors` written to ``path``."""
    write_state(path, state_tensors(parts))


def load_state(path: str | Path, parts: Mapping[str, Mitigation]) -> None:
    """Restore the parts from :func:`save_state`'s file; a part the file lacks is an error."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # missing, truncated or not safetensors
        raise CptError(f"{path}: cannot read the mitigation state ({type(e).__name__}: {e})") from None
    for key, part in parts.items():
        own = {k[len(key) + 1:]: t for k, t in tensors.items() if k.startswith(key + "/")}
        if not own:
            raise CptError(f"{path}: no {key} state (the checkpoint was written without it)")
        try:
            part.load_state_dict(own)
        except CptError as e:
            raise CptError(f"{path}: {e}") from None
