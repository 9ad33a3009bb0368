"""Long documents in ``cpt prepare``: select them, upsample them, keep them whole, and count their lengths.

For a long-context stage the data must hold long documents whole within a row (Fu et al. 2024, "Data
Engineering for Scaling Language Models to 128K Context": cutting documents at the old context breaks the
long-range dependencies the stage is for) and more of them than a corpus has naturally (length
upsampling, done per source so that the domain mixture stays as it was: one ``cpt prepare`` per source,
each with the same ``--upsample-long``, mixed by the recipe's weights). :class:`DocumentPacker` sits
between the tokenizer and the shard writer and sees each document whole:

- ``min_doc_tokens``: documents shorter than this are dropped (counted);
- ``upsample``: ``(L, F)``, documents of at least L tokens are written F times. The first copy goes where
  the document came; copy k (k = 2..F) in the (k-1)-th extra pass over all the upsampled documents, after
  the inputs (they wait in a spill file beside the shards, not in memory), so two copies of a document
  never sit in one row, where the second could be predicted by copying the first;
- ``whole``: a document that fits in a row (at most ``seq_len`` tokens) is never cut across two rows:
  one that does not fit in what is left of the current row waits (up to ``WAITING`` of them) while
  documents that fit fill the row, best fit first; a document longer than a row is cut anyway and fills
  rows as it comes. Only when ``WAITING`` documents wait and none fits (or at the end) is the oldest cut.

Lengths are tokens with the document's framing (BOS where the tokenizer adds one, EOS): what it takes
in a row. The manifest's ``lengths`` records the options, the documents read and written (count, tokens,
a power-of-two histogram, quantiles, the share of tokens in documents longer than a row) and the
documents that fit in a row but were cut across two.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from cpt.errors import CptError

WAITING = 64  # documents that may wait for a row with room for them (whole): memory <= WAITING rows
SPILL = ".upsample-spill.bin"  # the extra copies' source, in the temporary folder; removed when read


@dataclass(frozen=True)
class LengthOptions:
    """What ``cpt prepare`` does with documents by length (module docstring)."""

    min_doc_tokens: int | None = None
    upsample: tuple[int, int] | None = None  # (L, F)
    whole: bool = False

    def check(self, part: tuple[int, int] | None) -> None:
        if part is not None:
            raise CptError("--min-doc-tokens / --upsample-long / --whole-documents need all the documents in one "
                           "prepare; prepare without --num-shards")
        if self.min_doc_tokens is not None and self.min_doc_tokens < 1:
            raise CptError(f"--min-doc-tokens must be positive, got {self.min_doc_tokens}")
        if self.upsample is not None and (self.upsample[0] < 1 or self.upsample[1] < 1):
            raise CptError(f"--upsample-long {self.upsample[0]}:{self.upsample[1]}: expected L:F with L >= 1 tokens "
                           f"and F >= 1 copies")

    def to_json(self) -> dict:
        return {"min_doc_tokens": self.min_doc_tokens, "whole_documents": self.whole,
                "upsample_long": None if self.upsample is None else {"min_tokens": self.upsample[0],
                                                                      "copies": self.upsample[1]}}


def parse_upsample(text: str) -> tuple[int, int]:
    """``"L:F"`` (``--upsample-long``) -> (L, F): documents of at least L tokens written F times."""
    lo, sep, f = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(lo), int(f)
    except ValueError:
        raise CptError(f"--upsample-long {text!r}: expected L:F, e.g. 512:3 (documents of 512 tokens or more, "
                       f"3 copies each)") from None


class LengthStats:
    """Counts of document lengths: a power-of-two histogram, and every length for the quantiles (4 bytes
    per document)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.lengths: list[np.ndarray] = []
        self._batch: list[int] = []

    def add(self, n: int, times: int = 1) -> None:
        self._batch.extend([n] * times)
        if len(self._batch) >= 65536:
            self.lengths.append(np.asarray(self._batch, dtype=np.int32))
            self._batch = []

    def to_json(self) -> dict:
        n = np.concatenate([*self.lengths, np.asarray(self._batch, dtype=np.int32)]).astype(np.int64)
        tokens = int(n.sum())
        out = {"documents": len(n), "tokens": tokens}
        if not len(n):
            return out
        bucket = np.floor(np.log2(n)).astype(np.int64)
        out["histogram"] = [{"tokens_from": 1 << int(b), "tokens_below": 1 << int(b + 1),
                             "documents": int((bucket == b).sum()), "tokens": int(n[bucket == b].sum())}
                            for b in np.unique(bucket)]
        out["quantiles"] = {k: int(np.quantile(n, q, method="lower"))
                            for k, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}
        out["share_of_tokens_over_seq_len"] = float(n[n > self.seq_len].sum() / tokens)
        return out


