"""The simulated device: request handling in-process, then host <-> device over a real pty pair."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from edgeff.firmware_sim.device import Device, parse_size
from edgeff.firmware_sim.edge_model import EdgeModel, new_model
from edgeff.firmware_sim.faults import FaultyPort
from edgeff.firmware_sim.protocol import FrameDecoder, Message, MsgType, encode_frame

from edgeff.data import ImageData
from edgeff.edge.plan import file_plan, learner_plan
from edgeff.edge.rand import Rng
from edgeff.host import CHUNK, DeviceClient, DeviceRefusedError


def _flat(ds: ImageData, n: int, *, test: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x, y = (ds.x_test, ds.y_test) if test else (ds.x_train, ds.y_train)
    return x[:n].reshape(n, -1), y[:n].astype(np.int64)


def _ask(dev: Device, msg: Message) -> Message:
    (reply,) = FrameDecoder().feed(dev.receive(encode_frame(msg)))
    assert isinstance(reply, Message)
    return reply


def _local(blob: bytes) -> tuple[EdgeModel, Rng]:
    """The same model in this process, with the generator a device seeds for it at LOAD."""
    net, _ = EdgeModel.from_bytes(blob)
    return net, Rng(int(net.spec["seed"]))


def _load(dev: Device, blob: bytes, seq: int = 1, *, declare: bool = False) -> Message:
    meta = {"total": len(blob), "crc32": zlib.crc32(blob)}
    if declare:  # what edgeff.host does: the planned memory rides on the first chunk
        meta["memory"] = int(learner_plan(EdgeModel.from_bytes(blob)[0].learner, 1, file_bytes=len(blob))["total"])
    for off in range(0, len(blob), CHUNK):
        reply = _ask(dev, Message(MsgType.LOAD_MODEL, seq, {**meta, "offset": off},
                                  {"chunk": np.frombuffer(blob[off : off + CHUNK], np.uint8)}))
        seq += 1
        if reply.type == MsgType.ERROR:  # refused part-way (or at the first chunk): the upload stops
            break
    return reply


def test_parse_size() -> None:
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("4MiB") == 4 * 1024 * 1024
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("65536") == 65536
    with pytest.raises(ValueError, match="512KiB"):
        parse_size("lots")


def test_device_refuses_a_model_over_budget_and_says_by_how_much() -> None:
    dev = Device(parse_size("512KiB"))
    reply = _load(dev, new_model("device-embed", [256, 256]))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "too_big"
    assert "cannot be staged" in reply.meta["text"] and "512.0 KiB" in reply.meta["text"]  # at the first chunk
    assert dev.net is None and dev.staging is None  # nothing installed, nothing staged
    reply = _load(dev, new_model("device-embed", [100]), 10, declare=True)  # the file (~0.3 MiB) fits, the model not
    assert reply.type == MsgType.ERROR and "over by" in reply.meta["text"] and "declared" in reply.meta["text"]
    assert dev.staging is None
    reply = _load(dev, new_model("device-embed", [100]), 20)  # not declared: refused from the file's plan
    assert reply.type == MsgType.ERROR and "over by" in reply.meta["text"]
    ok = _load(dev, new_model("device-embed", [32], optimizer="sgd"), seq=30)
    assert ok.type == MsgType.ACK
    big_batch = _ask(dev, Message(MsgType.TRAIN, 40, {"first": 0},
                                  {"x": np.zeros((1000, 784), np.uint8), "y": np.zeros(1000, np.int64)}))
    assert big_batch.type == MsgType.ERROR and "batch of 1000" in big_batch.meta["text"]
    assert dev.samples_seen == 0


def test_duplicate_frames_are_answered_but_never_applied_twice(mnist_small: ImageData) -> None:
    dev = Device(parse_size("4MiB"))
    _load(dev, new_model("device-embed", [32]))
    x, y = _flat(mnist_small, 4)
    frame = encode_frame(Message(MsgType.TRAIN, 2, {"first": 0}, {"x": x, "y": y}))
    replies = FrameDecoder().feed(dev.receive(frame + frame + frame))
    assert len(replies) == 3 and all(isinstance(r, Message) and r.type == MsgType.ACK for r in replies)
    assert dev.samples_seen == 4 and dev.counters["duplicates"] == 2
    # a new sequence number with an old sample range is recognised as already applied
    again = _ask(dev, Message(MsgType.TRAIN, 3, {"first": 0}, {"x": x, "y": y}))
    assert again.meta["applied"] is False and dev.samples_seen == 4
    gap = _ask(dev, Message(MsgType.TRAIN, 4, {"first": 10}, {"x": x, "y": y}))
    assert gap.type == MsgType.ERROR and gap.meta["code"] == "out_of_order"


def test_corrupt_frame_gets_a_nack(mnist_small: ImageData) -> None:
    dev = Device(parse_size("4MiB"))
    frame = bytearray(encode_frame(Message(MsgType.HELLO, 1)))
    frame[5] ^= 0x40
    (reply,) = FrameDecoder().feed(dev.receive(bytes(frame)))
    assert isinstance(reply, Message) and reply.type == MsgType.NACK
    assert dev.counters["frame_errors"] == 1


def test_save_reset_restores_the_saved_state(tmp_path: Path, mnist_small: ImageData) -> None:
    dev = Device(parse_size("4MiB"), tmp_path)
    _load(dev, new_model("device-goodness", [32]))
    x, y = _flat(mnist_small, 10)
    _ask(dev, Message(MsgType.TRAIN, 2, {"first": 0}, {"x": x, "y": y}))
    assert _ask(dev, Message(MsgType.SAVE, 3)).type == MsgType.ACK
    saved = dev.net.scores(x)  # type: ignore[union-attr]
    _ask(dev, Message(MsgType.TRAIN, 4, {"first": 10}, {"x": x, "y": y}))
    boot = dev.boot_id
    _ask(dev, Message(MsgType.RESET, 5))
    assert dev.boot_id != boot and dev.samples_seen == 10
    np.testing.assert_array_equal(dev.net.scores(x), saved)  # type: ignore[union-attr]
    # a fresh process with the same state directory restores it too
    assert Device(parse_size("4MiB"), tmp_path).samples_seen == 10


def test_add_class_over_budget_leaves_the_model_untouched(mnist_small: ImageData) -> None:
    blob = new_model("device-goodness", [16], optimizer="sgd")
    dev = Device(file_plan(blob)["total"] + 100)
    _load(dev, blob)  # no room for another pattern
    reply = _ask(dev, Message(MsgType.ADD_CLASS, 2, {"name": "ten"}))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "too_big"
    assert dev.net is not None and len(dev.net.spec["classes"]) == 10 and dev.net.learner.num_classes == 10


# --------------------------------------------------------------------------- over a real pty
def _start(budget: str, state_dir: Path | None = None, link: Path | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edgeff.firmware_sim.device", "--budget", budget]
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    if link is not None:
        cmd += ["--link", str(link)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("port: "), line
    return proc, line.split("port: ", 1)[1].strip()


@pytest.fixture
def device_pty(tmp_path: Path) -> Iterator[str]:
    proc, url = _start("16MiB", tmp_path / "state")
    yield url
    proc.kill()
    proc.wait()


def test_end_to_end_train_on_device_equals_numpy_in_process(device_pty: str, mnist_small: ImageData) -> None:
    x, y = _flat(mnist_small, 2000)
    xt, yt = _flat(mnist_small, 1000, test=True)
    blob = new_model("device-embed", [128, 128])
    with DeviceClient(device_pty) as dev:
        assert dev.info["model"] is None and dev.info["ram_budget"] == 16 * 1024 * 1024
        dev.load(blob)
        res = dev.stream(x, y, batch_size=10, save_every=500)
        assert res.samples == 2000 and res.reconnects == 0
        acc, pred = dev.evaluate(xt, yt)
        stats = dev.device_stats()
    assert stats["torch_loaded"] is False  # the device learns with numpy only
    assert stats["samples_seen"] == 2000 and stats["counters"]["duplicates"] == 0
    assert 0 < stats["traced_peak"]
    net, rng = _local(blob)  # the same edge learner in this process
    for i in range(0, 2000, 10):
        net.train_step(x[i : i + 10], y[i : i + 10], rng)
    local = net.scores(xt).argmax(1)
    assert (pred == local).mean() >= 0.999  # the same training run, bit for bit up to float noise
    assert acc == pytest.approx(float((local == yt).mean()), abs=0.002)
    assert acc > 0.6  # 2,000 real samples, one pass: far above chance (10%)


def test_faults_lose_nothing_and_apply_nothing_twice(device_pty: str, mnist_small: ImageData) -> None:
    n = 1500
    x, y = _flat(mnist_small, n)
    blob = new_model("device-embed", [32])
    with DeviceClient(device_pty) as clean:
        clean.load(blob)
    port = None

    def wrap(p: object) -> FaultyPort:
        nonlocal port
        port = FaultyPort(p, rate=0.05, seed=1, max_delay=0.01)
        return port

    with DeviceClient(device_pty, timeout=0.05, wrap=wrap) as dev:
        res = dev.stream(x, y, batch_size=1, save_every=None)
        stats = dev.device_stats()
    assert port is not None and sum(port.injected.values()) > 50  # faults really happened, both ways
    assert port.injected["rx_corrupt"] > 0 and port.injected["tx_drop"] > 0
    assert res.samples == n and stats["samples_seen"] == n
    expected = 0
    for i in range(n):
        expected = zlib.crc32(i.to_bytes(8, "little"), expected)
    assert stats["applied_crc"] == expected  # every sample exactly once, in order
    net, rng = _local(blob)
    for i in range(n):
        net.train_step(x[i : i + 1], y[i : i + 1], rng)
    with DeviceClient(device_pty) as dev:
        np.testing.assert_allclose(dev.infer(x[:50])["scores"], net.scores(x[:50]), atol=1e-5)


def test_stream_resumes_after_the_device_process_dies(tmp_path: Path, mnist_small: ImageData) -> None:
    link, state = tmp_path / "edgeff-dev", tmp_path / "state"
    proc, url = _start("16MiB", state, link)
    n = 1200
    x, y = _flat(mnist_small, n)
    blob = new_model("device-goodness", [64])
    client = DeviceClient(url, timeout=0.1, reconnect_s=30)
    client.open()
    client.load(blob)
    seen: list[int] = []
    result = {}

    def run() -> None:
        result["res"] = client.stream(x, y, batch_size=10, save_every=200, progress=seen.append)

    t = threading.Thread(target=run)
    t.start()
    while not seen or seen[-1] < 500:  # kill it mid-stream, between saves
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    time.sleep(0.3)
    proc, _ = _start("16MiB", state, link)  # power back on: restores the last save
    t.join(timeout=120)
    try:
        assert not t.is_alive()
        res = result["res"]
        assert res.reconnects >= 1 and res.samples == n
        stats = client.device_stats()
        expected = 0
        for i in range(n):
            expected = zlib.crc32(i.to_bytes(8, "little"), expected)
        assert stats["samples_seen"] == n and stats["applied_crc"] == expected
        net, rng = _local(blob)
        for i in range(0, n, 10):
            net.train_step(x[i : i + 10], y[i : i + 10], rng)
        np.testing.assert_allclose(client.infer(x[:50])["scores"], net.scores(x[:50]), atol=1e-5)
    finally:
        client.close()
        proc.kill()
        proc.wait()


def test_host_reports_device_errors_clearly(device_pty: str) -> None:
    with DeviceClient(device_pty) as dev:
        with pytest.raises(DeviceRefusedError, match="no model loaded"):
            dev.infer(np.zeros((1, 784), np.uint8))
        with pytest.raises(DeviceRefusedError, match="neither an edgeff device model nor"):
            dev.load(b"nope" * 10)


def test_a_file_of_the_retired_device_format_is_refused_with_the_way_forward() -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, spec=np.frombuffer(b'{"format": "edgeff-device-model", "rule": "embed"}', np.uint8),
             w0=np.zeros((4, 4), np.float32))
    reply = _load(Device(parse_size("4MiB")), buf.getvalue())
    assert reply.type == MsgType.ERROR and "retired device format" in reply.meta["text"]
    assert "edgeff device load --preset" in reply.meta["text"]


def test_onnx_model_runs_on_the_device_for_inference_only(device_pty: str, mnist_small: ImageData,
                                                         tmp_path: Path) -> None:
    from dataclasses import replace

    from edgeff.exporters.onnx import export_onnx

    from edgeff.layers import LayerSpec
    from edgeff.presets import get_preset, make_learner

    p = get_preset("symba-mlp")
    learner = make_learner(replace(p, model=replace(p.model, layers=(LayerSpec("linear", 128, norm="length"),) * 2)))
    for xb, yb in mnist_small.train_batches(100, limit=500):
        learner.learn_many(xb, yb)
    path = export_onnx(learner, tmp_path / "m.onnx", meta={"mean": [0.1307], "std": [0.3081]})
    xt, _ = _flat(mnist_small, 200, test=True)
    xb, _ = next(mnist_small.test_batches(200))
    with DeviceClient(device_pty) as dev:
        meta = dev.load(Path(path).read_bytes())
        assert meta["format"] == "onnx"
        got = dev.infer(xt)
        with pytest.raises(DeviceRefusedError, match="inference only"):
            dev.train(xt[:2], np.array([0, 1]), 0)
    want = learner.predict_many(xb).numpy()
    assert (got["pred"] == want).mean() >= 0.99  # uint8 pixels normalised on the device from the file's metadata


def test_socket_transport(tmp_path: Path, mnist_small: ImageData) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "edgeff.firmware_sim.device", "--socket", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split("port: ", 1)[1].strip()
        assert url.startswith("socket://")
        x, y = _flat(mnist_small, 100)
        with DeviceClient(url) as dev:
            dev.load(new_model("device-embed", [16]))
            assert dev.stream(x, y, batch_size=10).samples == 100
            assert dev.device_stats()["samples_seen"] == 100
    finally:
        proc.kill()
        proc.wait()


def _slowed(dev: Device, gate: threading.Event) -> None:
    """The loaded model's training step waits for ``gate``: a request that runs as long as the test says."""
    assert dev.net is not None
    step = dev.net.train_step

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        gate.wait(30)
        return step(*args, **kwargs)

    dev.net.train_step = slow  # type: ignore[method-assign]


