"""A validation split, by document: which side of it each document of the inputs goes to.

A document goes to validation iff blake2b-64 of its UTF-8 text (keyed by the seed), read as a fraction
of 2**64, is below the validation fraction: a property of the text alone, so the split does not
depend on the inputs' order, num_proc or the cuts of long documents, and identical documents (exact
duplicates, also across inputs and formats) always land on the same side, never on both.
:func:`cpt.data.prepare.prepare_split` writes both sides.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from cpt.data.reader import FORMATS
from cpt.errors import CptError

SPLIT_RULE = "validation iff blake2b(utf8(text), digest_size=8, key=str(seed)) / 2**64 < validation_fraction"
SIDES = ("validation", "train")  # the small side first: it is the one that fails for too few tokens


def check_fraction(fraction, seed) -> None:
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
    return _below(h, fraction)


def _below(h, fraction: float) -> bool:
    return int.from_bytes(h.digest(), "big") < math.ceil(fraction * 2**64)


def side_of(path: Path, fmt: str, blocks, fraction: float, seed: int) -> str:
    """The side of one document as its format's ``documents`` gives it: a whole-file document (.txt,
    .md, .rst) is hashed from the file's bytes (its UTF-8 text, checked, with newlines as in the file)
    without holding it, others from the text."""
    if not FORMATS[fmt].whole_file:
        return "validation" if in_validation("".join(blocks), fraction, seed) else "train"
    h = _split_hash(seed)
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError as e:
        raise CptError(f"input {path} cannot be read: {e}") from None
    return "validation" if _below(h, fraction) else "train"
