"""Seeded, resumable mixture sampler over prepared sources. Its whole state is a few integers.

Which source: deterministic weighted interleaving. Sample ``g`` (0-based, over the whole run) goes
to the source with the largest deficit ``weight[s] * (g + 1) - drawn[s]`` (ties: first name in
sorted order). Every prefix of the stream then holds each source within one sample of its exact
share: 0.75/0.25 gives exactly 6 and 2 of every 8, with no sampling noise to confound a replay
ablation, and no random state to save.

Which sequence: the k-th draw from source ``s`` (size ``n``) is in epoch ``k // n`` at position
``k % n`` and reads sequence ``perm(seed, s, epoch)(position)``, where ``perm`` is a keyed bijection
of ``[0, n)``: a Feistel network over the next power-of-two domain with cycle walking. It costs O(1)
memory for any corpus size, every epoch is a fresh order, and every sequence is read exactly once
per epoch. Keys use ``zlib.crc32`` of the name, never Python's per-process salted ``hash()``.

So ``state_dict()`` is ``{"seed", "drawn": {name: int}, "position": int, "offsets": {name: int}}`` and
a restored sampler continues with exactly the picks the original would have made. ``offsets`` are the
draws made from each source before this sampler existed (earlier stages with other weights): the
interleaving starts afresh with the new weights while each source goes on through its epochs where
it was, instead of re-reading the sequences an earlier stage already saw.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np

from cpt.errors import CptError

_M64 = (1 << 64) - 1
_ROUNDS = 6
_TIE_EPS = 1e-9  # deficits closer than this are ties (float rounding must not break exact shares)


def _mix64(z: int) -> int:
    """splitmix64 finaliser on a Python int (key derivation)."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


