"""Read raw documents from user files, counting every record that is not used and why.

Formats, chosen by the path:
  * ``.jsonl`` / ``.jsonl.gz``: one JSON object per line; the text lives in ``text_field``.
  * ``.json`` / ``.json.gz``: a JSON array of objects, or JSON lines (as ``datasets``' json loader); an
    array is parsed whole, so big corpora belong in JSON lines.
  * ``.parquet``: a column named ``text_field``.
  * ``.csv`` / ``.tsv``: one document per row, the column named ``text_field`` (a header row names the
    columns; quoting as Python's csv module and pandas write it, so a text may hold newlines, tabs and
    quotes). A file without that column is an error naming its columns.
  * ``.txt``, ``.md`` / ``.markdown``, ``.rst``: the whole file is ONE document, read as UTF-8 text. A
    folder of them (books, manuals, a documentation tree) is then a corpus with one document per file;
    splitting on blank lines would cut documents into paragraphs and lose the long-range context
    continual pre-training is meant to teach. ``cpt prepare`` reads it in pieces (:func:`split_text`), so
    a file of any size is never whole in memory.
  * a folder written by ``datasets.Dataset.save_to_disk``.
  * any other folder: every supported file below it, walked recursively in sorted path order (as
    ``sorted()`` orders ``Path`` objects: by path component), so the order never depends on the file
    system. Hidden files and folders (a name starting with ``.``: ``.git``, ``.venv``) are not read;
    files of other types are skipped and counted by extension (``resolve_inputs(..., other=)``, the
    manifest's ``unsupported_files``, one line of ``cpt prepare``'s summary).
  * :class:`HubDataset`: a dataset by name, read with ``datasets.load_dataset`` (a hub id, or a local
    folder of data files), streamed when asked; the hub unreachable or switched off is one line saying
    what to do.

JSON inputs are parsed line by line (not by ``datasets``) so that one bad line is a counted
skip instead of a failed run, the first line as any other. Reasons: ``blank_line``, ``invalid_utf8``,
``invalid_json``, ``not_an_object``, ``missing_field``, ``null_text``, ``not_a_string``, ``empty_text``
(empty or whitespace only), and ``empty_file`` for an input with nothing in it (a .txt of whitespace
too), so that one empty file does not stop a folder. An input whose records are all unusable, and a
run in which no input has a document, are errors, never a silent zero.

Each format is a :class:`cpt.data.formats.Format` (:mod:`cpt.data.textfiles`, :mod:`cpt.data.arrow`),
registered by name in :data:`FORMATS`; everything here and in ``cpt prepare`` asks the format, so a
new format is its class and one line in FORMATS.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from cpt.data.arrow import Hub, HubDataset, Parquet, SavedDataset
from cpt.data.formats import Format, InputStats
from cpt.data.textfiles import Delimited, JsonFile, TextFile
from cpt.errors import CptError

# The formats by name, in the order ``cpt prepare --help`` lists them; a file is of the first whose
# suffixes its name ends with.
FORMATS: dict[str, Format] = {f.name: f for f in (
    JsonFile("jsonl", (".jsonl", ".jsonl.gz")),
    JsonFile("json", (".json", ".json.gz"), arrays=True),
    Parquet("parquet", (".parquet",)),
    Delimited("csv", (".csv",), ","),
    Delimited("tsv", (".tsv",), "\t"),
    TextFile("txt", (".txt",)),
    TextFile("md", (".md", ".markdown")),
    TextFile("rst", (".rst",)),
    SavedDataset("saved_dataset"),
    Hub("hf"),
)}
_BY_SUFFIX = {suffix: f.name for f in FORMATS.values() for suffix in f.suffixes}
SUFFIXES = tuple(_BY_SUFFIX)


def input_format(path: Path) -> str:
    """The format name of one file or folder, or a CptError naming the path."""
    if path.is_dir():
        for fmt in FORMATS.values():
            if fmt.is_folder_of(path):
                return fmt.name
        return "folder"
    name = path.name.lower()
    for suffix, fmt in _BY_SUFFIX.items():
        if name.endswith(suffix):
            return fmt
    raise CptError(
        f"input {path}: unsupported file type; expected one of {', '.join(SUFFIXES)} "
        "or a folder saved with datasets' save_to_disk"
    )


def resolve_inputs(inputs: list[str | Path | HubDataset] | str | Path | HubDataset,
                   other: Counter | None = None) -> list[tuple[Path | HubDataset, str]]:
    """Check every input exists and expand plain folders into their supported files (module docstring:
    recursive, sorted, hidden names left out). Files of other types in those folders are skipped and
    counted by extension in ``other`` (``"(none)"`` for a name without one)."""
    if isinstance(inputs, (str, Path, HubDataset)):
        inputs = [inputs]
    if not inputs:
        raise CptError("no inputs given")
    out: list[tuple[Path | HubDataset, str]] = []
    for raw in inputs:
        if isinstance(raw, HubDataset):
            out.append((raw, "hf"))
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            raise CptError(f"input {path} does not exist")
        fmt = input_format(path)
        if fmt != "folder":
            out.append((path, fmt))
            continue
        files, unsupported = [], Counter()
        for root, dirs, names in os.walk(path):  # symlinked folders are not entered (as Path.rglob)
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                p = Path(root, name)
                if name.startswith(".") or not p.is_file():
                    continue
                if name.lower().endswith(SUFFIXES):
                    files.append(p)
                else:
                    unsupported[p.suffix.lower() or "(none)"] += 1
        if not files:
            raise CptError(f"input folder {path} holds no {', '.join(SUFFIXES)} files")
        if other is not None:
            other.update(unsupported)
        out.extend((p, input_format(p)) for p in sorted(files))
    return out


def iter_documents(*args, **kwargs) -> Iterator[str]:
    """Whole document texts in input order: :func:`iter_pieces` (same arguments) with no cutting."""
    for text, _ in iter_pieces(*args, **kwargs):
        yield text


def iter_pieces(
    inputs: list[tuple[Path, str]],
    text_field: str,
    stats: list[InputStats],
    max_documents: int | None = None,
    cache_dir: str | Path | None = None,
    max_per_input: int | None = None,
    chunk_chars: int | None = None,
) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, last)``: the documents in input order, each in pieces of at most ``chunk_chars``
    characters (:func:`split_text`; ``None``: whole), ``last`` on its final piece.

    Appends one InputStats per input read to ``stats``. Stops after ``max_documents`` usable
    documents in all (inputs not reached are not read) and reads at most ``max_per_input`` usable
    documents of each input (a sample of every corpus). An empty input is counted as skipped
    (``empty_file``); raises CptError for an input with no usable record, a field found in no record,
    or when no input has a document at all.
    """
    remaining = max_documents
    for path, fmt in inputs:
        if remaining is not None and remaining <= 0:
            return
        st = InputStats(str(path), fmt)
        stats.append(st)
        for blocks in FORMATS[fmt].documents(path, text_field, st, cache_dir, chunk_chars):
            st.documents += 1
            yield from split_text(blocks, chunk_chars)
            if remaining is not None:
                remaining -= 1
                if remaining <= 0:
                    break
            if max_per_input is not None and st.documents >= max_per_input:
                break
        check_input(st, text_field)
    if stats and not any(st.documents for st in stats):
        if len(stats) == 1:
            raise CptError(f"input {stats[0].path} is empty")
        raise CptError(f"all {len(stats)} inputs are empty ({stats[0].path}, ...)")


