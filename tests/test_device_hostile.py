"""The device against hostile frames with a valid CRC: each crash and budget breach found by probing, then a
hypothesis suite over every kind of hostile frame (firmware_sim/fuzz.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from edgeff.firmware_sim.device import Device, parse_size
from edgeff.firmware_sim.edge_model import new_model
from edgeff.firmware_sim.fuzz import KINDS, _external_onnx, _model_named, _zip_bomb, hostile_frame, raw_frame
from edgeff.firmware_sim.protocol import FrameDecoder, Message, MsgType, encode_frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeff.edge.rand import Rng


def _reply(dev: Device, frame: bytes) -> Message:
    (out,) = FrameDecoder().feed(dev.receive(frame))
    assert isinstance(out, Message)
    return out


def _hello_ok(dev: Device) -> Message:
    reply = _reply(dev, encode_frame(Message(MsgType.HELLO, 999_999)))
    assert reply.type == MsgType.ACK
    return reply


def _loaded(tmp: Path | None = None, budget: str = "4MiB") -> Device:
    dev = Device(parse_size(budget), tmp)
    blob = new_model("device-embed", [32])
    reply = _reply(dev, encode_frame(Message(MsgType.LOAD_MODEL, 1, {"offset": 0, "total": len(blob),
                                                                    "crc32": zlib.crc32(blob)},
                                             {"chunk": np.frombuffer(blob, np.uint8)})))
    assert reply.type == MsgType.ACK
    return dev


@pytest.mark.parametrize(("mtype", "head", "blob"), [
    (MsgType.LOAD_MODEL, '{"meta":{"offset":1e999,"total":16,"crc32":0},"arrays":[["chunk","uint8",[16]]]}', 16),
    (MsgType.TRAIN, '{"meta":{"first":1e999},"arrays":[["x","uint8",[1,784]],["y","int64",[1]]]}', 792),
    (MsgType.INFER, '{"meta":{},"arrays":[["x","uint8",[1000000000000000000000000000000]]]}', 64),  # np.prod
    (MsgType.INFER, '{"meta":{},"arrays":[["x","uint8",[0,1000000000000000000000000000000]]]}', 0),
    (MsgType.STATS, '{"meta":{"a":' + "[" * 50_000 + "]" * 50_000 + '},"arrays":[]}', 0),  # RecursionError
    (MsgType.INFER, '{"meta":{},"arrays":[["' + "n" * 1_500_000 + '","object",[1]]]}', 0),  # echoed in the NACK
    (MsgType.ADD_CLASS, '{"meta":{"name":"' + "c" * 1_200_000 + '"},"arrays":[]}', 0),  # its ACK too big
])
def test_frames_that_crashed_the_device_are_refused(mtype: MsgType, head: str, blob: int) -> None:
    dev = _loaded()
    reply = FrameDecoder().feed(dev.receive(raw_frame(int(mtype), 5, head, bytes(blob))))
    assert len(reply) == 1 and not (isinstance(reply[0], Message) and reply[0].type == MsgType.ACK)
    _hello_ok(dev)


def test_a_class_name_that_would_brick_the_device_is_refused(tmp_path: Path) -> None:
    """Before: a ~1 MB name fitted its ACK, but every HELLO after it (and after each restart) did not."""
    dev = _loaded(tmp_path)
    reply = _reply(dev, raw_frame(int(MsgType.ADD_CLASS), 5, '{"meta":{"name":"' + "c" * 1_048_276 + '"},"arrays":[]}'))
    assert reply.type != MsgType.ACK
    assert _reply(dev, encode_frame(Message(MsgType.SAVE, 6))).type == MsgType.ACK
    _hello_ok(Device(parse_size("4MiB"), tmp_path))  # a restart boots and answers
    # a saved state bricked by an older version is ignored at boot instead of breaking every HELLO
    assert Device(parse_size("4MiB"), tmp_path).net is not None
    (tmp_path / "state.npz").write_bytes(_model_named(["c" * 1_048_276]))
    assert Device(parse_size("4MiB"), tmp_path).net is None
    _hello_ok(Device(parse_size("4MiB"), tmp_path))


def test_uploads_are_refused_before_they_exceed_the_budget() -> None:
    dev = _loaded(budget="4MiB")
    reply = _reply(dev, encode_frame(Message(MsgType.LOAD_MODEL, 5, {"offset": 0, "total": 10**12, "crc32": 0},
                                             {"chunk": np.zeros(16, np.uint8)})))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "too_big" and dev.staging is None
    # 150 chunks of 1 MB against a 4 MiB budget: refused at the first, nothing staged
    reply = _reply(dev, encode_frame(Message(MsgType.LOAD_MODEL, 6, {"offset": 0, "total": 150 << 20, "crc32": 0},
                                             {"chunk": np.zeros(1_000_000, np.uint8)})))
    assert reply.type == MsgType.ERROR and dev.staging is None
    # an abandoned upload is freed by the next request of another kind
    blob = new_model("device-embed", [32])
    reply = _reply(dev, encode_frame(Message(MsgType.LOAD_MODEL, 7, {"offset": 0, "total": len(blob),
                                                                    "crc32": zlib.crc32(blob)},
                                             {"chunk": np.frombuffer(blob[:1000], np.uint8)})))
    assert reply.type == MsgType.ACK and dev.staging is not None
    _hello_ok(dev)
    assert dev.staging is None


def test_zip_bomb_and_external_onnx_data_are_refused(tmp_path: Path) -> None:
    dev = _loaded(tmp_path)
    for blob in (_zip_bomb(), _external_onnx()):
        reply = _reply(dev, encode_frame(Message(MsgType.LOAD_MODEL, 5 + len(blob) % 7, {
            "offset": 0, "total": len(blob), "crc32": zlib.crc32(blob)}, {"chunk": np.frombuffer(blob, np.uint8)})))
        assert reply.type == MsgType.ERROR and reply.meta["code"] in ("too_big", "bad_model"), reply.meta
    assert "external" in reply.meta["text"]


def test_a_float_batch_that_overflows_float32_is_refused_and_applies_nothing() -> None:
    dev = _loaded()
    x = np.zeros((1, 784))
    x[0, 3] = 1e39  # finite as float64, inf after the float32 cast
    before = dev.net.to_bytes()  # type: ignore[union-attr]
    reply = _reply(dev, encode_frame(Message(MsgType.TRAIN, 5, {"first": 0}, {"x": x, "y": np.zeros(1, np.int64)})))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "bad_input"
    assert dev.samples_seen == 0 and dev.net.to_bytes() == before  # type: ignore[union-attr]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1))
def test_hostile_frames_never_crash_or_get_accepted(kind: str, seed: int) -> None:
    dev = _loaded()
    rng = np.random.default_rng(seed)
    for i in range(5):
        frame, must_refuse = hostile_frame(kind, rng, 10 + i, 784, len(dev.net.spec["classes"]))  # type: ignore[union-attr]
        out = FrameDecoder().feed(dev.receive(frame))
        assert len(out) == 1
        if must_refuse:
            assert not (isinstance(out[0], Message) and out[0].type == MsgType.ACK), (kind, out[0])
        _hello_ok(dev)


def _socket_device(tmp_path: Path) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-m", "edgeff.firmware_sim.device", "--socket", "0", "--idle", "1"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip().split("socket://", 1)[1]
    host, port = url.rsplit(":", 1)
    return proc, (host, int(port))


def _hello_over(addr: tuple[str, int], timeout: float = 5.0) -> bool:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(encode_frame(Message(MsgType.HELLO, 1)))
        data = b""
        while not data.endswith(b"\x00"):
            chunk = s.recv(65536)
            if not chunk:
                return False
            data += chunk
    (reply,) = FrameDecoder().feed(data)
    return isinstance(reply, Message) and reply.type == MsgType.ACK


def test_socket_mode_drops_idle_clients_and_survives_resets(tmp_path: Path) -> None:
    proc, addr = _socket_device(tmp_path)
    try:
        idle = socket.create_connection(addr)  # connects and says nothing: held the device forever before
        t0 = time.monotonic()
        assert _hello_over(addr, timeout=10)
        assert time.monotonic() - t0 < 8
        idle.close()
        # a client that resets the connection in the middle of a reply (SO_LINGER 0 -> RST)
        rude = socket.create_connection(addr)
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        rude.sendall(encode_frame(Message(MsgType.STATS, 2)) * 50)
        rude.close()
        time.sleep(0.2)
        assert proc.poll() is None and _hello_over(addr)
    finally:
        proc.kill()
        proc.wait(10)


def test_normal_use_stays_within_the_budget(mnist_small) -> None:
    """load -> stream -> eval -> add-class, each phase's traced peak (numpy buffers included) within the RAM
    budget. Before: add-class copied the whole model as a backup (4,583 KiB against a 4,096 KiB budget)."""
    import gc
    import tracemalloc

    from edgeff.firmware_sim.device import warm_up

    from edgeff.host import CHUNK

    x = mnist_small.x_train.reshape(len(mnist_small.x_train), -1)[:300]
    y = mnist_small.y_train[:300].astype(np.int64)
    budget = parse_size("4MiB")
    warm_up()
    tracemalloc.start()
    try:
        for rule, widths in (("device-embed", [128, 128]), ("device-goodness", [64, 64])):
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            dev = Device(budget)
            blob = new_model(rule, widths)
            frames = [Message(MsgType.LOAD_MODEL, 1 + off // CHUNK, {"offset": off, "total": len(blob),
                                                                    "crc32": zlib.crc32(blob)},
                              {"chunk": np.frombuffer(blob[off:off + CHUNK], np.uint8)})
                      for off in range(0, len(blob), CHUNK)]
            frames += [Message(MsgType.TRAIN, 100 + i, {"first": i}, {"x": x[i:i + 10], "y": y[i:i + 10]})
                       for i in range(0, 300, 10)]
            frames += [Message(MsgType.INFER, 500 + i, {}, {"x": x[i:i + 10]}) for i in range(0, 300, 10)]
            frames.append(Message(MsgType.ADD_CLASS, 900, {"name": "extra"}, {"x": x[:50]}))
            for msg in frames:
                assert _reply(dev, encode_frame(msg)).type == MsgType.ACK
                assert tracemalloc.get_traced_memory()[1] - base <= budget, (rule, msg.type)
            del dev
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("preset", ["symba-mlp", "cfl-mlp", "trifecta-cnn", "slda-conv"])
def test_a_refused_class_leaves_an_edge_model_as_it_was(preset: str) -> None:
    """add-class is undone by reference (no copy of the model): the restored model is byte-identical."""
    from dataclasses import replace

    from edgeff.firmware_sim.edge_model import EdgeModel

    from edgeff.edge import make_edge_learner
    from edgeff.presets import get_preset

    p = get_preset(preset)
    learner = make_edge_learner(p, train=replace(p.train, views=1, crop_padding=0, batch_size=8, schedule="all"))
    model = EdgeModel(learner, {})
    rng, draws = np.random.default_rng(0), Rng(0)  # the data's, the device's (edgeff.edge.rand)
    model.train_step(rng.integers(0, 255, (8, 784), dtype=np.uint8), np.arange(8) % 10, draws)
    x = rng.integers(0, 255, (4, 784), dtype=np.uint8)
    before, rng_state = model.to_bytes(), draws.state
    restore = model.class_snapshot()
    model.add_class("extra", draws, x)
    assert model.to_bytes() != before
    restore()
    draws.state = rng_state  # the device restores its generator itself
    assert model.to_bytes() == before and model.spec["classes"] == [str(i) for i in range(10)]


def test_refused_large_frames_are_freed_at_once() -> None:
    """A refused ~1 MB frame kept ~2 MB alive until Python's cyclic GC ran (its FrameError's traceback held
    the decoded bytes): 15 of them took the device's resident set 30 MB up before it fell back."""
    import gc
    import tracemalloc

    dev = Device(4 << 20)
    frame = raw_frame(int(MsgType.ADD_CLASS), 5, json.dumps({"meta": {"name": "c" * 1_048_276}, "arrays": []}))
    gc.disable()  # as between two automatic collections
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            for j in range(0, len(frame), 65536):
                dev.receive(frame[j : j + 65536])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gc.enable()
    assert held < 1 << 20, f"{held / 2**20:.1f} MiB still held after 10 refused frames"


