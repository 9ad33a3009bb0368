"""Read raw documents from user files, counting every record that is not used and why.

Formats, chosen by the path:
  * ``.jsonl`` / ``.jsonl.gz``: one JSON object per line; the text lives in ``text_field``.
  * ``.json`` / ``.json.gz``: a JSON array of objects, or JSON lines (as ``datasets``' json loader).
  * ``.parquet``: a column named ``text_field``.
  * ``.txt``: the whole file is ONE document. A folder of ``.txt`` files (books, manuals, web pages)
    is then a corpus with one document per file; splitting on blank lines would cut documents into
    paragraphs and lose the long-range context continual pre-training is meant to teach.
  * a folder written by ``datasets.Dataset.save_to_disk``.
  * any other folder: every supported file below it, in sorted order.

JSON inputs are parsed line by line here (not by ``datasets``) so that one bad line is a counted
skip instead of a failed run. Reasons: ``blank_line``, ``invalid_utf8``, ``invalid_json``,
``not_an_object``, ``missing_field``, ``null_text``, ``not_a_string``, ``empty_text`` (empty or whitespace only).
An input that yields no document at all is an error, never a silent zero.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cpt.errors import CptError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt")


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
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix.lstrip(".").replace(".gz", "")
    raise CptError(
        f"input {path}: unsupported file type; expected one of {', '.join(SUFFIXES)} "
        "or a folder saved with datasets' save_to_disk"
    )


def resolve_inputs(inputs: list[str | Path] | str | Path) -> list[tuple[Path, str]]:
    """Check every input exists and expand plain folders into their supported files, sorted."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise CptError("no inputs given")
    out: list[tuple[Path, str]] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise CptError(f"input {path} does not exist")
        fmt = input_format(path)
        if fmt != "folder":
            out.append((path, fmt))
            continue
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SUFFIXES)
        )
        if not files:
            raise CptError(f"input folder {path} holds no {', '.join(SUFFIXES)} files")
        out.extend((p, input_format(p)) for p in files)
    return out


def iter_documents(
    inputs: list[tuple[Path, str]],
    text_field: str,
    stats: list[InputStats],
    max_documents: int | None = None,
    cache_dir: str | Path | None = None,
    max_per_input: int | None = None,
) -> Iterator[str]:
    """Yield document texts in input order; append one InputStats per input read to ``stats``.

    Stops after ``max_documents`` usable documents in all (inputs not reached are not read) and
    reads at most ``max_per_input`` usable documents of each input (a sample of every corpus). Raises
    CptError for an empty input, an input with no usable document, or a field found in no record.
    """
    remaining = max_documents
    for path, fmt in inputs:
        if remaining is not None and remaining <= 0:
            return
        st = InputStats(str(path), fmt)
        stats.append(st)
        if fmt in ("jsonl", "json"):
            records = _json_records(path, st)
        elif fmt == "txt":
            records = _txt_records(path, st)
        else:
            records = _table_records(path, fmt, text_field, st, cache_dir)
        for record in records:
            text = _text_of(record, text_field, st)
            if text is None:
                continue
            st.documents += 1
            yield text
            if remaining is not None:
                remaining -= 1
                if remaining <= 0:
                    break
            if max_per_input is not None and st.documents >= max_per_input:
                break
        _check_input(st, text_field)


def _check_input(st: InputStats, text_field: str) -> None:
    if st.documents:
        return
    if st.objects and st.skipped.get("missing_field", 0) == st.objects:
        seen = ", ".join(sorted(st.fields_seen)) or "none"
        raise CptError(
            f"input {st.path}: no field '{text_field}' in any record (fields seen: {seen}); set --text-field"
        )
    if not st.skipped:
        raise CptError(f"input {st.path} is empty")
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


def _json_records(path: Path, st: InputStats) -> Iterator[object]:
    """Records of a JSON-lines file (or a JSON array); bad lines are counted and yield _MISSING."""
    try:
        with _open_bytes(path) as f:
            first = _first_non_space(f)
            f.seek(0)
            if first == b"[":  # one JSON array of records
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
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    st.skipped["invalid_utf8"] += 1
                    yield _MISSING
                    continue
                try:
                    yield json.loads(text)
                except json.JSONDecodeError:
                    st.skipped["invalid_json"] += 1
                    yield _MISSING
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip, unreadable file
        raise CptError(f"input {path} cannot be read: {e}") from None


def _first_non_space(f) -> bytes:
    while True:
        c = f.read(1)
        if not c or not c.isspace():
            return c


def _txt_records(path: Path, st: InputStats) -> Iterator[object]:
    data = path.read_bytes()
    if not data:
        return
    try:
        yield {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        st.skipped["invalid_utf8"] += 1


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
        raise CptError(f"input {path} cannot be read as {fmt}: {type(e).__name__}: {e}") from None
    if len(ds) == 0:
        return
    if text_field not in ds.column_names:
        st.objects = len(ds)
        st.skipped["missing_field"] = len(ds)
        st.fields_seen.update(ds.column_names)
        return
    column = ds.select_columns([text_field])
    for batch in column.iter(batch_size=1000):
        for text in batch[text_field]:
            yield {text_field: text}
