"""The optimizer: AdamW over parameter groups that may carry an ``lr_scale``, and the schedule's LR written
into them before every step. Weight decay applies to matrices (ndim >= 2) only."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cpt.train.weights import trainable


def param_groups(model: torch.nn.Module, weight_decay: float, scales: Mapping[str, float] | None = None,
                 owner: Mapping[int, str] | None = None) -> list[dict]:
    """AdamW groups of the trainable parameters: a decay group (matrices) and a no-decay group at scale 1,
    even when empty; then, per key of ``scales`` (in order), its decay and no-decay groups at that scale,
    those that hold something. ``owner``: ``id(parameter) -> key`` for the scaled ones. Without scales the
    two groups are the plain optimizer's, so optimizer checkpoints stay compatible."""
    scales, owner = dict(scales or {}), owner or {}
    buckets: dict[tuple[str | None, bool], list] = {(None, True): [], (None, False): []}
    for key in scales:
        buckets[(key, True)], buckets[(key, False)] = [], []
    for _, p in trainable(model):
        buckets[(owner.get(id(p)), p.ndim >= 2)].append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": 1.0 if key is None else scales[key]}
            for (key, decay), params in buckets.items() if key is None or params]


def make_optimizer(model, cfg, lr: float, device_type: str, groups: list[dict] | None = None):
    """AdamW (train.optimizer) over ``groups`` (default :func:`param_groups`: what requires grad, decay on
    matrices only; a mitigation may shape them, e.g. layer-wise LR); fused where torch has the kernel (auto)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    groups = param_groups(model, cfg.weight_decay) if groups is None else groups
    fused = device_type in _get_fused_kernels_supported_devices() if cfg.fused == "auto" else cfg.fused
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
    set_lr(optimizer, lr)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR into every group, times the group's ``lr_scale`` (1 where it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
