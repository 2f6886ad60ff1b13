"""The framed serial protocol, as pure bytes <-> messages (no I/O here; the transport is separate).

A frame on the wire is ``COBS(header + payload + crc32) + b"\\x00"``:

- header (little-endian, 12 bytes): protocol version (u8), message type (u8), flags (u8, 0),
  reserved (u8), sequence number (u32), payload length (u32);
- payload: a message body (``encode_body``): a u32 length, a UTF-8 JSON object (the message's
  small fields plus a table of arrays), then the arrays' raw little-endian bytes;
- crc32: ``zlib.crc32`` over header + payload (u32).

COBS (Consistent Overhead Byte Stuffing) removes every 0x00 from the frame, so 0x00 always marks a
frame boundary and a receiver resynchronises after any corruption at the next delimiter.

Reliability lives one level up (``edgeff.host.DeviceClient`` and ``edgeff.firmware_sim.device``):
every request is answered by an ACK (or ERROR) carrying the request's sequence number; the sender
retransmits on timeout or NACK; the receiver answers a repeated sequence number from its cache
without applying the request twice.
"""

from __future__ import annotations

import array
import json
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

VERSION = 1
HEADER = struct.Struct("<BBBBII")  # version, type, flags, reserved, seq, payload length
CRC = struct.Struct("<I")
MAX_PAYLOAD = 1 << 20  # 1 MiB: a longer frame is dropped as corrupt
DTYPES = ("uint8", "int8", "int32", "int64", "float32", "float64")
# bounds on a body's table, checked before anything is allocated
MAX_HEAD = 64 * 1024  # bytes of JSON
MAX_DEPTH = 8  # nesting of JSON objects/lists
MAX_ARRAYS = 16
MAX_NAME = 64  # characters of an array name
MAX_DIMS = 8


class MsgType(IntEnum):
    HELLO = 1  # -> device capabilities, boot id, samples seen
    LOAD_MODEL = 2  # one chunk of a model file; the last chunk installs it
    INFER = 3  # x -> scores, class
    TRAIN = 4  # x, y -> per-layer losses
    ADD_CLASS = 5  # a new class, optionally initialised from examples
    STATS = 6  # -> per-layer memory and counters
    SAVE = 7  # persist the device state (atomic)
    RESET = 8  # reboot: drop RAM, restore the saved state
    ERROR = 9  # reply: code + text
    ACK = 10  # reply: the request's result
    NACK = 11  # reply: a corrupt frame arrived; please retransmit


class FrameError(ValueError):
    """A frame that cannot be decoded (bad COBS, length, version, CRC or body)."""


@dataclass(frozen=True)
class Message:
    """One protocol message: its type, sequence number, JSON-able fields and named arrays."""

    type: MsgType
    seq: int
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------- COBS
def cobs_encode(data: bytes) -> bytes:
    """COBS-encode ``data``: the result holds no 0x00 byte and is at most len/254 + 1 bytes longer.

    With a virtual 0x00 in front, COBS replaces every 0x00 by the distance to the next one (or to the
    end); vectorised with numpy when no run of non-zero bytes reaches 254, else block by block.
    """
    buf = np.frombuffer(b"\x00" + bytes(data), np.uint8).copy()
    zeros = np.flatnonzero(buf == 0)
    dist = np.diff(np.append(zeros, len(buf)))
    if dist.max(initial=0) < 255:
        buf[zeros] = dist
        return buf.tobytes()
    out = bytearray()
    for seg in bytes(data).split(b"\x00"):
        i = 0
        while len(seg) - i >= 254:
            out.append(255)
            out += seg[i : i + 254]
            i += 254
        out.append(len(seg) - i + 1)
        out += seg[i:]
    return bytes(out)


