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

Mixtures over time. The weights may change along the stage (:class:`MixtureSchedule`: piecewise
constant, or linear between two mixtures, e.g. replay 25% -> 5%, or a switch to a high-quality source
when the LR decay starts). The rule stays the same with the constant share times ``g`` replaced by the
integral of the share up to sample ``g``: sample ``g`` goes to the source with the largest
``W[s](g + 1) - drawn[s]``, ``W[s](x) = integral_0^x share[s](u) du``. ``W`` is a closed-form function of
``g`` (piecewise linear or quadratic), so the picks still depend on the counters alone and a resume
continues them exactly; with two sources every prefix holds each within one sample of its integral. A
schedule may also grow as the run goes (:mod:`cpt.data.controller`: a step point appended at a probe, from
the position drawn so far); its points then ride in the sampler's state.
"""

from __future__ import annotations

import bisect
import math
import zlib
from collections.abc import Mapping

import numpy as np

from cpt.errors import CptError
from cpt.units import format_count

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


RAMPS = ("step", "linear")


class MixtureSchedule:
    """Shares of each source along a stage, as points ``(tokens from the stage start, shares, ramp)``.

    A point's ``ramp`` says how the mixture reaches it from the previous point: ``step`` (it holds the
    previous shares until the point, then jumps) or ``linear`` (interpolated between the two points).
    The first point is at token 0; after the last one its shares hold to the end of the stage. A plain
    ``{name: share}`` is the one-point schedule (:meth:`constant`). ``seq_len`` converts tokens to the
    sampler's unit, sequences.
    """

    def __init__(self, points, seq_len: int = 1):
        points = [(int(t), dict(w), str(r)) for t, w, r in points]
        if not points:
            raise CptError("a mixture schedule needs at least one point")
        if points[0][0] != 0:
            raise CptError(f"a mixture schedule starts at token 0, not {points[0][0]}")
        for i, (t, w, r) in enumerate(points):
            if r not in RAMPS:
                raise CptError(f"mixture point {i}: ramp {r!r}, expected one of {', '.join(RAMPS)}")
            bad = [f"{k}={v}" for k, v in w.items() if not math.isfinite(float(v)) or v < 0]
            if bad:
                raise CptError(f"mixture weights must be >= 0, got {', '.join(bad)}")
            total = sum(w.values())
            if abs(total - 1.0) > 1e-6:
                shown = ", ".join(f"{k}={v:g}" for k, v in w.items())
                raise CptError(f"mixture weights must sum to 1, got {total:.6g} ({shown})")
            if i and t < points[i - 1][0]:
                raise CptError(f"mixture points must be in order of tokens: point {i} at {t} comes after "
                               f"{points[i - 1][0]}")
        self.points = points
        self.seq_len = int(seq_len)
        self.names = sorted({k for _, w, _ in points for k in w})
        # normalised shares per point in self.names order, and the integral W at each point (in sequences)
        self._x = [t / self.seq_len for t, _, _ in points]
        self._w = [[w.get(k, 0.0) / sum(w.values()) for k in self.names] for _, w, _ in points]
        self._linear = [r == "linear" for _, _, r in points]
        self._c = [[0.0] * len(self.names)]
        for i in range(1, len(points)):
            self._c.append(self._integral(i - 1, self._x[i]))

    @classmethod
    def constant(cls, shares) -> MixtureSchedule:
        return cls([(0, shares, "step")])

    @property
    def is_constant(self) -> bool:
        return all(w == self._w[0] for w in self._w)

    def active(self) -> list[str]:
        """Sources with a share > 0 somewhere along the stage."""
        return [k for j, k in enumerate(self.names) if any(w[j] > 0 for w in self._w)]

    def _segment(self, x: float) -> int:
        """The last point at or before ``x`` (the first one before the stage start)."""
        return max(bisect.bisect_right(self._x, x) - 1, 0)

    def _integral(self, i: int, x: float) -> list[float]:
        """W at ``x`` (sequences) for ``x`` in segment ``i`` (from point i to point i + 1)."""
        d = x - self._x[i]
        c, w = self._c[i], self._w[i]
        if i + 1 < len(self._x) and self._linear[i + 1] and self._x[i + 1] > self._x[i]:
            span, w1 = self._x[i + 1] - self._x[i], self._w[i + 1]
            return [c[j] + w[j] * d + 0.5 * (w1[j] - w[j]) * d * d / span for j in range(len(w))]
        return [c[j] + w[j] * d for j in range(len(w))]

    def cumulative(self, g: float) -> list[float]:
        """``W[s](g)`` for each source of :attr:`names`: the sequences it is due after ``g`` sequences."""
        return self._integral(self._segment(g), g)

    def shares_between(self, g0: int, g1: int) -> dict[str, float]:
        """The mean share of each source over sequences ``[g0, g1)``: what a step drawing them was due."""
        a, b = self.cumulative(g0), self.cumulative(g1)
        n = max(g1 - g0, 1)
        return {k: (b[j] - a[j]) / n for j, k in enumerate(self.names)}

    def share_at(self, tokens: float) -> dict[str, float]:
        """The shares in effect at ``tokens`` from the stage start: a point's own dict where the mixture
        holds one (so a constant mixture comes back exactly as written), else interpolated."""
        x = tokens / self.seq_len
        i = self._segment(x)
        if i + 1 < len(self._x) and self._linear[i + 1] and self._x[i + 1] > self._x[i]:
            f = (x - self._x[i]) / (self._x[i + 1] - self._x[i])
            return {k: (1 - f) * self._w[i][j] + f * self._w[i + 1][j] for j, k in enumerate(self.names)}
        return dict(self.points[i][1])

    def mean(self, tokens: int) -> dict[str, float]:
        """The mean shares over the first ``tokens`` of the stage (its whole budget: the stage's data)."""
        if self.is_constant:
            return dict(self.points[0][1])
        return self.shares_between(0, tokens / self.seq_len)

    def state(self) -> list:
        """A JSON-able record of the schedule (compared on resume)."""
        return [[t, {k: float(v) for k, v in sorted(w.items())}, r] for t, w, r in self.points]

    def restore(self, saved) -> None:
        """Go on from a sampler state saved under ``saved`` (:meth:`state`, None for a constant mixture): a
        fixed schedule must be the same one; one that changes as it goes (cpt.data.controller) takes it over."""
        if saved != (None if self.is_constant else self.state()):
            raise CptError(
                "mixture sampler state was saved under another mixture schedule than this stage's "
                f"(saved: {saved or 'constant'}; now: {self.describe()}): the data position cannot go on exactly"
            )

    def on_probe(self, tokens: int, record: Mapping) -> dict:
        """A probe's results at ``tokens`` from the stage start; a schedule that sets its shares from them
        (cpt.data.controller) does so here and returns what to log. A fixed schedule: nothing."""
        return {}

    def describe(self) -> str:
        """One line, tokens from the stage start: ``de 0.75 en 0.25 at 0, linear to de 0.95 en 0.05 at 1M``."""
        def fmt(w: dict) -> str:
            return " ".join(f"{k} {v:g}" for k, v in w.items() if v)
        if len(self.points) == 1:
            return fmt(self.points[0][1])
        parts = [f"{fmt(self.points[0][1])} at 0"]
        for t, w, r in self.points[1:]:
            parts.append(f"{'linear to' if r == 'linear' else 'then'} {fmt(w)} at {format_count(t)}")
        return ", ".join(parts)


class MixtureSampler:
    """Picks ``(source, sequence index)`` pairs for a weighted mixture; see the module docstring.

    ``sizes``: sequences per source. ``weights``: shares of sequences (hence of tokens: all sources
    have the same ``seq_len``), >= 0 and summing to 1, or a :class:`MixtureSchedule` of them along the
    stage; a source absent from ``weights`` has weight 0 and is never drawn.
    """

    def __init__(self, sizes: Mapping[str, int], weights: Mapping[str, float] | MixtureSchedule, seed: int,
                 offsets: Mapping[str, int] | None = None):
        if not sizes:
            raise CptError("a mixture needs at least one source")
        schedule = weights if isinstance(weights, MixtureSchedule) else MixtureSchedule.constant(weights)
        unknown = sorted(set(schedule.names) - set(sizes))
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
        active = schedule.active()
        empty = [k for k in active if self.sizes[k] == 0]
        if empty:
            raise CptError(f"mixture source {', '.join(empty)} has weight > 0 but no sequences")
        self.schedule = schedule
        self.seed = int(seed)
        self.drawn: dict[str, int] = {name: 0 for name in self.names}
        self.offsets: dict[str, int] = {name: int((offsets or {}).get(name, 0)) for name in self.names}
        self.position = 0
        self._last = (0, 0)  # sequence numbers of the last draw
        # (number in self.names, number in schedule.names) of each source that can be drawn
        self._active = [(self.names.index(k), schedule.names.index(k)) for k in active]

    def _choose(self, n: int) -> np.ndarray:
        """Source numbers (into ``self.names``) of the next ``n`` samples; advances the counters."""
        drawn = [self.drawn[name] for name in self.names]
        g = self.position
        out = np.empty(n, dtype=np.int64)
        active, due = self._active, self.schedule.cumulative
        for t in range(n):
            g += 1
            target = due(g)
            best, best_v = -1, -math.inf
            for i, j in active:
                v = target[j] - drawn[i]
                if v > best_v + _TIE_EPS:
                    best, best_v = i, v
            drawn[best] += 1
            out[t] = best
        self._last = (self.position, g)
        self.position = g
        for i, name in enumerate(self.names):
            self.drawn[name] = drawn[i]
        return out

    def last_shares(self) -> dict[str, float]:
        """The shares the schedule gave the sequences of the last draw (a step's batch), active sources."""
        due = self.schedule.shares_between(*self._last)
        return {k: due[k] for k in self.schedule.active()}

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

    def on_probe(self, tokens: int, record: Mapping) -> dict:
        """Hand a probe's results (at ``tokens`` from the stage start, when exactly ``tokens`` worth of
        sequences have been drawn) to the schedule: a controlled mixture sets its share from the next draw
        on. Returns the fields to log with the probe."""
        return self.schedule.on_probe(tokens, record)

    def repeats(self) -> dict[str, float]:
        """Epochs consumed per source (drawn / size); > 1 means sequences were seen again."""
        return {k: (v / self.sizes[k] if self.sizes[k] else 0.0) for k, v in self.consumed().items()}

    def consumed(self) -> dict[str, int]:
        """Draws made from each source so far, earlier samplers' (offsets) included."""
        return {k: self.offsets[k] + self.drawn[k] for k in self.names}

    def state_dict(self) -> dict:
        state = {"seed": self.seed, "drawn": dict(self.drawn), "position": self.position,
                 "offsets": dict(self.offsets)}
        if not self.schedule.is_constant:  # the counters mean something only under the same schedule
            state["schedule"] = self.schedule.state()
        return state

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
        self.schedule.restore(state.get("schedule"))
        self.drawn = {k: int(drawn[k]) for k in self.names}
        self.offsets = {k: int(state.get("offsets", {}).get(k, 0)) for k in self.names}
        self.position = int(position)
