"""Fault injection: a transport wrapper that drops, corrupts, duplicates and delays frames and bytes.

Wrap the host's port (``DeviceClient(url, wrap=lambda port: FaultyPort(port, rate=0.05))``): writes
are split at frame delimiters and each frame is faulted with probability ``rate``; each chunk read
back is faulted with the same probability, so both directions see faults. The kind of a fault is
drawn uniformly from ``kinds``. Seeded, so a failing run can be replayed.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

KINDS = ("drop", "corrupt", "duplicate", "delay")


class FaultyPort:
    """A pyserial-like port (``read``, ``write``, ``in_waiting``, ``timeout``, ``close``) with faults.

    Args:
        port: the real port (from ``serial.serial_for_url``).
        rate: probability that a written frame, or a chunk read, is faulted.
        seed: seeds the fault RNG.
        kinds: which faults to draw from.
        max_delay: longest injected delay in seconds.
    """

    def __init__(
        self, port: Any, *, rate: float = 0.05, seed: int = 0, kinds: tuple[str, ...] = KINDS, max_delay: float = 0.02
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {KINDS}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be in [0, 1], got {rate}")
        self.port = port
        self.rate = rate
        self.kinds = kinds
        self.max_delay = max_delay
        self.rng = np.random.default_rng(seed)
        self.injected = {f"{d}_{k}": 0 for d in ("tx", "rx") for k in KINDS}

    def _fault(self, data: bytes, direction: str) -> bytes:
        if not data or self.rng.random() >= self.rate:
            return data
        kind = str(self.rng.choice(self.kinds))
        self.injected[f"{direction}_{kind}"] += 1
        if kind == "drop":
            return b""
        if kind == "corrupt":
            buf = bytearray(data)
            i = int(self.rng.integers(len(buf)))
            buf[i] ^= 1 << int(self.rng.integers(8))
            return bytes(buf)
        if kind == "duplicate":
            return data + data
        time.sleep(float(self.rng.uniform(0, self.max_delay)))
        return data

    def write(self, data: bytes) -> int:
        frames = bytes(data).split(b"\x00")
        out = b"".join(self._fault(f + b"\x00", "tx") for f in frames[:-1])
        if frames[-1]:
            out += self._fault(frames[-1], "tx")
        if out:
            self.port.write(out)
        return len(data)

    def read(self, size: int = 1) -> bytes:
        return self._fault(self.port.read(size), "rx")

    @property
    def in_waiting(self) -> int:
        return int(self.port.in_waiting)

    @property
    def timeout(self) -> float | None:
        return self.port.timeout  # type: ignore[no-any-return]

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self.port.timeout = value

    def reset_input_buffer(self) -> None:
        self.port.reset_input_buffer()

    def close(self) -> None:
        self.port.close()
