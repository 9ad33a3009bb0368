"""Probes: held-out loss per domain on a fixed set of sequences, sharded across processes."""

from __future__ import annotations

import math
import time

import torch

from cpt.data.mixture import read_batch
from cpt.data.source import TokenSource
from cpt.errors import CptError


class HeldOutLoss:
    """Mean next-token loss on the first ``max_sequences`` sequences of each probe set.

    Every process runs the same number of forward passes (short shards are padded with weight-0
    rows), because sharded models (ZeRO-3, FSDP) need all ranks in every forward.
    """

    def __init__(self, sets: dict[str, str], seq_len: int, max_sequences: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1):
        self.sources: dict[str, TokenSource] = {}
        self.shards: dict[str, tuple[list[int], list[float]]] = {}
        for name, path in sets.items():
            try:
                src = TokenSource(path)
            except CptError as e:
                raise CptError(f"probes.sets.{name}: {e}") from None
            if src.seq_len != seq_len:
                raise CptError(
                    f"probes.sets.{name}: {path} was prepared with seq_len {src.seq_len}, "
                    f"the recipe trains at data.seq_len {seq_len}"
                )
            n = min(max_sequences, src.num_sequences)
            per_rank = math.ceil(n / world_size)
            mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
            weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
            mine += [0] * (per_rank - len(mine))
            self.sources[name] = src
            self.shards[name] = (mine, weights)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def __call__(self, model, accelerator) -> dict[str, float]:
        """{"probe/<name>/loss": ..., "probe/<name>/ppl": ..., "probe/seconds": ...}"""
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        for name, (indices, weights) in self.shards.items():
            total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum loss, sum weight)
            for i in range(0, len(indices), self.micro_batch_size):
                ids = read_batch({name: self.sources[name]}, [(name, j) for j in indices[i:i + self.micro_batch_size]])
                ids = ids.to(accelerator.device)
                w = torch.tensor(weights[i:i + self.micro_batch_size], device=accelerator.device)
                logits = model(input_ids=ids).logits.float()
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
                ).view(ids.size(0), -1).mean(dim=1)
                total[0] += (nll * w).sum().double()
                total[1] += w.sum().double()
            total = accelerator.reduce(total, reduction="sum")
            loss = (total[0] / total[1]).item()
            out[f"probe/{name}/loss"] = loss
            out[f"probe/{name}/ppl"] = math.exp(min(loss, 50.0))
        if was_training:
            model.train()
        out["probe/seconds"] = time.perf_counter() - t0
        return out