def _upload_frames(blob: bytes | bytearray, chunk: int = 256 << 10, seq: int = 100) -> list[bytes]:
    """A whole upload's frames, built before anything on the device is measured."""
    crc = zlib.crc32(blob)
    return [encode_frame(Message(MsgType.LOAD_MODEL, seq + i, {"offset": at, "total": len(blob), "crc32": crc},
                                 {"chunk": np.frombuffer(bytes(blob[at:at + chunk]), np.uint8)}))
            for i, at in enumerate(range(0, len(blob), chunk))]


def _traced_upload(dev: Device, frames: list[bytes]) -> tuple[Message, int]:
    """``_upload`` with tracemalloc on: the last reply and the traced peak (the frames were built before)."""
    import tracemalloc

    tracemalloc.start()
    try:
        return _upload(dev, frames), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _upload(dev: Device, frames: list[bytes]) -> Message:
    """Send an upload's frames until one is refused; the last reply."""
    for frame in frames:
        reply = _reply(dev, frame)
        if reply.type != MsgType.ACK:
            break
    return reply


@pytest.mark.parametrize("classes", [[[[[[[[[[["a"]]]]]]]]]], ["two\nlines"], ["x" * 65], [7], ["a", "a"]])
def test_a_model_whose_class_names_break_the_rule_is_refused_and_ignored_at_boot(tmp_path: Path, classes) -> None:
    """Before: class "names" of nested JSON deeper than 8 levels passed `len(str(c)) <= 64`, were installed and
    SAVEd, and every HELLO after it — across restarts — exceeded the host's nesting limit."""
    dev = _loaded(tmp_path)
    blob = _model_named(classes)
    reply = _upload(dev, _upload_frames(blob))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "bad_model", reply.meta
    _hello_ok(dev)
    (tmp_path / "state.npz").write_bytes(blob)  # a state an older firmware saved
    fresh = Device(parse_size("4MiB"), tmp_path)
    assert fresh.net is None
    _hello_ok(fresh)


