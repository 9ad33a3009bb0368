"""Read prepared token shards: ``TokenSource(path)``, O(1) to open, random access by sequence (its
tokens, and the bytes of text each token covers where the folder has them)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cpt.errors import CptError

# The on-disk format that `cpt prepare` writes and this module reads. The version changes only where a
# reader of the previous one would misread a folder; additions that older readers can ignore keep it:
# per-token byte counts (manifest "token_bytes", a "bytes_file" per shard) are such an addition, so
# folders without them still load (no byte counts) and older cpt reads new folders (ignoring them).
# A shard entry may also name a file elsewhere (a path relative to the folder) and an "offset": the
# tokens to skip at the start of that file before its sequences begin. `cpt prepare merge` writes such
# entries to use the parts' files in place; a reader without offsets refuses them (its exact size check
# fails) rather than misreading them, so the version stays.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "cpt-tokens"
MANIFEST_VERSION = 1
SHARD_PATTERN = "tokens-{:05d}.bin"
BYTES_PATTERN = "bytes-{:05d}.bin"  # uint8 per token, parallel to the shard of the same number
BYTES_DTYPE = "uint8"
BYTES_OVERFLOW = "bytes-overflow.npy"  # int64 [k, 2]: (flat token index, bytes) where a count is > 255

_REQUIRED = (
    "format",
    "format_version",
    "seq_len",
    "dtype",
    "vocab_size",
    "eos_token_id",
    "tokenizer_hash",
    "sequences",
    "shards",
)


class TokenSource:
    """The packed sequences of one folder written by :func:`cpt.data.prepare.prepare`.

    Opening reads the manifest and checks that every shard file has exactly the size the manifest
    promises; the shards themselves are memory-mapped on first use. Sequence ``i`` of the source is
    sequence ``i - start`` of the shard whose cumulative range holds ``i``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        m = self.manifest
        self.seq_len: int = int(m["seq_len"])
        self.dtype = np.dtype(m["dtype"])
        self.tokenizer_hash: str = m["tokenizer_hash"]
        self.tokenizer_fingerprint: str | None = m.get("tokenizer_fingerprint")  # older manifests: none
        self.eos_token_id: int = int(m["eos_token_id"])
        self.vocab_size: int = int(m["vocab_size"])
        # the largest id in the shards, to check against a model's embedding size; None: older manifests
        self.max_token_id: int | None = m.get("max_token_id")
        # bytes of document text per token (cpt.data.prepare); None: prepared before byte counts
        token_bytes = m.get("token_bytes")
        self.bytes_total: int | None = int(token_bytes["total"]) if token_bytes else None
        counts = []
        for shard in m["shards"]:
            files = [(shard["file"], self.dtype)]
            if token_bytes:
                files.append((shard["bytes_file"], np.dtype(token_bytes["dtype"])))
            offset = int(shard.get("offset", 0))  # tokens before the shard's first sequence (merged parts)
            for name, dtype in files:
                file = self.path / name
                expected = int(shard["sequences"]) * self.seq_len * dtype.itemsize
                if not file.is_file():
                    raise CptError(f"prepared data {self.path}: shard {name} is missing")
                size = file.stat().st_size
                # a file of our own holds exactly its sequences; a part's file, used from an offset, at least
                if size != expected if "offset" not in shard else size < expected + offset * dtype.itemsize:
                    raise CptError(
                        f"prepared data {self.path}: shard {name} has {size} bytes, the manifest expects "
                        f"{expected} ({shard['sequences']} sequences of {self.seq_len} {dtype.name}"
                        f"{f' from token {offset}' if offset else ''}); the folder is damaged, run cpt prepare again"
                    )
            counts.append(int(shard["sequences"]))
        self._offsets = [int(s.get("offset", 0)) for s in m["shards"]]
        self._files = [self.path / s["file"] for s in m["shards"]]
        self._bytes_dtype = np.dtype(token_bytes["dtype"]) if token_bytes else None
        self._bytes_files = [self.path / s["bytes_file"] for s in m["shards"]] if token_bytes else []
        overflow = token_bytes.get("overflow") if token_bytes else None
        self._overflow_file = self.path / overflow if overflow else None
        if self._overflow_file is not None and not self._overflow_file.is_file():
            raise CptError(f"prepared data {self.path}: {overflow} is missing; run cpt prepare again")
        # _ends[k] = sequences in shards 0..k; sequence i lives in shard searchsorted(_ends, i, "right")
        self._ends = np.cumsum(np.asarray(counts, dtype=np.int64))
        self._starts = self._ends - np.asarray(counts, dtype=np.int64)
        self.num_sequences = int(self._ends[-1]) if len(counts) else 0
        if self.num_sequences != int(m["sequences"]):
            raise CptError(
                f"prepared data {self.path}: shards hold {self.num_sequences} sequences, "
                f"the manifest says {m['sequences']}"
            )
        self._maps: list[np.ndarray | None] = [None] * len(self._files)
        self._bytes_maps: list[np.ndarray | None] = [None] * len(self._bytes_files)
        self._overflow: np.ndarray | None = None

    @property
    def has_bytes(self) -> bool:
        """Whether the folder records the bytes of text per token (prepared since byte counts exist)."""
        return self.bytes_total is not None

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return f"TokenSource({str(self.path)!r}, sequences={self.num_sequences}, seq_len={self.seq_len})"

    def __getstate__(self) -> dict:
        # memmaps are reopened lazily in the receiving process (DataLoader workers, spawn)
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._files)
        state["_bytes_maps"] = [None] * len(self._bytes_files)
        return state

    def _shard(self, k: int) -> np.ndarray:
        return self._mapped(self._maps, self._files, self.dtype, k)

    def _bytes_shard(self, k: int) -> np.ndarray:
        return self._mapped(self._bytes_maps, self._bytes_files, self._bytes_dtype, k)

    def _mapped(self, cache: list, files: list[Path], dtype: np.dtype, k: int) -> np.ndarray:
        """Shard ``k`` of ``files`` as [sequences, seq_len], memory-mapped on first use (from its offset)."""
        if cache[k] is None:
            rows = int(self._ends[k] - self._starts[k])
            cache[k] = np.memmap(files[k], dtype=dtype, mode="r", offset=self._offsets[k] * dtype.itemsize,
                                 shape=(rows, self.seq_len))
        return cache[k]

    def get(self, idx: int) -> np.ndarray:
        """Sequence ``idx`` as an int64 array of ``seq_len`` tokens (a copy)."""
        return self.batch([idx])[0]

    def batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Sequences at ``indices`` (any order, repeats allowed) as int64 ``[len(indices), seq_len]``."""
        return self._gather(indices, self._shard)

    def bytes_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray | None:
        """int64 ``[len(indices), seq_len]``: the UTF-8 bytes of document text each token of those
        sequences covers (0 for BOS / EOS), as :meth:`batch` lays out the tokens; None for a folder
        prepared before byte counts. A sequence's text bytes are its row's sum."""
        if not self.has_bytes:
            return None
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = self._gather(idx, self._bytes_shard)
        if self._overflow_file is not None:  # counts above 255, stored apart (rare)
            if self._overflow is None:
                self._overflow = np.load(self._overflow_file)
            flat, value = self._overflow[:, 0], self._overflow[:, 1]
            for j in np.flatnonzero(np.isin(flat // self.seq_len, idx)):
                out[idx == flat[j] // self.seq_len, flat[j] % self.seq_len] = value[j]
        return out

    def _gather(self, indices, shard_of) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        if not len(idx):
            return out
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.num_sequences:
            bad = lo if lo < 0 else hi
            raise IndexError(f"sequence {bad} out of range for {self.path} ({self.num_sequences} sequences)")
        if len(self._files) == 1:
            out[:] = shard_of(0)[idx]
            return out
        shard = np.searchsorted(self._ends, idx, side="right")
        for k in np.unique(shard):
            rows = shard == k
            out[rows] = shard_of(int(k))[idx[rows] - self._starts[k]]
        return out


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not path.exists():
        raise CptError(f"prepared data {path} does not exist; run cpt prepare first")
    if not file.is_file():
        raise CptError(f"{path} has no {MANIFEST}; is it a folder written by cpt prepare?")
    try:
        m = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CptError(f"{file} is not valid JSON ({e}); run cpt prepare again") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise CptError(
            f"{file} is not a cpt token manifest (format {m.get('format') if isinstance(m, dict) else None!r})"
        )
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise CptError(f"{file} lacks {', '.join(missing)}; run cpt prepare again")
    if m["format_version"] != MANIFEST_VERSION:
        raise CptError(
            f"{file} has format version {m['format_version']}; this cpt reads version {MANIFEST_VERSION}"
        )
    if m["dtype"] not in ("uint16", "uint32"):
        raise CptError(f"{file}: dtype {m['dtype']!r} is not uint16 or uint32")
    tb = m.get("token_bytes")
    if tb is not None and (not isinstance(tb, dict) or tb.get("dtype") not in ("uint8", "uint16", "uint32")
                           or "total" not in tb or not all("bytes_file" in s for s in m["shards"])):
        raise CptError(f"{file}: its token_bytes entry is damaged; run cpt prepare again")
    return m


class SubsetSource:
    """A fixed replay buffer: ``size`` sequences of ``source`` chosen once by a seeded permutation.

    Reads behave like a TokenSource of ``size`` sequences, so the mixture sampler counts its epochs
    (how often the buffer was repeated) exactly as for a whole corpus."""

    def __init__(self, source: TokenSource, size: int, seed: int, name: str):
        from cpt.data.mixture import permutation_keys, permute

        if not 0 < size <= source.num_sequences:
            raise CptError(f"replay buffer of {size} sequences from {source.path}, which has "
                           f"{source.num_sequences}: expected 1..{source.num_sequences}")
        self.source = source
        self.path = source.path
        self.seq_len = source.seq_len
        self.tokenizer_hash = source.tokenizer_hash
        self.tokenizer_fingerprint = source.tokenizer_fingerprint
        self.max_token_id = source.max_token_id
        self.eos_token_id = source.eos_token_id
        self.manifest = source.manifest
        self.has_bytes = source.has_bytes
        self.num_sequences = size
        self.indices = permute(np.arange(size), source.num_sequences, permutation_keys(seed, f"{name}/buffer", 0))

    def __len__(self) -> int:
        return self.num_sequences

    def batch(self, indices) -> np.ndarray:
        return self.source.batch(self.indices[np.asarray(indices, dtype=np.int64)])

    def bytes_batch(self, indices) -> np.ndarray | None:
        return self.source.bytes_batch(self.indices[np.asarray(indices, dtype=np.int64)])


def read_batch(sources: Mapping[str, object], picks: list[tuple[str, int]], vocab_size: int | None = None):
    """Read ``picks`` from ``{name: TokenSource}`` into a LongTensor ``[len(picks), seq_len]``, in order.

    Reads are grouped per source (one vectorised memmap gather each). With ``vocab_size``, an id outside
    ``[0, vocab_size)`` (a corrupt shard, or one tokenized for a larger vocabulary) is a CptError naming
    the source and sequence, instead of an IndexError deep in the model's embedding.
    """
    import torch

    groups: dict[str, tuple[list[int], list[int]]] = {}
    for row, (name, idx) in enumerate(picks):
        g = groups.get(name)
        if g is None:
            g = groups[name] = ([], [])
        g[0].append(row)
        g[1].append(idx)
    missing = sorted(set(groups) - set(sources))
    if missing:
        raise CptError(f"picks name source {', '.join(missing)}, which is not loaded")
    seq_lens = {sources[n].seq_len for n in groups}
    if len(seq_lens) > 1:
        detail = ", ".join(f"{n}={sources[n].seq_len}" for n in sorted(groups))
        raise CptError(f"mixed sources have different seq_len ({detail}); prepare them with one seq_len")
    seq_len = seq_lens.pop() if seq_lens else next(iter(sources.values())).seq_len if sources else 0
    out = np.empty((len(picks), seq_len), dtype=np.int64)
    for name, (rows, idx) in groups.items():
        out[rows] = sources[name].batch(idx)
    if vocab_size is not None and len(picks) and out.max() >= vocab_size:  # shards are unsigned: no id < 0
        row = int(np.flatnonzero((out >= vocab_size).any(1))[0])
        name, idx = picks[row]
        bad = int(out[row][out[row] >= vocab_size][0])
        raise CptError(f"data source {name!r}: sequence {idx} holds token id {bad}, outside the model's "
                       f"vocabulary of {vocab_size}: the shard is corrupt or was tokenized for another model")
    return torch.from_numpy(out)


def validate_source(key: str, path: str | Path, seq_len: int | None, tokenizer) -> TokenSource:
    """The one check of a prepared dir that something names (a recipe's training source or probe set,
    `cpt probe --sets`): it opens, it was prepared at ``seq_len`` (None: any) and by ``tokenizer`` (a
    cpt.data.tokenizer.TokenizerIdentity; None: the model's tokenizer has no tokenizer.json to compare
    with). Errors start with ``key``, the name the user gave it."""
    try:
        src = TokenSource(path)
    except CptError as e:
        raise CptError(f"{key}: {e}") from None
    if seq_len is not None and src.seq_len != seq_len:
        raise CptError(f"{key}: {path} was prepared with seq_len {src.seq_len}, but data.seq_len is {seq_len} "
                       f"(re-run cpt prepare with --seq-len {seq_len})")
    if not src.tokenizer_hash:
        raise CptError(f"{key}: {path}: its manifest records no tokenizer hash, so nothing says which "
                       f"tokenizer wrote it (re-run cpt prepare)")
    if tokenizer is not None and not tokenizer.matches(src.tokenizer_hash, src.tokenizer_fingerprint):
        raise CptError(f"{key}: {path} was tokenized with another tokenizer than the model's "
                       f"(hash {src.tokenizer_hash[:12]} vs {tokenizer.hash[:12]})")
    return src
