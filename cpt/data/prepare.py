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
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from cpt import __version__
from cpt.data import reader
from cpt.data.reader import InputStats, iter_pieces, resolve_inputs
from cpt.data.source import (
    BYTES_DTYPE,
    BYTES_OVERFLOW,
    BYTES_PATTERN,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    SHARD_PATTERN,
    TokenSource,
    _read_manifest,
)
from cpt.data.tokenizer import load_tokenizer, tokenizer_fingerprint, tokenizer_hash
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


# A part (``prepare(part=(i, n))``) keeps its tail, the tokens after its last whole sequence, here:
# in the documents' order they continue in the next part's first sequence (merge_parts).
TAIL_TOKENS = "tail-tokens.bin"
TAIL_BYTES = "tail-bytes.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


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


def document_frame(backend, eos_id: int) -> tuple[tuple[int, ...], int]:
    """How a document is framed in the shards: ``(prefix, eos)``, where ``prefix`` is what the tokenizer
    itself puts before a text (Llama, Mistral and Gemma tokenizers a BOS; byte-level BPEs like GPT-2's,
    Qwen's or cpt's nothing), so the model sees documents as in its pre-training; EOS ends each."""
    plain = backend.encode("frame", add_special_tokens=False).ids
    full = backend.encode("frame", add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return tuple(full[:at]), eos_id


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


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
        if table[ids].sum() != _utf8_len(text):
            return None
    return table


def token_records(dtype: str | np.dtype) -> np.dtype:
    """One packed token as prepare streams it: its id and the bytes of text it covers."""
    return np.dtype([("id", dtype), ("bytes", np.uint32)])


def _encode(backend, frame: tuple[tuple[int, ...], int], dtype: str, table: np.ndarray | None,
            batch) -> tuple[np.ndarray, int]:
    """One batch of pieces -> (:func:`token_records`: ids framed per document, prefix before its first
    piece, EOS after its last, with the bytes of text per id, 0 for the framing; documents ended). Byte
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
        expected = np.fromiter(map(_utf8_len, texts), dtype=np.int64, count=len(texts))
        for k in np.flatnonzero(cum[ends] - cum[ends - lengths] != expected):  # a piece the table misses
            offsets = backend.encode(texts[k], add_special_tokens=False).offsets
            text_bytes[ends[k] - lengths[k]:ends[k]] = offset_bytes(texts[k], offsets)
    records = np.zeros(n, dtype=token_records(dtype))
    records["id"] = out
    records["bytes"][is_text] = text_bytes
    return records, sum(lasts)


_worker: tuple | None = None  # (backend, frame, dtype, byte table) in a worker process


def _init_worker(tokenizer_json: str, frame: tuple, dtype: str, table: np.ndarray | None) -> None:
    global _worker
    from tokenizers import Tokenizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process, one core
    _worker = (Tokenizer.from_str(tokenizer_json), frame, dtype, table)


def _encode_in_worker(batch) -> tuple[np.ndarray, int]:
    return _encode(*_worker, batch)


def _encoded(batches, backend, frame: tuple, dtype: str, table: np.ndarray | None, num_proc: int):
    """``_encode`` of each batch, in order: in this process, or in ``num_proc`` workers."""
    if num_proc == 1:
        for batch in batches:
            yield _encode(backend, frame, dtype, table, batch)
        return
    # spawn, not fork: the parent may hold threads (the tokenizer's, torch's) that fork would break
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc, _init_worker, (backend.to_str(), frame, dtype, table)) as pool:  # exit: terminate
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) > 2 * num_proc:  # reading runs ahead of the workers by a few batches only
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _cuts_keep_tokens(backend) -> bool:
    """Whether cutting a text as reader.split_text does leaves its tokens as they were: true of
    byte-level BPE; false where every text gets a prefix space (SentencePiece-style Metaspace), which
    would add a space at each cut, so such tokenizers get whole documents."""

    def ids(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    cuts = [("The first line", "\n    indented(x) = 1\n"), ("ends with a dot.\n", "Next line"),
            ("Between", " words")]
    return all(ids(a + b) == ids(a) + ids(b) for a, b in cuts)


class _ShardWriter:
    """Packs a stream of :func:`token_records` into ``seq_len`` sequences and writes ``shard_sequences``
    per pair of files: the ids, and their byte counts as uint8 (counts above 255 also go to ``overflow``)."""

    def __init__(self, out_dir: Path, seq_len: int, shard_sequences: int, dtype: np.dtype):
        self.out_dir, self.seq_len, self.shard_sequences, self.dtype = (
            out_dir,
            seq_len,
            shard_sequences,
            dtype,
        )
        self.carry = np.empty(0, dtype=token_records(dtype))  # < seq_len tokens waiting for the next batch
        self.shards: list[dict] = []
        self.files: tuple | None = None  # (ids, bytes) of the open shard
        self.max_id = -1  # the largest id written, for checks against a model's embedding size
        self.written = 0  # tokens written
        self.bytes = 0  # bytes of text the written tokens cover
        self.overflow: list[np.ndarray] = []  # [k, 2] (flat token index, bytes) for counts > 255

    def add(self, tokens: np.ndarray) -> None:
        """Append token records; write every completed sequence."""
        if len(self.carry):
            need = self.seq_len - len(self.carry)
            if len(tokens) < need:
                self.carry = np.concatenate([self.carry, tokens])
                return
            self._write(np.concatenate([self.carry, tokens[:need]]).reshape(1, self.seq_len))
            tokens = tokens[need:]
        n_seq = len(tokens) // self.seq_len
        self._write(tokens[: n_seq * self.seq_len].reshape(n_seq, self.seq_len))
        self.carry = tokens[n_seq * self.seq_len :].copy()

    def _write(self, seqs: np.ndarray) -> None:
        while len(seqs):
            if self.files is None or self.shards[-1]["sequences"] == self.shard_sequences:
                self._next_shard()
            room = self.shard_sequences - self.shards[-1]["sequences"]
            part, seqs = seqs[:room], seqs[room:]
            ids, nbytes = np.ascontiguousarray(part["id"]), part["bytes"].reshape(-1)
            ids.tofile(self.files[0])
            np.minimum(nbytes, 255).astype(BYTES_DTYPE).tofile(self.files[1])
            big = np.flatnonzero(nbytes > 255)
            if len(big):
                self.overflow.append(np.stack([self.written + big, nbytes[big].astype(np.int64)], axis=1))
            self.shards[-1]["sequences"] += len(part)
            self.shards[-1]["max_token_id"] = max(self.shards[-1]["max_token_id"], int(ids.max()))
            self.max_id = max(self.max_id, int(ids.max()))
            self.written += ids.size
            self.bytes += int(nbytes.sum(dtype=np.int64))

    def _next_shard(self) -> None:
        self._close_file()
        name, bytes_name = SHARD_PATTERN.format(len(self.shards)), BYTES_PATTERN.format(len(self.shards))
        self.files = (open(self.out_dir / name, "wb"), open(self.out_dir / bytes_name, "wb"))
        self.shards.append({"file": name, "sequences": 0, "bytes_file": bytes_name, "max_token_id": -1})

    def _close_file(self) -> None:
        for f in self.files or ():
            f.flush()
            os.fsync(f.fileno())  # on disk before the folder is renamed into place
            f.close()
        self.files = None

    def keep_tail(self) -> dict:
        """Write the tail (< seq_len tokens) to ``TAIL_TOKENS`` / ``TAIL_BYTES`` instead of dropping it: a
        part's tail continues in the next part (:func:`merge_parts`). Its counts above 255 go to the
        overflow like any other, indexed as if the tail followed the last sequence."""
        ids, nbytes = np.ascontiguousarray(self.carry["id"]), self.carry["bytes"]
        for name, data in ((TAIL_TOKENS, ids), (TAIL_BYTES, np.minimum(nbytes, 255).astype(BYTES_DTYPE))):
            with open(self.out_dir / name, "wb") as f:
                data.tofile(f)
                f.flush()
                os.fsync(f.fileno())
        big = np.flatnonzero(nbytes > 255)
        if len(big):
            self.overflow.append(np.stack([self.written + big, nbytes[big].astype(np.int64)], axis=1))
        return {"tokens": len(ids), "file": TAIL_TOKENS, "bytes_file": TAIL_BYTES}

    def close(self) -> int:
        """Close the last shard and write the overflow file (if any count exceeded 255); return the
        number of tail tokens dropped."""
        self._close_file()
        if self.overflow:
            with open(self.out_dir / BYTES_OVERFLOW, "wb") as f:
                np.save(f, np.concatenate(self.overflow))
                f.flush()
                os.fsync(f.fileno())
        return len(self.carry)


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
) -> dict:
    """Tokenize ``inputs`` with ``tokenizer``, pack into ``seq_len`` sequences, write to ``out_dir``.

    Returns the manifest (also written as ``out_dir/manifest.json``). ``max_documents`` caps the
    usable documents read, over all inputs in order. ``num_proc`` > 1 tokenizes in that many spawned
    worker processes (a script calling this then needs the usual ``if __name__ == "__main__":``);
    1 tokenizes here, on the tokenizer's own threads. An existing ``out_dir`` is replaced only with
    ``overwrite=True``, and only once the new one is whole. A full disk or an unwritable ``out_dir``
    is a one-line CptError; on any failure or Ctrl-C nothing of this run is left behind.

    Each document is framed as the tokenizer frames a text (:func:`document_frame`: a BOS where it adds
    one) and ends with EOS; ``eos_token`` names the separator for a tokenizer that has no eos token.

    ``part=(i, n)`` prepares only part ``i`` of ``n`` of the inputs' records (:func:`split_records`),
    for n machines or processes, and keeps its tail; :func:`merge_parts` joins the n parts into the
    folder one prepare of all inputs writes.

    ``select=(side, fraction, seed)`` keeps only the documents of one side of a validation split
    (:func:`in_validation`; side ``"train"`` or ``"validation"``): :func:`prepare_split` writes both.
    With ``part`` too, the documents of that side among the part's records.
    """
    from tqdm import tqdm

    if seq_len < 1:
        raise CptError(f"seq_len must be positive, got {seq_len}")
    if shard_sequences < 1:
        raise CptError(f"shard_sequences must be positive, got {shard_sequences}")
    if num_proc < 1:
        raise CptError(f"num_proc must be positive, got {num_proc}")
    if max_documents is not None and max_documents <= 0:
        raise CptError(f"max_documents must be positive, got {max_documents}")
    if select is not None:
        _check_fraction(select[1], select[2])
        if select[0] not in ("train", "validation"):
            raise CptError(f"split side must be 'train' or 'validation', got {select[0]!r}")
    if part is not None:
        if not (part[1] >= 1 and 0 <= part[0] < part[1]):
            raise CptError(f"shard index {part[0]} of {part[1]} shards: expected 0..{part[1] - 1} of at least 1")
        if max_documents is not None:
            raise CptError("max_documents caps the documents of all inputs together, which one part cannot "
                           "count; prepare parts without it")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CptError(f"output {out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    unsupported: Counter = Counter()  # files of other types in input folders, by extension
    resolved = resolve_inputs(inputs, other=unsupported)
    tok = load_tokenizer(tokenizer)
    eos_id = tok.eos_token_id if eos_token is None else tok.convert_tokens_to_ids(eos_token)
    if eos_token is not None and (eos_id is None or tok.convert_ids_to_tokens(eos_id) != eos_token):
        raise CptError(f"--eos-token {eos_token!r}: not a token of {tokenizer}")
    if eos_id is None:
        raise CptError(f"tokenizer {tokenizer} has no eos token to separate documents with; name one of its "
                       f"tokens with --eos-token (e.g. one of {', '.join(tok.all_special_tokens[:5]) or 'none'})")
    tok_hash = tokenizer_hash(tokenizer)
    vocab_size = len(tok)
    dtype = token_dtype(vocab_size)
    backend = tok.backend_tokenizer
    chunk_chars = _CHUNK_CHARS if _cuts_keep_tokens(backend) else None
    table = byte_table(backend)

    tmp = _temporary(out_dir, "tmp")
    try:
        _remove_stale(out_dir)
        tmp.mkdir(parents=True)
        cache = tmp / ".cache"  # parquet inputs are converted to Arrow here, and removed with it
        stats: list[InputStats] = []
        sides: Counter = Counter()  # with select: documents per side of the split
        read: list[int] = []  # with select or part: documents read per input (both sides)
        if select is None and part is None:
            pieces = iter_pieces(resolved, text_field, stats, max_documents, cache, chunk_chars=chunk_chars)
        else:
            split = None if part is None else split_records(resolved, text_field, cache, *part)
            pieces = _chosen_pieces(resolved, text_field, stats, cache, chunk_chars, max_documents, split, select,
                                    sides, read)
        writer = _ShardWriter(tmp, seq_len, shard_sequences, dtype)
        documents = 0
        frame = document_frame(backend, eos_id)
        encoded = _encoded(_batches(pieces), backend, frame, dtype.name, table, num_proc)
        with contextlib.closing(encoded):
            # the first batch before the bar: an input that cannot be read at all (a hub set not cached, a
            # missing column) is then the only line on stderr
            first = list(itertools.islice(encoded, 1))
            with tqdm(desc="tokenizing", unit=" tokens", unit_scale=True, disable=not progress) as bar:
                for tokens, ended in itertools.chain(first, encoded):
                    writer.add(tokens)
                    documents += ended
                    bar.update(len(tokens))
        kept = writer.keep_tail() if part is not None else None
        tail = writer.close()
        shutil.rmtree(cache, ignore_errors=True)

        sequences = sum(s["sequences"] for s in writer.shards)
        tokens = sequences * seq_len
        if sequences == 0 and part is None:
            which = "" if select is None else (
                f"the {select[0]} split ({sides[select[0]]} of {sum(sides.values())} documents at "
                f"validation fraction {select[1]}) of ")
            raise CptError(
                f"{which}{_describe(resolved)} yields {tail} tokens, fewer than one sequence of {seq_len}"
            )
        skipped: Counter = Counter()
        for st in stats:
            skipped.update(st.skipped)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "seq_len": seq_len,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "max_token_id": writer.max_id,
            "eos_token_id": int(eos_id),
            "document_prefix": list(frame[0]),  # what the tokenizer puts before a text (BOS), then EOS
            "tokenizer": str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else str(tokenizer),
            "tokenizer_hash": tok_hash,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "text_field": text_field,
            "chunk_chars": chunk_chars,
            "inputs": [st.to_json() for st in stats],
            "unsupported_files": dict(sorted(unsupported.items())),  # in input folders, skipped, by extension
            "max_documents": max_documents,
            "documents": documents,
            "skipped": dict(sorted(skipped.items())),
            "tokens": tokens,
            "tokens_dropped_tail": tail,
            "sequences": sequences,
            "shard_sequences": shard_sequences,
            "shards": writer.shards,
            # UTF-8 bytes of document text per token (module docstring); absent in older folders
            "token_bytes": {"dtype": BYTES_DTYPE, "total": writer.bytes,
                            "dropped_tail": int(writer.carry["bytes"].sum(dtype=np.int64)),
                            "overflow": BYTES_OVERFLOW if writer.overflow else None,
                            "counted_from": "offsets" if table is None else "byte-level vocabulary"},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cpt_version": __version__,
        }
        if part is not None:  # what merge_parts needs: where this part lies, its tail, per-input counts
            manifest["part"] = {
                "index": part[0], "count": part[1], "records": [split["lo"], split["hi"]],
                "records_total": split["records_total"], "weight_total": split["weight_total"],
                "shard_sequences": shard_sequences, "tail": kept,
                "inputs": [{"records": n, "objects": st.objects, "fields_seen": sorted(st.fields_seen),
                            "documents_read": r} for n, st, r in zip(split["records"], stats, read, strict=True)],
            }
        if select is not None:  # which side this is, and how the inputs' documents were divided
            manifest["split"] = {"side": select[0], "validation_fraction": select[1], "seed": select[2],
                                 "rule": SPLIT_RULE, "documents": {k: sides[k] for k in ("train", "validation")}}
        with open(tmp / MANIFEST, "w") as f:  # last, and on disk before the rename commits the folder
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, out_dir)
        return manifest
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, no permission: one line naming the output
            raise CptError(f"cannot write {out_dir}: {e.strerror or e}") from None
        raise


# ---------------------------------------------------------------- a validation split, by document
#
# A document goes to validation iff blake2b-64 of its UTF-8 text (keyed by the seed), read as a fraction
# of 2**64, is below the validation fraction: a property of the text alone, so the split does not
# depend on the inputs' order, num_proc or the cuts of long documents, and identical documents (exact
# duplicates, also across inputs and formats) always land on the same side, never on both.
SPLIT_RULE = "validation iff blake2b(utf8(text), digest_size=8, key=str(seed)) / 2**64 < validation_fraction"
SIDES = ("validation", "train")  # the small side first: it is the one that fails for too few tokens


def _check_fraction(fraction, seed) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0 < fraction < 0.5):
        raise CptError(f"validation fraction must be a number with 0 < F < 0.5, got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 10**60:
        raise CptError(f"split seed must be a non-negative integer, got {seed!r}")


def _split_hash(seed: int):
    return hashlib.blake2b(digest_size=8, key=str(seed).encode())


def in_validation(text: str, fraction: float, seed: int = 0) -> bool:
    """Whether a document goes to the validation side of a split (SPLIT_RULE)."""
    h = _split_hash(seed)
    h.update(text.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "big") < math.ceil(fraction * 2**64)


def _side_of(path: Path, fmt: str, blocks, fraction: float, seed: int) -> str:
    """The side of one document as reader._documents gives it: a .txt (.md, .rst) file is hashed from its
    bytes (its UTF-8 text, checked, with newlines as in the file) without holding it, others from the text."""
    if fmt not in reader.WHOLE_FILE:
        return "validation" if in_validation("".join(blocks), fraction, seed) else "train"
    h = _split_hash(seed)
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError as e:
        raise CptError(f"input {path} cannot be read: {e}") from None
    return "validation" if int.from_bytes(h.digest(), "big") < math.ceil(fraction * 2**64) else "train"


def _chosen_pieces(resolved, text_field: str, stats: list[InputStats], cache: Path, chunk_chars: int | None,
                   max_documents: int | None, split: dict | None, select: tuple[str, float, int] | None,
                   sides: Counter, read: list[int]):
    """reader.iter_pieces for the records ``split["lo"]..split["hi"]`` only (:func:`split_records`; None:
    all) and, with ``select``, the documents of side ``select[0]`` only. Each InputStats counts the
    documents kept; ``read`` gets the documents read per input and ``sides`` counts both sides. Without
    ``split`` the inputs are checked here (with all their documents); a part's checks wait for
    merge_parts, which sees every record. ``max_documents`` caps the documents read (both sides), so
    both sides come from the same first documents."""
    remaining = max_documents
    start = 0
    for k, (path, fmt) in enumerate(resolved):
        if remaining is not None and remaining <= 0:
            break
        st = InputStats(str(path), fmt)
        stats.append(st)
        if split is None:
            documents = reader._documents(path, fmt, text_field, st, cache, chunk_chars)
        else:
            n = split["records"][k]
            a, b = max(split["lo"] - start, 0), min(split["hi"] - start, n)
            start += n
            documents = _documents_in(path, fmt, text_field, st, cache, chunk_chars, a, b) if a < b else ()
        kept = 0
        for blocks in documents:
            st.documents += 1
            if select is not None:
                here = _side_of(path, fmt, blocks, select[1], select[2])
                sides[here] += 1
            if select is None or here == select[0]:
                kept += 1
                yield from reader.split_text(blocks, chunk_chars)
            if remaining is not None:
                remaining -= 1
                if remaining <= 0:
                    break
        if split is None:
            reader._check_input(st, text_field)
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
    _check_fraction(validation_fraction, split_seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CptError(f"output {out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    return {side: prepare(inputs, tokenizer, out_dir / side, seq_len, overwrite=overwrite,
                          select=(side, float(validation_fraction), split_seed), **kwargs)
            for side in SIDES}


def _temporary(out_dir: Path, kind: str) -> Path:
    """``<out>.<kind>-<pid>@<host>``: a later prepare can tell it is ours and whether it was left."""
    return out_dir.with_name(f"{out_dir.name}.{kind}-{os.getpid()}@{socket.gethostname()}")


def _remove_stale(out_dir: Path) -> None:
    """Remove what killed prepares into ``out_dir`` left: temporaries whose process on this host is
    gone, and ``<out>.tmp``, the name earlier versions used. A prepare still running keeps its own."""
    if not out_dir.parent.is_dir():
        return
    ours = re.compile(re.escape(out_dir.name) + r"\.(?:tmp|old)-(\d+)@(.+)")
    host = socket.gethostname()
    for path in out_dir.parent.iterdir():
        m = ours.fullmatch(path.name)
        if path.name == out_dir.name + ".tmp" or (m and m[2] == host and not _alive(int(m[1]))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _commit(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder in place by renames: readers see the old output or the new, whole."""
    old = _temporary(out_dir, "old") if out_dir.exists() else None
    if old is not None:
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def _describe(resolved: list[tuple[Path, str]]) -> str:
    if len(resolved) == 1:
        return f"input {resolved[0][0]}"
    return f"{len(resolved)} inputs ({resolved[0][0]}, ...)"


# ---------------------------------------------------------------- preparing in parts, and merging them
#
# The split rule. The inputs' records, in the order one prepare reads them (inputs in order, records in
# file order; a record is a line of JSON lines, an element of a JSON array, a row of a table, of a CSV /
# TSV file or of a hub dataset, a whole .txt / .md / .rst file; unusable records too), are cut into n
# contiguous ranges, balanced by size: a record's weight is its size as read (the bytes of its line; a
# whole file's bytes; for other records 1 + the UTF-8 bytes of the text field), and record r goes to part
# floor(n * C_r / W), C_r the weight of the records before it and W of all. Parts then differ by less than one record's weight, and
# part 0, part 1, ... read in order are the documents of one prepare in order. A file is thus split by
# record, not only by file. Every part computes the same ranges from the inputs alone (a pass that
# reads, and for .gz decompresses, every input but parses JSON lines not at all), so the parts need
# not talk to each other; each records the totals it saw and merge_parts refuses parts that disagree.


def _record_weights(path: Path, fmt: str, text_field: str, cache: Path) -> np.ndarray:
    """int64 weight of each record of one input, one per record the reader yields (see the split rule)."""
    if fmt in reader.WHOLE_FILE:
        return np.array([max(1, path.stat().st_size)], dtype=np.int64)
    if fmt in ("jsonl", "json"):
        try:
            with reader._open_bytes(path) as f:
                if not (fmt == "json" and reader._is_array(f)):
                    return np.fromiter((max(1, len(line)) for line in f), dtype=np.int64)
        except (OSError, EOFError, zlib.error) as e:
            raise CptError(f"input {path} cannot be read: {e}") from None
    records = reader._records(path, fmt, text_field, scratch := InputStats(str(path), fmt), cache)
    weights = np.fromiter((1 + (_utf8_len(r[text_field]) if isinstance(r, dict) and isinstance(r.get(text_field), str)
                                else 0) for r in records), dtype=np.int64)
    if not len(weights) and scratch.objects:  # a table without the text column: every row is one record
        return np.ones(scratch.objects, dtype=np.int64)
    return weights


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


def _documents_in(path: Path, fmt: str, text_field: str, st: InputStats, cache: Path,
                  chunk_chars: int | None, a: int, b: int):
    """The usable documents among records ``a..b`` of one input (reader._documents for a range)."""
    if fmt in reader.WHOLE_FILE:  # one record: a == 0, b == 1
        blocks = reader._txt_blocks(path, st, chunk_chars)
        if blocks is not None:
            yield blocks
        return
    # the reader counts a bad line just before it yields it: what it counted since the last record
    # is this record's
    scratch = InputStats(str(path), fmt)
    records = reader._records(path, fmt, text_field, scratch, cache)
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
                text = reader._text_of(record, text_field, st)
                if text is not None:
                    yield (text,)
    if fmt not in ("jsonl", "json") and scratch.objects and not st.objects:  # no text column at all
        st.objects, st.skipped["missing_field"] = b - a, b - a
        st.fields_seen |= scratch.fields_seen


# What every part must share with the others (else they are not parts of one prepare).
_SAME = ("seq_len", "dtype", "vocab_size", "eos_token_id", "document_prefix", "tokenizer_hash",
         "tokenizer_fingerprint", "text_field", "chunk_chars")


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
    loaded = sorted(((p, _read_part(p)) for p in paths), key=lambda pm: pm[1]["part"]["index"])
    first_path, first = loaded[0]
    count = first["part"]["count"]
    indices = [m["part"]["index"] for _, m in loaded]
    if sorted(set(indices)) != indices or len(loaded) != count or any(m["part"]["count"] != count for _, m in loaded):
        given = ", ".join(f"{m['part']['index']}/{m['part']['count']} ({p})" for p, m in loaded)
        raise CptError(f"parts to merge must be shards 0..{count - 1} of {count}, each once; got {given}")
    same = {k: lambda m, k=k: m[k] for k in _SAME}
    same |= {"shard_sequences": lambda m: m["part"]["shard_sequences"],
             "inputs": lambda m: [(i["path"], i["format"]) for i in m["inputs"]],
             "validation split": lambda m: {k: v for k, v in m.get("split", {}).items() if k != "documents"},
             "records": lambda m: (m["part"]["records_total"], m["part"]["weight_total"]),
             "byte counts": lambda m: (m["token_bytes"]["dtype"], m["token_bytes"]["counted_from"])}
    for path, m in loaded[1:]:
        for key, of in same.items():
            if of(m) != of(first):
                raise CptError(f"parts differ in {key}: {first_path} has {of(first)!r}, {path} has {of(m)!r}; "
                               "prepare every part with the same inputs, tokenizer and options")
    ranges = [m["part"]["records"] for _, m in loaded]
    if ranges[0][0] != 0 or ranges[-1][1] != first["part"]["records_total"] or any(
            a[1] != b[0] for a, b in itertools.pairwise(ranges)):
        raise CptError(f"parts' record ranges {ranges} do not cover the inputs' {first['part']['records_total']} "
                       "records once, in order: prepare them again with one cpt version")

    seq_len = first["seq_len"]
    stream = _Stream(loaded, seq_len)
    n_seq = stream.total // seq_len
    end = n_seq * seq_len  # tokens after this are the one tail a single prepare drops
    if n_seq == 0:
        raise CptError(f"{count} parts yield {stream.total} tokens, fewer than one sequence of {seq_len}")

    # per-input counts and checks, as one prepare reads them: with all documents read (both sides of a
    # split), then counting the kept ones
    stats, read = [], []
    for k, (path, fmt) in enumerate(same["inputs"](first)):
        st = InputStats(path, fmt)
        for _, m in loaded:
            st.documents += m["part"]["inputs"][k].get("documents_read", m["inputs"][k]["documents"])
            st.skipped.update(m["inputs"][k]["skipped"])
            st.objects += m["part"]["inputs"][k]["objects"]
            st.fields_seen |= set(m["part"]["inputs"][k]["fields_seen"])
        reader._check_input(st, first["text_field"])
        read.append(st.documents)
        st.documents = sum(m["inputs"][k]["documents"] for _, m in loaded)
        stats.append(st)
    if not any(read):
        raise CptError(f"all {len(stats)} inputs are empty ({stats[0].path}, ...)" if len(stats) > 1
                       else f"input {stats[0].path} is empty")

    out_dir.mkdir(parents=True, exist_ok=True)
    old = None
    if (out_dir / MANIFEST).exists():
        old = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        if "parts" not in old:
            raise CptError(f"{out_dir} holds a prepared folder that is not a merge; merge into another folder")
        if not overwrite:
            raise CptError(f"{out_dir} holds a merge already; pass overwrite=True (--overwrite) to replace it")
    stitch = (f"stitch-{os.getpid()}-tokens.bin", f"stitch-{os.getpid()}-bytes.bin")

    def rel(file: Path) -> str:
        return os.path.relpath(os.path.abspath(file), os.path.abspath(out_dir))

    # sequences j of the stream: those inside one piece are read there, from an offset; the others
    # (across a boundary between pieces) are copied into the stitch file
    shards, stitched, next_j, max_id = [], [], 0, -1
    try:
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
                shards.append({"file": rel(ids_file), "sequences": b - a, "bytes_file": rel(bytes_file),
                               "offset": a * seq_len - start})
                next_j = b
            if n_seq > next_j:
                copy(next_j, n_seq)
            for f in (f_ids, f_bytes):
                f.flush()
                os.fsync(f.fileno())
        if not stitched:
            for name in stitch:
                (out_dir / name).unlink()
        overflow = stream.overflow[stream.overflow[:, 0] < end]
        over_name = f"bytes-overflow-{os.getpid()}.npy" if len(overflow) else None
        if over_name:
            with open(out_dir / over_name, "wb") as f:
                np.save(f, overflow)
                f.flush()
                os.fsync(f.fileno())
        dropped_bytes = int(stream.read(end, stream.total)[1].sum())
        all_bytes = sum(m["token_bytes"]["total"] + m["token_bytes"]["dropped_tail"] for _, m in loaded)
        skipped: Counter = Counter()
        for st in stats:
            skipped.update(st.skipped)
        manifest = {k: first[k] for k in ("format", "format_version", *_SAME[:5], "tokenizer", *_SAME[5:])}
        manifest |= {
            "max_token_id": max_id,
            "inputs": [st.to_json() for st in stats],
            "unsupported_files": first.get("unsupported_files", {}),
            "max_documents": None,
            "documents": sum(st.documents for st in stats),
            "skipped": dict(sorted(skipped.items())),
            "tokens": end,
            "tokens_dropped_tail": stream.total - end,
            "sequences": n_seq,
            "shard_sequences": first["part"]["shard_sequences"],
            "shards": shards,
            "token_bytes": {"dtype": BYTES_DTYPE, "total": all_bytes - dropped_bytes, "dropped_tail": dropped_bytes,
                            "overflow": over_name, "counted_from": first["token_bytes"]["counted_from"]},
            "parts": [{"path": rel(p), "records": m["part"]["records"], "tokens": m["tokens"] + m["part"]["tail"]["tokens"]}
                      for p, m in loaded],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cpt_version": __version__,
        }
        if "split" in first:  # one side of a validation split: the documents of both sides, all parts
            manifest["split"] = first["split"] | {"documents": {
                k: sum(m["split"]["documents"][k] for _, m in loaded) for k in ("train", "validation")}}
        tmp = out_dir / f"{MANIFEST}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:  # last, and renamed: a reader sees the old merge or the new one
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / MANIFEST)
    except BaseException as e:
        for name in (*stitch, f"{MANIFEST}.tmp-{os.getpid()}", f"bytes-overflow-{os.getpid()}.npy"):
            (out_dir / name).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CptError(f"cannot write {out_dir}: {e.strerror or e}") from None
        raise
    if old is not None:  # the files of the merge this one replaced
        ours = {s["file"] for s in shards} | {s["bytes_file"] for s in shards} | {over_name}
        for s in old["shards"]:
            for name in (s["file"], s["bytes_file"]):
                if "/" not in name and name not in ours:
                    (out_dir / name).unlink(missing_ok=True)
        over = old["token_bytes"].get("overflow")
        if over and over not in ours:
            (out_dir / over).unlink(missing_ok=True)
    return manifest


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
