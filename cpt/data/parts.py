"""Preparing in parts, and merging them: ``cpt prepare --num-shards N --shard-index I``, ``cpt prepare merge``.

The split rule. The inputs' records, in the order one prepare reads them (inputs in order, records in
file order; a record is a line of JSON lines, an element of a JSON array, a row of a table, of a CSV /
TSV file or of a hub dataset, a whole .txt / .md / .rst file; unusable records too), are cut into n
contiguous ranges, balanced by size: a record's weight is its size as read (the bytes of its line; a
whole file's bytes; for other records 1 + the UTF-8 bytes of the text field: each format's
``record_weights``), and record r goes to part floor(n * C_r / W), C_r the weight of the records before
it and W of all. Parts then differ by less than one record's weight, and part 0, part 1, ... read in
order are the documents of one prepare in order. A file is thus split by record, not only by file.
Every part computes the same ranges from the inputs alone (a pass that reads, and for .gz decompresses,
every input but parses JSON lines not at all), so the parts need not talk to each other; each records
the totals it saw and merge_parts refuses parts that disagree.

A merge copies no token but the few sequences that span two parts: its manifest names the parts' own
shard files, read from an offset.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cpt import __version__
from cpt.data.reader import FORMATS, InputStats, check_input
from cpt.data.source import BYTES_DTYPE, MANIFEST, TokenSource, _read_manifest
from cpt.data.split import SIDES
from cpt.data.writer import save_array, sync, write_json
from cpt.errors import CptError


def _record_weights(path: Path, fmt: str, text_field: str, cache: Path) -> np.ndarray:
    """int64 weight of each record of one input, one per record the reader yields (see the split rule)."""
    return np.fromiter(FORMATS[fmt].record_weights(path, text_field, cache), dtype=np.int64)


def split_records(resolved: list[tuple[Path, str]], text_field: str, cache: Path, index: int, count: int) -> dict:
    """The records of part ``index`` of ``count`` (the split rule above): ``{"lo", "hi"}`` (global record
    indices, ``hi`` excluded), ``records`` (per input), ``records_total`` and ``weight_total``."""
    weights = [_record_weights(path, fmt, text_field, cache) for path, fmt in resolved]
    flat = np.concatenate(weights) if weights else np.zeros(0, dtype=np.int64)
    before = np.concatenate(([0], np.cumsum(flat)))  # C_r for r = 0..R; C_R = W
    total = int(before[-1])
    # record r is in part i where n * C_r >= i * W and < (i + 1) * W: the first record of part i
    lo, hi = (int(np.searchsorted(count * before[:-1], i * total, side="left")) if i < count else len(flat)
              for i in (index, index + 1))
    return {"lo": lo, "hi": hi, "records": [len(w) for w in weights], "records_total": len(flat),
            "weight_total": total}


# What every part must share with the others (else they are not parts of one prepare).
_SAME = ("seq_len", "dtype", "vocab_size", "eos_token_id", "document_prefix", "tokenizer_hash",
         "tokenizer_fingerprint", "text_field", "chunk_chars")
_AGREE = {k: lambda m, k=k: m[k] for k in _SAME} | {
    "shard_sequences": lambda m: m["part"]["shard_sequences"],
    "inputs": lambda m: [(i["path"], i["format"]) for i in m["inputs"]],
    "validation split": lambda m: {k: v for k, v in m.get("split", {}).items() if k != "documents"},
    "records": lambda m: (m["part"]["records_total"], m["part"]["weight_total"]),
    "byte counts": lambda m: (m["token_bytes"]["dtype"], m["token_bytes"]["counted_from"])}


def _read_part(path: Path) -> dict:
    m = _read_manifest(path)
    if "part" not in m:
        raise CptError(f"{path} is not a part (prepared without --num-shards / --shard-index)")
    TokenSource(path)  # its shard files are whole
    tail = m["part"]["tail"]
    for name, itemsize in ((tail["file"], np.dtype(m["dtype"]).itemsize), (tail["bytes_file"], 1)):
        file = path / name
        if not file.is_file() or file.stat().st_size != tail["tokens"] * itemsize:
            raise CptError(f"part {path}: {name} is missing or damaged; prepare this part again")
    return m


def _load_parts(paths: list[Path]) -> list[tuple[Path, dict]]:
    """The parts' manifests in part order, checked to be all n parts of one prepare, each once."""
    loaded = sorted(((p, _read_part(p)) for p in paths), key=lambda pm: pm[1]["part"]["index"])
    first_path, first = loaded[0]
    count = first["part"]["count"]
    indices = [m["part"]["index"] for _, m in loaded]
    if sorted(set(indices)) != indices or len(loaded) != count or any(m["part"]["count"] != count for _, m in loaded):
        given = ", ".join(f"{m['part']['index']}/{m['part']['count']} ({p})" for p, m in loaded)
        raise CptError(f"parts to merge must be shards 0..{count - 1} of {count}, each once; got {given}")
    for path, m in loaded[1:]:
        for key, of in _AGREE.items():
            if of(m) != of(first):
                raise CptError(f"parts differ in {key}: {first_path} has {of(first)!r}, {path} has {of(m)!r}; "
                               "prepare every part with the same inputs, tokenizer and options")
    ranges = [m["part"]["records"] for _, m in loaded]
    if ranges[0][0] != 0 or ranges[-1][1] != first["part"]["records_total"] or any(
            a[1] != b[0] for a, b in itertools.pairwise(ranges)):
        raise CptError(f"parts' record ranges {ranges} do not cover the inputs' {first['part']['records_total']} "
                       "records once, in order: prepare them again with one cpt version")
    return loaded


