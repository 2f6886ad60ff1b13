"""Hostile frames with a valid CRC, for testing a device the way an attacker or a broken host would.

``hostile_frames(rng, context)`` yields ``(kind, frame_bytes, must_refuse)``: every message type with
mutated fields, extreme numbers (1e999, 2**64, -1, floats, booleans, strings), hostile array tables
(shapes of 10**30, zero dims, too many dims, 1.5 MB names), deep JSON nesting, huge class names, uploads
that lie about their size, zip bombs, archives of many members, models whose class names nest or break the
names rule, ONNX files pointing at external data, non-finite or out-of-range
inputs and labels. ``must_refuse`` marks the frames a correct device answers with an ERROR or NACK (never
an ACK); the rest (e.g. a duplicate sequence number) may be answered either way. The frames are built
here by hand where ``encode_frame`` would refuse to build them.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from edgeff.firmware_sim.protocol import (
    CRC,
    HEADER,
    VERSION,
    Message,
    MsgType,
    cobs_encode,
    encode_frame,
)

KINDS = ("numbers", "table", "nesting", "names", "upload", "inputs", "types", "mutate")
EXTREMES: list[Any] = [1e308, -1, 2**64, 2**31, 1.5, True, None, "7", [], {}, -(2**63), 0]


def raw_frame(mtype: int, seq: int, head: bytes | str, blob: bytes = b"") -> bytes:
    """A frame with a valid CRC around a hand-made body (``head`` is the body's JSON text)."""
    head_b = head.encode() if isinstance(head, str) else head
    payload = struct.pack("<I", len(head_b)) + head_b + blob
    raw = HEADER.pack(VERSION, mtype, 0, 0, seq & 0xFFFFFFFF, len(payload)) + payload
    return cobs_encode(raw + CRC.pack(zlib.crc32(raw))) + b"\x00"


def _json(meta: dict[str, Any], table: list[Any] | None = None) -> str:
    text = json.dumps({"meta": meta, "arrays": table or []}, separators=(",", ":"))
    return text.replace("Infinity", "1e999")  # what a hostile host writes for an overflowing number


@functools.cache
def _zip_bomb(size: int = 512 << 20) -> bytes:
    """An .npz whose one member unpacks to ``size`` zero bytes (512 MiB in about 0.5 MB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("w.npy", "w", force_zip64=True) as f:
        header = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.uint8))
        header["shape"] = (size,)
        np.lib.format.write_array_header_1_0(f, header)
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    return buf.getvalue()


@functools.cache
def _external_onnx() -> bytes:
    """A minimal ONNX ModelProto whose one initializer keeps its data in the file ``state.npz`` (hand-encoded)."""
    def field(num: int, payload: bytes) -> bytes:
        return _varint(num << 3 | 2) + _varint(len(payload)) + payload

    entry = field(1, b"location") + field(2, b"state.npz")
    tensor = field(8, b"w") + _varint(1 << 3) + _varint(16) + _varint(2 << 3) + _varint(1) + field(13, entry) \
        + _varint(14 << 3) + _varint(1)
    graph = field(5, tensor) + field(2, b"g")
    return _varint(1 << 3) + _varint(8) + field(7, graph)


@functools.cache
def _many_members(count: int = 10_000) -> bytes:
    """An .npz of ``count`` empty members (~0.9 MB, one frame): cheap to send, costly to parse."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(count):
            zf.writestr(f"{i}.npy", b"")
    return buf.getvalue()


def _nested(depth: int) -> Any:
    v: Any = "a"
    for _ in range(depth):
        v = [v]
    return v


def _model_named(classes: list[Any]) -> bytes:
    """A small, valid device model whose class list starts with ``classes`` (names no device may install)."""
    from edgeff.firmware_sim.edge_model import new_model

    with np.load(io.BytesIO(new_model("device-embed", [4], input_shape=(1, 2, 2), classes=["a", "b"]))) as z:
        arrays = {k: z[k] for k in z.files}
    head = json.loads(arrays["header"].tobytes().decode())
    head["model"]["class_names"] = head["meta"]["classes"] = [*classes, "b"]
    arrays["header"] = np.frombuffer(json.dumps(head).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def hostile_frames(rng: np.random.Generator, context: dict[str, Any], n: int) -> Iterator[tuple[str, bytes, bool]]:
    """``n`` hostile frames; ``context`` holds ``input_dim`` and ``classes`` of the loaded model and
    ``samples_seen`` (the frames keep ``first`` consistent where they mean to be applied)."""
    d = int(context.get("input_dim", 784))
    k = int(context.get("classes", 10))
    seq = int(rng.integers(1, 2**31))
    for _ in range(n):
        seq += 1
        kind = KINDS[int(rng.integers(len(KINDS)))]
        yield kind, *hostile_frame(kind, rng, seq, d, k)


def hostile_frame(kind: str, rng: np.random.Generator, seq: int, d: int, k: int) -> tuple[bytes, bool]:
    """One hostile frame of ``kind`` for a model with input width ``d`` and ``k`` classes; and whether a
    correct device must refuse it."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]
    if kind == "numbers":  # every integer field of every request, given an extreme value
        mtype, key = pick([(MsgType.LOAD_MODEL, "offset"), (MsgType.LOAD_MODEL, "total"), (MsgType.LOAD_MODEL, "crc32"),
                           (MsgType.TRAIN, "first"), (MsgType.INFER, "per_layer"), (MsgType.STATS, "reset_peak")])
        value = pick([float("inf"), *EXTREMES])
        meta = {"offset": 0, "total": 16, "crc32": 0, "first": 0, key: value}
        table = [["x", "uint8", [1, d]]] if mtype in (MsgType.TRAIN, MsgType.INFER) else [["chunk", "uint8", [16]]]
        blob = bytes(d) if mtype in (MsgType.TRAIN, MsgType.INFER) else bytes(16)
        if mtype == MsgType.TRAIN:
            table.append(["y", "int64", [1]])
            blob += bytes(8)
        bad = mtype in (MsgType.LOAD_MODEL, MsgType.TRAIN) and (isinstance(value, bool) or not isinstance(value, int)
                                                                or value < 0 or value >= 2**53)
        return raw_frame(int(mtype), seq, _json(meta, table), blob), bad
    if kind == "table":  # hostile array tables: the payload does not hold what the table claims
        shape = pick([[10**30], [0, 10**30], [2**62, 2**62], [-1, d], [1.5], [1] * 64, "x", [True, d]])
        name = pick(["x", "n" * 1_500_000, "", 7, None])
        dtype = pick(["uint8", "float64", "object", "complex128", "<U10"])
        mtype = pick([MsgType.TRAIN, MsgType.INFER, MsgType.ADD_CLASS, MsgType.LOAD_MODEL])
        return raw_frame(int(mtype), seq, _json({"first": 0, "name": "c"}, [[name, dtype, shape]]), bytes(64)), True
    if kind == "nesting":
        depth = pick([50_000, 2_000, 100, 20])
        head = '{"meta":{"a":' + "[" * depth + "]" * depth + '},"arrays":[]}'
        return raw_frame(int(pick(list(MsgType)[:8])), seq, head), True
    if kind == "names":  # class names: huge, empty, control characters, not a string
        name = pick(["c" * 1_048_276, "c" * 1_200_000, "", " ", "a\x00b", "\n", 12, None, ["a"], "ok" * 40])
        return raw_frame(int(MsgType.ADD_CLASS), seq, _json({"name": name})), True
    if kind == "upload":  # uploads that lie, bombs and external data
        which = pick(["huge_total", "past_total", "bomb", "onnx_external", "junk", "zero_total", "wrong_crc",
                      "nested_names", "bad_names", "many_members"])
        if which == "huge_total":
            meta = {"offset": 0, "total": 10**12, "crc32": 0}
            return encode_frame(Message(MsgType.LOAD_MODEL, seq, meta, {"chunk": np.zeros(64, np.uint8)})), True
        if which == "past_total":
            meta = {"offset": 0, "total": 8, "crc32": 0}
            return encode_frame(Message(MsgType.LOAD_MODEL, seq, meta, {"chunk": np.zeros(64, np.uint8)})), True
        if which == "zero_total":
            meta = {"offset": 0, "total": 0, "crc32": 0}
            return encode_frame(Message(MsgType.LOAD_MODEL, seq, meta, {"chunk": np.zeros(0, np.uint8)})), True
        blob = {"bomb": _zip_bomb, "onnx_external": _external_onnx, "wrong_crc": _zip_bomb,
                "junk": lambda: rng.bytes(int(rng.integers(1, 4096))), "many_members": _many_members,
                "nested_names": lambda: _model_named([_nested(int(rng.integers(9, 200)))]),
                "bad_names": lambda: _model_named([pick(["a\nb", "x" * 65, "", 7, None, {"a": 1}])])}[which]()
        crc = zlib.crc32(blob) ^ (1 if which == "wrong_crc" else 0)
        meta = {"offset": 0, "total": len(blob), "crc32": crc}
        return encode_frame(Message(MsgType.LOAD_MODEL, seq, meta, {"chunk": np.frombuffer(blob, np.uint8)})), True
    if kind == "inputs":  # batches a model must refuse
        b = int(rng.integers(1, 5))
        which = pick(["nan", "inf", "overflow", "shape", "labels", "neg_labels", "float_labels", "count", "big_batch"])
        x: np.ndarray = rng.integers(0, 255, (b, d), dtype=np.uint8)
        y = rng.integers(0, k, b).astype(np.int64)
        if which in ("nan", "inf", "overflow"):
            xf = rng.standard_normal((b, d))
            xf[0, int(rng.integers(d))] = {"nan": np.nan, "inf": np.inf, "overflow": 1e39}[which]
            x = xf
        elif which == "shape":
            x = np.zeros((b, d + 1), np.uint8)
        elif which == "labels":
            y[0] = k + 10**6 + int(rng.integers(0, 1000))  # beyond any class a run could have added
        elif which == "neg_labels":
            y[0] = -1
        elif which == "float_labels":
            return encode_frame(Message(MsgType.TRAIN, seq, {"first": 0}, {"x": x, "y": y + 0.7})), True
        elif which == "count":
            y = y[:-1] if b > 1 else np.zeros(2, np.int64)
        elif which == "big_batch":
            x = np.zeros((5000, 1), np.uint8)
        mtype = MsgType.TRAIN if which not in ("nan", "inf", "overflow", "shape", "big_batch") or rng.random() < 0.5 \
            else MsgType.INFER
        arrays = {"x": x, "y": y} if mtype == MsgType.TRAIN else {"x": x}
        return encode_frame(Message(mtype, seq, {"first": 0}, arrays)), True
    if kind == "types":  # replies and unknown types sent to the device
        mtype = pick([MsgType.ERROR, MsgType.ACK, MsgType.NACK, 0, 12, 255])
        return raw_frame(int(mtype), seq, _json({})), True
    # mutate: a plausible request with one random field replaced by an arbitrary JSON value
    mtype = pick([MsgType.HELLO, MsgType.STATS, MsgType.INFER, MsgType.ADD_CLASS, MsgType.SAVE])
    meta: dict[str, Any] = {"per_layer": False, "reset_peak": False, "name": "cls"}
    meta[pick(list(meta) + ["extra"])] = pick([float("inf"), *EXTREMES, "s" * 10_000, {"a": {"b": [1]}}])
    arrays = {"x": rng.integers(0, 255, (1, d), dtype=np.uint8)} if mtype == MsgType.INFER else {}
    return raw_frame(int(mtype), seq, _json(meta, [[n, "uint8", list(a.shape)] for n, a in arrays.items()]),
                     b"".join(a.tobytes() for a in arrays.values())), False


__all__ = ["KINDS", "hostile_frame", "hostile_frames", "raw_frame"]
