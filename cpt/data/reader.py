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

JSON inputs are parsed line by line here (not by ``datasets``) so that one bad line is a counted
skip instead of a failed run, the first line as any other. Reasons: ``blank_line``, ``invalid_utf8``,
``invalid_json``, ``not_an_object``, ``missing_field``, ``null_text``, ``not_a_string``, ``empty_text``
(empty or whitespace only), and ``empty_file`` for an input with nothing in it (a .txt of whitespace
too), so that one empty file does not stop a folder. An input whose records are all unusable, and a
run in which no input has a document, are errors, never a silent zero.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cpt.errors import CptError

# suffix -> format; a format in WHOLE_FILE is one document per file
FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".json.gz": "json", ".parquet": "parquet",
           ".csv": "csv", ".tsv": "tsv", ".txt": "txt", ".md": "md", ".markdown": "md", ".rst": "rst"}
SUFFIXES = tuple(FORMATS)
WHOLE_FILE = ("txt", "md", "rst")


@dataclass(frozen=True)
class HubDataset:
    """A dataset read with ``datasets.load_dataset(name, config, split=split, streaming=streaming)``:
    a hub id (``allenai/c4``) or a local folder of data files. ``streaming`` iterates the rows as they
    arrive instead of downloading (and converting to Arrow) the whole split first; a downloaded set
    is cached (``HF_DATASETS_CACHE``) and read from there offline. Each pass reads it again: a
    validation split reads it twice, a part (``--num-shards``) twice too (the records' sizes first),
    which for a streamed set means streaming it again."""

    name: str
    config: str | None = None
    split: str = "train"
    streaming: bool = False

    def __str__(self) -> str:  # its path in messages and manifests; streamed or not, the same rows
        return f"hf:{self.name}" + (f" config={self.config}" if self.config else "") + f" split={self.split}"


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


def input_format(path: Path) -> str:
    """The format name of one file or folder, or a CptError naming the path."""
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise CptError(
                f"input {path} is a saved DatasetDict with splits {', '.join(splits)}; "
                f"pass one split folder, e.g. {path / (splits[0] if splits else 'train')}"
            )
        if (path / "state.json").exists() and (path / "dataset_info.json").exists():
            return "saved_dataset"
        return "folder"
    name = path.name.lower()
    for suffix, fmt in FORMATS.items():
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
        for blocks in _documents(path, fmt, text_field, st, cache_dir, chunk_chars):
            st.documents += 1
            yield from split_text(blocks, chunk_chars)
            if remaining is not None:
                remaining -= 1
                if remaining <= 0:
                    break
            if max_per_input is not None and st.documents >= max_per_input:
                break
        _check_input(st, text_field)
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


def _documents(
    path: Path, fmt: str, text_field: str, st: InputStats, cache_dir: str | Path | None,
    chunk_chars: int | None,
) -> Iterator[Iterable[str]]:
    """Each usable document of one input as blocks of text; unusable records are counted in ``st``."""
    if fmt in WHOLE_FILE:
        blocks = _txt_blocks(path, st, chunk_chars)
        if blocks is not None:
            yield blocks
        return
    for record in _records(path, fmt, text_field, st, cache_dir):
        text = _text_of(record, text_field, st)
        if text is not None:
            yield (text,)


def _records(path, fmt: str, text_field: str, st: InputStats, cache_dir: str | Path | None) -> Iterator[object]:
    """The records of an input that is not one document per file (each becomes a document or a counted skip)."""
    if fmt in ("jsonl", "json"):
        return _json_records(path, fmt, st)
    if fmt in ("csv", "tsv"):
        return _csv_records(path, fmt, text_field)
    if fmt == "hf":
        return _hub_records(path, text_field, st)
    return _table_records(path, fmt, text_field, st, cache_dir)


def _check_input(st: InputStats, text_field: str) -> None:
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


_MISSING = object()


