"""model.extend_vocab.train_rows: new. After a vocabulary extension only the new tokens' rows train: the
init_from model's own rows are put back after every update."""

from __future__ import annotations

import torch

from cpt.errors import CptError
from cpt.mitigate.base import Mitigation, register
from cpt.model import old_token_rows
from cpt.train.weights import Weights


class OldRows:
    """The first ``rows`` rows of the input embeddings and of an untied head (the init_from model's own
    tokens) as they are now; :meth:`restore`, called after every optimizer update, puts them back bit for
    bit, so AdamW's update and weight decay move only the new rows. The rows are read from the weights
    (at a resume: the checkpoint's, which hold them unchanged)."""

    def __init__(self, model, rows: int):
        tables = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not tables[0]:
            tables.append(head.weight)
        with torch.no_grad():
            self.kept = [(w, w[:rows].clone()) for w in tables]
        self.rows = rows

    def restore(self) -> None:
        with torch.no_grad():
            for w, old in self.kept:
                w[:self.rows].copy_(old)


@register
class RowRestore(Mitigation):
    """Restores the init_from model's token rows after every update (:class:`OldRows`)."""

    order = 40  # after L2-init's pull, which would move the old rows too

    def __init__(self, source: str | None, peft: bool, main: bool = False):
        self.source, self.peft, self.main = source, peft, main
        self.keeper: OldRows | None = None

    @classmethod
    def from_recipe(cls, recipe, origin, main):
        ext = recipe.model.extend_vocab
        if ext is None or ext.train_rows == "all":
            return None
        return cls(origin, recipe.peft is not None, main)

    def attach(self, weights: Weights) -> None:
        if not weights.in_place or self.peft:
            raise CptError("model.extend_vocab.train_rows: new restores rows of the module's weights after each "
                           "update: not with DeepSpeed / FSDP (they update copies or shards of their own) or peft")
        if self.source is None:
            raise CptError("model.extend_vocab.train_rows: new needs init_from (the model whose rows stay)")
        rows = old_token_rows(self.source)
        self.keeper = OldRows(weights.model, rows)
        if self.main:
            print(f"cpt: model.extend_vocab.train_rows: new: rows 0..{rows - 1} (the tokens of {self.source}) of "
                  f"{len(self.keeper.kept)} table(s) kept; rows {rows}.. train")

    def after_update(self, optimizer) -> None:
        self.keeper.restore()