def split_text(blocks: Iterable[str], size: int | None) -> Iterator[tuple[str, bool]]:
    """Re-cut one document, given as consecutive blocks of text, into ``(piece, last)`` of at most
    ``size`` characters (``None``: one piece); ``"".join`` of the pieces is the document.

    A cut goes where byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, cpt's own) give the same tokens
    as for the uncut text (``_CLEAN_CUT``), as late in the piece as one is found. Text with none in
    the last half of a piece (a table of symbols, one long run of digits) is cut at its last newline,
    else at ``size``: still lossless, but the tokens next to that cut may differ from the whole text's.
    """
    if size is None:
        yield "".join(blocks), True
        return
    buf, start = "", 0
    for block in blocks:
        buf, start = buf[start:] + block, 0
        while len(buf) - start > size:  # more text follows this piece
            cut = _cut(buf, start, start + size)
            yield buf[start:cut], False
            start = cut
    yield buf[start:], True


# Where the pre-tokenizer regexes of GPT-2 and of Llama 3 / cl100k both end a pre-token whatever
# text follows and start the next one whatever came before: before a newline that ends a word or
# number, after a newline between two non-space characters, before the space between two words.
_CLEAN_CUT = re.compile(r"(?<=[^\W_])(?=\n)|(?<=\S\n)(?=\S)|(?<=[^\W\d_])(?= [^\W\d_])")


def _cut(text: str, lo: int, hi: int) -> int:
    """Where a piece starting at ``lo`` ends, at most at ``hi`` (< len(text)); see split_text."""
    for floor in (max(lo, hi - 4096), lo + (hi - lo) // 2):  # the short search nearly always finds one
        found = [m.start() for m in _CLEAN_CUT.finditer(text, floor, hi)]
        if found and found[-1] > lo:
            return found[-1]
    i = text.rfind("\n", lo, hi)
    return i + 1 if i >= lo else hi


def check_input(st: InputStats, text_field: str) -> None:
    """Raise for an input that gave no document but records (none usable, or no text field in any);
    count one with nothing in it as ``empty_file``."""
    if st.documents:
        return
    if st.objects and st.skipped.get("missing_field", 0) == st.objects:
        seen = ", ".join(sorted(st.fields_seen)) or "none"
        raise CptError(
            f"input {st.path}: no field '{text_field}' in any record (fields seen: {seen}); set --text-field"
        )
    if not st.skipped:  # nothing in it: counted, the other inputs go on
        st.skipped["empty_file"] = 1
        return
    why = ", ".join(f"{reason} {n}" for reason, n in sorted(st.skipped.items()))
    raise CptError(f"input {st.path} has no usable document (skipped: {why})")
