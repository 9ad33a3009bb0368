"""Human-friendly quantities used in recipes: token counts and phase lengths.

Sizes use binary suffixes (K = 2**10, M = 2**20, G = B = 2**30, T = 2**40) so that
batch sizes such as ``64K`` split evenly into micro-batches of powers of two.

A *length* (of a warmup, a decay, a probe window) is one of
  * tokens:   ``2M``, ``500000``, ``2M tokens``
  * steps:    ``200 steps`` (optimizer steps)
  * fraction: ``10%`` or a float below 1 such as ``0.1`` (of the stage's token budget)
and resolves to tokens once the budget and tokens per step are known.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "B": 2**30, "T": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGBT]?)\s*$", re.IGNORECASE)
_UNIT_RE = re.compile(r"^\s*(.*?)\s*(tokens?|steps?)\s*$", re.IGNORECASE)


def parse_count(value: object) -> int:
    """Parse a non-negative integer count: ``20M``, ``64K``, ``1.5G``, ``2e6`` or an int."""
    if isinstance(value, bool):
        raise ValueError(f"expected a count such as 2M or 65536, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole count, got {value!r}")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"expected a count such as 2M, 64K or 65536, got {value!r}")
        x = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
        if not math.isclose(x, round(x), rel_tol=0, abs_tol=1e-6):
            raise ValueError(f"{value!r} is not a whole number of units")
        n = int(round(x))
    else:
        raise ValueError(f"expected a count such as 2M or 65536, got {value!r}")
    if n < 0:
        raise ValueError(f"expected a non-negative count, got {value!r}")
    return n


def format_count(n: int) -> str:
    """Inverse of :func:`parse_count` for exact multiples; plain digits otherwise."""
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIX[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


@dataclass(frozen=True)
class Length:
    """A span measured in tokens, optimizer steps or a fraction of the stage budget."""

    value: float
    unit: Literal["tokens", "steps", "fraction"]

    def to_tokens(self, total_tokens: int, tokens_per_step: int) -> int:
        """Resolve to a token count, given the stage budget and tokens per optimizer step."""
        if self.unit == "tokens":
            return int(self.value)
        if self.unit == "steps":
            return int(self.value) * tokens_per_step
        return int(round(self.value * total_tokens))

    def __str__(self) -> str:
        if self.unit == "fraction":
            return f"{self.value * 100:g}%"
        if self.unit == "steps":
            return f"{int(self.value)} steps"
        return format_count(int(self.value))


def parse_length(value: object) -> Length:
    """Parse ``10%``, ``0.1``, ``200 steps``, ``2M``, ``2M tokens`` or an int (tokens)."""
    if isinstance(value, Length):
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected a length such as 10%, 200 steps or 2M, got {value!r}")
    if isinstance(value, float) and (value <= 1.0 or not value.is_integer()):
        # floats up to 1.0 are fractions of the budget; 1.5 is neither a fraction nor a count
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a fractional length must lie in [0, 1], got {value!r}")
        return Length(float(value), "fraction")
    if isinstance(value, str):
        s = value.strip()
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                raise ValueError(f"expected a percentage such as 10%, got {value!r}") from None
            if not 0.0 <= pct <= 100.0:
                raise ValueError(f"a percentage must lie in [0%, 100%], got {value!r}")
            return Length(pct / 100.0, "fraction")
        m = _UNIT_RE.match(s)
        if m:
            n = parse_count(m.group(1))
            return Length(n, "steps" if m.group(2).lower().startswith("step") else "tokens")
        try:
            f = float(s)
        except ValueError:
            f = None
        if f is not None and "." in s:
            return parse_length(f)
    return Length(parse_count(value), "tokens")


# Pydantic field types: validate from human strings, serialise back to human strings.
TokenCount = Annotated[
    int,
    BeforeValidator(parse_count),
    PlainSerializer(format_count, return_type=str),
    WithJsonSchema({"type": ["integer", "string"], "description": "count, e.g. 2M or 65536"}),
]
LengthField = Annotated[
    Length,
    BeforeValidator(parse_length),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": ["integer", "number", "string"], "description": "10%, 200 steps or 2M"}),
]


class StrictModel(BaseModel):
    """The base of every recipe section (recipe, schedules, tracking): unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
