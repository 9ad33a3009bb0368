"""Train a small byte-level BPE tokenizer, load tokenizers, and fingerprint them.

The identity of a tokenizer (:func:`tokenizer_identity`: the bytes of its tokenizer.json and a
fingerprint of what it does) is what ties prepared token shards to a model: two tokenizers that
match turn the same text into the same ids.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpt.data.reader import InputStats, iter_documents, resolve_inputs
from cpt.errors import CptError

EOS = "<|endoftext|>"


def train_tokenizer(
    inputs: list[str | Path] | str | Path,
    out_dir: str | Path,
    vocab_size: int = 4096,
    text_field: str = "text",
    min_frequency: int = 2,
    max_documents: int | None = None,
    overwrite: bool = False,
    max_documents_per_input: int | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer on the documents of ``inputs`` and save it to ``out_dir``.

    ``<|endoftext|>`` is the only special token; it serves as eos, bos, unk and pad. The result
    is a ``transformers`` tokenizer directory that ``AutoTokenizer.from_pretrained(out_dir)`` loads.
    Inputs are read exactly as ``cpt prepare`` reads them (see :mod:`cpt.data.reader`).
    ``max_documents`` caps the documents of all inputs together (the first inputs may use it up);
    ``max_documents_per_input`` takes the first N of each input, so every corpus is in the sample.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise CptError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 257 (256 bytes + eos)"
        )
    for name, cap in (("max_documents", max_documents), ("max_documents_per_input", max_documents_per_input)):
        if cap is not None and cap <= 0:
            raise CptError(f"{name} must be positive, got {cap}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CptError(
            f"tokenizer output {out_dir} exists and is not empty; pass overwrite=True (--overwrite)"
        )
    resolved = resolve_inputs(inputs)

    stats: list[InputStats] = []
    bpe = ByteLevelBPETokenizer()
    with tempfile.TemporaryDirectory(prefix="cpt-tok-") as cache:
        docs = iter_documents(resolved, text_field, stats, max_documents=max_documents, cache_dir=cache,
                              max_per_input=max_documents_per_input)
        bpe.train_from_iterator(
            docs,
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS],
            show_progress=False,
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )

    # build beside the target, then swap in, so a crash never leaves a half-written tokenizer
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load_tokenizer(tokenizer: str | Path):
    """``AutoTokenizer.from_pretrained`` with a one-line CptError, requiring a fast tokenizer."""
    from transformers import AutoTokenizer

    path = _local(tokenizer)
    if path is not None and path.is_file():
        raise CptError(f"cannot load tokenizer: {path} is a file; pass the tokenizer dir that holds it")
    try:
        tok = AutoTokenizer.from_pretrained(str(path or tokenizer))
    except Exception as e:
        if path is None:
            raise CptError(f"cannot load tokenizer: {tokenizer} is not a local folder, and as a hub id: "
                           f"{_first_line(e)}") from None
        raise CptError(f"cannot load tokenizer {tokenizer}: {type(e).__name__}: {_first_line(e)}") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise CptError(
            f"tokenizer {tokenizer} is not a fast (Rust `tokenizers`) tokenizer; it has no tokenizer.json"
        )
    return tok


def tokenizer_json(tokenizer: str | Path) -> Path:
    """The tokenizer.json file of a tokenizer folder (or file, or a hub id already in the local cache)."""
    path = _local(tokenizer)
    if path is not None and path.is_file():
        return path
    if path is not None:
        if not (path / "tokenizer.json").is_file():
            raise CptError(f"tokenizer {path} has no tokenizer.json (a fast tokenizer is needed)")
        return path / "tokenizer.json"
    from transformers.utils import cached_file

    try:
        found = cached_file(str(tokenizer), "tokenizer.json")
    except Exception as e:
        raise CptError(f"cannot find tokenizer.json for {tokenizer}: {_first_line(e)}") from None
    if found is None:
        raise CptError(f"cannot find tokenizer.json for {tokenizer}")
    return Path(found)


def _local(tokenizer: str | Path) -> Path | None:
    """The tokenizer's folder or file on disk, or None for a hub id (``gpt2``, ``org/name``).

    A name that cannot be a hub id (``/nope``, ``./tok``, ``a/b/c``) must exist: transformers would
    answer "Repo id must be in the form ..." where the user needs "<path> does not exist"."""
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise CptError(f"cannot load tokenizer: {path} is not a tokenizer dir: "
                           "no tokenizer.json/tokenizer_config.json")
        return path
    if path.exists():
        return path
    if not _HUB_ID.fullmatch(str(tokenizer)):
        raise CptError(f"cannot load tokenizer: {tokenizer} does not exist")
    return None


# "name" or "namespace/name", as the hub's repo ids (parts do not start or end with "." or "-")
_HUB_ID = re.compile(r"(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]*\w)?")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


# What the behavioural fingerprint encodes: prose, digits, whitespace runs, code, accents (composed and
# decomposed), other scripts, emoji and byte soup, so normalizers and pre-tokenizers show in the ids.
_PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It's 12345 km, isn't it?",
    "  def f(x):\n\treturn x ** 2  # comment\r\n\n\n    }",
    "Straße, café, cafe\u0301, naïve, Ærø, ĳssel; Привет мир; 東京タワー; 안녕; مرحبا; 🔎︎🙂",
    "123 4567 89.0e-3 0x1F $€£ <|endoftext|> <s> </s> [INST] \u00a0\u200b\ufeff",
)


@dataclass(frozen=True)
class TokenizerIdentity:
    """How a tokenizer is recognised in a manifest: ``hash`` (sha256 of tokenizer.json's bytes, in every
    manifest) and ``fingerprint`` (what it does; in manifests since cpt records it). Data matches when
    either agrees: some tokenizers (Qwen 2's) are rewritten by transformers on every save, other bytes
    and the same ids."""

    hash: str
    fingerprint: str

    def matches(self, file_hash: str, fingerprint: str | None) -> bool:
        return file_hash == self.hash or (fingerprint is not None and fingerprint == self.fingerprint)


def tokenizer_identity(tokenizer: str | Path, loaded=None) -> TokenizerIdentity:
    """``loaded``: the tokenizer as already loaded from ``tokenizer`` (saves loading it again)."""
    return TokenizerIdentity(tokenizer_hash(tokenizer), tokenizer_fingerprint(loaded or load_tokenizer(tokenizer)))


def tokenizer_fingerprint(tok) -> str:
    """sha256 of what a loaded tokenizer does, not how its file is written: its vocabulary, merges and
    added tokens (with their special flags) and the ids it gives a fixed set of probe texts, with and
    without special tokens (so normalizer, pre-tokenizer and post-processor count by their effect).
    Taken from the tokenizer as transformers loads it, which is what tokenizes: for some models
    (Qwen 2) transformers builds another tokenizer than the file's and writes that one on save."""
    import json

    backend = tok.backend_tokenizer
    raw = json.loads(backend.to_str())
    model = raw.get("model", {})
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    what = {
        "type": model.get("type"),
        "vocab": sorted(backend.get_vocab(with_added_tokens=True).items()),
        "merges": merges,
        "added": sorted((t["id"], t["content"], bool(t.get("special"))) for t in raw.get("added_tokens", [])),
        "ids": [_probe_ids(backend, t, s) for t in _PROBE_TEXTS for s in (False, True)],
    }
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()


def _probe_ids(backend, text: str, special: bool) -> list[int] | str:
    try:
        return backend.encode(text, add_special_tokens=special).ids
    except Exception as e:  # e.g. a character it has no token and no unk for: that is its behaviour too
        return f"error: {e}"


def tokenizer_hash(tokenizer: str | Path) -> str:
    """sha256 of the bytes of the tokenizer's tokenizer.json: the fingerprint in every manifest.

    ``save_pretrained`` of a loaded byte-level BPE tokenizer writes the file back byte for byte, so the
    hash survives a load/save cycle; where transformers rewrites the file, the fingerprint still matches.
    """
    return hashlib.sha256(tokenizer_json(tokenizer).read_bytes()).hexdigest()


# ------------------------------------------------------------------- how cpt prepare uses a tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def document_frame(backend, eos_id: int) -> tuple[tuple[int, ...], int]:
    """How a document is framed in the shards: ``(prefix, eos)``, where ``prefix`` is what the tokenizer
    itself puts before a text (Llama, Mistral and Gemma tokenizers a BOS; byte-level BPEs like GPT-2's,
    Qwen's or cpt's nothing), so the model sees documents as in its pre-training; EOS ends each."""
    plain = backend.encode("frame", add_special_tokens=False).ids
    full = backend.encode("frame", add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return tuple(full[:at]), eos_id


def cuts_keep_tokens(backend) -> bool:
    """Whether cutting a text as reader.split_text does leaves its tokens as they were: true of
    byte-level BPE; false where every text gets a prefix space (SentencePiece-style Metaspace), which
    would add a space at each cut, so such tokenizers get whole documents."""

    def ids(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    cuts = [("The first line", "\n    indented(x) = 1\n"), ("ends with a dot.\n", "Next line"),
            ("Between", " words")]
    return all(ids(a + b) == ids(a) + ids(b) for a, b in cuts)
