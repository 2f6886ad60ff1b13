from __future__ import annotations

import numpy as np
import pytest
from edgeff.firmware_sim.protocol import (
    FrameDecoder,
    FrameError,
    Message,
    MsgType,
    cobs_decode,
    cobs_encode,
    decode_frame,
    encode_frame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x00\x00", b"\x11\x22\x00\x33", bytes(range(1, 255)), bytes(range(1, 256)),
     bytes([1] * 254 + [0]), bytes([7] * 600), bytes(1000)],
)
def test_cobs_round_trip_edge_cases(data: bytes) -> None:
    enc = cobs_encode(data)
    assert b"\x00" not in enc
    assert len(enc) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(enc) == data


def test_cobs_known_vectors() -> None:
    # from the COBS paper / Wikipedia examples
    assert cobs_encode(b"\x00") == b"\x01\x01"
    assert cobs_encode(b"\x00\x00") == b"\x01\x01\x01"
    assert cobs_encode(b"\x11\x22\x00\x33") == b"\x03\x11\x22\x02\x33"
    assert cobs_encode(b"\x11\x00\x00\x00") == b"\x02\x11\x01\x01\x01"


def _msg() -> Message:
    return Message(MsgType.TRAIN, 77, {"first": 5, "name": "sneaker"},
                   {"x": np.arange(12, dtype=np.uint8).reshape(3, 4), "y": np.array([1, 0, 9], np.int64),
                    "w": np.linspace(-1, 1, 5, dtype=np.float32)})


def test_frame_round_trip() -> None:
    msg = _msg()
    frame = encode_frame(msg)
    assert frame.endswith(b"\x00") and frame.count(b"\x00") == 1
    got = decode_frame(frame[:-1])
    assert got.type == msg.type and got.seq == msg.seq and got.meta == msg.meta
    for k, v in msg.arrays.items():
        assert got.arrays[k].dtype == v.dtype
        np.testing.assert_array_equal(got.arrays[k], v)


def test_decoder_splits_a_stream_and_resynchronises() -> None:
    a, b = encode_frame(_msg()), encode_frame(Message(MsgType.HELLO, 1))
    dec = FrameDecoder()
    items = []
    stream = b"garbage" + b"\x00" + a + b + a
    for i in range(0, len(stream), 7):  # bytes arrive in small pieces
        items += dec.feed(stream[i : i + 7])
    assert isinstance(items[0], FrameError)  # the garbage before the first delimiter
    assert [m.type for m in items[1:]] == [MsgType.TRAIN, MsgType.HELLO, MsgType.TRAIN]  # type: ignore[union-attr]


def test_oversized_frame_is_dropped_not_buffered() -> None:
    dec = FrameDecoder(max_frame=100)
    items = dec.feed(b"\x05" * 1000 + b"\x00" + encode_frame(Message(MsgType.STATS, 3)))
    assert isinstance(items[0], FrameError)
    assert isinstance(items[1], Message) and items[1].seq == 3
    assert len(dec._buf) == 0


def test_the_receive_buffer_never_holds_more_than_the_limit() -> None:
    # a frame arriving in large pieces is dropped before a piece that would take it past max_frame is appended
    import tracemalloc

    dec = FrameDecoder(max_frame=1_000_000)
    piece = b"\x05" * 600_000
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            dec.feed(piece)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # the buffered part (600 kB) and never a 1.2 MB buffer
    items = dec.feed(b"\x00" + encode_frame(Message(MsgType.STATS, 4)))
    assert isinstance(items[0], FrameError)
    assert isinstance(items[1], Message) and items[1].seq == 4


def test_unsupported_array_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode_frame(Message(MsgType.INFER, 1, {}, {"x": np.zeros(3, np.float16)}))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_decoder_never_crashes_on_random_bytes(data: bytes) -> None:
    for item in FrameDecoder().feed(data + b"\x00"):
        assert isinstance(item, (Message, FrameError))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    meta=st.dictionaries(st.text(max_size=5), st.integers(-1000, 1000), max_size=3),
    payload=st.binary(max_size=64),
    seq=st.integers(0, 2**32 - 1),
    pos=st.integers(0, 10_000),
    mask=st.integers(1, 255),
    extra=st.integers(0, 2),
)
def test_fuzz_corrupted_frame_is_never_accepted(
    meta: dict, payload: bytes, seq: int, pos: int, mask: int, extra: int
) -> None:
    msg = Message(MsgType.TRAIN, seq, meta, {"p": np.frombuffer(payload, np.uint8)})
    frame = bytearray(encode_frame(msg)[:-1])
    for k in range(extra + 1):  # 1-3 corrupted bytes
        frame[(pos + 7 * k) % len(frame)] ^= mask
    items = FrameDecoder().feed(bytes(frame) + b"\x00")  # a corrupted byte may become a delimiter
    assert items and all(isinstance(i, FrameError) for i in items)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**32 - 1))
def test_fuzz_any_payload_round_trips(payload: bytes, seq: int) -> None:
    msg = Message(MsgType.LOAD_MODEL, seq, {"offset": 0}, {"chunk": np.frombuffer(payload, np.uint8)})
    (got,) = FrameDecoder().feed(encode_frame(msg))
    assert isinstance(got, Message) and got.seq == seq
    assert got.arrays["chunk"].tobytes() == payload
