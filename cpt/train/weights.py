"""How this rank holds the weights under each backend, for code that touches them outside a step (the
mitigations in cpt.mitigate, the merge probe): the one module besides cpt.train.backend that knows
DeepSpeed's and FSDP's tensors, so that no mitigation names them.

- A parameter's *local piece* (:func:`local`) is where this rank keeps its values: the whole tensor (one
  process, DDP, ZeRO-1/2), an FSDP2 DTensor shard, or a DeepSpeed ZeRO-3 1-D slice (``p.ds_tensor``; ``p``
  itself is empty outside its module's forward). :func:`whole` gathers a piece into the whole tensor
  (a collective where it is a piece), :func:`local_piece` cuts a whole tensor into this rank's piece.
- After weights are written into the pieces outside a step, :func:`settler`'s hook makes the next
  forward gather what the pieces hold; :func:`lent` lends other weights to the model for a block.
- :class:`Weights` bundles what the mitigations are handed for one prepared model; cpt.train.masters
  builds from it the tensors the optimizer actually updates, with a reference to pull them toward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from cpt.errors import CptError

Named = list[tuple[str, torch.nn.Parameter]]


def reshard(model) -> None:
    """FSDP2: free the whole parameters a forward gathered and kept. Groups with reshard_after_forward
    false (accelerate's tail: final norm and LM head) keep them until a backward, which a probe never
    runs; the next forward would reuse them. Elsewhere nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def settler(wrapped, model) -> Callable[[], None]:
    """What to run before and after weights are written into this rank's pieces of the parameters outside
    a step (EMA or merged weights lent for a probe, L2 pulled after one), so that the next forward gathers
    what the pieces hold. ``wrapped``: the model accelerator.prepare returned; ``model``: unwrapped.

    - FSDP2: :func:`reshard` (a unit a forward left gathered would be reused as it is).
    - DeepSpeed ZeRO-3: release every gathered parameter (``empty_partition_cache`` of its optimizer; the
      engine's adds a gc.collect, too slow for every step). DeepSpeed keeps some gathered past a forward
      for reuse, and the small ones ("persistent") whole all along; the next forward gathers them from the
      slices. (Re-gathering the persistent ones here, as DeepSpeed's step does, made the run's last
      collective a gloo all-gather into views, which gloo's worker thread could still be releasing when
      the interpreter shut down: "terminate called without an active exception", 4 exits in 43.)
    - Elsewhere the weights are whole: nothing to do."""
    if getattr(wrapped, "zero_optimization_stage", lambda: 0)() == 3:
        return wrapped.optimizer.empty_partition_cache
    return lambda: reshard(model)


def pieces_unwritable(accelerator) -> str | None:
    """Why this rank cannot write its pieces of the parameters in place outside a step (L2 pull, EMA and
    merged weights lent for probes; see :func:`settler`), or None where it can: whole tensors (one
    process, DDP, ZeRO-1/2), FSDP2's DTensor shards, ZeRO-3's slices (``p.ds_tensor``) where they live in
    memory. Not FSDP1 (flat parameters), nor ZeRO-3 with NVMe offload (the slices are swapped out) or
    with ZeRO++'s hpZ (a second copy of each slice, ``ds_secondary_tensor``, is what forwards gather)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        return "FSDP1 keeps flat parameters (FSDP2 works: fsdp_version: 2)"
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if any((zero.get(k) or {}).get("device") == "nvme" for k in ("offload_param", "offload_optimizer")):
            return "ZeRO-3 with NVMe offload swaps the parameter slices out (offload to cpu keeps them in memory)"
        if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
            return "ZeRO-3 with zero_hpz_partition_size > 1 (ZeRO++ hpZ) gathers from a second copy of the slices"
    return None


def trainable(model: torch.nn.Module) -> Named:
    """The trainable parameters; under FSDP2 the shards (a unit a forward left gathered would otherwise
    give its gathered weights, which are freed at the next reshard)."""
    reshard(model)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------ pieces and wholes


def _zero3(p: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: this rank's values are ``p.ds_tensor``, a 1-D slice of the flattened
    tensor (rank r holds elements [r*n, (r+1)*n), n the same on every rank, the last slice zero-padded)."""
    return hasattr(p, "ds_tensor")


def local(p: torch.Tensor) -> torch.Tensor:
    """Where this rank keeps its values of parameter ``p``: ZeRO-3's slice, else ``p`` (under FSDP2 a DTensor
    shard; elsewhere the whole tensor)."""
    return p.ds_tensor if _zero3(p) else p


def shape(p: torch.Tensor) -> tuple[int, ...]:
    """The whole shape of parameter ``p`` (ZeRO-3 keeps it in ds_shape; p.shape is empty there)."""
    return tuple(p.ds_shape) if _zero3(p) else tuple(p.shape)


def whole(t: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """The whole tensor of ``t``, this rank's piece of parameter ``p`` (a collective where it is a piece: every
    rank calls it): an FSDP2 DTensor's full tensor, a ZeRO-3 slice's all-gather, else ``t``."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor()
    if p is None or not _zero3(p):
        return t
    import torch.distributed as dist

    group = p.ds_process_group
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        slices = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(slices, t.contiguous(), group=group)
        t = torch.cat(slices)
    return t[:p.ds_numel].view(shape(p))


def local_piece(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` (a plain tensor, every rank holding it) in the layout of ``local(p)``,
    in ``full``'s dtype (an fp32 reference stays fp32; ``copy_`` casts); no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    mine = local(p)
    if isinstance(mine, DTensor) and not isinstance(full, DTensor):
        return distribute_tensor(full.to(mine.device), mine.device_mesh, mine.placements, src_data_rank=None)
    if not _zero3(p):
        return full
    import torch.distributed as dist

    n = mine.numel()
    start = (dist.get_rank(p.ds_process_group) if dist.is_initialized() else 0) * n
    piece = full.reshape(-1)[start:start + n].to(mine.device)
    return torch.cat([piece, piece.new_zeros(n - piece.numel())]) if piece.numel() < n else piece


@contextmanager
def lent(model: torch.nn.Module, params: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
         settle: Callable[[], None] | None = None, is_local: bool = False) -> Iterator[None]:
    """Within the block ``params`` (of ``model``) hold ``weights`` (same names; whole tensors, or with
    ``is_local`` this rank's pieces in the layout of :func:`local`); after it, their own values again, bit
    for bit (kept as a copy meanwhile). ``settle`` (:func:`settler`; default: the one of ``model`` itself,
    which reshards FSDP2 units) runs before and after each write, so that no forward reuses weights
    gathered from the old values."""
    settle = settle or settler(model, model)
    settle()
    raw = {n: local(p).detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                local(p).copy_(weights[name] if is_local else local_piece(p, weights[name]))
            settle()
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                local(p).copy_(raw[name])
            settle()


def load_into(own: dict[str, torch.Tensor], saved: Mapping[str, torch.Tensor], what: str,
              params: Mapping[str, torch.Tensor] | None = None) -> None:
    """Copy ``saved`` (whole tensors) into ``own`` (same names; with ``params``, this rank's pieces of those
    parameters: :func:`local_piece`), refusing any mismatch with one line."""
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which is no trainable parameter here"
        raise CptError(f"{what}: the saved state {which} ({len(missing)} missing, {len(extra)} unknown "
                       f"of {len(own)}): another model or another set of trainable parameters")
    for name, t in own.items():
        want = shape(params[name]) if params else tuple(t.shape)
        if tuple(saved[name].shape) != want:
            raise CptError(f"{what}: {name} has shape {tuple(saved[name].shape)} in the saved state, "
                           f"{want} here")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(local_piece(params[name], saved[name]) if params else saved[name])


# ---------------------------------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class Weights:
    """What the backend hands the mitigations for one prepared model.

    ``model``: the unwrapped model (names are its own: no DDP ``module.`` prefix); ``settle``: run it
    after writing into the pieces outside a step (:func:`settler`); ``in_place``: the optimizer updates
    the module's own tensors (one process, DDP), so a write into them after a step sticks (not under
    DeepSpeed, which updates master copies, nor FSDP); ``unwritable``: why the pieces cannot be written
    outside a step here, or None (:func:`pieces_unwritable`); ``zero_optimizer``: DeepSpeed's ZeRO
    optimizer under DeepSpeed, else None."""

    model: torch.nn.Module
    settle: Callable[[], None]
    in_place: bool = True
    unwritable: str | None = None
    zero_optimizer: Any = None


def weights_of(accelerator, wrapped, optimizer) -> Weights:
    """The :class:`Weights` of a prepared model and optimizer."""
    from accelerate.utils import DistributedType

    model = accelerator.unwrap_model(wrapped)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    in_place = not deepspeed and accelerator.distributed_type != DistributedType.FSDP
    return Weights(model, settler(wrapped, model), in_place, pieces_unwritable(accelerator),
                   getattr(optimizer, "optimizer", None) if deepspeed else None)
