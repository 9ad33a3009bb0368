"""Forgetting mitigations beyond replay: freeze parameters, scale their LR, pull them toward the weights
the run started from (L2-init), average them over steps (EMA).

Parameters are chosen by regular expressions that are *searched* (``re.search``, not fullmatch) in the
names of ``model.named_parameters()``: ``embed_tokens|lm_head`` or ``layers\\.([0-7])\\.`` match
wherever they occur, so the same pattern works on a plain HF model (``model.layers.0.mlp.up_proj.weight``)
and on a peft-wrapped one, whose names carry a ``base_model.model.`` prefix and ``lora_A.default`` /
``lora_B.default`` (or ``modules_to_save.default``) infixes. Anchor with ``^``/``$`` where you mean it.
Only trainable parameters are candidates (with LoRA: the adapters and modules_to_save), and a pattern
that matches none is an error. Tied weights (an LM head sharing the embedding) are one tensor: either
name selects it, and it is counted and stored once, under its first name.

Everything here acts on the unwrapped model (``accelerator.unwrap_model``): DDP's ``module.`` prefix
never reaches the names, so checkpoint keys are the model's own. Where a backend shards the parameters,
references and averages are sharded alike and every update is elementwise on this rank's piece
(:func:`_local`): FSDP2's DTensor shards, or DeepSpeed ZeRO-3's 1-D slices (``p.ds_tensor``; ``p`` itself
is empty outside its module's forward). A checkpoint holds the whole tensors (gathered one at a time), so
it loads at any process count.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from cpt.errors import CptError

Named = list[tuple[str, torch.nn.Parameter]]
STATE_FILE = "mitigate.safetensors"  # in a checkpoint dir, beside accelerate's files


def _trainable(model: torch.nn.Module) -> Named:
    """The trainable parameters; under FSDP2 the shards (a unit a forward left gathered would otherwise
    give its gathered weights, which are freed at the next reshard)."""
    from cpt.train.backend import reshard

    reshard(model)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


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


def _count(params: Named) -> tuple[int, int]:
    return len(params), sum(p.numel() for _, p in params)


def freeze(model: torch.nn.Module, patterns: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Set ``requires_grad=False`` on the trainable parameters the patterns match; returns
    ``{pattern: (tensors, parameters)}`` matched (a tensor two patterns match counts under both).
    Call before the optimizer is built and before ``accelerator.prepare`` (DDP registers what requires
    grad when it wraps the model); the optimizer then never sees the frozen tensors."""
    matched = match_params(model, patterns)  # all matched first: overlapping patterns are no error
    for params in matched.values():
        for _, p in params:
            p.requires_grad_(False)
    return {pattern: _count(params) for pattern, params in matched.items()}