def _text_of(record: object, text_field: str, st: InputStats) -> str | None:
    """The document text of one record, or None after counting why it is skipped."""
    if record is _MISSING:
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


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _json_records(path: Path, fmt: str, st: InputStats) -> Iterator[object]:
    """Records of a JSON-lines file (or a .json array); bad lines are counted and yield _MISSING."""
    try:
        with _open_bytes(path) as f:
            if fmt == "json" and _is_array(f):
                try:
                    records = json.loads(f.read().decode("utf-8"))
                except UnicodeDecodeError:
                    raise CptError(f"input {path} is not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise CptError(f"input {path} is not valid JSON: {e}") from None
                yield from records
                return
            for line in f:
                if not line.strip():
                    st.skipped["blank_line"] += 1
                    yield _MISSING
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    st.skipped["invalid_utf8"] += 1
                    yield _MISSING
                    continue
                except json.JSONDecodeError:
                    st.skipped["invalid_json"] += 1
                    yield _MISSING
                    continue
                line = None  # a record may be huge: hold it once, not also as bytes
                yield record
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip, unreadable file
        raise CptError(f"input {path} cannot be read: {e}") from None


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


def _table_records(
    path: Path, fmt: str, text_field: str, st: InputStats, cache_dir: str | Path | None
) -> Iterator[object]:
    """Rows of a parquet file or a saved dataset, read with ``datasets`` (memory-mapped Arrow)."""
    import datasets

    try:
        if fmt == "saved_dataset":
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as e:  # corrupt file: report it with its path, one line
        raise CptError(f"input {path} cannot be read as {fmt}: {type(e).__name__}: {_one_line(e)}") from None
    yield from _dataset_rows(ds, text_field, st)


def _dataset_rows(ds, text_field: str, st: InputStats) -> Iterator[object]:
    """Rows of a ``datasets.Dataset`` as ``{text_field: text}``; a Dataset without that column is counted
    as all rows ``missing_field`` (the input's check then names its columns)."""
    if len(ds) == 0:
        return
    if text_field not in ds.column_names:
        st.objects = len(ds)
        st.skipped["missing_field"] = len(ds)
        st.fields_seen.update(ds.column_names)
        return
    column = ds.select_columns([text_field])
    for batch in column.iter(batch_size=100):  # rows may be whole books: few at a time
        for text in batch[text_field]:
            yield {text_field: text}


def _csv_records(path: Path, fmt: str, text_field: str) -> Iterator[object]:
    """Rows of a .csv / .tsv file with a header row, as dicts (a short row's missing cells are None)."""
    csv.field_size_limit(2**31 - 1)  # a cell is a whole document; the default stops at 128 KiB
    rows = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM (Excel) is not a column name
            rows = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            if rows.fieldnames is None:  # an empty file
                return
            if text_field not in rows.fieldnames:
                raise CptError(f"input {path} has no column '{text_field}' (its columns: "
                               f"{', '.join(map(str, rows.fieldnames)) or 'none'}); set --text-field")
            yield from rows
    except UnicodeDecodeError:
        raise CptError(f"input {path} is not valid UTF-8 (after line {rows.line_num if rows else 0})") from None
    except csv.Error as e:
        raise CptError(f"input {path}: line {rows.line_num if rows else 0} is not valid {fmt.upper()}: {e}") from None
    except OSError as e:
        raise CptError(f"input {path} cannot be read: {e}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def load_hub_dataset(spec: HubDataset):
    """``datasets.load_dataset`` of ``spec``, or one CptError line saying what to do (hub off or
    unreachable and the set not cached, no such set, config or split)."""
    import datasets

    try:
        return datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=spec.streaming)
    except Exception as e:
        raise _hub_error(spec, e) from None


def _hub_error(spec: HubDataset, e: Exception) -> CptError:
    import datasets

    why = _one_line(e)
    unreachable = isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in type(e).__name__
    if datasets.config.HF_HUB_OFFLINE and (unreachable or isinstance(e, FileNotFoundError)):
        switches = [f"{v}={os.environ[v]}" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v)]
        return CptError(
            f"input {spec}: not in the local datasets cache, and the hub is switched off "
            f"({', '.join(switches) or 'offline mode'}): run once with HF_HUB_OFFLINE=0 where the hub is "
            "reachable (without --streaming the download is cached and then read offline), or pass local files")
    if unreachable:
        return CptError(
            f"input {spec}: cannot reach the Hugging Face Hub ({why}): check the network (or HF_ENDPOINT, a "
            "proxy); or download it once where the hub is reachable (without --streaming it is cached, and "
            "HF_HUB_OFFLINE=1 reads the cache), or pass local files")
    if isinstance(e, datasets.exceptions.DatasetNotFoundError):
        return CptError(f"input {spec}: {why} (a gated or private set needs `hf auth login` first)")
    if isinstance(e, ValueError):  # an unknown config or split: datasets' message lists the ones there are
        return CptError(f"input {spec}: {why}")
    return CptError(f"input {spec} cannot be loaded: {type(e).__name__}: {why}")


def _hub_records(spec: HubDataset, text_field: str, st: InputStats) -> Iterator[object]:
    """Rows of a :class:`HubDataset`; a stream that breaks off (network) is one CptError line."""
    ds = load_hub_dataset(spec)
    try:
        if not spec.streaming:  # a Dataset, memory-mapped from the cache: read as a saved dataset
            yield from _dataset_rows(ds, text_field, st)
            return
        if ds.column_names is not None:  # known before the first row for most sets: fail early
            if text_field not in ds.column_names:
                raise CptError(f"input {spec}: no field '{text_field}' in any record (fields seen: "
                               f"{', '.join(sorted(map(str, ds.column_names)))}); set --text-field")
            ds = ds.select_columns([text_field])
        yield from ds  # rows as dicts; rows of sets with unknown columns are checked one by one
    except CptError:
        raise
    except Exception as e:
        raise CptError(f"input {spec}: reading stopped after {st.objects} rows: {type(e).__name__}: {_one_line(e)}"
                       " (run again; without --streaming a download is cached and resumes)") from None
