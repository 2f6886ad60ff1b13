"""The numpy runtime's one memory model (``edgeff.edge.plan``) against what the device measures: an edge model
uploaded to a device, trained and asked to predict, never peaks past 1.15x the plan of the request it accepted
(tracemalloc, which sees numpy's buffers), and a model the budget cannot hold is refused at LOAD from its file's
header and table of contents, before it is built."""

from __future__ import annotations

import tempfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from edgeff.firmware_sim.device import Device, parse_size
from edgeff.firmware_sim.protocol import FrameDecoder, Message, MsgType, encode_frame

from edgeff.edge import make_edge_learner, save
from edgeff.edge.plan import learner_plan
from edgeff.host import CHUNK  # the host's upload chunk


def _blob(preset: str, shape: tuple[int, int, int] = (1, 28, 28)) -> bytes:
    learner = make_edge_learner(preset, input_shape=shape, num_classes=10)
    with tempfile.TemporaryDirectory() as tmp:
        save(learner, Path(tmp) / "m.npz", meta={"preset": preset})
        return (Path(tmp) / "m.npz").read_bytes()


def _frames(blob: bytes, chunk: int = CHUNK) -> list[bytes]:
    crc = zlib.crc32(blob)
    return [encode_frame(Message(MsgType.LOAD_MODEL, 10 + i, {"offset": at, "total": len(blob), "crc32": crc},
                                 {"chunk": np.frombuffer(blob[at:at + chunk], np.uint8)}))
            for i, at in enumerate(range(0, len(blob), chunk))]


def _send(dev: Device, frame: bytes) -> Message:
    (out,) = FrameDecoder().feed(dev.receive(frame))
    assert isinstance(out, Message)
    return out


def _stats(dev: Device, seq: int) -> dict:
    reply = _send(dev, encode_frame(Message(MsgType.STATS, seq, {"reset_peak": True})))
    return reply.meta


# slda-conv on 20x20 inputs: its 1,024-feature Gram matrix (8 MiB) dominates the plan as the 2,304 of 28x28 do
# (42 MiB), while a fresh file of zeros, one COBS block per byte, uploads in seconds, not a minute
@pytest.mark.parametrize(("preset", "side"), [("slda-conv", 20), ("cfl-mlp", 28), ("cfl-conv", 28), ("symba-mlp", 28)])
def test_the_device_never_peaks_past_its_plan(preset: str, side: int) -> None:
    blob = _blob(preset, (1, side, side))
    frames = _frames(blob)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, side * side), dtype=np.uint8)
    y = rng.integers(0, 10, 60).astype(np.int64)
    train = [encode_frame(Message(MsgType.TRAIN, 100 + i, {"first": i * 10},
                                  {"x": x[i * 10:(i + 1) * 10], "y": y[i * 10:(i + 1) * 10]})) for i in range(6)]
    infer = encode_frame(Message(MsgType.INFER, 200, {}, {"x": x[:50]}))
    dev = Device(parse_size("1GiB"))
    tracemalloc.start()
    try:
        _stats(dev, 1)
        for f in frames:
            assert _send(dev, f).type == MsgType.ACK
        phases = [_stats(dev, 2)]
        for f in train:
            reply = _send(dev, f)
            assert reply.type == MsgType.ACK, reply.meta
        phases.append(_stats(dev, 3))
        assert _send(dev, infer).type == MsgType.ACK
        phases.append(_stats(dev, 4))
    finally:
        tracemalloc.stop()
    for name, st in zip(("load", "train", "predict"), phases, strict=True):
        assert st["planned_peak"] > 0, name
        assert st["traced_peak"] <= 1.15 * st["planned_peak"], \
            f"{preset} {name}: peak {st['traced_peak'] / 2**20:.1f} MiB, planned {st['planned_peak'] / 2**20:.1f} MiB"


def test_a_model_the_budget_cannot_hold_is_refused_at_load_before_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = _blob("cfl-conv")  # a 0.6 MiB file whose training and prediction need ~4 MiB
    plan = learner_plan(make_edge_learner("cfl-conv", input_shape=(1, 28, 28), num_classes=10), 1,
                        file_bytes=len(blob))
    budget = 2 << 20
    assert len(blob) * 2 < budget < plan["total"]
    dev = Device(budget)

    def built(*_: object) -> None:
        raise AssertionError("the model was built before its plan was checked")

    monkeypatch.setattr("edgeff.firmware_sim.device.model_from_bytes", built)
    replies = [_send(dev, f) for f in _frames(blob)]
    assert replies[-1].type == MsgType.ERROR and replies[-1].meta["code"] == "too_big", replies[-1].meta
    assert "loading" in replies[-1].meta["text"] and "\n" not in replies[-1].meta["text"]
    assert dev.net is None