class _Stream:
    """The parts' tokens in order (each part's shard files, then its tail) as one flat stream."""

    def __init__(self, parts: list[tuple[Path, dict]], seq_len: int):
        self.pieces = []  # (global start, tokens, ids file, bytes file, max id or None)
        at = 0
        self.part_starts = []
        overflow = []
        for path, m in parts:
            self.part_starts.append(at)
            tail = m["part"]["tail"]
            files = [(s["file"], s["bytes_file"], s["sequences"] * seq_len, s.get("max_token_id"))
                     for s in m["shards"]] + [(tail["file"], tail["bytes_file"], tail["tokens"], None)]
            for ids, nbytes, n, max_id in files:
                if n:
                    self.pieces.append((at, n, path / ids, path / nbytes, max_id))
                    at += n
            over = m["token_bytes"].get("overflow")
            if over:
                rows = np.load(path / over)
                overflow.append(rows + np.array([self.part_starts[-1], 0]))
        self.total = at
        self.overflow = np.concatenate(overflow) if overflow else np.zeros((0, 2), dtype=np.int64)
        self.dtype = np.dtype(parts[0][1]["dtype"])

    def read(self, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and int64 byte counts of stream tokens ``g0..g1`` (a few sequences: copied)."""
        ids, nbytes = np.empty(g1 - g0, dtype=self.dtype), np.empty(g1 - g0, dtype=np.int64)
        for start, n, ids_file, bytes_file, _ in self.pieces:
            lo, hi = max(g0, start), min(g1, start + n)
            if lo < hi:
                at = lo - start
                ids[lo - g0:hi - g0] = np.fromfile(ids_file, self.dtype, hi - lo, offset=at * self.dtype.itemsize)
                nbytes[lo - g0:hi - g0] = np.fromfile(bytes_file, BYTES_DTYPE, hi - lo, offset=at)
        inside = (self.overflow[:, 0] >= g0) & (self.overflow[:, 0] < g1)
        nbytes[self.overflow[inside, 0] - g0] = self.overflow[inside, 1]
        return ids, nbytes


def _merged_inputs(loaded: list[tuple[Path, dict]]) -> list[InputStats]:
    """Per-input counts and checks, as one prepare reads them: with all documents read (both sides of a
    split), then counting the kept ones."""
    first = loaded[0][1]
    stats, read = [], []
    for k, (path, fmt) in enumerate(_AGREE["inputs"](first)):
        st = InputStats(path, fmt)
        for _, m in loaded:
            st.documents += m["part"]["inputs"][k].get("documents_read", m["inputs"][k]["documents"])
            st.skipped.update(m["inputs"][k]["skipped"])
            st.objects += m["part"]["inputs"][k]["objects"]
            st.fields_seen |= set(m["part"]["inputs"][k]["fields_seen"])
        check_input(st, first["text_field"])
        read.append(st.documents)
        st.documents = sum(m["inputs"][k]["documents"] for _, m in loaded)
        stats.append(st)
    if not any(read):
        raise CptError(f"all {len(stats)} inputs are empty ({stats[0].path}, ...)" if len(stats) > 1
                       else f"input {stats[0].path} is empty")
    return stats


def _previous_merge(out_dir: Path, overwrite: bool) -> dict | None:
    """The manifest of the merge in ``out_dir`` that this one replaces, if any (made if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / MANIFEST).exists():
        return None
    old = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    if "parts" not in old:
        raise CptError(f"{out_dir} holds a prepared folder that is not a merge; merge into another folder")
    if not overwrite:
        raise CptError(f"{out_dir} holds a merge already; pass overwrite=True (--overwrite) to replace it")
    return old


def _relative(file: Path, out_dir: Path) -> str:
    return os.path.relpath(os.path.abspath(file), os.path.abspath(out_dir))


class _Layout(NamedTuple):
    shards: list[dict]  # the merged folder's shards, in order
    max_id: int  # the largest id in them
    overflow: str | None  # the file of byte counts above 255, if any


def _lay_out(stream: _Stream, out_dir: Path, seq_len: int, n_seq: int) -> _Layout:
    """Write the files of the merged folder. Sequences that lie inside one piece of the stream are read
    there, from an offset; the others (across a boundary between pieces) are copied into the stitch
    file, removed again where there are none."""
    end = n_seq * seq_len
    shards, stitched, next_j, max_id = [], [], 0, -1
    stitch = _stitch_names()
    with open(out_dir / stitch[0], "wb") as f_ids, open(out_dir / stitch[1], "wb") as f_bytes:
        def copy(j0: int, j1: int) -> None:
            ids, nbytes = stream.read(j0 * seq_len, j1 * seq_len)
            shards.append({"file": stitch[0], "sequences": j1 - j0, "bytes_file": stitch[1],
                           "offset": sum(stitched) * seq_len})
            stitched.append(j1 - j0)
            ids.tofile(f_ids)
            np.minimum(nbytes, 255).astype(BYTES_DTYPE).tofile(f_bytes)

        for start, n, ids_file, bytes_file, piece_max in stream.pieces:
            a, b = -(-start // seq_len), min((start + n) // seq_len, n_seq)
            if start < end:  # the largest id written: from the part where all of the piece is written
                whole = start + n <= end and piece_max is not None
                max_id = max(max_id, piece_max if whole else int(stream.read(start, min(start + n, end))[0].max()))
            if b <= a:
                continue
            if a > next_j:
                copy(next_j, a)
            shards.append({"file": _relative(ids_file, out_dir), "sequences": b - a,
                           "bytes_file": _relative(bytes_file, out_dir), "offset": a * seq_len - start})
            next_j = b
        if n_seq > next_j:
            copy(next_j, n_seq)
        for f in (f_ids, f_bytes):
            sync(f)
    if not stitched:
        for name in stitch:
            (out_dir / name).unlink()
    overflow = stream.overflow[stream.overflow[:, 0] < end]
    over_name = _overflow_name() if len(overflow) else None
    if over_name:
        save_array(out_dir / over_name, overflow)
    return _Layout(shards, max_id, over_name)


def _stitch_names() -> tuple[str, str]:
    return f"stitch-{os.getpid()}-tokens.bin", f"stitch-{os.getpid()}-bytes.bin"


def _overflow_name() -> str:
    return f"bytes-overflow-{os.getpid()}.npy"


def _merged_manifest(loaded: list[tuple[Path, dict]], stats: list[InputStats], stream: _Stream, layout: _Layout,
                     n_seq: int, out_dir: Path) -> dict:
    """The manifest one prepare of all inputs writes, whose shards are ``layout``'s."""
    first = loaded[0][1]
    end = n_seq * first["seq_len"]
    dropped_bytes = int(stream.read(end, stream.total)[1].sum())
    all_bytes = sum(m["token_bytes"]["total"] + m["token_bytes"]["dropped_tail"] for _, m in loaded)
    skipped: Counter = Counter()
    for st in stats:
        skipped.update(st.skipped)
    manifest = {k: first[k] for k in ("format", "format_version", *_SAME[:5], "tokenizer", *_SAME[5:])}
    manifest |= {
        "max_token_id": layout.max_id,
        "inputs": [st.to_json() for st in stats],
        "unsupported_files": first.get("unsupported_files", {}),
        "max_documents": None,
        "documents": sum(st.documents for st in stats),
        "skipped": dict(sorted(skipped.items())),
        "tokens": end,
        "tokens_dropped_tail": stream.total - end,
        "sequences": n_seq,
        "shard_sequences": first["part"]["shard_sequences"],
        "shards": layout.shards,
        "token_bytes": {"dtype": BYTES_DTYPE, "total": all_bytes - dropped_bytes, "dropped_tail": dropped_bytes,
                        "overflow": layout.overflow, "counted_from": first["token_bytes"]["counted_from"]},
        "parts": [{"path": _relative(p, out_dir), "records": m["part"]["records"],
                   "tokens": m["tokens"] + m["part"]["tail"]["tokens"]} for p, m in loaded],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpt_version": __version__,
    }
    if "split" in first:  # one side of a validation split: the documents of both sides, all parts
        manifest["split"] = first["split"] | {"documents": {
            k: sum(m["split"]["documents"][k] for _, m in loaded) for k in ("train", "validation")}}
    return manifest


def merge_parts(parts: list[str | Path], out_dir: str | Path, overwrite: bool = False) -> dict:
    """Join the parts ``prepare(part=(i, n))`` wrote into one prepared folder ``out_dir``: the manifest
    one prepare of all inputs writes (same sequences, tokens, byte counts, counts of skipped records),
    whose shards are the parts' own files, named by paths relative to ``out_dir`` and read from an
    offset; no token is copied but the few sequences that span two parts (or two of a part's shard
    files), which go to one small stitch file in ``out_dir``. ``out_dir`` may be the folder that holds
    the parts; keep them beside it. Parts of one side of a validation split merge into that side of
    a single prepare_split (:func:`merge_split_parts` merges both). Returns the manifest."""
    paths = [Path(p) for p in parts]
    if not paths:
        raise CptError("no parts given to merge")
    out_dir = Path(out_dir)
    loaded = _load_parts(paths)
    first = loaded[0][1]
    seq_len = first["seq_len"]
    stream = _Stream(loaded, seq_len)
    n_seq = stream.total // seq_len  # the tokens after n_seq * seq_len are the one tail a single prepare drops
    if n_seq == 0:
        raise CptError(f"{first['part']['count']} parts yield {stream.total} tokens, fewer than one sequence "
                       f"of {seq_len}")
    stats = _merged_inputs(loaded)
    old = _previous_merge(out_dir, overwrite)
    tmp = out_dir / f"{MANIFEST}.tmp-{os.getpid()}"
    try:
        layout = _lay_out(stream, out_dir, seq_len, n_seq)
        manifest = _merged_manifest(loaded, stats, stream, layout, n_seq, out_dir)
        write_json(tmp, manifest)  # last, and renamed: a reader sees the old merge or the new one
        os.replace(tmp, out_dir / MANIFEST)
    except BaseException as e:
        for name in (*_stitch_names(), tmp.name, _overflow_name()):
            (out_dir / name).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CptError(f"cannot write {out_dir}: {e.strerror or e}") from None
        raise
    if old is not None:
        _remove_replaced(out_dir, old, layout)
    return manifest


def _remove_replaced(out_dir: Path, old: dict, layout: _Layout) -> None:
    """Remove the files of the merge this one replaced that this one does not use."""
    ours = {s["file"] for s in layout.shards} | {s["bytes_file"] for s in layout.shards} | {layout.overflow}
    for s in old["shards"]:
        for name in (s["file"], s["bytes_file"]):
            if "/" not in name and name not in ours:
                (out_dir / name).unlink(missing_ok=True)
    over = old["token_bytes"].get("overflow")
    if over and over not in ours:
        (out_dir / over).unlink(missing_ok=True)


def is_split_part(path: str | Path) -> bool:
    """Whether ``path`` is a part prepared with a validation split: PART/train and PART/validation."""
    path = Path(path)
    return not (path / MANIFEST).exists() and all((path / side / MANIFEST).is_file() for side in SIDES)


def merge_split_parts(parts: list[str | Path], out_dir: str | Path, overwrite: bool = False) -> dict[str, dict]:
    """:func:`merge_parts` for parts written by ``prepare_split(..., part=(i, n))``: each side of the n
    parts (``PART/train``, ``PART/validation``) into ``out_dir/train`` and ``out_dir/validation``, the
    folders one prepare_split of all inputs writes. Returns both manifests."""
    paths = [Path(p) for p in parts]
    if not paths:
        raise CptError("no parts given to merge")
    for path in paths:
        if not is_split_part(path):
            raise CptError(f"{path} is not a part prepared with --validation-fraction (no {path / 'train'} and "
                           f"{path / 'validation'} holding a {MANIFEST}); merge parts of one kind")
    return {side: merge_parts([p / side for p in paths], Path(out_dir) / side, overwrite=overwrite)
            for side in SIDES}
