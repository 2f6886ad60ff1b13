"""Random numbers for the numpy runtime without ``numpy.random`` (standard library and numpy arrays only).

``import numpy.random`` costs a fresh process 6.7 MiB here (32.1 vs 25.4 MiB): its seven extension modules, and
``secrets`` -> ``hmac`` -> OpenSSL's libcrypto (4.2 MiB) for entropy the runtime never asks for (every generator
it makes is seeded). An edge process is numpy plus its model; this module gives it what it draws:

- ``Rng``: the learner's draws (weights, wrong labels, noise, crops, label patterns), SplitMix64 (Steele, Lea &
  Flood 2014; the generator ``java.util.SplittableRandom`` uses, which passes BigCrush) evaluated on counters, so
  a draw of N values is a few array operations in blocks of ``BLOCK`` (no N-sized temporaries) and its whole
  state is two integers, saved as JSON in an edge file.
- ``permutation(n, seed)``: ``numpy.random.default_rng(seed).permutation(n)``, value for value (its SeedSequence,
  PCG64 and Fisher-Yates shuffle, in Python integers): the data order both runtimes share
  (``edgeff.edge.data.epoch_order``), so a numpy run sees the batches a torch run sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import cycle
from typing import Any

import numpy as np

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
BLOCK = 1 << 16  # values drawn per block
Shape = int | Sequence[int] | None


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * MIX1) & M64
    z = ((z ^ (z >> 27)) * MIX2) & M64
    return z ^ (z >> 31)


def _size(shape: Shape) -> tuple[int, ...]:
    if shape is None:
        return ()
    return (int(shape),) if isinstance(shape, int | np.integer) else tuple(int(s) for s in shape)


class Rng:
    """A seeded generator with the draws the numpy runtime makes (``numpy.random.Generator``'s names and
    arguments: ``random``, ``integers``, ``standard_normal``); ``state`` / ``from_state`` save and restore it."""

    def __init__(self, seed: int | Sequence[int] = 0) -> None:
        key = 0
        for word in ([seed] if isinstance(seed, int | np.integer) else seed):
            key = _mix64((key ^ (int(word) & M64)) + GOLDEN & M64)
        self.key, self.counter = key, 0

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> dict[str, Any]:
        return {"generator": "splitmix64", "key": self.key, "counter": self.counter}

    @state.setter
    def state(self, st: dict[str, Any]) -> None:
        if st.get("generator") == "splitmix64":
            self.key, self.counter = int(st["key"]) & M64, int(st["counter"])
            return
        # a file written before this generator (numpy's PCG64 state): a stream of its own, derived from that state
        inner = st.get("state", {})
        self.key, self.counter = _mix64((int(inner.get("state", 0)) ^ int(inner.get("inc", 0))) & M64), 0

    # ------------------------------------------------------------------ raw bits
    def _blocks(self, n: int) -> Iterator[np.ndarray]:
        """``n`` uniform 64-bit words, in blocks of at most ``BLOCK``."""
        key = np.uint64(self.key)
        for s in range(0, n, BLOCK):
            m = min(BLOCK, n - s)
            z = np.arange(self.counter + 1, self.counter + 1 + m, dtype=np.uint64)
            z *= np.uint64(GOLDEN)
            z += key
            z ^= z >> np.uint64(30)
            z *= np.uint64(MIX1)
            z ^= z >> np.uint64(27)
            z *= np.uint64(MIX2)
            z ^= z >> np.uint64(31)
            self.counter += m
            yield z

    def _fill(self, shape: Shape, dtype: Any, out: np.ndarray | None, make: Any) -> Any:
        size = _size(shape) if out is None else out.shape
        res = np.empty(size, dtype) if out is None else out
        flat = res.reshape(-1)
        s = 0
        for z in self._blocks(flat.size):
            flat[s : s + z.size] = make(z)
            s += z.size
        return res if size else res.reshape(())[()]

    # ------------------------------------------------------------------ draws
    def random(self, size: Shape = None, dtype: Any = np.float64, out: np.ndarray | None = None) -> Any:
        """Uniform in [0, 1): 24 random bits for float32, 53 for float64."""
        if np.dtype(dtype) == np.float32:
            return self._fill(size, np.float32, out, lambda z: (z >> np.uint64(40)).astype(np.float32) * np.float32(2**-24))
        return self._fill(size, np.float64, out, lambda z: (z >> np.uint64(11)).astype(np.float64) * 2.0**-53)

    def uniform(self, low: float = 0.0, high: float = 1.0, size: Shape = None) -> Any:
        """Uniform in [low, high) (float64)."""
        return low + (high - low) * self.random(size)

    def integers(self, low: int, high: int, size: Shape = None) -> Any:
        """Uniform integers in [low, high) (int64), by a 32-bit multiply-shift (``high - low`` below 2^32; its
        bias, at most (high - low) / 2^32, is below 1e-9 for the label counts drawn here)."""
        span = int(high) - int(low)
        if not 0 < span <= M32:
            raise ValueError(f"integers needs 0 < high - low <= 2^32, got [{low}, {high})")
        return self._fill(size, np.int64, None, lambda z: (((z >> np.uint64(32)) * np.uint64(span)) >> np.uint64(32))
                          .astype(np.int64) + int(low))

    def standard_normal(self, size: Shape = None, dtype: Any = np.float64, out: np.ndarray | None = None) -> Any:
        """N(0, 1) by the Box-Muller transform of two 53-bit uniforms (both of its outputs used)."""
        def make(z: np.ndarray) -> np.ndarray:
            half = (z.size + 1) // 2
            u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
            u1 = 1.0 - u[:half]  # (0, 1]: the log is finite
            u2 = u[half:] if z.size % 2 == 0 else np.append(u[half:], 0.0)
            r = np.sqrt(-2.0 * np.log(u1))
            return np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])[: z.size]
        return self._fill(size, dtype, out, make)


# ---------------------------------------------------------------------- numpy's permutation, value for value
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_PCG_MULT = (2549297995355413924 << 64) | 4865540595714422341
M128 = (1 << 128) - 1


def _words(x: int | Sequence[int]) -> list[int]:
    """``SeedSequence``'s entropy as 32-bit words (an int: little-endian words; a sequence: each in turn)."""
    if isinstance(x, int | np.integer):
        n = int(x)
        if n < 0:
            raise ValueError("a seed must be non-negative")
        out = [n & M32] if n == 0 else []
        while n > 0:
            out.append(n & M32)
            n >>= 32
        return out
    return [w for v in x for w in _words(v)]