class DocumentPacker:
    """Whole documents from the tokenizer's record stream -> the shard writer, as :class:`LengthOptions`
    say. ``add(records, ends)`` as ShardWriter.add (``ends``: where each document ended in ``records``);
    ``finish()`` writes what waits and the extra copies, and returns the manifest's ``lengths``."""

    def __init__(self, writer, options: LengthOptions, spill_dir: Path):
        self.writer, self.options, self.seq_len = writer, options, writer.seq_len
        self.read, self.written = LengthStats(self.seq_len), LengthStats(self.seq_len)
        self.dropped = {"documents": 0, "tokens": 0}
        self.cut = 0  # documents of at most seq_len tokens written across two rows
        self.partial: list[np.ndarray] = []  # the pieces of the document not yet ended
        self.waiting: list[np.ndarray] = []  # whole: documents waiting for a row with room
        self.spill_path = spill_dir / SPILL
        self.spill, self.spilled = None, []  # extra copies: the file, and the length of each document in it

    def add(self, records: np.ndarray, ends: np.ndarray) -> None:
        start = 0
        for end in ends:
            self._document(np.concatenate([*self.partial, records[start:end]]) if self.partial else records[start:end])
            self.partial, start = [], int(end)
        if start < len(records):
            self.partial.append(records[start:].copy())

    def _document(self, doc: np.ndarray) -> None:
        n = len(doc)
        self.read.add(n)
        if self.options.min_doc_tokens is not None and n < self.options.min_doc_tokens:
            self.dropped["documents"] += 1
            self.dropped["tokens"] += n
            return
        self._place(doc)
        up = self.options.upsample
        if up is not None and n >= up[0] and up[1] > 1:
            if self.spill is None:
                self.spill = open(self.spill_path, "wb")
            doc.tofile(self.spill)
            self.spilled.append(n)

    def _room(self) -> int:
        return self.seq_len - len(self.writer.carry)

    def _write(self, doc: np.ndarray) -> None:
        if len(doc) <= self.seq_len and len(doc) > self._room():
            self.cut += 1
        self.written.add(len(doc))
        self.writer.add(doc)

    def _place(self, doc: np.ndarray) -> None:
        if not self.options.whole or len(doc) > self.seq_len or len(doc) <= self._room():
            self._write(doc)
        else:
            self.waiting.append(doc)
        self._fill()
        while len(self.waiting) > WAITING:  # none fits: the oldest is cut across this row and the next
            self._write(self.waiting.pop(0))
            self._fill()

    def _fill(self) -> None:
        """Put waiting documents into the current row while one fits, the longest that fits first."""
        while self.waiting:
            room = self._room()
            fits = [i for i, d in enumerate(self.waiting) if len(d) <= room]
            if not fits:
                return
            self._write(self.waiting.pop(max(fits, key=lambda i: len(self.waiting[i]))))

    def finish(self) -> dict:
        if self.partial:  # the stream ends with an EOS after every document: nothing may be left
            raise RuntimeError("cpt prepare: a document without its end in the token stream")
        if self.spill is not None:
            self.spill.close()
            copies = np.memmap(self.spill_path, dtype=self.writer.carry.dtype, mode="r")
            offsets = np.concatenate([[0], np.cumsum(self.spilled)])
            for _ in range(self.options.upsample[1] - 1):
                for a, b in pairwise(offsets):
                    self._place(np.array(copies[a:b]))
            del copies
            self.spill_path.unlink()
        while self.waiting:  # the end: what still waits goes in, oldest first where none fits
            self._write(self.waiting.pop(0))
            self._fill()
        return {**self.options.to_json(), "read": self.read.to_json(), "dropped_short": self.dropped,
                "written": self.written.to_json(), "cut_documents": self.cut, "repeated_documents": len(self.spilled)}


def summary(lengths: dict) -> str:
    """One line of the manifest's ``lengths`` for ``cpt prepare`` to print."""
    w, up = lengths["written"], lengths["upsample_long"]
    q = w.get("quantiles", {})
    times = f" x{up['copies']}" if up else ""
    return (f"documents by length: {lengths['read']['documents']} read, {lengths['dropped_short']['documents']} "
            f"shorter than --min-doc-tokens dropped, {lengths['repeated_documents']} upsampled{times}; "
            f"{w['documents']} written ({w['tokens']} tokens), lengths p50 {q.get('p50', 0)} p90 {q.get('p90', 0)} "
            f"max {q.get('max', 0)}, {100 * w.get('share_of_tokens_over_seq_len', 0):.1f}% of tokens in documents "
            f"longer than a row; {lengths['cut_documents']} documents that fit a row cut across two")
