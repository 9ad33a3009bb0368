"""The optimizer's *masters*: the tensors it actually updates, with a reference copy to pull them toward
(cpt.mitigate's L2-init)::

    master <- lerp(master, ref, w(group))

:func:`masters` picks the kind for the backend (from a cpt.train.weights.Weights). Where the optimizer
updates the parameters themselves (one process, DDP, FSDP2) they are the masters (:class:`ParamMasters`).
Under DeepSpeed it updates fp32 master copies of its own and then overwrites the module's weights from
them, so a pull must move both (:class:`ZeroMasters`, :class:`Zero3Masters`). Every kind has ``groups``,
``snapshot``, ``pull``, ``state_dict``, ``load_state_dict``, and ``params`` (the parameters whose state
is per name, gathered into whole tensors for a checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from cpt.errors import CptError
from cpt.train.weights import Weights, load_into, trainable


def masters(weights: Weights):
    """The masters of this backend (ZeRO-3's optimizer keeps the partitioned flats :class:`Zero3Masters`
    acts on)."""
    zero = weights.zero_optimizer
    if zero is None:
        return ParamMasters(weights.model)
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return Zero3Masters(zero, weights.model, weights.settle)
    return ZeroMasters(zero)


class ParamMasters:
    """Masters where the optimizer updates the parameters themselves (one process, DDP, FSDP2's DTensor
    shards): the references are fp32 copies of the trainable parameters (those at construction), and a
    pull is elementwise on each parameter (on this rank's shard under FSDP2)::

        p <- lerp(p, ref, w(group))        (in fp32; cast back for a bf16 parameter)
    """

    def __init__(self, model: torch.nn.Module):
        self.params = dict(trainable(model))
        self._names = {id(p): n for n, p in self.params.items()}
        self.refs = {n: p.detach().float().clone() for n, p in self.params.items()}

    def groups(self, optimizer) -> list[dict]:
        """The parameter groups whose LR the pull follows."""
        return optimizer.param_groups

    @torch.no_grad()
    def snapshot(self) -> None:
        """Take the current weights as the reference."""
        for name, p in self.params.items():
            self.refs[name].copy_(p.detach().float())

    @torch.no_grad()
    def pull(self, optimizer, weight: Callable[[dict], float]) -> None:
        """Move every referenced parameter toward its reference by ``weight(group)`` of its group."""
        for group in optimizer.param_groups:
            w = weight(group)
            for p in group["params"]:
                name = self._names.get(id(p))
                if name is None:
                    continue
                if p.dtype == torch.float32:
                    p.lerp_(self.refs[name], w)
                else:
                    p.copy_(p.float().lerp_(self.refs[name], w))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: fp32 reference}``."""
        return dict(self.refs)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        load_into(self.refs, state, what, self.params)


class ZeroMasters:
    """ZeRO-1/2. The optimizer updates fp32 master partitions (``single_partition_of_fp32_groups``: this
    rank's slice of each parameter group, flattened) and then overwrites the module's weights, which are
    views into one flat buffer per group (``bit16_groups_flat``). So the pull acts on both::

        master <- lerp(master, ref[rank slice], w)        flat <- lerp(flat, ref, w)

    ``ref`` is the whole group's fp32 flat buffer at the stage start, gathered from every rank's master
    slice (the same on every rank, so the main process saves it; a rank's slice is cut from it with
    DeepSpeed's own partitioning). In fp32 the two stay equal; in bf16 the module's weights are the
    rounding of the master, as DeepSpeed keeps them."""

    def __init__(self, zero_optimizer):
        self.zo = zero_optimizer
        self.params: dict = {}  # the state is per flat group, whole on every rank: nothing to gather
        self.snapshot()

    def _rank(self, i: int) -> int:
        import torch.distributed as dist

        group = self.zo.real_dp_process_group[i]
        return dist.get_rank(group=group) if dist.is_initialized() else 0

    def _gather(self, i: int) -> torch.Tensor:
        """Group ``i``'s whole fp32 master buffer (in DeepSpeed's flat layout), from every rank's slice."""
        import torch.distributed as dist

        mine = self.zo.single_partition_of_fp32_groups[i].detach().float()
        sizes = [p.numel() for p in self.zo.get_data_parallel_partitions(self.zo.bit16_groups_flat[i], i)]
        if len(sizes) == 1:
            return mine.clone()
        padded = torch.zeros(max(sizes), dtype=torch.float32, device=mine.device)
        padded[:mine.numel()] = mine
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded, group=self.zo.real_dp_process_group[i])
        return torch.cat([c[:n] for c, n in zip(chunks, sizes, strict=True)])

    def _slices(self) -> None:
        self.parts = [self.zo.get_data_parallel_partitions(ref, i)[self._rank(i)] for i, ref in enumerate(self.refs)]

    def groups(self, optimizer) -> list[dict]:
        return self.zo.optimizer.param_groups

    @torch.no_grad()
    def snapshot(self) -> None:
        """Take the current weights as the reference (a collective: every rank calls it)."""
        self.refs = [self._gather(i) for i in range(len(self.zo.bit16_groups_flat))]
        self._slices()

    @torch.no_grad()
    def pull(self, optimizer, weight: Callable[[dict], float]) -> None:
        for i, group in enumerate(self.zo.optimizer.param_groups):
            w = weight(group)
            self.zo.single_partition_of_fp32_groups[i].lerp_(self.parts[i], w)
            flat = self.zo.bit16_groups_flat[i]
            if flat.dtype == torch.float32:
                flat.lerp_(self.refs[i], w)
            else:
                flat.copy_(flat.float().lerp_(self.refs[i], w))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"zero_group.{i}": ref for i, ref in enumerate(self.refs)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        own = {f"zero_group.{i}": ref for i, ref in enumerate(self.refs)}
        load_into(own, state, what)
        self.refs = [own[f"zero_group.{i}"] for i in range(len(self.refs))]
        self._slices()


