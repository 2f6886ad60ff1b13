"""The host side of the serial link: talks to a device (real or ``edgeff device-sim``) over any
pyserial URL — ``/dev/ttyUSB0``, a pty path, ``socket://host:port`` — with the framed protocol of
``edgeff.firmware_sim.protocol``.

Reliability: one request in flight; each carries a fresh sequence number and is retransmitted on
timeout, on a NACK, or when a corrupt reply arrives; replies with another sequence number are stale
and ignored. The device answers a repeated sequence number from its reply cache, and applies a TRAIN
batch only if it starts at the device's own sample count — so no sample is lost or applied twice.
Every reply carries the device's boot id: when it changes (the device reset) or the port fails, the
stream reconnects, asks the device how many samples its restored state has seen, and resumes there.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeff.errors import EdgeFFError
from edgeff.firmware_sim.protocol import FrameDecoder, FrameError, Message, MsgType, encode_frame

CHUNK = 16 * 1024  # model upload chunk (bytes)


class LinkError(EdgeFFError):
    """The device did not answer (after every retransmission), or the port failed."""


class DeviceResetError(LinkError):
    """The device rebooted since the session began (its boot id changed)."""


class DeviceRefusedError(EdgeFFError):
    """The device answered with an ERROR; ``code`` is machine-readable, the message says what to do."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"device refused ({code}): {text}")
        self.code = code


@dataclass
class LinkStats:
    requests: int = 0
    retransmits: int = 0
    nacks: int = 0
    corrupt_replies: int = 0
    stale_replies: int = 0
    busy: int = 0  # "busy" replies: the device was working on a long request, the request was sent again
    reconnects: int = 0
    bytes_tx: int = 0
    bytes_rx: int = 0


@dataclass
class StreamResult:
    samples: int  # samples the device applied in this stream
    seconds: float
    losses: list[list[float]] = field(default_factory=list)  # per batch, per layer
    reconnects: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def open_port(url: str, timeout: float = 0.01) -> Any:
    """``serial.serial_for_url`` with the settings the protocol needs (8N1, 115200 on real UARTs)."""
    import serial

    return serial.serial_for_url(url, baudrate=115200, timeout=timeout, write_timeout=5.0)


def _planned_memory(blob: bytes) -> int | None:
    """The RAM a device model will plan for at batch 1 (None for an ONNX graph or an unreadable file)."""
    if not blob.startswith(b"PK"):
        return None
    try:
        from edgeff.edge.plan import learner_plan
        from edgeff.firmware_sim.edge_model import model_from_bytes

        net = model_from_bytes(blob)[0]  # the device's plan: loading this file, training and predicting at batch 1
        return int(learner_plan(net.learner, 1, file_bytes=len(blob))["total"])
    except Exception:  # noqa: BLE001 - the device checks it again and says what is wrong
        return None


