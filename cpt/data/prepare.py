"""Tokenize once into memory-mapped token shards: ``cpt prepare``.

Pipeline: raw files -> documents in pieces (:mod:`cpt.data.reader`, bad records counted; a long
document is cut where its tokens do not change) -> batches of ``_BATCH_CHARS``
characters -> the fast tokenizer, here or in ``num_proc`` worker processes, each batch becoming ONE
numpy array of ids with EOS after the last piece of every document -> streamed in order into
fixed-length sequences written as flat numpy arrays. Memory is bounded by the batch size and
``num_proc``, not by the size of a document or of the corpus; the order of the tokens does not
depend on ``num_proc``.

Layout of the output folder::

    manifest.json        what was read, counted, skipped and written (see MANIFEST_FORMAT)
    tokens-00000.bin     flat array of whole sequences, ``shard_sequences`` per shard (last: fewer)
    bytes-00000.bin      uint8 parallel to it: the UTF-8 bytes of document text each token covers
    tokens-00001.bin     ...
    bytes-overflow.npy   only where a token covers more than 255 bytes: int64 rows (flat token index, bytes)

Byte counts (manifest ``token_bytes``) make losses comparable across tokenizers (bits per byte,
cpt.probes.HeldOutLoss). Every token of a document's text gets the bytes from the end of the token
before it to its own end, so the counts of a document's tokens sum to ``len(text.encode("utf-8"))``
exactly, also where it was tokenized in pieces; the BOS and EOS of the framing get 0. The count of a
token is exact where its text is its own (a character split over several tokens goes to the first of
them, see :func:`offset_bytes`). A piece of text that gives no token at all (a normalizer removed it)
adds no bytes.

Documents are joined as ``[BOS] doc0 EOS [BOS] doc1 EOS ...`` (a BOS where the tokenizer itself adds
one: :func:`document_frame`, recorded in the manifest) and cut every ``seq_len`` tokens, so a
sequence may start inside a document; the tail that does not fill a last sequence is dropped and
counted. The folder is built as ``<out>.tmp-<pid>@<host>``, its manifest written last, and renamed
into place when whole: a killed prepare leaves no output, only a temporary that the next prepare
into the same ``out`` removes.

This module is the pipeline: reading, tokenizing, packing, the manifest. The shard writer and the
renames that put a folder in place are :mod:`cpt.data.writer`, preparing in parts and merging the parts
:mod:`cpt.data.parts`, the rule of a validation split :mod:`cpt.data.split`; merge_parts,
merge_split_parts, is_split_part, split_records and in_validation are imported from here as before.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import os
import shutil
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cpt import __version__
from cpt.data import reader
from cpt.data.formats import utf8_len
from cpt.data.lengths import DocumentPacker, LengthOptions
from cpt.data.parts import (  # noqa: F401  (is_split_part, merge_parts, merge_split_parts, _record_weights: API here)
    _record_weights,
    is_split_part,
    merge_parts,
    merge_split_parts,
    split_records,
)
from cpt.data.reader import InputStats, check_input, iter_pieces, resolve_inputs, split_text
from cpt.data.source import BYTES_DTYPE, BYTES_OVERFLOW, MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION
from cpt.data.split import SIDES, SPLIT_RULE, check_fraction, in_validation, side_of  # noqa: F401  (in_validation: API)
from cpt.data.tokenizer import (
    cuts_keep_tokens,
    document_frame,
    load_tokenizer,
    token_dtype,
    tokenizer_fingerprint,
    tokenizer_hash,
)
from cpt.data.workers import map_ordered
from cpt.data.writer import ShardWriter as _ShardWriter  # tests patch _ShardWriter._write here
from cpt.data.writer import commit, remove_stale, temporary, token_records, write_json
from cpt.errors import CptError

# Documents longer than this many characters are tokenized in pieces (cut as reader.split_text
# says). While it encodes a text the Rust tokenizer holds ~100-140 bytes per character (alignments,
# offsets, token strings): one 25 MB document took 4 GB. A piece of 256K characters costs ~30 MB
# per tokenizer thread, and cuts stay rare enough (one per 256K characters) that a long document
# keeps its whole-text tokens.
_CHUNK_CHARS = 1 << 18
# Characters per tokenizer call: the encodings of a batch (~30 bytes per character) are alive at
# once. 2M characters: ~60 MB, and 8 long pieces or thousands of short documents for its threads.
# Measured on a 30 MiB .txt, 2 cores: peak RSS 425 MB (250 MB of it imports), 6.7 s; with 4M, 498 MB.
_BATCH_CHARS = 1 << 21


def _batches(pieces):
    """Group ``(text, last)`` pieces into ``(texts, firsts, lasts)`` of about ``_BATCH_CHARS`` characters."""
    texts, firsts, lasts, chars, first = [], [], [], 0, True
    for text, last in pieces:
        texts.append(text)
        firsts.append(first)
        lasts.append(last)
        first = last  # the piece after a document's last one starts the next document
        chars += len(text)
        if chars >= _BATCH_CHARS:
            yield texts, firsts, lasts
            texts, firsts, lasts, chars = [], [], [], 0
    if texts:
        yield texts, firsts, lasts


def offset_bytes(text: str, offsets) -> np.ndarray:
    """int64 UTF-8 bytes of ``text`` that each of its tokens covers, from the tokenizer's character
    ``offsets``: token t gets the bytes from the end of token t-1 (the text's start for the first) to
    its own end, and the last token ends at the end of the text. The counts sum to the text's bytes
    whatever the offsets leave out: whitespace trimmed from a token (``trim_offsets``) goes to the next
    one, a prefix space the tokenizer added counts nothing, and of several tokens that share one
    character (byte-level pieces of an emoji, byte-fallback tokens) the first gets all its bytes."""
    if not len(offsets):
        return np.zeros(0, dtype=np.int64)
    ends = np.fromiter((end for _, end in offsets), dtype=np.int64, count=len(offsets))
    ends = np.minimum(np.maximum.accumulate(ends), len(text))
    ends[-1] = len(text)
    if not text.isascii():  # character offset -> byte offset: cumulative UTF-8 length per character
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        width = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
        ends = np.concatenate(([0], np.cumsum(width)))[ends]
    return np.diff(ends, prepend=0)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` reversed: the character a byte-level BPE writes -> the byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}


_NOT_BYTES = 1 << 40  # byte_table's count for an id that is not a byte string: no piece sums to it


def byte_table(backend) -> np.ndarray | None:
    """int64 bytes of text per token id where that is a property of the id: a byte-level BPE (GPT-2,
    Llama 3, Qwen, cpt's own) whose encoding adds and changes nothing (no prefix space, no normalizer),
    checked on sample texts; None otherwise, and then every text's counts come from its offsets.

    The table is the faster way (``encode_batch_fast`` skips offsets; with them and reading them back
    into Python, prepare took ~40% longer on the test corpora) and the more exact: a token's count is its own bytes, also for a
    character split over several tokens. Its sums per piece equal the offsets' (both the text's bytes);
    a piece where the table's do not (a normalizer changed the text) is counted from offsets instead.
    Ids that are not byte strings get a count no piece can match, so pieces holding them do too."""
    from tokenizers import decoders

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    alphabet = _byte_level_alphabet()
    table = np.full(backend.get_vocab_size(with_added_tokens=True), _NOT_BYTES, dtype=np.int64)
    for token, i in backend.get_vocab(with_added_tokens=False).items():
        if all(c in alphabet for c in token):
            table[i] = len(token)
    for i, added in backend.get_added_tokens_decoder().items():  # matched as literal text
        table[i] = len(added.content.encode("utf-8"))
    samples = ["The first line", " leading space and  two", "Öffnen Sie das Menü – Optionen",
               "emoji 🔎︎ and tabs\tand\r\nCRLF", "def f(x):\n    return x\n", "日本語のテキスト"]
    for text in samples:
        ids = backend.encode(text, add_special_tokens=False).ids
        if table[ids].sum() != utf8_len(text):
            return None
    return table


def _encode(backend, frame: tuple[tuple[int, ...], int], dtype: str, table: np.ndarray | None,
            batch) -> tuple[np.ndarray, np.ndarray]:
    """One batch of pieces -> (:func:`token_records`: ids framed per document, prefix before its first
    piece, EOS after its last, with the bytes of text per id, 0 for the framing; where each document that
    ended in it ends: the index after its EOS). Byte
    counts come from ``table`` (:func:`byte_table`) where it gives each piece its exact length, else
    from offsets."""
    texts, firsts, lasts = batch
    prefix, eos = frame[0], (frame[1],)
    if table is None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        counted = [offset_bytes(t, e.offsets) for t, e in zip(texts, encodings, strict=True)]
    else:
        encodings = backend.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: faster
        ids = [e.ids for e in encodings]
    del encodings  # most of the memory (offsets, token strings): keep only the ids
    n = sum(map(len, ids)) + sum(lasts) + len(prefix) * sum(firsts)
    stream = itertools.chain.from_iterable(
        itertools.chain(prefix if first else (), i, eos if last else ())
        for i, first, last in zip(ids, firsts, lasts, strict=True)
    )
    out = np.fromiter(stream, dtype=dtype, count=n)
    # where the text tokens sit in the stream: runs of (prefix, text, eos) per piece
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    runs = np.stack([len(prefix) * np.asarray(firsts, dtype=np.int64), lengths,
                     np.asarray(lasts, dtype=np.int64)], axis=1).reshape(-1)
    is_text = np.repeat(np.tile(np.array([False, True, False]), len(ids)), runs)
    if table is None:
        text_bytes = np.concatenate(counted) if counted else np.zeros(0, dtype=np.int64)
    else:
        text_bytes = table[out[is_text]]
        cum = np.concatenate(([0], np.cumsum(text_bytes)))
        ends = np.cumsum(lengths)
        expected = np.fromiter(map(utf8_len, texts), dtype=np.int64, count=len(texts))
        for k in np.flatnonzero(cum[ends] - cum[ends - lengths] != expected):  # a piece the table misses
            offsets = backend.encode(texts[k], add_special_tokens=False).offsets
            text_bytes[ends[k] - lengths[k]:ends[k]] = offset_bytes(texts[k], offsets)
    records = np.zeros(n, dtype=token_records(dtype))
    records["id"] = out
    records["bytes"][is_text] = text_bytes
    return records, np.cumsum(runs.reshape(-1, 3).sum(axis=1))[np.asarray(lasts, dtype=bool)]


_worker: tuple | None = None  # (backend, frame, dtype, byte table) in a worker process


def _init_worker(tokenizer_json: str, frame: tuple, dtype: str, table: np.ndarray | None) -> None:
    global _worker
    from tokenizers import Tokenizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process, one core
    _worker = (Tokenizer.from_str(tokenizer_json), frame, dtype, table)


def _encode_in_worker(batch) -> tuple[np.ndarray, np.ndarray]:
    return _encode(*_worker, batch)


def _encoded(batches, backend, frame: tuple, dtype: str, table: np.ndarray | None, num_proc: int):
    """``_encode`` of each batch, in order: in this process, or in ``num_proc`` workers."""
    if num_proc == 1:
        for batch in batches:
            yield _encode(backend, frame, dtype, table, batch)
        return
    yield from map_ordered(_encode_in_worker, batches, num_proc, _init_worker, (backend.to_str(), frame, dtype, table))

@dataclass(frozen=True)
class _Options:
    """What one prepare is asked to do beyond its inputs and tokenizer: :func:`prepare`'s arguments."""

    seq_len: int
    text_field: str
    num_proc: int
    shard_sequences: int
    max_documents: int | None
    progress: bool
    part: tuple[int, int] | None
    select: tuple[str, float, int] | None
    lengths: LengthOptions | None = None  # long documents: cpt.data.lengths

    def check(self) -> None:
        """One CptError line for the first option out of range, before anything is read."""
        if self.seq_len < 1:
            raise CptError(f"seq_len must be positive, got {self.seq_len}")
        if self.shard_sequences < 1:
            raise CptError(f"shard_sequences must be positive, got {self.shard_sequences}")
        if self.num_proc < 1:
            raise CptError(f"num_proc must be positive, got {self.num_proc}")
        if self.max_documents is not None and self.max_documents <= 0:
            raise CptError(f"max_documents must be positive, got {self.max_documents}")
        select, part = self.select, self.part
        if self.lengths is not None:
            self.lengths.check(part)
        if select is not None:
            check_fraction(select[1], select[2])
            if select[0] not in ("train", "validation"):
                raise CptError(f"split side must be 'train' or 'validation', got {select[0]!r}")
        if part is not None:
            if not (part[1] >= 1 and 0 <= part[0] < part[1]):
                raise CptError(f"shard index {part[0]} of {part[1]} shards: expected 0..{part[1] - 1} of at least 1")
            if self.max_documents is not None:
                raise CptError("max_documents caps the documents of all inputs together, which one part cannot "
                               "count; prepare parts without it")


@dataclass(frozen=True)
class _Tokenizing:
    """The tokenizer as prepare uses it, loaded and checked before anything is written."""

    name: str | Path  # as given to prepare
    tok: object  # the transformers tokenizer
    hash: str  # tokenizer_hash
    eos_id: int
    dtype: np.dtype  # of the token ids written
    chunk_chars: int | None  # documents longer than this are tokenized in pieces; None: whole
    table: np.ndarray | None  # byte_table: the bytes of each id; None: counted from offsets
    frame: tuple[tuple[int, ...], int]  # document_frame
    eos_given: bool = False  # the separator was named with eos_token (--eos-token), not the tokenizer's eos

    @property
    def backend(self):
        return self.tok.backend_tokenizer

    def separator(self) -> str:
        """One line naming the token that ends each document and why it is that one; the tokenizer's
        other special tokens are the choices --eos-token has (an instruct tokenizer's eos, e.g.
        ``<|im_end|>``, may not be the end of a document the base model was pre-trained with)."""
        tok, eos = self.tok, self.tok.convert_ids_to_tokens(self.eos_id)
        others = [t for t in tok.all_special_tokens if t != eos]
        if self.eos_given:
            own = tok.eos_token
            why = "from --eos-token" + ("" if own == eos else
                                        f" (the tokenizer's eos token is {own!r})" if own is not None
                                        else " (the tokenizer has no eos token)")
        else:
            why = "the tokenizer's eos token" + (
                f"; --eos-token names another (its other special tokens: {_listed(others)})" if others else "")
        return f"document separator: {eos!r} (id {self.eos_id}), {why}"


def _listed(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _tokenizing(tokenizer: str | Path, eos_token: str | None) -> _Tokenizing:
    tok = load_tokenizer(tokenizer)
    eos_id = tok.eos_token_id if eos_token is None else tok.convert_tokens_to_ids(eos_token)
    if eos_token is not None and (eos_id is None or tok.convert_ids_to_tokens(eos_id) != eos_token):
        raise CptError(f"--eos-token {eos_token!r}: not a token of {tokenizer}")
    if eos_id is None:
        raise CptError(f"tokenizer {tokenizer} has no eos token to separate documents with; name one of its "
                       f"tokens with --eos-token (e.g. one of {', '.join(tok.all_special_tokens[:5]) or 'none'})")
    tok_hash = tokenizer_hash(tokenizer)
    backend = tok.backend_tokenizer
    chunk_chars = _CHUNK_CHARS if cuts_keep_tokens(backend) else None
    return _Tokenizing(tokenizer, tok, tok_hash, eos_id, token_dtype(len(tok)), chunk_chars, byte_table(backend),
                       document_frame(backend, eos_id), eos_token is not None)


@dataclass
class _Reading:
    """What reading the inputs gave, filled in while the pieces are consumed."""

    unsupported: Counter  # files of other types in input folders, by extension
    stats: list[InputStats] = field(default_factory=list)
    sides: Counter = field(default_factory=Counter)  # with select: documents per side of the split
    read: list[int] = field(default_factory=list)  # with select or part: documents read per input (both sides)
    split: dict | None = None  # with part: its records (split_records)


def prepare(
    inputs: list[str | Path] | str | Path,
    tokenizer: str | Path,
    out_dir: str | Path,
    seq_len: int,
    text_field: str = "text",
    num_proc: int = 1,
    shard_sequences: int = 65536,
    max_documents: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    eos_token: str | None = None,
    part: tuple[int, int] | None = None,
    select: tuple[str, float, int] | None = None,
    lengths: LengthOptions | None = None,
    _announce: bool = True,  # prepare_split: the separator line for its first side only
) -> dict:
    """Tokenize ``inputs`` with ``tokenizer``, pack into ``seq_len`` sequences, write to ``out_dir``.

    Returns the manifest (also written as ``out_dir/manifest.json``). ``max_documents`` caps the
    usable documents read, over all inputs in order. ``num_proc`` > 1 tokenizes in that many spawned
    worker processes (a script calling this then needs the usual ``if __name__ == "__main__":``);
    1 tokenizes here, on the tokenizer's own threads. An existing ``out_dir`` is replaced only with
    ``overwrite=True``, and only once the new one is whole. A full disk or an unwritable ``out_dir``
    is a one-line CptError; on any failure or Ctrl-C nothing of this run is left behind.

    Each document is framed as the tokenizer frames a text (:func:`document_frame`: a BOS where it adds
    one) and ends with a separator: the tokenizer's eos token, or ``eos_token`` (another of its tokens, in
    place of its eos; required where it has none). With ``progress`` a line on stdout names the separator
    and why it is that one, and the bar names what it tokenizes (the side of a split, the part, the inputs).

    ``part=(i, n)`` prepares only part ``i`` of ``n`` of the inputs' records (:func:`split_records`),
    for n machines or processes, and keeps its tail; :func:`merge_parts` joins the n parts into the
    folder one prepare of all inputs writes.

    ``select=(side, fraction, seed)`` keeps only the documents of one side of a validation split
    (:func:`in_validation`; side ``"train"`` or ``"validation"``): :func:`prepare_split` writes both.
    With ``part`` too, the documents of that side among the part's records.

    ``lengths`` (:class:`cpt.data.lengths.LengthOptions`): drop short documents, upsample long ones, keep
    documents whole in a row; the manifest's ``lengths`` then records the length distribution.
    """
    opts = _Options(seq_len, text_field, num_proc, shard_sequences, max_documents, progress, part, select, lengths)
    opts.check()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CptError(f"output {out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    reading = _Reading(Counter())
    resolved = resolve_inputs(inputs, other=reading.unsupported)
    tk = _tokenizing(tokenizer, eos_token)
    if opts.progress and _announce:
        print(f"cpt prepare: {tk.separator()}", flush=True)  # stdout: stderr is the bar's and an error's
    tmp = temporary(out_dir, "tmp")
    try:
        remove_stale(out_dir)
        tmp.mkdir(parents=True)
        manifest = _write(tmp, resolved, tk, opts, reading)
        write_json(tmp / MANIFEST, manifest)  # last, and on disk before the rename commits the folder
        commit(tmp, out_dir)
        return manifest
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, no permission: one line naming the output
            raise CptError(f"cannot write {out_dir}: {e.strerror or e}") from None
        raise


def _write(tmp: Path, resolved: list[tuple[Path, str]], tk: _Tokenizing, opts: _Options, reading: _Reading) -> dict:
    """Read, tokenize and pack the inputs into the folder ``tmp``; return its manifest, not yet written."""
    cache = tmp / ".cache"  # parquet inputs are converted to Arrow here, and removed with it
    if opts.select is None and opts.part is None:
        pieces = iter_pieces(resolved, opts.text_field, reading.stats, opts.max_documents, cache,
                             chunk_chars=tk.chunk_chars)
    else:
        if opts.part is not None:
            reading.split = split_records(resolved, opts.text_field, cache, *opts.part)
        pieces = _chosen_pieces(resolved, cache, tk.chunk_chars, opts, reading)
    writer = _ShardWriter(tmp, opts.seq_len, opts.shard_sequences, tk.dtype)
    packer = None if opts.lengths is None else DocumentPacker(writer, opts.lengths, tmp)
    documents = _pack(pieces, packer or writer, tk, opts, _label(resolved, opts))
    lengths = None if packer is None else packer.finish()
    kept = writer.keep_tail() if opts.part is not None else None
    tail = writer.close()
    shutil.rmtree(cache, ignore_errors=True)
    if sum(s["sequences"] for s in writer.shards) == 0 and opts.part is None:
        select, sides = opts.select, reading.sides
        which = "" if select is None else (
            f"the {select[0]} split ({sides[select[0]]} of {sum(sides.values())} documents at "
            f"validation fraction {select[1]}) of ")
        raise CptError(
            f"{which}{_describe(resolved)} yields {tail} tokens, fewer than one sequence of {opts.seq_len}"
        )
    manifest = _manifest(tk, opts, reading, writer, documents, tail, kept)
    return manifest if lengths is None else {**manifest, "lengths": lengths}


def _label(resolved: list[tuple[Path, str]], opts: _Options) -> str:
    """What the progress bar says it tokenizes: ``tokenizing validation, part 2/4 (en.jsonl, +2 more)``."""
    names = [p.name if isinstance(p, Path) else str(p) for p, _ in resolved]
    which = [*([opts.select[0]] if opts.select else []),
             *([f"part {opts.part[0] + 1}/{opts.part[1]}"] if opts.part else [])]
    inputs = names[0] + (f", +{len(names) - 1} more" if len(names) > 1 else "")
    return f"tokenizing {', '.join(which)} ({inputs})" if which else f"tokenizing {inputs}"


def _pack(pieces, writer: _ShardWriter, tk: _Tokenizing, opts: _Options, label: str = "tokenizing") -> int:
    """Tokenize the pieces, in this process or in ``num_proc`` workers, into ``writer``; return the
    number of documents ended. ``label``: the progress bar's (:func:`_label`)."""
    from tqdm import tqdm

    documents = 0
    encoded = _encoded(_batches(pieces), tk.backend, tk.frame, tk.dtype.name, tk.table, opts.num_proc)
    with contextlib.closing(encoded):
        # the first batch before the bar: an input that cannot be read at all (a hub set not cached, a
        # missing column) is then the only line on stderr
        first = list(itertools.islice(encoded, 1))
        with tqdm(desc=label, unit=" tokens", unit_scale=True, disable=not opts.progress) as bar:
            for tokens, ends in itertools.chain(first, encoded):
                writer.add(tokens, ends)
                documents += len(ends)
                bar.update(len(tokens))
    return documents


def _manifest(tk: _Tokenizing, opts: _Options, reading: _Reading, writer: _ShardWriter, documents: int,
              tail: int, kept: dict | None) -> dict:
    """What was read, counted, skipped and written (MANIFEST_FORMAT), and for a part or a side of a
    split where it lies among all the inputs' documents."""
    sequences = sum(s["sequences"] for s in writer.shards)
    skipped: Counter = Counter()
    for st in reading.stats:
        skipped.update(st.skipped)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "seq_len": opts.seq_len,
        "dtype": tk.dtype.name,
        "vocab_size": len(tk.tok),
        "max_token_id": writer.max_id,
        "eos_token_id": int(tk.eos_id),
        "document_prefix": list(tk.frame[0]),  # what the tokenizer puts before a text (BOS), then EOS
        "tokenizer": str(Path(tk.name).resolve()) if Path(tk.name).exists() else str(tk.name),
        "tokenizer_hash": tk.hash,
        "tokenizer_fingerprint": tokenizer_fingerprint(tk.tok),
        "text_field": opts.text_field,
        "chunk_chars": tk.chunk_chars,
        "inputs": [st.to_json() for st in reading.stats],
        "unsupported_files": dict(sorted(reading.unsupported.items())),  # in input folders, skipped, by extension
        "max_documents": opts.max_documents,
        "documents": documents,
        "skipped": dict(sorted(skipped.items())),
        "tokens": sequences * opts.seq_len,
        "tokens_dropped_tail": tail,
        "sequences": sequences,
        "shard_sequences": opts.shard_sequences,
        "shards": writer.shards,
        # UTF-8 bytes of document text per token (module docstring); absent in older folders
        "token_bytes": {"dtype": BYTES_DTYPE, "total": writer.bytes,
                        "dropped_tail": int(writer.carry["bytes"].sum(dtype=np.int64)),
                        "overflow": BYTES_OVERFLOW if writer.overflow else None,
                        "counted_from": "offsets" if tk.table is None else "byte-level vocabulary"},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpt_version": __version__,
    }
    if opts.part is not None:  # what merge_parts needs: where this part lies, its tail, per-input counts
        split, part = reading.split, opts.part
        manifest["part"] = {
            "index": part[0], "count": part[1], "records": [split["lo"], split["hi"]],
            "records_total": split["records_total"], "weight_total": split["weight_total"],
            "shard_sequences": opts.shard_sequences, "tail": kept,
            "inputs": [{"records": n, "objects": st.objects, "fields_seen": sorted(st.fields_seen),
                        "documents_read": r} for n, st, r in zip(split["records"], reading.stats, reading.read,
                                                                 strict=True)],
        }
    if opts.select is not None:  # which side this is, and how the inputs' documents were divided
        select, sides = opts.select, reading.sides
        manifest["split"] = {"side": select[0], "validation_fraction": select[1], "seed": select[2],
                             "rule": SPLIT_RULE, "documents": {k: sides[k] for k in ("train", "validation")}}
    return manifest


def _chosen_pieces(resolved, cache: Path, chunk_chars: int | None, opts: _Options, reading: _Reading):
    """reader.iter_pieces for the records ``split["lo"]..split["hi"]`` only (:func:`split_records`, with
    ``part``; None: all) and, with ``select``, the documents of side ``select[0]`` only. Each InputStats
    counts the documents kept; ``reading.read`` gets the documents read per input and ``reading.sides``
    counts both sides. Without ``split`` the inputs are checked here (with all their documents); a part's
    checks wait for merge_parts, which sees every record. ``max_documents`` caps the documents read (both
    sides), so both sides come from the same first documents."""
    split, select, text_field = reading.split, opts.select, opts.text_field
    stats, read = reading.stats, reading.read
    remaining = opts.max_documents
    start = 0
    for k, (path, fmt) in enumerate(resolved):
        if remaining is not None and remaining <= 0:
            break
        st = InputStats(str(path), fmt)
        stats.append(st)
        if split is None:
            documents = reader.FORMATS[fmt].documents(path, text_field, st, cache, chunk_chars)
        else:
            n = split["records"][k]
            a, b = max(split["lo"] - start, 0), min(split["hi"] - start, n)
            start += n
            documents = reader.FORMATS[fmt].documents_in(path, text_field, st, cache, chunk_chars, a, b) if a < b else ()
        kept = 0
        for blocks in documents:
            st.documents += 1
            if select is not None:
                here = side_of(path, fmt, blocks, select[1], select[2])
                reading.sides[here] += 1
            if select is None or here == select[0]:
                kept += 1
                yield from split_text(blocks, chunk_chars)
            if remaining is not None:
                remaining -= 1
                if remaining <= 0:
                    break
        if split is None:
            check_input(st, text_field)
        read.append(st.documents)
        st.documents = kept
    if split is None and stats and not sum(read):
        raise CptError(f"input {stats[0].path} is empty" if len(stats) == 1
                       else f"all {len(stats)} inputs are empty ({stats[0].path}, ...)")


def prepare_split(inputs, tokenizer, out_dir: str | Path, seq_len: int, validation_fraction: float,
                  split_seed: int = 0, overwrite: bool = False, **kwargs) -> dict[str, dict]:
    """:func:`prepare` twice, into ``out_dir/train`` and ``out_dir/validation``: each document of the
    inputs goes to exactly one of them (SPLIT_RULE, about ``validation_fraction`` of them to validation).
    Each pass reads and hashes all inputs but tokenizes only its own documents. Returns both manifests.

    With ``part=(i, n)`` each side is that part of the side (the split is a property of each document's
    text, so a part can tell the sides apart alone): :func:`merge_split_parts` joins the n parts into
    the two folders one prepare_split writes."""
    check_fraction(validation_fraction, split_seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CptError(f"output {out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    return {side: prepare(inputs, tokenizer, out_dir / side, seq_len, overwrite=overwrite,
                          select=(side, float(validation_fraction), split_seed), **kwargs,
                          _announce=side == SIDES[0])  # the separator line once, before the first side's bar
            for side in SIDES}


def _describe(resolved: list[tuple[Path, str]]) -> str:
    if len(resolved) == 1:
        return f"input {resolved[0][0]}"
    return f"{len(resolved)} inputs ({resolved[0][0]}, ...)"