def _seed_state(seed: int | Sequence[int]) -> tuple[int, int]:
    """``SeedSequence(seed).generate_state(4, uint64)`` as PCG64's (initstate, initseq)."""
    entropy = _words(seed)
    h = [_INIT_A]

    def hashmix(value: int) -> int:
        value = (value ^ h[0]) & M32
        h[0] = (h[0] * _MULT_A) & M32
        value = (value * h[0]) & M32
        return value ^ (value >> 16)

    def mix(x: int, y: int) -> int:
        r = (_MIX_L * x - _MIX_R * y) & M32
        return r ^ (r >> 16)

    pool = [hashmix(entropy[i] if i < len(entropy) else 0) for i in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(4, len(entropy)):
        for dst in range(4):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    words, hb = [], _INIT_B
    for v in (next(c) for c in [cycle(pool)] for _ in range(8)):
        v ^= hb
        hb = (hb * _MULT_B) & M32
        v = (v * hb) & M32
        words.append(v ^ (v >> 16))
    u64 = [words[2 * i] | (words[2 * i + 1] << 32) for i in range(4)]
    return (u64[0] << 64) | u64[1], (u64[2] << 64) | u64[3]


def permutation(n: int, seed: int | Sequence[int]) -> np.ndarray:
    """``numpy.random.default_rng(seed).permutation(n)`` (int64), computed without ``numpy.random``."""
    initstate, initseq = _seed_state(seed)
    inc = ((initseq << 1) | 1) & M128
    state = ((inc + initstate) * _PCG_MULT + inc) & M128  # srandom: state 0, a step (inc), + initstate, a step
    arr = list(range(n))
    spare: int | None = None  # next32's buffered upper half
    for i in range(n - 1, 0, -1):
        mask = i
        for s in (1, 2, 4, 8, 16, 32):
            mask |= mask >> s
        while True:
            if i <= M32:
                if spare is not None:
                    word, spare = spare, None
                else:
                    state = (state * _PCG_MULT + inc) & M128
                    rot = state >> 122
                    v = ((state >> 64) ^ state) & M64
                    word64 = ((v >> rot) | (v << ((-rot) & 63))) & M64
                    word, spare = word64 & M32, word64 >> 32
            else:
                state = (state * _PCG_MULT + inc) & M128
                rot = state >> 122
                v = ((state >> 64) ^ state) & M64
                word = ((v >> rot) | (v << ((-rot) & 63))) & M64
            j = word & mask
            if j <= i:
                break
        arr[i], arr[j] = arr[j], arr[i]
    return np.array(arr, dtype=np.int64)