def test_the_device_answers_hello_while_a_long_request_runs(mnist_small: ImageData) -> None:
    """Before: the device served one request at a time, so while it solved (a 10 s lda readout) a host's HELLO went
    unanswered and the host gave up. Now a long request continues in a worker: HELLO is answered, anything else
    gets `busy` (nothing applied), and the request's reply comes when it is done, equal to a synchronous device's."""
    x, y = _flat(mnist_small, 8)
    blob = new_model("device-embed", [32])
    sync = Device(parse_size("4MiB"))
    _load(sync, blob)
    want = _ask(sync, Message(MsgType.TRAIN, 10, {"first": 0}, {"x": x, "y": y}))
    dev = Device(parse_size("4MiB"))
    _load(dev, blob)
    gate = threading.Event()
    _slowed(dev, gate)
    dev.background = 0.0  # a long request continues in a worker at once
    train = encode_frame(Message(MsgType.TRAIN, 10, {"first": 0}, {"x": x, "y": y}))
    assert dev.receive(train) == b"" and dev.job is not None  # no reply yet: it runs
    hello = _ask(dev, Message(MsgType.HELLO, 11))
    assert hello.type == MsgType.ACK and hello.seq == 11 and hello.meta["samples_seen"] == 0
    for msg in (Message(MsgType.TRAIN, 10, {"first": 0}, {"x": x, "y": y}), Message(MsgType.STATS, 12)):
        busy = _ask(dev, msg)
        assert busy.type == MsgType.ERROR and busy.meta["code"] == "busy" and busy.seq == msg.seq
        assert "TRAIN (seq 10)" in busy.meta["text"]
    assert dev.poll() == b""
    gate.set()
    dev.job[1].join(30)  # type: ignore[index]
    (reply,) = FrameDecoder().feed(dev.poll())
    assert isinstance(reply, Message) and reply.type == MsgType.ACK and reply.seq == 10
    assert reply.meta["samples_seen"] == want.meta["samples_seen"] == 8 and dev.job is None
    assert all(np.array_equal(a, sync.net.learner.arrays()[k]) for k, a in dev.net.learner.arrays().items())  # type: ignore[union-attr]
    again = _ask(dev, Message(MsgType.TRAIN, 10, {"first": 0}, {"x": x, "y": y}))  # the host's late retransmission
    assert again.type == MsgType.ACK and dev.samples_seen == 8 and dev.counters["busy"] == 2


