"""What an input format is to the reader: the interface every format implements, and what they share.

A format turns one input (a file, a folder, a hub dataset) into records and records into documents, and
says what each record weighs when ``cpt prepare`` is split into parts. The formats themselves live in
:mod:`cpt.data.textfiles` (parsed here: JSON, CSV / TSV, plain text) and :mod:`cpt.data.arrow` (read
with ``datasets``); :data:`cpt.data.reader.FORMATS` registers them by name. Nothing outside a format
asks which format an input is: it asks the format.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# A record the format could not parse (a bad JSON line): counted where it was read, and yielded so
# that it still takes its place among the records (prepare in parts counts records by position).
MISSING = object()


@dataclass
class InputStats:
    """What one input gave: documents used and records skipped, by reason."""

    path: str
    format: str
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    fields_seen: set = field(default_factory=set)
    objects: int = 0  # records that were JSON objects / table rows (candidates for a document)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "documents": self.documents,
            "skipped": dict(sorted(self.skipped.items())),
        }


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def text_of(record: object, text_field: str, st: InputStats) -> str | None:
    """The document text of one record, or None after counting why it is skipped."""
    if record is MISSING:
        return None
    if not isinstance(record, dict):
        st.skipped["not_an_object"] += 1
        return None
    st.objects += 1
    if text_field not in record:
        st.skipped["missing_field"] += 1
        if len(st.fields_seen) < 50:
            st.fields_seen.update(str(k) for k in record)
        return None
    text = record[text_field]
    if text is None:
        st.skipped["null_text"] += 1
        return None
    if not isinstance(text, str):
        st.skipped["not_a_string"] += 1
        return None
    if not text.strip():
        st.skipped["empty_text"] += 1
        return None
    return text


class Format:
    """One kind of input, named ``name`` in manifests and messages; a file whose lowercased name ends
    with one of ``suffixes`` is of this kind. Most formats are a sequence of records and give only
    :meth:`records`; the documents, the documents of a range of records and the records' weights then
    follow from them here. A format whose file is one document (``whole_file``) gives its own."""

    whole_file = False  # the whole file is one document, read in blocks (it is then also one record)

    def __init__(self, name: str, suffixes: tuple[str, ...] = ()):
        self.name = name
        self.suffixes = suffixes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def is_folder_of(self, path: Path) -> bool:
        """Whether the folder ``path`` is one input of this format, rather than a folder of files to
        walk; a folder this format cannot take as it is may raise a CptError saying what to pass."""
        return False

    def records(self, path, text_field: str, st: InputStats, cache_dir: str | Path | None) -> Iterator[object]:
        """Each record in order, usable or not (:func:`text_of` tells); a record that cannot be parsed
        is counted in ``st.skipped`` and then yielded as MISSING."""
        raise NotImplementedError(f"{self!r} is read as whole files")

    def documents(self, path, text_field: str, st: InputStats, cache_dir: str | Path | None,
                  chunk_chars: int | None) -> Iterator[Iterable[str]]:
        """Each usable document of one input as blocks of text; unusable records are counted in ``st``."""
        for record in self.records(path, text_field, st, cache_dir):
            text = text_of(record, text_field, st)
            if text is not None:
                yield (text,)

    def documents_in(self, path, text_field: str, st: InputStats, cache_dir: str | Path | None,
                     chunk_chars: int | None, a: int, b: int) -> Iterator[Iterable[str]]:
        """:meth:`documents` of records ``a..b`` only (``b`` excluded): what one part of a prepare in
        parts reads, with the skips of those records counted in ``st``."""
        # the format counts a bad record just before it yields it: what it counted since the last
        # record is this record's
        scratch = InputStats(str(path), self.name)
        records = self.records(path, text_field, scratch, cache_dir)
        seen = Counter()
        with contextlib.closing(records):
            for k, record in enumerate(records):
                if k >= b:
                    break
                if scratch.skipped != seen:
                    if k >= a:
                        st.skipped.update(scratch.skipped - seen)
                    seen = Counter(scratch.skipped)
                if k >= a:
                    text = text_of(record, text_field, st)
                    if text is not None:
                        yield (text,)
        if scratch.objects and not st.objects:  # a table without the text column (dataset_rows counted it)
            st.objects, st.skipped["missing_field"] = b - a, b - a
            st.fields_seen |= scratch.fields_seen

    def record_weights(self, path, text_field: str, cache_dir: str | Path | None) -> Iterator[int]:
        """The weight of each record, one per record :meth:`records` yields, by which prepare in parts
        balances its parts (cpt.data.parts): here 1 + the UTF-8 bytes of the record's text, so that
        a record without one still counts."""
        scratch = InputStats(str(path), self.name)
        n = 0
        for r in self.records(path, text_field, scratch, cache_dir):
            n += 1
            yield 1 + (utf8_len(r[text_field]) if isinstance(r, dict) and isinstance(r.get(text_field), str) else 0)
        if not n and scratch.objects:  # a table without the text column: every row is one record
            yield from itertools.repeat(1, scratch.objects)