class Zero3Masters:
    """ZeRO-3. Each rank holds a 1-D slice of every parameter (``p.ds_tensor``); the optimizer keeps, per
    sub-group, the slices of its parameters back to back twice: an fp32 master
    (``fp32_partitioned_groups_flat``, which it updates) and the module's copy
    (``fp16_partitioned_groups_flat``, whose views the ``ds_tensor`` are; the same tensor as the master in
    fp32 training), and copies master into module copy after each step. The pull does the same::

        master <- lerp(master, ref, w(group of the sub-group))        module copy <- master

    then ``settle`` releases what DeepSpeed keeps gathered (the small "persistent" parameters are whole
    all along), so the next forward gathers the pulled slices. ``ref`` is an fp32 copy of the masters at
    the stage start, laid out alike, so one lerp per sub-group pulls every parameter; :meth:`state_dict`
    gives it per parameter name (this rank's slices; whole tensors once gathered), so a checkpoint loads
    at any process count."""

    def __init__(self, zero_optimizer, model: torch.nn.Module, settle: Callable[[], None]):
        self.zo, self.settle = zero_optimizer, settle
        self.flats = [m.detach().float().clone() for m in self.zo.fp32_partitioned_groups_flat]
        names = {id(p): n for n, p in model.named_parameters()}
        self.params: dict[str, torch.nn.Parameter] = {}
        self.refs: dict[str, torch.Tensor] = {}  # per parameter: views of self.flats
        for flat, group in zip(self.flats, self.zo.fp16_groups, strict=True):
            offset = 0
            for p in group:
                n = p.ds_tensor.numel()
                self.params[names[id(p)]] = p
                self.refs[names[id(p)]] = flat.narrow(0, offset, n)
                offset += n
            if offset != flat.numel():
                raise CptError(f"l2_init under ZeRO-3: a sub-group holds {flat.numel()} elements but its "
                               f"parameters' slices {offset} (a DeepSpeed layout cpt does not know)")

    def groups(self, optimizer) -> list[dict]:
        return self.zo.optimizer.param_groups

    @torch.no_grad()
    def snapshot(self) -> None:
        """Take the current weights as the reference."""
        for flat, master in zip(self.flats, self.zo.fp32_partitioned_groups_flat, strict=True):
            flat.copy_(master)

    @torch.no_grad()
    def pull(self, optimizer, weight: Callable[[dict], float]) -> None:
        groups = self.zo.optimizer.param_groups
        for i, (ref, master) in enumerate(zip(self.flats, self.zo.fp32_partitioned_groups_flat, strict=True)):
            master.lerp_(ref, weight(groups[self.zo.sub_group_to_group_id[i]]))
            module_copy = self.zo.fp16_partitioned_groups_flat[i]
            if module_copy.data_ptr() != master.data_ptr():
                module_copy.copy_(master)
        self.settle()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: this rank's fp32 slice}``."""
        return dict(self.refs)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        load_into(self.refs, state, what, self.params)  # into the views, so into self.flats