def test_a_host_waits_for_a_busy_device_without_spending_its_retries(mnist_small: ImageData) -> None:
    """Over a real socket: a request that runs 3 s against a host that gives up after 9 silent attempts of 0.1 s
    (the device holds a long request 0.2 s before it continues in a worker); the device says `busy` to each
    retransmission and the host keeps asking until the reply comes."""
    from edgeff.firmware_sim.device import serve_socket

    dev = Device(parse_size("4MiB"))
    _load(dev, new_model("device-embed", [32]))
    gate = threading.Event()
    _slowed(dev, gate)
    import socket as socketlib

    probe = socketlib.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    threading.Thread(target=serve_socket, args=(dev, port), kwargs={"announce": False}, daemon=True).start()
    threading.Timer(3.0, gate.set).start()
    x, y = _flat(mnist_small, 8)
    deadline = time.monotonic() + 10
    while True:
        try:
            host = DeviceClient(f"socket://127.0.0.1:{port}", timeout=0.1, retries=8)
            host.open()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with host:
        t0 = time.monotonic()
        res = host.request(MsgType.TRAIN, {"first": 0}, {"x": x, "y": y})
        assert res.type == MsgType.ACK and res.meta["samples_seen"] == 8 and time.monotonic() - t0 >= 2.5
        assert host.stats.busy >= 10 and host.hello()["samples_seen"] == 8
