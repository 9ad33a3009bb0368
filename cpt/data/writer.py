"""Writing a prepared folder: packed sequences into shard files, and the folder put in place whole.

The layout (``tokens-*.bin``, ``bytes-*.bin``, ``bytes-overflow.npy``, ``manifest.json``) is described
in :mod:`cpt.data.prepare`. Every file is on disk (fsync) before the manifest that names it is written,
and the manifest before the folder is renamed into place, so that a reader sees the old output or the
new one, whole, and a killed prepare leaves only a temporary that the next prepare removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np

from cpt.data.source import BYTES_DTYPE, BYTES_OVERFLOW, BYTES_PATTERN, SHARD_PATTERN

# A part (``prepare(part=(i, n))``) keeps its tail, the tokens after its last whole sequence, here:
# in the documents' order they continue in the next part's first sequence (merge_parts).
TAIL_TOKENS = "tail-tokens.bin"
TAIL_BYTES = "tail-bytes.bin"


def token_records(dtype: str | np.dtype) -> np.dtype:
    """One packed token as prepare streams it: its id and the bytes of text it covers."""
    return np.dtype([("id", dtype), ("bytes", np.uint32)])


def sync(f) -> None:
    """Flush an open file to disk: it must be whole before anything that names it is committed."""
    f.flush()
    os.fsync(f.fileno())


def write_json(path: Path, data: dict) -> None:
    """A manifest, as every prepared folder writes it: indented by 1, a newline at the end, on disk."""
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        sync(f)


def save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        sync(f)


class ShardWriter:
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

    def add(self, tokens: np.ndarray, ends=None) -> None:
        """Append token records; write every completed sequence. (``ends``, where documents end, is for
        cpt.data.lengths.DocumentPacker, which takes the same calls.)"""
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
            self._note_overflow(nbytes)
            self.shards[-1]["sequences"] += len(part)
            self.shards[-1]["max_token_id"] = max(self.shards[-1]["max_token_id"], int(ids.max()))
            self.max_id = max(self.max_id, int(ids.max()))
            self.written += ids.size
            self.bytes += int(nbytes.sum(dtype=np.int64))

    def _note_overflow(self, nbytes: np.ndarray) -> None:
        """Keep the counts above 255 of tokens about to follow the ``written`` ones."""
        big = np.flatnonzero(nbytes > 255)
        if len(big):
            self.overflow.append(np.stack([self.written + big, nbytes[big].astype(np.int64)], axis=1))

    def _next_shard(self) -> None:
        self._close_file()
        name, bytes_name = SHARD_PATTERN.format(len(self.shards)), BYTES_PATTERN.format(len(self.shards))
        self.files = (open(self.out_dir / name, "wb"), open(self.out_dir / bytes_name, "wb"))
        self.shards.append({"file": name, "sequences": 0, "bytes_file": bytes_name, "max_token_id": -1})

    def _close_file(self) -> None:
        for f in self.files or ():
            sync(f)  # on disk before the folder is renamed into place
            f.close()
        self.files = None

    def keep_tail(self) -> dict:
        """Write the tail (< seq_len tokens) to ``TAIL_TOKENS`` / ``TAIL_BYTES`` instead of dropping it: a
        part's tail continues in the next part (:func:`cpt.data.parts.merge_parts`). Its counts above 255
        go to the overflow like any other, indexed as if the tail followed the last sequence."""
        ids, nbytes = np.ascontiguousarray(self.carry["id"]), self.carry["bytes"]
        for name, data in ((TAIL_TOKENS, ids), (TAIL_BYTES, np.minimum(nbytes, 255).astype(BYTES_DTYPE))):
            with open(self.out_dir / name, "wb") as f:
                data.tofile(f)
                sync(f)
        self._note_overflow(nbytes)
        return {"tokens": len(ids), "file": TAIL_TOKENS, "bytes_file": TAIL_BYTES}

    def close(self) -> int:
        """Close the last shard and write the overflow file (if any count exceeded 255); return the
        number of tail tokens dropped."""
        self._close_file()
        if self.overflow:
            save_array(self.out_dir / BYTES_OVERFLOW, np.concatenate(self.overflow))
        return len(self.carry)


def temporary(out_dir: Path, kind: str) -> Path:
    """``<out>.<kind>-<pid>@<host>``: a later prepare can tell it is ours and whether it was left."""
    return out_dir.with_name(f"{out_dir.name}.{kind}-{os.getpid()}@{socket.gethostname()}")


def remove_stale(out_dir: Path) -> None:
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


def commit(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder in place by renames: readers see the old output or the new, whole."""
    old = temporary(out_dir, "old") if out_dir.exists() else None
    if old is not None:
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)