def cobs_decode(data: bytes | bytearray | memoryview) -> bytes:
    """Invert ``cobs_encode``; raises ``FrameError`` on a malformed encoding. The block chain is walked once
    (block offsets kept as int32, 4 bytes per block, not a Python object each), the output built by numpy."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    n = len(data)
    if data.find(0) != -1:
        raise FrameError("COBS: zero byte inside a frame")
    codes = array.array("i")
    i = 0
    while i < n:  # one step per block: the code bytes chain through the frame
        codes.append(i)
        i += data[i]
    if i != n:
        raise FrameError("COBS: block runs past the end of the frame")
    if not codes:
        return b""
    arr = np.frombuffer(data, np.uint8)
    pos = np.frombuffer(codes, np.int32)
    keep = np.ones(n, bool)
    keep[pos[0]] = False  # the leading code byte
    keep[pos[1:][arr[pos[:-1]] == 255]] = False  # a 255-block is not followed by a zero
    out = arr.copy()
    out[pos] = 0
    return out[keep].tobytes()


# --------------------------------------------------------------------------- bodies
def encode_body(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """A message body: u32 JSON length, JSON ``{"meta": ..., "arrays": [[name, dtype, shape], ...]}``,
    then each array's little-endian bytes in table order."""
    table = []
    blobs = []
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.name not in DTYPES:
            raise ValueError(f"array {name!r} has dtype {a.dtype}; the protocol carries {DTYPES}")
        table.append([name, a.dtype.name, list(a.shape)])
        blobs.append(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    head = json.dumps({"meta": meta, "arrays": table}, separators=(",", ":")).encode()
    if len(head) > MAX_HEAD or _depth(meta) > MAX_DEPTH:  # what decode_body refuses is never sent
        raise ValueError(f"message head of {len(head)} bytes, nested {_depth(meta)} deep, exceeds the protocol's "
                         f"{MAX_HEAD} bytes / depth {MAX_DEPTH}")
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def _depth(obj: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            depth = max(depth, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return depth


def _short(v: Any) -> str:
    """A value for an error message, never long (a hostile name must not be echoed back whole)."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def decode_body(body: bytes | memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Invert ``encode_body``; raises ``FrameError`` on any inconsistency. Sizes, counts, nesting and
    names are bounded (``MAX_*``) and every array's size is checked against the payload before it is read."""
    if len(body) < 4:
        raise FrameError("body shorter than its length field")
    (n,) = struct.unpack_from("<I", body)
    if n > MAX_HEAD:
        raise FrameError(f"body JSON of {n} bytes exceeds {MAX_HEAD}")
    if 4 + n > len(body):
        raise FrameError("body JSON runs past the payload")
    try:
        head = json.loads(bytes(body[4 : 4 + n]).decode())
        if not isinstance(head, dict):
            raise TypeError("the body header must be an object")
        meta, table = head["meta"], head["arrays"]
        if not isinstance(meta, dict) or not isinstance(table, list):
            raise TypeError("meta must be an object and arrays a list")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise FrameError(f"bad body header: {_short(str(e))}") from None
    if _depth(meta) > MAX_DEPTH:
        raise FrameError(f"body JSON nested deeper than {MAX_DEPTH}")
    if len(table) > MAX_ARRAYS:
        raise FrameError(f"{len(table)} arrays in one message; at most {MAX_ARRAYS}")
    arrays: dict[str, np.ndarray] = {}
    pos = 4 + n
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise FrameError(f"bad array entry {_short(entry)}")
        name, dtype, shape = entry
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or dtype not in DTYPES:
            raise FrameError(f"bad array entry {_short(name)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_PAYLOAD for s in shape):
            raise FrameError(f"bad shape for array {_short(name)}")
        dt = np.dtype(dtype).newbyteorder("<")
        count = 1
        for s in shape:  # Python integers: no overflow, and stop as soon as it cannot fit
            count *= s
            if count * dt.itemsize > len(body) - pos:
                raise FrameError(f"array {_short(name)} runs past the payload")
        size = count * dt.itemsize
        arrays[name] = np.frombuffer(body, dt, count=count, offset=pos).reshape(shape).astype(dtype)
        pos += size
    if pos != len(body):
        raise FrameError("trailing bytes after the last array")
    return meta, arrays


# --------------------------------------------------------------------------- frames
def encode_frame(msg: Message) -> bytes:
    """The bytes to put on the wire for ``msg``, delimiter included."""
    payload = encode_body(msg.meta, msg.arrays)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"message payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte frame limit")
    raw = HEADER.pack(VERSION, int(msg.type), 0, 0, msg.seq & 0xFFFFFFFF, len(payload)) + payload
    return cobs_encode(raw + CRC.pack(zlib.crc32(raw))) + b"\x00"


def decode_frame(frame: bytes) -> Message:
    """Decode one frame (without its 0x00 delimiter); raises ``FrameError`` if it is not intact."""
    if len(frame) > MAX_FRAME:
        raise FrameError(f"frame of {len(frame)} bytes is longer than the {MAX_FRAME}-byte limit")
    raw = memoryview(cobs_decode(frame))  # views below, not copies
    if len(raw) < HEADER.size + CRC.size:
        raise FrameError(f"frame of {len(raw)} bytes is shorter than header + CRC")
    body, (crc,) = raw[: -CRC.size], CRC.unpack(raw[-CRC.size :])
    if zlib.crc32(body) != crc:
        raise FrameError("CRC mismatch")
    version, mtype, _flags, _res, seq, length = HEADER.unpack_from(body)
    if version != VERSION:
        raise FrameError(f"protocol version {version}, expected {VERSION}")
    if length != len(body) - HEADER.size:
        raise FrameError("payload length field does not match the frame")
    try:
        kind = MsgType(mtype)
    except ValueError:
        raise FrameError(f"unknown message type {mtype}") from None
    meta, arrays = decode_body(body[HEADER.size :])
    return Message(kind, seq, meta, arrays)


# the longest frame that can carry a legal payload: header + MAX_PAYLOAD + CRC, COBS-encoded (1 byte per 254)
MAX_FRAME = (HEADER.size + MAX_PAYLOAD + CRC.size) * 255 // 254 + 2


class FrameDecoder:
    """Splits a byte stream at 0x00 delimiters and decodes each frame.

    ``feed`` never raises: a damaged frame comes out as a ``FrameError`` item, so the caller can
    NACK it; bytes beyond ``max_frame`` without a delimiter are discarded up to the next one.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._overflow = False

    def feed(self, data: bytes) -> list[Message | FrameError]:
        out: list[Message | FrameError] = []
        for chunk_i, chunk in enumerate(bytes(data).split(b"\x00")):
            if chunk_i > 0:  # a delimiter preceded this chunk: the buffered frame is complete
                out.extend(self._finish())
            if self._overflow:
                continue
            if len(self._buf) + len(chunk) > self.max_frame:  # checked before appending: never over the limit
                self._buf.clear()
                self._overflow = True
                continue
            self._buf += chunk
        return out

    def _finish(self) -> list[Message | FrameError]:
        if self._overflow:
            self._overflow = False
            return [FrameError("frame longer than the limit")]
        if not self._buf:
            return []  # back-to-back delimiters: nothing between them
        frame, self._buf = self._buf, bytearray()  # handed over, not copied
        try:
            return [decode_frame(frame)]
        except FrameError as e:
            # without its traceback: the frames it references hold the frame's decoded bytes in a reference
            # cycle that only the cyclic GC frees (a ~1 MB frame kept ~2 MB alive until then)
            return [e.with_traceback(None)]