def test_the_protocol_never_sends_what_it_would_refuse_to_read() -> None:
    from edgeff.firmware_sim.protocol import MAX_DEPTH

    nested: list = []
    for _ in range(MAX_DEPTH + 1):
        nested = [nested]
    with pytest.raises(ValueError, match="depth"):
        encode_frame(Message(MsgType.ACK, 1, {"classes": nested}))


def test_an_archive_of_many_members_is_refused_before_it_is_parsed() -> None:
    """Before: a 3.8 MiB .npz of 43,000 empty members reached a traced 50 MiB (12.5x a 4 MiB budget) while its
    directory was parsed. The member count is read from the archive's end record first."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(43_000):
            z.writestr(f"{i}.npy", b"")
    blob = buf.getvalue()
    assert 3 << 20 < len(blob) < 4 << 20
    dev, frames = Device(4 << 20), _upload_frames(blob)
    reply, peak = _traced_upload(dev, frames)
    assert reply.type == MsgType.ERROR and "43000 arrays" in reply.meta["text"], reply.meta
    # the staged file plus one 256 KiB frame's decoding (~2 MiB measured), not the parsed directory
    assert peak < len(blob) + (3 << 20), f"{peak / 2**20:.1f} MiB traced"


def test_a_budget_sized_upload_is_staged_within_the_budget() -> None:
    """Before: the chunks were kept and then joined, 2.05x the budget at the end of any budget-sized upload."""

    budget = 16 << 20
    blob = np.random.default_rng(0).bytes(int(budget * 0.95))  # not a model: refused once it is whole
    dev, frames = Device(budget), _upload_frames(blob)
    reply, peak = _traced_upload(dev, frames)
    assert reply.type == MsgType.ERROR
    assert peak < budget * 1.15, f"{peak / budget:.2f}x the budget traced"


def _trickle(addr: tuple[str, int], stop: threading.Event, frames: bool) -> None:
    """A client that holds its connection: one byte of a frame every 0.3 s, or a whole HELLO every 0.3 s."""
    frame = encode_frame(Message(MsgType.HELLO, 7))
    with socket.create_connection(addr) as s:
        i = 0
        while not stop.is_set():
            try:
                s.sendall(frame if frames else frame[i % (len(frame) - 1):i % (len(frame) - 1) + 1])
            except OSError:
                return  # dropped by the device
            i += 1
            time.sleep(0.3)


@pytest.mark.parametrize("frames", [False, True], ids=["byte-by-byte", "whole-frames"])
def test_a_slow_or_chatty_client_does_not_hold_the_socket_device(tmp_path: Path, frames: bool) -> None:
    """Before: the idle timeout was per read, so one byte every 29 s kept every other client out. Now each
    frame has a deadline (--idle, 1 s here), and while another client waits a session is let go after a pause
    of `share` (1 s) or a `turn` (5 s)."""
    proc, addr = _socket_device(tmp_path)
    stop = threading.Event()
    hog = threading.Thread(target=_trickle, args=(addr, stop, frames), daemon=True)
    try:
        hog.start()
        time.sleep(0.5)  # the hog is being served
        t0 = time.monotonic()
        assert _hello_over(addr, timeout=10)
        assert time.monotonic() - t0 < (8 if frames else 4)  # a turn of 5 s; a frame deadline of 1 s
    finally:
        stop.set()
        proc.kill()
        proc.wait(10)
