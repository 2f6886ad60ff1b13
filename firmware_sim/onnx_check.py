"""Does an ONNX file point outside itself? A protobuf walk with no dependency (the device has no ``onnx``).

An ONNX tensor can keep its data in another file (``data_location = EXTERNAL`` plus ``external_data``
entries naming a path); onnxruntime would read that path — on a device, any file in its working folder —
and an INFER reply would carry its bytes. The device refuses such models. The walk visits every tensor
the ONNX schema can hold: graph initializers, sparse initializers, node attributes (tensors, subgraphs),
and functions' nodes.
"""

from __future__ import annotations

# (message, field number) -> the message type of that length-delimited field
_CHILD = {
    ("model", 7): "graph", ("model", 25): "function",
    ("function", 7): "node",
    ("graph", 1): "node", ("graph", 5): "tensor", ("graph", 15): "sparse",
    ("node", 5): "attribute",
    ("attribute", 5): "tensor", ("attribute", 6): "graph", ("attribute", 10): "tensor", ("attribute", 11): "graph",
    ("attribute", 22): "sparse", ("attribute", 23): "sparse",
    ("sparse", 1): "tensor", ("sparse", 2): "tensor",
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
MAX_NESTING = 32


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise OnnxFormatError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one message; length-delimited values as bytes."""
    out: list[tuple[int, int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
            out.append((field, wire, v))
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise OnnxFormatError("length-delimited field runs past the message")
            out.append((field, wire, buf[i:i + n]))
            i += n
        else:
            raise OnnxFormatError(f"unsupported wire type {wire}")
        if i > len(buf):
            raise OnnxFormatError("field runs past the message")
    return out


def uses_external_data(blob: bytes) -> bool:
    """Whether any tensor of the ONNX model ``blob`` keeps its data in another file.

    Raises:
        OnnxFormatError: the bytes are not a protobuf ModelProto.
    """
    stack = [("model", bytes(blob), 0)]
    while stack:
        kind, buf, depth = stack.pop()
        if depth > MAX_NESTING:
            raise OnnxFormatError("model nested too deeply")
        for field, wire, value in _fields(buf):
            if kind == "tensor" and ((field == _TENSOR_DATA_LOCATION and wire == 0 and value == 1)
                                     or (field == _TENSOR_EXTERNAL_DATA and wire == 2)):
                return True
            child = _CHILD.get((kind, field))
            if child is not None and wire == 2:
                stack.append((child, value, depth + 1))  # type: ignore[arg-type]
    return False
