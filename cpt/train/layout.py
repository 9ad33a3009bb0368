"""How one optimizer step is cut into micro-batches across processes: the batch arithmetic that the
backend (DeepSpeed's batch sizes), the step and the data order all share."""

from __future__ import annotations

from dataclasses import dataclass

from cpt.errors import CptError
from cpt.recipe import Recipe


@dataclass
class Layout:
    """How one optimizer step is cut into micro-batches across processes."""

    seq_len: int
    sequences_per_step: int  # global batch, all processes
    micro_batch_size: int
    world_size: int
    grad_accum: int

    @classmethod
    def from_recipe(cls, recipe: Recipe, world_size: int) -> Layout:
        seq_len, micro = recipe.data.seq_len, recipe.train.micro_batch_size
        sequences = recipe.train.global_batch_tokens // seq_len
        if sequences % (micro * world_size):
            raise CptError(
                f"train.global_batch_tokens = {recipe.train.global_batch_tokens} is {sequences} sequences of "
                f"{seq_len}, not divisible by train.micro_batch_size ({micro}) x processes ({world_size})"
            )
        return cls(seq_len, sequences, micro, world_size, sequences // (micro * world_size))

    def my_micro_batches(self, picks: list, rank: int) -> list[list]:
        """This rank's micro-batches of a global batch. Micro-step a of rank r holds picks
        [(a*W + r)*m, (a*W + r + 1)*m): the global batch is the same whatever W divides it."""
        m, w = self.micro_batch_size, self.world_size
        return [picks[(a * w + rank) * m:(a * w + rank + 1) * m] for a in range(self.grad_accum)]