_C0, _C1, _C2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (the Feistel round function); wraps mod 2**64."""
    z = z + _C0
    z = (z ^ (z >> _S30)) * _C1
    z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


def permutation_keys(seed: int, name: str, epoch: int) -> list[int]:
    """Round keys of the permutation for (seed, source name, epoch); stable across processes."""
    base = _mix64(_mix64(seed & _M64) ^ _mix64(zlib.crc32(name.encode("utf-8")) + (1 << 40)) ^ _mix64(epoch))
    return [_mix64(base + r) for r in range(_ROUNDS)]


def permute(positions: np.ndarray, n: int, keys: list[int]) -> np.ndarray:
    """Apply the keyed bijection of ``[0, n)`` to ``positions`` (vectorised).

    An unbalanced Feistel network permutes ``[0, 2**b)`` (``2**b >= n``); values that land at or
    above ``n`` are pushed through again (cycle walking) until they fall inside, which keeps the
    map a bijection of ``[0, n)``. The domain is < 2n (b >= 2), so the walk is short.
    """
    x = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return np.zeros(len(x), dtype=np.int64)
    bits = max(2, (n - 1).bit_length())
    ks = [np.uint64(k) for k in keys]

    def feistel(v: np.ndarray) -> np.ndarray:
        hb, lb = bits // 2, bits - bits // 2  # v = hi (hb bits) | lo (lb bits)
        for k in ks:
            hi = v >> np.uint64(lb)
            lo = v & np.uint64((1 << lb) - 1)
            f = _mix64_np(lo ^ k) & np.uint64((1 << hb) - 1)
            v = (lo << np.uint64(hb)) | (hi ^ f)  # invertible: lo is kept, hi is masked by F(lo)
            hb, lb = lb, hb
        return v

    y = feistel(x)
    out_of_range = np.flatnonzero(y >= np.uint64(n))
    while len(out_of_range):
        y[out_of_range] = feistel(y[out_of_range])
        out_of_range = out_of_range[y[out_of_range] >= np.uint64(n)]
    return y.astype(np.int64)


class MixtureSampler:
    """Picks ``(source, sequence index)`` pairs for a weighted mixture; see the module docstring.

    ``sizes``: sequences per source. ``weights``: shares of sequences (hence of tokens: all sources
    have the same ``seq_len``), >= 0 and summing to 1; a source absent from ``weights`` has weight 0
    and is never drawn.
    """

    def __init__(self, sizes: Mapping[str, int], weights: Mapping[str, float], seed: int,
                 offsets: Mapping[str, int] | None = None):
        if not sizes:
            raise CptError("a mixture needs at least one source")
        unknown = sorted(set(weights) - set(sizes))
        if unknown:
            raise CptError(
                f"mixture weight for {', '.join(unknown)}, which is not a source (sources: {', '.join(sorted(sizes))})"
            )
        self.names: list[str] = sorted(sizes)
        self.sizes: dict[str, int] = {}
        for name in self.names:
            n = sizes[name]
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise CptError(f"mixture source {name}: size must be a non-negative integer, got {n!r}")
            self.sizes[name] = int(n)
        w = {name: float(weights.get(name, 0.0)) for name in self.names}
        bad = [f"{k}={v}" for k, v in w.items() if not math.isfinite(v) or v < 0]
        if bad:
            raise CptError(f"mixture weights must be >= 0, got {', '.join(bad)}")
        total = sum(w.values())
        if abs(total - 1.0) > 1e-6:
            shown = ", ".join(f"{k}={v:g}" for k, v in w.items())
            raise CptError(f"mixture weights must sum to 1, got {total:.6g} ({shown})")
        empty = [k for k in self.names if w[k] > 0 and self.sizes[k] == 0]
        if empty:
            raise CptError(f"mixture source {', '.join(empty)} has weight > 0 but no sequences")
        self.weights = {k: v / total for k, v in w.items()}
        self.seed = int(seed)
        self.drawn: dict[str, int] = {name: 0 for name in self.names}
        self.offsets: dict[str, int] = {name: int((offsets or {}).get(name, 0)) for name in self.names}
        self.position = 0
        self._active = [(i, self.weights[n]) for i, n in enumerate(self.names) if self.weights[n] > 0]

    def _choose(self, n: int) -> np.ndarray:
        """Source numbers (into ``self.names``) of the next ``n`` samples; advances the counters."""
        drawn = [self.drawn[name] for name in self.names]
        g = self.position
        out = np.empty(n, dtype=np.int64)
        active = self._active
        for t in range(n):
            g += 1
            best, best_v = -1, -math.inf
            for i, w in active:
                v = w * g - drawn[i]
                if v > best_v + _TIE_EPS:
                    best, best_v = i, v
            drawn[best] += 1
            out[t] = best
        self.position = g
        for i, name in enumerate(self.names):
            self.drawn[name] = drawn[i]
        return out

    def draw(self, n: int) -> list[tuple[str, int]]:
        """The next ``n`` picks as ``(source name, sequence index)``; advances the state."""
        if n < 0:
            raise ValueError(f"cannot draw {n} samples")
        before = dict(self.drawn)
        choice = self._choose(n)
        index = np.empty(n, dtype=np.int64)
        for i, name in enumerate(self.names):
            rows = np.flatnonzero(choice == i)
            if not len(rows):
                continue
            size = self.sizes[name]
            k = self.offsets[name] + before[name] + np.arange(len(rows), dtype=np.int64)  # k-th draw ever
            epoch, pos = np.divmod(k, size)
            for e in np.unique(epoch):
                sel = epoch == e
                index[rows[sel]] = permute(pos[sel], size, permutation_keys(self.seed, name, int(e)))
        names = self.names
        return [(names[c], i) for c, i in zip(choice.tolist(), index.tolist(), strict=True)]

    def repeats(self) -> dict[str, float]:
        """Epochs consumed per source (drawn / size); > 1 means sequences were seen again."""
        return {k: (v / self.sizes[k] if self.sizes[k] else 0.0) for k, v in self.consumed().items()}

    def consumed(self) -> dict[str, int]:
        """Draws made from each source so far, earlier samplers' (offsets) included."""
        return {k: self.offsets[k] + self.drawn[k] for k in self.names}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "drawn": dict(self.drawn), "position": self.position,
                "offsets": dict(self.offsets)}

    def load_state_dict(self, state: Mapping) -> None:
        try:
            seed, drawn, position = state["seed"], dict(state["drawn"]), state["position"]
        except (KeyError, TypeError) as e:
            raise CptError(
                f"mixture sampler state is malformed (missing {e}); expected seed, drawn, position"
            ) from None
        if seed != self.seed:
            raise CptError(f"mixture sampler state has seed {seed}, this run uses seed {self.seed}")
        if sorted(drawn) != self.names:
            raise CptError(
                f"mixture sampler state has sources {', '.join(sorted(drawn))}, "
                f"this run has {', '.join(self.names)}"
            )
        for k, v in drawn.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise CptError(f"mixture sampler state: drawn[{k}] = {v!r} is not a count")
        if position != sum(drawn.values()):
            raise CptError(
                f"mixture sampler state: position {position} is not the sum of drawn counts {sum(drawn.values())}"
            )
        self.drawn = {k: int(drawn[k]) for k in self.names}
        self.offsets = {k: int(state.get("offsets", {}).get(k, 0)) for k in self.names}
        self.position = int(position)
