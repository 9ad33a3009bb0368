"""The input formats parsed here, line by line or in blocks: JSON lines and JSON, CSV / TSV, plain text.

JSON is parsed here rather than by ``datasets`` so that one bad line is a counted skip instead of a
failed run (module docstring of :mod:`cpt.data.reader`); a plain-text file is one document, read in
blocks so that a file of any size is never whole in memory.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from cpt.data.formats import MISSING, Format, InputStats
from cpt.errors import CptError


def open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


class JsonFile(Format):
    """JSON lines, one object per line, gzipped or not; with ``arrays`` also a file that is one JSON
    array of objects (as ``datasets``' json loader reads a .json), which is parsed whole."""

    def __init__(self, name: str, suffixes: tuple[str, ...], arrays: bool = False):
        super().__init__(name, suffixes)
        self.arrays = arrays

    def records(self, path: Path, text_field: str, st: InputStats, cache_dir=None) -> Iterator[object]:
        """Records of a JSON-lines file (or a .json array); bad lines are counted and yield MISSING."""
        try:
            with open_bytes(path) as f:
                if self.arrays and _is_array(f):
                    yield from _array(path, f)
                    return
                for line in f:
                    if not line.strip():
                        st.skipped["blank_line"] += 1
                        yield MISSING
                        continue
                    try:
                        record = json.loads(line.decode("utf-8"))
                    except UnicodeDecodeError:
                        st.skipped["invalid_utf8"] += 1
                        yield MISSING
                        continue
                    except json.JSONDecodeError:
                        st.skipped["invalid_json"] += 1
                        yield MISSING
                        continue
                    line = None  # a record may be huge: hold it once, not also as bytes
                    yield record
        except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip, unreadable file
            raise CptError(f"input {path} cannot be read: {e}") from None

    def record_weights(self, path: Path, text_field: str, cache_dir=None) -> Iterator[int]:
        """The bytes of each line, read without parsing it (an array's records: as any format's)."""
        try:
            with open_bytes(path) as f:
                if not (self.arrays and _is_array(f)):
                    yield from (max(1, len(line)) for line in f)
                    return
        except (OSError, EOFError, zlib.error) as e:
            raise CptError(f"input {path} cannot be read: {e}") from None
        yield from super().record_weights(path, text_field, cache_dir)


def _array(path: Path, f) -> list:
    try:
        return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise CptError(f"input {path} is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise CptError(f"input {path} is not valid JSON: {e}") from None


def _is_array(f) -> bool:
    """Whether a .json file is one JSON array, rather than JSON lines whose first value is an array
    (a whole JSON value on the first line, more after it). Leaves ``f`` at its start."""
    first = _first_non_space(f)
    f.seek(0)
    if first != b"[":
        return False
    line = f.readline()
    more = _first_non_space(f)
    f.seek(0)
    if not more:  # the array is the whole file, on one line
        return True
    try:
        json.loads(line.decode("utf-8"))
    except ValueError:  # "[" alone or an unfinished array: a pretty-printed array
        return True
    return False


def _first_non_space(f) -> bytes:
    while True:
        c = f.read(1)
        if not c or not c.isspace():
            return c


class Delimited(Format):
    """A CSV or TSV file with a header row: one document per row, in the column named ``text_field``;
    quoting as Python's csv module and pandas write it, so a text may hold newlines, tabs and quotes."""

    def __init__(self, name: str, suffixes: tuple[str, ...], delimiter: str):
        super().__init__(name, suffixes)
        self.delimiter = delimiter

    def records(self, path: Path, text_field: str, st: InputStats, cache_dir=None) -> Iterator[object]:
        """Rows as dicts (a short row's missing cells are None); a file without the column is an error
        naming its columns."""
        csv.field_size_limit(2**31 - 1)  # a cell is a whole document; the default stops at 128 KiB
        rows = None
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM (Excel) is not a column name
                rows = csv.DictReader(f, delimiter=self.delimiter)
                if rows.fieldnames is None:  # an empty file
                    return
                if text_field not in rows.fieldnames:
                    raise CptError(f"input {path} has no column '{text_field}' (its columns: "
                                   f"{', '.join(map(str, rows.fieldnames)) or 'none'}); set --text-field")
                yield from rows
        except UnicodeDecodeError:
            raise CptError(f"input {path} is not valid UTF-8 (after line {rows.line_num if rows else 0})") from None
        except csv.Error as e:
            raise CptError(f"input {path}: line {rows.line_num if rows else 0} is not valid "
                           f"{self.name.upper()}: {e}") from None
        except OSError as e:
            raise CptError(f"input {path} cannot be read: {e}") from None


class TextFile(Format):
    """A file that is ONE document, read as UTF-8 text (.txt, Markdown, reStructuredText): a folder of
    them is a corpus with one document per file, each keeping its long-range context."""

    whole_file = True

    def documents(self, path: Path, text_field: str, st: InputStats, cache_dir,
                  chunk_chars: int | None) -> Iterator[Iterable[str]]:
        blocks = _txt_blocks(path, st, chunk_chars)
        if blocks is not None:
            yield blocks

    def documents_in(self, path: Path, text_field: str, st: InputStats, cache_dir, chunk_chars: int | None,
                     a: int, b: int) -> Iterator[Iterable[str]]:
        return self.documents(path, text_field, st, cache_dir, chunk_chars)  # one record: a == 0, b == 1

    def record_weights(self, path: Path, text_field: str, cache_dir=None) -> Iterator[int]:
        yield max(1, path.stat().st_size)


def _txt_blocks(path: Path, st: InputStats, size: int | None) -> Iterator[str] | None:
    """The one document of a .txt file as blocks of ``size`` characters (``None``: all at once), or
    None if it is skipped. A first pass checks all of it, so that a file with a bad byte is skipped
    whole (``invalid_utf8``), never after its first pieces were used."""
    decoder, blank = codecs.getincrementaldecoder("utf-8")(), True
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                text = decoder.decode(block)
                blank = blank and not text.strip()
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        st.skipped["invalid_utf8"] += 1
        return None
    except OSError as e:
        raise CptError(f"input {path} cannot be read: {e}") from None
    return None if blank else _txt_read(path, size)


def _txt_read(path: Path, size: int | None) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": CRLF stays as in the file
            while block := f.read(size or -1):
                yield block
    except OSError as e:
        raise CptError(f"input {path} cannot be read: {e}") from None
