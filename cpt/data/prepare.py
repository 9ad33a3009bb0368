"""Tokenize once into memory-mapped token shards: ``cpt prepare``.

Pipeline: raw files -> documents (:mod:`cpt.data.reader`, bad records counted) -> an Arrow text
column (``Dataset.from_generator``) -> ``Dataset.map(batched, num_proc)`` with the fast tokenizer,
where each batch of documents becomes ONE row holding its ids with EOS after every document ->
streamed in order into fixed-length sequences written as flat numpy arrays.

Layout of the output folder::

    manifest.json        what was read, counted, skipped and written (see MANIFEST_FORMAT)
    tokens-00000.bin     flat array of whole sequences, ``shard_sequences`` per shard (last: fewer)
    tokens-00001.bin     ...

Documents are joined as ``doc0 EOS doc1 EOS ...`` (no BOS) and cut every ``seq_len`` tokens, so a
sequence may start inside a document; the tail that does not fill a last sequence is dropped and
counted. Because each map batch is one row, the token stream never exists as Python lists of the
whole corpus, and its order does not depend on ``num_proc``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import itertools
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpt import __version__
from cpt.data.reader import InputStats, iter_documents, resolve_inputs
from cpt.data.tokenizer import load_tokenizer, tokenizer_hash
from cpt.errors import CptError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "cpt-tokens"
MANIFEST_VERSION = 1
SHARD_PATTERN = "tokens-{:05d}.bin"

_MAP_BATCH = 1000  # documents per map call, and so per Arrow row of ids
_ENCODE_CHARS = 8_000_000  # characters per tokenizer call, to bound the Python ints alive at once


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class _Tokenize:
    """Batched map function: a batch of documents -> one row of ids, EOS after each document.

    A class (not a closure) so that ``datasets`` can pickle it into ``num_proc`` workers. The fast
    tokenizer returns Python lists of ints; they are turned into a numpy array every
    ``_ENCODE_CHARS`` characters, so a batch of very long documents never holds more than a few
    million Python ints at once.
    """

    def __init__(self, backend, eos_id: int, dtype: str):
        self.backend = backend
        self.eos_id = eos_id
        self.dtype = dtype

    def __call__(self, batch: dict) -> dict:
        texts = batch["text"]
        pieces, start, chars = [], 0, 0
        for i, text in enumerate(texts):
            chars += len(text)
            if chars >= _ENCODE_CHARS or i == len(texts) - 1:
                pieces.append(self._encode(texts[start : i + 1]))
                start, chars = i + 1, 0
        ids = np.concatenate(pieces) if len(pieces) > 1 else pieces[0] if pieces else np.empty(0, self.dtype)
        return {"ids": [ids], "documents": [len(texts)]}

    def _encode(self, texts: list[str]) -> np.ndarray:
        encs = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        eos = (self.eos_id,)
        n = sum(len(e.ids) for e in encs) + len(encs)
        stream = itertools.chain.from_iterable(itertools.chain(e.ids, eos) for e in encs)
        return np.fromiter(stream, dtype=self.dtype, count=n)


class _ShardWriter:
    """Packs a token stream into ``seq_len`` sequences and writes ``shard_sequences`` per file."""

    def __init__(self, out_dir: Path, seq_len: int, shard_sequences: int, dtype: np.dtype):
        self.out_dir, self.seq_len, self.shard_sequences, self.dtype = (
            out_dir,
            seq_len,
            shard_sequences,
            dtype,
        )
        self.carry = np.empty(0, dtype=dtype)  # < seq_len tokens waiting for the next batch
        self.shards: list[dict] = []
        self.file = None

    def add(self, ids: np.ndarray) -> None:
        """Append tokens; write every completed sequence. ``ids`` may be a view of mapped memory."""
        if len(self.carry):
            need = self.seq_len - len(self.carry)
            if len(ids) < need:
                self.carry = np.concatenate([self.carry, ids])
                return
            self._write(np.concatenate([self.carry, ids[:need]]).reshape(1, self.seq_len))
            ids = ids[need:]
        n_seq = len(ids) // self.seq_len
        self._write(ids[: n_seq * self.seq_len].reshape(n_seq, self.seq_len))
        self.carry = ids[n_seq * self.seq_len :].copy()

    def _write(self, seqs: np.ndarray) -> None:
        while len(seqs):
            if self.file is None or self.shards[-1]["sequences"] == self.shard_sequences:
                self._next_shard()
            room = self.shard_sequences - self.shards[-1]["sequences"]
            part, seqs = seqs[:room], seqs[room:]
            part.tofile(self.file)
            self.shards[-1]["sequences"] += len(part)

    def _next_shard(self) -> None:
        self._close_file()
        name = SHARD_PATTERN.format(len(self.shards))
        self.file = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "sequences": 0})

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())  # on disk before the folder is renamed into place
            self.file.close()
            self.file = None

    def close(self) -> int:
        """Close the last shard; return the number of tail tokens dropped."""
        self._close_file()
        return len(self.carry)


@dataclass
class _ReadJob:
    inputs: list[tuple[Path, str]]
    text_field: str
    stats: list[InputStats]  # filled while the generator runs (in this process)
    max_documents: int | None
    cache_dir: Path


def _text_rows(job: _ReadJob):
    for text in iter_documents(job.inputs, job.text_field, job.stats, job.max_documents, job.cache_dir):
        yield {"text": text}


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
) -> dict:
    """Tokenize ``inputs`` with ``tokenizer``, pack into ``seq_len`` sequences, write to ``out_dir``.

    Returns the manifest (also written as ``out_dir/manifest.json``). ``max_documents`` caps the
    usable documents read, over all inputs in order. The folder is built as ``<out_dir>.tmp`` and
    renamed when complete; an existing ``out_dir`` is replaced only with ``overwrite=True``.
    """
    import datasets

    if seq_len < 1:
        raise CptError(f"seq_len must be positive, got {seq_len}")
    if shard_sequences < 1:
        raise CptError(f"shard_sequences must be positive, got {shard_sequences}")
    if num_proc < 1:
        raise CptError(f"num_proc must be positive, got {num_proc}")
    if max_documents is not None and max_documents <= 0:
        raise CptError(f"max_documents must be positive, got {max_documents}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CptError(f"output {out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    resolved = resolve_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    eos_id = tok.eos_token_id
    if eos_id is None:
        raise CptError(f"tokenizer {tokenizer} has no eos token; documents cannot be separated")
    tok_hash = tokenizer_hash(tokenizer)
    vocab_size = len(tok)
    dtype = token_dtype(vocab_size)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed run
    tmp.mkdir(parents=True)
    cache = tmp / ".cache"  # a fresh datasets cache: nothing stale is reused, nothing left behind
    bars_were_off = datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        stats: list[InputStats] = []
        try:
            texts = datasets.Dataset.from_generator(
                _text_rows,
                features=datasets.Features({"text": datasets.Value("large_string")}),
                cache_dir=str(cache),
                # one object, not lists: datasets would read lists in gen_kwargs as shards
                gen_kwargs={"job": _ReadJob(resolved, text_field, stats, max_documents, cache)},
            )
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, CptError):
                raise e.__cause__ from None
            raise
        ids = texts.map(
            _Tokenize(tok.backend_tokenizer, eos_id, dtype.name),
            batched=True,
            batch_size=_MAP_BATCH,
            writer_batch_size=16,  # rows are whole batches of documents: keep Arrow chunks small
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["text"],
            features=datasets.Features(
                {"ids": datasets.LargeList(datasets.Value(dtype.name)), "documents": datasets.Value("int64")}
            ),
            new_fingerprint=f"cpt-tokenize-{os.getpid()}-{id(texts)}",
            desc="tokenizing",
        )

        writer = _ShardWriter(tmp, seq_len, shard_sequences, dtype)
        documents = 0
        for table in ids.with_format("arrow").iter(batch_size=64):
            documents += int(np.asarray(table.column("documents")).sum()) if table.num_rows else 0
            for chunk in table.column("ids").chunks:
                writer.add(chunk.flatten().to_numpy(zero_copy_only=True))
        tail = writer.close()
        del texts, ids  # release the memory-mapped Arrow files before their folder goes
        gc.collect()
        shutil.rmtree(cache, ignore_errors=True)

        sequences = sum(s["sequences"] for s in writer.shards)
        tokens = sequences * seq_len
        if sequences == 0:
            raise CptError(
                f"{_describe(resolved)} yields {tail} tokens, fewer than one sequence of {seq_len}"
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
            "eos_token_id": int(eos_id),
            "tokenizer": str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else str(tokenizer),
            "tokenizer_hash": tok_hash,
            "text_field": text_field,
            "inputs": [st.to_json() for st in stats],
            "max_documents": max_documents,
            "documents": documents,
            "skipped": dict(sorted(skipped.items())),
            "tokens": tokens,
            "tokens_dropped_tail": tail,
            "sequences": sequences,
            "shard_sequences": shard_sequences,
            "shards": writer.shards,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cpt_version": __version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if not progress and not bars_were_off:
            datasets.enable_progress_bars()


def _describe(resolved: list[tuple[Path, str]]) -> str:
    if len(resolved) == 1:
        return f"input {resolved[0][0]}"
    return f"{len(resolved)} inputs ({resolved[0][0]}, ...)"
