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
never reaches the names, so checkpoint keys are the model's own. Under FSDP2 the parameters are DTensors
(this rank's shard of each): references and averages are then DTensors sharded alike, every update is
elementwise on the local shards, and a checkpoint holds the whole tensors (gathered), so it loads at any
process count.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
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


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; a collective: every rank calls it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def copy_whole(own: torch.Tensor, whole: torch.Tensor) -> None:
    """``own.copy_(whole)``, where ``own`` may be an FSDP2 shard and ``whole`` a plain tensor: each rank then
    takes its own slice of it (every rank holds it, read from the same file; no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(own, DTensor) and not isinstance(whole, DTensor):
        whole = distribute_tensor(whole.to(own.device, own.dtype), own.device_mesh, own.placements,
                                  src_data_rank=None)
    own.copy_(whole)


@contextmanager
def lent(model: torch.nn.Module, params: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
         ) -> Iterator[None]:
    """Within the block ``params`` (of ``model``) hold ``weights`` (same names; whole tensors or, under FSDP2,
    shards alike; :func:`copy_whole`); after it, their own values again, bit for bit (kept as a copy
    meanwhile). FSDP2 units a forward left gathered are freed before and after (cpt.train.backend.reshard),
    so the next forward gathers what the shards hold."""
    from cpt.train.backend import reshard

    raw = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            reshard(model)
            for name, p in params.items():
                copy_whole(p, weights[name])
        yield
    finally:
        with torch.no_grad():
            reshard(model)
            for name, p in params.items():
                p.copy_(raw[name])


def _load_into(own: dict[str, torch.Tensor], saved: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy ``saved`` into ``own`` (same names, same shapes), refusing any mismatch with one line."""
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which is no trainable parameter here"
        raise CptError(f"{what}: the saved state {which} ({len(missing)} missing, {len(extra)} unknown "
                       f"of {len(own)}): another model or another set of trainable parameters")
    for name, t in own.items():
        if tuple(saved[name].shape) != tuple(t.shape):
            raise CptError(f"{what}: {name} has shape {tuple(saved[name].shape)} in the saved state, "
                           f"{tuple(t.shape)} here")
    with torch.no_grad():
        for name, t in own.items():
            copy_whole(t, saved[name])


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
    optimizer updates fp32 master copies of its own) takes :class:`ZeroL2Init` at ZeRO-1/2; ZeRO-3 is
    refused: see :func:`unsupported`.
    """

    def __init__(self, model: torch.nn.Module, coeff: float):
        if not (math.isfinite(coeff) and coeff >= 0):
            raise CptError(f"l2_init coefficient {coeff!r}: expected a number >= 0")
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
        lr = max(group["lr"] for group in optimizer.param_groups)  # checked before anything moves
        if lr * self.coeff > 1:
            raise CptError(f"l2_init: coefficient {self.coeff:g} x LR {lr:.3e} = {lr * self.coeff:.3g} > 1 would "
                           f"overshoot the start weights; keep it below 1 / (max LR x largest lr multiplier)")
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
        _load_into(self.refs, state, "l2_init")


class ZeroL2Init:
    """:class:`L2Init` under DeepSpeed ZeRO-1/2, on DeepSpeed's own tensors. The optimizer there updates fp32
    master partitions (``single_partition_of_fp32_groups``: this rank's slice of each parameter group,
    flattened) and then overwrites the module's weights, which are views into one flat buffer per group
    (``bit16_groups_flat``). So the pull acts on both, with the same formula as :class:`L2Init`::

        master <- lerp(master, ref[rank slice], lr_g * coeff)     flat <- lerp(flat, ref, lr_g * coeff)

    ``ref`` is the whole group's fp32 flat buffer at the stage start, gathered from every rank's master
    slice (the same on every rank, so the main process saves it; a rank's slice is cut from it with
    DeepSpeed's own partitioning). In fp32 the two stay equal; in bf16 the module's weights are the
    rounding of the master, as DeepSpeed keeps them. ZeRO-3 (parameters partitioned) is refused."""

    def __init__(self, zero_optimizer, coeff: float):
        if not (math.isfinite(coeff) and coeff >= 0):
            raise CptError(f"l2_init coefficient {coeff!r}: expected a number >= 0")
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
        lr = max(g["lr"] for g in groups)
        if lr * self.coeff > 1:
            raise CptError(f"l2_init: coefficient {self.coeff:g} x LR {lr:.3e} = {lr * self.coeff:.3g} > 1 would "
                           f"overshoot the start weights; keep it below 1 / (max LR x largest lr multiplier)")
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


class EMA:
    """Exponential moving average of the trainable weights, in fp32::

        ema <- decay * ema + (1 - decay) * p          on every step with step % every == 0

    It starts from the weights at construction (the run's start), not from the first update's
    weights: after n updates the start keeps weight decay**n, so choose 1 / (1 - decay) well below the
    number of updates (with ``every`` > 1, decay applies per update, not per step). Frozen parameters are
    not averaged (they do not move). :meth:`applied` lends the averaged weights to the model (probes,
    export) and restores the raw ones bit for bit. DDP and DeepSpeed ZeRO-1/2: identical on every rank;
    FSDP2: each rank averages its shards. ZeRO-3 is not supported: see :func:`unsupported`.
    """

    def __init__(self, model: torch.nn.Module, decay: float, every: int = 1):
        if not 0 < decay < 1:
            raise CptError(f"ema decay {decay!r}: expected a number in (0, 1)")
        if every < 1:
            raise CptError(f"ema every {every!r}: expected a step count >= 1")
        self.decay, self.every, self.model = decay, every, model
        self.params = dict(_trainable(model))
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Average in the current weights if ``step % every == 0`` (step: the count after this step)."""
        if step % self.every:
            return False
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)
        return True

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the EMA weights (cast to the parameters' dtype); after it, the
        raw weights exactly as before (kept as a copy meanwhile: one more copy of the trainable weights)."""
        with lent(self.model, self.params, self.shadow):
            yield

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: fp32 average}``: plain tensors, for safetensors (:func:`save_state`)."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_into(self.shadow, state, "ema")


def state_tensors(parts: Mapping[str, L2Init | EMA], keep: bool = True) -> dict[str, torch.Tensor]:
    """The parts' whole tensors on the CPU, keys ``<part>/<parameter name>``. Every rank calls it (FSDP2
    shards are gathered one tensor at a time); ranks with ``keep=False`` (all but the writer) get {}."""
    out = {}
    for key, part in parts.items():
        for name, t in part.state_dict().items():
            whole = _whole(t.detach())
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
    process, DDP, DeepSpeed ZeRO-1/2 and FSDP2. Under DDP and ZeRO-1/2 the parameters stay whole on every
    rank (ZeRO overwrites them from its fp32 master copies after each step; :class:`ZeroL2Init` moves both).
    Under FSDP2 they are DTensor shards that the optimizer updates in place, and every update here is
    elementwise on them. Not ZeRO-3 (the parameters are flat partitions inside DeepSpeed's engine) nor
    FSDP1 (flat parameters). Freezing and LR multipliers work everywhere (they only shape the optimizer's
    groups)."""
    from cpt.train.backend import params_writable

    if not params_writable(accelerator):
        return ("l2_init / ema: the parameters are flat partitions (ZeRO-3 / FSDP1), so they would not see whole "
                "tensors (DDP, ZeRO-1/2 and FSDP2 can)")
    return None