class DeviceClient:
    """A session with one device.

    Args:
        url: any pyserial URL.
        timeout: base reply timeout in seconds; the effective one also scales with the observed
            round-trip time (4× its running average), so slow requests are not retransmitted early.
        retries: retransmissions before a request raises ``LinkError``.
        busy_s: how long a request is sent again while the device answers ``busy`` (it is working on a long
            request: a readout solve, a large batch) before ``DeviceRefusedError`` says so.
        reconnect_s: how long ``reconnect`` keeps trying to reopen the port.
        wrap: optional function applied to the opened port (e.g. ``FaultyPort`` for fault injection).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.25,
        retries: int = 40,
        busy_s: float = 300.0,
        reconnect_s: float = 15.0,
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.busy_s = busy_s
        self.reconnect_s = reconnect_s
        self.wrap = wrap
        self.stats = LinkStats()
        self.port: Any = None
        self.seq = 0
        self.boot_id: int | None = None
        self.info: dict[str, Any] = {}
        self._rtt = 0.0
        self._decoder = FrameDecoder()

    # ----------------------------------------------------------------- session
    def open(self) -> dict[str, Any]:
        """Open the port and say HELLO; returns the device's capabilities."""
        try:
            port = open_port(self.url)
        except (OSError, ValueError) as e:  # serial.SerialException is an OSError
            raise LinkError(f"cannot open {self.url}: {e}. Check the port (edgeff device-sim prints it).") from None
        self.port = self.wrap(port) if self.wrap is not None else port
        self._decoder = FrameDecoder()
        self.boot_id = None
        self.info = self.request(MsgType.HELLO).meta
        self.boot_id = int(self.info["boot_id"])
        return self.info

    def close(self) -> None:
        if self.port is not None:
            try:
                self.port.close()
            except Exception:  # noqa: BLE001, S110 - closing a dead port must not mask the real error
                pass
            self.port = None

    def __enter__(self) -> DeviceClient:  # noqa: PYI034
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reconnect(self) -> dict[str, Any]:
        """Close and reopen the port until the device answers HELLO (up to ``reconnect_s``)."""
        self.close()
        deadline = time.monotonic() + self.reconnect_s
        while True:
            try:
                info = self.open()
                self.stats.reconnects += 1
                return info
            except (LinkError, OSError, ValueError) as e:  # serial.SerialException is an OSError
                self.close()
                if time.monotonic() > deadline:
                    raise LinkError(f"device at {self.url} did not come back within {self.reconnect_s:.0f} s: {e}") \
                        from None
                time.sleep(0.2)

    # ----------------------------------------------------------------- requests
    def request(self, kind: MsgType, meta: dict[str, Any] | None = None,
                arrays: dict[str, np.ndarray] | None = None) -> Message:
        """Send one request and return its ACK; raises ``DeviceRefusedError`` on an ERROR reply,
        ``DeviceResetError`` if the device rebooted, ``LinkError`` if it never answers."""
        if self.port is None:
            raise LinkError("the port is not open; call open() first")
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        frame = encode_frame(Message(kind, self.seq, meta or {}, arrays or {}))
        self.stats.requests += 1
        busy_until = time.monotonic() + self.busy_s
        attempt = -1
        while attempt < self.retries:
            attempt += 1
            if attempt:
                self.stats.retransmits += 1
            t0 = time.monotonic()
            try:
                self.port.write(frame)
            except OSError as e:
                raise LinkError(f"writing to {self.url} failed: {e}") from None
            self.stats.bytes_tx += len(frame)
            reply = self._await(self.seq, t0 + max(self.timeout, 4 * self._rtt))
            if reply is None:
                continue
            self._rtt = 0.8 * self._rtt + 0.2 * (time.monotonic() - t0) if self._rtt else time.monotonic() - t0
            boot = reply.meta.get("boot")
            if kind != MsgType.HELLO and self.boot_id is not None and boot is not None and boot != self.boot_id:
                raise DeviceResetError(f"the device at {self.url} rebooted (boot id {boot:#x})")
            if reply.type == MsgType.ERROR and reply.meta.get("code") == "busy" and time.monotonic() < busy_until:
                self.stats.busy += 1  # the device is alive and working on a long request: ask again shortly,
                attempt -= 1  # without spending a retry
                time.sleep(max(self.timeout, 4 * self._rtt))
                continue
            if reply.type == MsgType.ERROR:
                raise DeviceRefusedError(str(reply.meta.get("code")), str(reply.meta.get("text")))
            return reply
        raise LinkError(f"no reply from {self.url} to {kind.name} after {self.retries + 1} attempts")

    def _await(self, seq: int, deadline: float) -> Message | None:
        """The reply to ``seq``, or None when it is time to retransmit (timeout, NACK, corrupt reply)."""
        while time.monotonic() < deadline:
            try:
                data = self.port.read(max(1, self.port.in_waiting))
            except OSError as e:
                raise LinkError(f"reading from {self.url} failed: {e}") from None
            if not data:
                continue
            self.stats.bytes_rx += len(data)
            for item in self._decoder.feed(data):
                if isinstance(item, FrameError):
                    self.stats.corrupt_replies += 1
                    return None  # maybe it was our reply: ask again (the device answers from its cache)
                if item.type == MsgType.NACK:
                    self.stats.nacks += 1
                    return None
                if item.seq != seq:
                    self.stats.stale_replies += 1
                    continue
                return item
        return None

    # ----------------------------------------------------------------- verbs
    def hello(self) -> dict[str, Any]:
        self.info = self.request(MsgType.HELLO).meta
        return self.info

    def load(self, model: bytes, *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Upload a device model in chunks; the device checks the whole-file CRC and its RAM budget."""
        blob = bytes(model)
        crc = zlib.crc32(blob)
        meta: dict[str, Any] = {}
        first: dict[str, Any] = {}
        planned = _planned_memory(blob)
        if planned is not None:  # declared up front: a model that cannot fit is refused before the upload
            first["memory"] = planned
        for off in range(0, max(len(blob), 1), CHUNK):
            part = np.frombuffer(blob[off : off + CHUNK], np.uint8)
            meta = self.request(MsgType.LOAD_MODEL, {"offset": off, "total": len(blob), "crc32": crc,
                                                     **(first if off == 0 else {})}, {"chunk": part}).meta
            if progress is not None:
                progress(min(off + CHUNK, len(blob)), len(blob))
        return meta

    def infer(self, x: np.ndarray, *, per_layer: bool = False) -> dict[str, np.ndarray]:
        """Scores (B, K) and predicted classes (B,) [and per-layer predictions (B, L)] for ``x`` (B, D)."""
        return self.request(MsgType.INFER, {"per_layer": per_layer}, {"x": np.asarray(x)}).arrays

    def train(self, x: np.ndarray, y: np.ndarray, first: int) -> dict[str, Any]:
        """One on-device training step on samples ``first .. first+B-1`` of the device's stream."""
        return self.request(MsgType.TRAIN, {"first": int(first)},
                            {"x": np.asarray(x), "y": np.asarray(y, np.int64)}).meta

    def add_class(self, name: str, x: np.ndarray | None = None) -> dict[str, Any]:
        arrays = {} if x is None else {"x": np.asarray(x)}
        return self.request(MsgType.ADD_CLASS, {"name": name}, arrays).meta

    def device_stats(self, *, reset_peak: bool = False) -> dict[str, Any]:
        return self.request(MsgType.STATS, {"reset_peak": reset_peak}).meta

    def save(self) -> dict[str, Any]:
        return self.request(MsgType.SAVE).meta

    def reset(self) -> dict[str, Any]:
        """Reboot the device (it restores its saved state) and start a new session."""
        self.request(MsgType.RESET)
        return self.reconnect()

    # ----------------------------------------------------------------- streams
    def stream(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int = 1,
        save_every: int | None = 500,
        start: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> StreamResult:
        """Train on-device on ``x``, ``y`` in order, surviving resets and port failures.

        Sample i of this stream is the device's sample ``start + i`` (``start`` defaults to the
        device's count when the stream begins). Every ``save_every`` samples (and at the end) the
        device saves its state (if it has storage); after a reset it restores the last save and the stream resumes
        from the device's own count, so every sample is applied exactly once to the final state.
        """
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if self.port is None:
            self.open()
        else:
            self.hello()  # the device's count now (a LOAD_MODEL resets it)
        offset = int(self.info["samples_seen"]) if start is None else start
        pos = int(self.info["samples_seen"]) - offset
        if not self.info.get("storage", True):
            save_every = None  # nowhere to save: a reset loses the stream's progress
        result = StreamResult(0, 0.0)
        last_save = pos
        t0 = time.perf_counter()
        n = len(x)
        while pos < n:
            try:
                meta = self.train(x[pos : pos + batch_size], y[pos : pos + batch_size], offset + pos)
                new_pos = int(meta["samples_seen"]) - offset
                if meta.get("applied"):
                    result.losses.append([float(v) for v in meta["losses"]])
                pos = new_pos
                if save_every and (pos - last_save >= save_every or pos >= n):
                    self.save()
                    last_save = pos
            except LinkError:
                info = self.reconnect()
                result.reconnects += 1
                pos = int(info["samples_seen"]) - offset
                if pos < 0:
                    raise LinkError(f"the device restored a state from before this stream began "
                                    f"(sample {info['samples_seen']} < {offset}); restart the stream") from None
                last_save = pos
            if progress is not None:
                progress(pos)
        result.seconds = time.perf_counter() - t0
        result.samples = pos
        return result

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 50) -> tuple[float, np.ndarray]:
        """Accuracy of the device's predictions on ``x``, and the predictions. A batch the device has
        no RAM for is halved until it fits."""
        preds = []
        i = 0
        while i < len(x):
            try:
                preds.append(self.infer(x[i : i + batch_size])["pred"])
            except DeviceRefusedError as e:
                if e.code != "too_big" or batch_size == 1:
                    raise
                batch_size //= 2
                continue
            i += batch_size
        pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        return float((pred == np.asarray(y)).mean()) if len(pred) else float("nan"), pred