def param_groups(model: torch.nn.Module, weight_decay: float, lr_multipliers: Mapping[str, float] | None = None
                 ) -> tuple[list[dict], dict[str, tuple[int, int]]]:
    """AdamW parameter groups of the trainable parameters, and ``{pattern: (tensors, parameters)}``.

    Weight decay on matrices (ndim >= 2) only, as :func:`cpt.train.step.make_optimizer`. Each group carries
    ``lr_scale``; :func:`set_lr` gives it ``lr * lr_scale``. A parameter takes the multiplier of the *first*
    pattern (in the mapping's order) that matches it; a pattern left with nothing by earlier ones is an
    error, and so is a multiplier <= 0 (0 would only waste optimizer state: freeze those instead). Order:
    the two groups of make_optimizer (scale 1, even when empty; without multipliers they are exactly its
    groups, so optimizer checkpoints stay compatible), then per pattern its decay and no-decay groups
    (those that hold something). ``param_groups[0]`` thus always runs at the schedule's LR."""
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
        counts[pattern] = _count(taken)
    buckets: dict[tuple[str | None, bool], list] = {(None, True): [], (None, False): []}
    for pattern in multipliers:
        buckets[(pattern, True)], buckets[(pattern, False)] = [], []
    for _, p in _trainable(model):
        buckets[(owner.get(id(p)), p.ndim >= 2)].append(p)
    groups = [{"params": params, "weight_decay": weight_decay if decay else 0.0,
               "lr_scale": 1.0 if pattern is None else multipliers[pattern]}
              for (pattern, decay), params in buckets.items() if pattern is None or params]
    return groups, counts


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR into every group, times the group's ``lr_scale`` (1 where it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _zero3(p: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: this rank's values are ``p.ds_tensor``, a 1-D slice of the flattened
    tensor (rank r holds elements [r*n, (r+1)*n), n the same on every rank, the last slice zero-padded)."""
    return hasattr(p, "ds_tensor")


def _local(p: torch.Tensor) -> torch.Tensor:
    """Where this rank keeps its values of parameter ``p``: ZeRO-3's slice, else ``p`` (under FSDP2 a DTensor
    shard; elsewhere the whole tensor)."""
    return p.ds_tensor if _zero3(p) else p


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """The whole shape of parameter ``p`` (ZeRO-3 keeps it in ds_shape; p.shape is empty there)."""
    return tuple(p.ds_shape) if _zero3(p) else tuple(p.shape)


def _whole(t: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
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
    return t[:p.ds_numel].view(_shape(p))


def local_piece(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``whole`` (a plain tensor, every rank holding it) in the layout of ``_local(p)``,
    in ``whole``'s dtype (an fp32 reference stays fp32; ``copy_`` casts); no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    local = _local(p)
    if isinstance(local, DTensor) and not isinstance(whole, DTensor):
        return distribute_tensor(whole.to(local.device), local.device_mesh, local.placements, src_data_rank=None)
    if not _zero3(p):
        return whole
    import torch.distributed as dist

    n = local.numel()
    start = (dist.get_rank(p.ds_process_group) if dist.is_initialized() else 0) * n
    piece = whole.reshape(-1)[start:start + n].to(local.device)
    return torch.cat([piece, piece.new_zeros(n - piece.numel())]) if piece.numel() < n else piece


@contextmanager
def lent(model: torch.nn.Module, params: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
         settle: Callable[[], None] | None = None, local: bool = False) -> Iterator[None]:
    """Within the block ``params`` (of ``model``) hold ``weights`` (same names; whole tensors, or with
    ``local`` this rank's pieces in the layout of :func:`_local`); after it, their own values again, bit for
    bit (kept as a copy meanwhile). ``settle`` (cpt.train.backend.settler; default: the one of ``model``
    itself, which reshards FSDP2 units) runs before and after each write, so that no forward reuses
    weights gathered from the old values."""
    from cpt.train.backend import settler

    settle = settle or settler(model, model)
    settle()
    raw = {n: _local(p).detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                _local(p).copy_(weights[name] if local else local_piece(p, weights[name]))
            settle()
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                _local(p).copy_(raw[name])
            settle()


def _load_into(own: dict[str, torch.Tensor], saved: Mapping[str, torch.Tensor], what: str,
               params: Mapping[str, torch.Tensor] | None = None) -> None:
    """Copy ``saved`` (whole tensors) into ``own`` (same names; with ``params``, this rank's pieces of those
    parameters: :func:`local_piece`), refusing any mismatch with one line."""
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which is no trainable parameter here"
        raise CptError(f"{what}: the saved state {which} ({len(missing)} missing, {len(extra)} unknown "
                       f"of {len(own)}): another model or another set of trainable parameters")
    for name, t in own.items():
        shape = _shape(params[name]) if params else tuple(t.shape)
        if tuple(saved[name].shape) != shape:
            raise CptError(f"{what}: {name} has shape {tuple(saved[name].shape)} in the saved state, "
                           f"{shape} here")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(local_piece(params[name], saved[name]) if params else saved[name])


def _check_coefficient(coeff: float) -> None:
    if not (math.isfinite(coeff) and coeff >= 0):
        raise CptError(f"l2_init coefficient {coeff!r}: expected a number >= 0")


def _check_overshoot(coeff: float, groups: Sequence[Mapping]) -> None:
    """lr_g * coeff > 1 in any group would pull past the reference: refused with one line."""
    lr = max(g["lr"] for g in groups)
    if lr * coeff > 1:
        raise CptError(f"l2_init: coefficient {coeff:g} x LR {lr:.3e} = {lr * coeff:.3g} > 1 would overshoot "
                       f"the start weights; keep it below 1 / (max LR x largest lr multiplier)")


class L2Init:
    """Decoupled L2 toward reference weights (those at construction; the loop calls :meth:`restart` at
    every stage start, so the reference is the weights the stage started from), after each optimizer step::

        p <- p - lr_g * coeff * (p - p0)        (computed as torch.lerp(p, p0, lr_g * coeff))

    with ``lr_g`` the LR the step used in the parameter's group (schedule x ``lr_scale``), so the pull
    follows the schedule exactly as AdamW's decoupled weight decay ``p <- p - lr_g * wd * p`` does.
    ``lr_g * coeff = 1`` puts p back on p0; above 1 it would overshoot, and :meth:`apply` refuses it.
    Only parameters trainable at construction are pulled; references are fp32 copies on their device.
    With LoRA the trainable tensors are the adapters: lora_B starts at zeros (peft's init), so its
    reference is zeros and the pull shrinks the adapter's update B @ A toward the base model; lora_A's
    reference is its random init.

    DDP: every rank holds the same references and applies the same deterministic update after the
    all-reduced step, so the replicas stay identical. FSDP2: the parameters, the optimizer's parameters and
    the references are the same DTensor shards, and the update is elementwise on them. DeepSpeed (the
    optimizer updates fp32 master copies of its own) takes :class:`ZeroL2Init` at ZeRO-1/2 and
    :class:`Zero3L2Init` at ZeRO-3.
    """

    def __init__(self, model: torch.nn.Module, coeff: float):
        _check_coefficient(coeff)
        self.coeff = coeff
        self.params = dict(_trainable(model))
        self._names = {id(p): n for n, p in self.params.items()}
        self.refs = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def restart(self) -> None:
        """Take the current weights as the reference (a new stage starts from them)."""
        for name, p in self.params.items():
            self.refs[name].copy_(p.detach().float())

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Pull every referenced parameter toward its reference; call right after a taken optimizer.step()."""
        if self.coeff == 0:
            return
        _check_overshoot(self.coeff, optimizer.param_groups)  # before anything moves
        for group in optimizer.param_groups:
            w = group["lr"] * self.coeff
            for p in group["params"]:
                name = self._names.get(id(p))
                if name is None:
                    continue
                if p.dtype == torch.float32:
                    p.lerp_(self.refs[name], w)
                else:
                    p.copy_(p.float().lerp_(self.refs[name], w))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: fp32 reference}``: plain tensors, for safetensors (:func:`save_state`)."""
        return dict(self.refs)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_into(self.refs, state, "l2_init", self.params)


class ZeroL2Init:
    """:class:`L2Init` under DeepSpeed ZeRO-1/2, on DeepSpeed's own tensors. The optimizer there updates fp32
    master partitions (``single_partition_of_fp32_groups``: this rank's slice of each parameter group,
    flattened) and then overwrites the module's weights, which are views into one flat buffer per group
    (``bit16_groups_flat``). So the pull acts on both, with the same formula as :class:`L2Init`::

        master <- lerp(master, ref[rank slice], lr_g * coeff)     flat <- lerp(flat, ref, lr_g * coeff)

    ``ref`` is the whole group's fp32 flat buffer at the stage start, gathered from every rank's master
    slice (the same on every rank, so the main process saves it; a rank's slice is cut from it with
    DeepSpeed's own partitioning). In fp32 the two stay equal; in bf16 the module's weights are the
    rounding of the master, as DeepSpeed keeps them. ZeRO-3: :class:`Zero3L2Init`."""

    def __init__(self, zero_optimizer, coeff: float):
        _check_coefficient(coeff)
        self.zo, self.coeff = zero_optimizer, coeff
        self.restart()

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

    @torch.no_grad()
    def restart(self) -> None:
        """Take the current weights as the reference (a collective: every rank calls it)."""
        self.refs = [self._gather(i) for i in range(len(self.zo.bit16_groups_flat))]
        self._slices()

    @torch.no_grad()
    def apply(self, optimizer) -> None:
        if self.coeff == 0:
            return
        groups = self.zo.optimizer.param_groups
        _check_overshoot(self.coeff, groups)
        for i, group in enumerate(groups):
            w = group["lr"] * self.coeff
            self.zo.single_partition_of_fp32_groups[i].lerp_(self.parts[i], w)
            flat = self.zo.bit16_groups_flat[i]
            if flat.dtype == torch.float32:
                flat.lerp_(self.refs[i], w)
            else:
                flat.copy_(flat.float().lerp_(self.refs[i], w))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"zero_group.{i}": ref for i, ref in enumerate(self.refs)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = {f"zero_group.{i}": ref for i, ref in enumerate(self.refs)}
        _load_into(own, state, "l2_init")
        self.refs = [own[f"zero_group.{i}"] for i in range(len(self.refs))]
        self._slices()


class Zero3L2Init:
    """:class:`L2Init` under DeepSpeed ZeRO-3, on DeepSpeed's own tensors. Each rank holds a 1-D slice of
    every parameter (``p.ds_tensor``); the optimizer keeps, per sub-group, the slices of its parameters
    back to back twice: an fp32 master (``fp32_partitioned_groups_flat``, which it updates) and the
    module's copy (``fp16_partitioned_groups_flat``, whose views the ``ds_tensor`` are; the same tensor as
    the master in fp32 training), and copies master into module copy after each step. The pull does the
    same, with the formula of :class:`L2Init`::

        master <- lerp(master, ref, lr_g * coeff)        module copy <- master

    then :attr:`settle` releases what DeepSpeed keeps gathered (the small "persistent" parameters are whole
    all along), so the next forward gathers the pulled slices.
    ``ref`` is an fp32 copy of the masters at the stage start, laid out alike, so one lerp per sub-group
    pulls every parameter; :meth:`state_dict` gives it per parameter name as whole tensors (gathered from
    the slices), so a checkpoint loads at any process count."""

    def __init__(self, zero_optimizer, model: torch.nn.Module, coeff: float, settle: Callable[[], None]):
        _check_coefficient(coeff)
        self.zo, self.coeff, self.settle = zero_optimizer, coeff, settle
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

    @torch.no_grad()
    def restart(self) -> None:
        """Take the current weights as the reference."""
        for flat, master in zip(self.flats, self.zo.fp32_partitioned_groups_flat, strict=True):
            flat.copy_(master)

    @torch.no_grad()
    def apply(self, optimizer) -> None:
        if self.coeff == 0:
            return
        groups = self.zo.optimizer.param_groups
        _check_overshoot(self.coeff, groups)
        for i, (ref, master) in enumerate(zip(self.flats, self.zo.fp32_partitioned_groups_flat, strict=True)):
            master.lerp_(ref, groups[self.zo.sub_group_to_group_id[i]]["lr"] * self.coeff)
            module_copy = self.zo.fp16_partitioned_groups_flat[i]
            if module_copy.data_ptr() != master.data_ptr():
                module_copy.copy_(master)
        self.settle()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: this rank's fp32 slice}``; :func:`state_tensors` gathers them."""
        return dict(self.refs)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_into(self.refs, state, "l2_init", self.params)  # into the views, so into self.flats


def l2_init(model: torch.nn.Module, coeff: float, zero_optimizer, settle: Callable[[], None]
            ) -> L2Init | ZeroL2Init | Zero3L2Init:
    """The L2 pull for this backend: ``zero_optimizer`` is DeepSpeed's ZeRO optimizer under DeepSpeed
    (None elsewhere; ZeRO-3's keeps the partitioned flats :class:`Zero3L2Init` acts on); ``settle``:
    cpt.train.backend.settler of the prepared model."""
    if zero_optimizer is None:
        return L2Init(model, coeff)
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
        return Zero3L2Init(zero_optimizer, model, coeff, settle)
    return ZeroL2Init(zero_optimizer, coeff)


class EMA:
    """Exponential moving average of the trainable weights, in fp32::

        ema <- decay * ema + (1 - decay) * p          on every step with step % every == 0

    It starts from the weights at construction (the run's start), not from the first update's
    weights: after n updates the start keeps weight decay**n, so choose 1 / (1 - decay) well below the
    number of updates (with ``every`` > 1, decay applies per update, not per step). Frozen parameters are
    not averaged (they do not move). :meth:`applied` lends the averaged weights to the model (probes,
    export) and restores the raw ones bit for bit. DDP and DeepSpeed ZeRO-1/2: identical on every rank;
    FSDP2 and ZeRO-3: each rank averages its pieces (:func:`_local`), and ``settle``
    (cpt.train.backend.settler) makes the lent weights the ones a forward gathers.
    """

    def __init__(self, model: torch.nn.Module, decay: float, every: int = 1,
                 settle: Callable[[], None] | None = None):
        if not 0 < decay < 1:
            raise CptError(f"ema decay {decay!r}: expected a number in (0, 1)")
        if every < 1:
            raise CptError(f"ema every {every!r}: expected a step count >= 1")
        self.decay, self.every, self.model, self.settle = decay, every, model, settle
        self.params = dict(_trainable(model))
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Average in the current weights if ``step % every == 0`` (step: the count after this step)."""
        if step % self.every:
            return False
        for name, p in self.params.items():
            self.shadow[name].lerp_(_local(p).detach().float(), 1.0 - self.decay)
        return True

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the EMA weights (cast to the parameters' dtype); after it, the
        raw weights exactly as before (kept as a copy meanwhile: one more copy of the trainable weights)."""
        with lent(self.model, self.params, self.shadow, self.settle, local=True):
            yield

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: fp32 average}`` (this rank's pieces; :func:`state_tensors` gathers them)."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_into(self.shadow, state, "ema", self.params)


def state_tensors(parts: Mapping[str, L2Init | Zero3L2Init | EMA], keep: bool = True) -> dict[str, torch.Tensor]:
    """The parts' whole tensors on the CPU, keys ``<part>/<parameter name>``. Every rank calls it (FSDP2
    shards and ZeRO-3 slices are gathered one tensor at a time); ranks with ``keep=False`` (all but the
    writer) get {}."""
    out = {}
    for key, part in parts.items():
        params = getattr(part, "params", {})
        for name, t in part.state_dict().items():
            whole = _whole(t.detach(), params.get(name))
            if keep:
                out[f"{key}/{name}"] = whole.cpu().contiguous()
    return out


def write_state(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write :func:`state_tensors` into one safetensors file (no pickle)."""
    from safetensors.torch import save_file

    parts = sorted({k.split("/", 1)[0] for k in tensors})
    save_file(dict(tensors), str(path), metadata={"format": "cpt.mitigate/1", "parts": json.dumps(parts)})


def save_state(path: str | Path, parts: Mapping[str, L2Init | EMA]) -> None:
    """One process: :func:`state_tensors` written to ``path``."""
    write_state(path, state_tensors(parts))


def load_state(path: str | Path, parts: Mapping[str, L2Init | EMA]) -> None:
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


def unsupported(accelerator) -> str | None:
    """Why L2Init / EMA cannot run under this accelerator's backend, or None where they can: single
    process, DDP, DeepSpeed ZeRO-1/2/3 (:class:`ZeroL2Init`, :class:`Zero3L2Init` move DeepSpeed's fp32
    masters too) and FSDP2; see cpt.train.backend.pieces_unwritable for the rest. Freezing and LR
    multipliers work everywhere (they only shape the optimizer's groups)."""
    from cpt.train.backend import pieces_unwritable

    why = pieces_unwritable(accelerator)
    return f"l2_init / ema: {why}" if why else None
