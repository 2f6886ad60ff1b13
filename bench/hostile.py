"""Hostile frames against a live device process: crashes, accepted invalid requests, and its memory.

    python bench/hostile.py [--frames 100000] [--budget 4MiB] [--seed 0]

A device process (``edgeff device-sim --socket 0``, tracemalloc on, as shipped) gets a small model, then
``--frames`` valid-CRC hostile frames from ``edgeff.firmware_sim.fuzz`` (every kind in turn, random fields),
each followed by a HELLO that must be answered. A crash is the process exiting (it is restarted and counted);
an accepted invalid frame is an ACK to a frame a correct device must refuse. The device's resident set
is read from /proc every 500 frames; ``max_rss`` is its VmHWM at the end, against its runtime baseline (its
peak over ``--normal-frames`` legitimate frames of every kind and size sent first: the runtime's own buffers
and heap under normal traffic) plus the RAM budget. Writes
``{"kind": "hostile", "frames", "crashes", "accepted_invalid", "max_rss", ...}`` to results/device.json, with the
seconds a second client waited for an answer behind a trickling and behind a chatty client (``wait_behind_*_s``,
the device at its default ``--idle`` of 30 s).
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
from _common import merge_records, table
from edgeff.firmware_sim.device import parse_size
from edgeff.firmware_sim.edge_model import new_model
from edgeff.firmware_sim.fuzz import hostile_frames
from edgeff.firmware_sim.protocol import MAX_PAYLOAD, FrameDecoder, Message, MsgType, encode_frame

from edgeff.host import DeviceClient

LARGEST_CHUNK = MAX_PAYLOAD - 256  # the payload's head (type, sequence, JSON) takes the rest


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class Live:
    """A device process on a socket, restarted if it dies."""

    def __init__(self, budget: str) -> None:
        self.budget = budget
        self.crashes = 0
        self.start()

    def start(self) -> None:
        # glibc told to return freed memory (the brief's measuring rule): RSS then shows what is live
        env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeff.firmware_sim.device", "--socket", "0", "--budget",
                                      self.budget], stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip().split("port: ", 1)[1]
        host, port = self.url.split("socket://", 1)[1].rsplit(":", 1)
        self.addr = (host, int(port))
        with DeviceClient(self.url) as dev:
            dev.load(new_model("device-embed", [32]))
        self.sock = socket.create_connection(self.addr, timeout=60)
        self.decoder = FrameDecoder()

    def ask(self, frame: bytes) -> Message | None:
        """Send one frame, return its one reply (None for a NACK-able decode error on our side)."""
        try:
            self.sock.sendall(frame)
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("device closed the connection")
                items = self.decoder.feed(data)
                if items:
                    item = items[0]
                    return item if isinstance(item, Message) else None
        except (OSError, ConnectionError):
            if self.proc.poll() is not None:
                self.crashes += 1
                self.start()
            else:
                self.sock = socket.create_connection(self.addr, timeout=60)
                self.decoder = FrameDecoder()
            return None

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


def wait_behind(addr: tuple[str, int], hog: str) -> float:
    """Seconds a second client waits for its HELLO's answer while another holds the device: a trickler (one
    byte of a frame every second) or a chatty client (a whole HELLO every 0.3 s). Before the per-frame deadline
    a trickler held the device forever."""
    stop = threading.Event()

    def run() -> None:
        frame = encode_frame(Message(MsgType.HELLO, 7))
        with socket.create_connection(addr) as s:
            i = 0
            while not stop.is_set():
                try:
                    s.sendall(frame if hog == "chatty" else frame[i % (len(frame) - 1):i % (len(frame) - 1) + 1])
                except OSError:
                    return
                i += 1
                time.sleep(0.3 if hog == "chatty" else 1.0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(1.5)
    t0 = time.perf_counter()
    try:
        with socket.create_connection(addr, timeout=120) as s:
            s.sendall(encode_frame(Message(MsgType.HELLO, 8)))
            decoder = FrameDecoder()
            while not decoder.feed(s.recv(65536)):
                pass
        return time.perf_counter() - t0
    finally:
        stop.set()
        t.join(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--budget", default="4MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-every", type=int, default=10_000)
    ap.add_argument("--normal-frames", type=int, default=5_000, help="legitimate frames before the hostile ones")
    args = ap.parse_args()
    dev = Live(args.budget)
    loaded = status(dev.proc.pid, "VmRSS:")
    # the runtime baseline: the device under normal traffic first — legitimate frames of every kind and size
    # (HELLO, STATS, INFER and TRAIN batches of 1..50, upload chunks up to the largest legal frame, abandoned)
    legit = np.random.default_rng(args.seed + 1)
    first = 0
    for j in range(args.normal_frames):
        kind = j % 5
        seq = 3_000_000_000 + j
        if kind == 0:
            msg = Message(MsgType.HELLO, seq)
        elif kind == 1:
            msg = Message(MsgType.STATS, seq)
        elif kind == 2:
            b = int(legit.integers(1, 51))
            msg = Message(MsgType.INFER, seq, {}, {"x": legit.integers(0, 255, (b, 784), dtype=np.uint8)})
        elif kind == 3:
            b = int(legit.integers(1, 51))
            msg = Message(MsgType.TRAIN, seq, {"first": first}, {"x": legit.integers(0, 255, (b, 784), dtype=np.uint8),
                                                                 "y": legit.integers(0, 10, b)})
            first += b
        else:
            # every fifth upload chunk the largest a legal frame carries (every other one of those all zeros:
            # a block per byte, COBS's slowest case), the others random bytes of any size below it
            n = LARGEST_CHUNK if j % 25 == 4 else int(legit.integers(1, LARGEST_CHUNK))
            msg = Message(MsgType.LOAD_MODEL, seq, {"offset": 0, "total": n + 1, "crc32": 0},  # never completed
                          {"chunk": np.zeros(n, np.uint8) if j % 50 == 29 else legit.integers(0, 255, n, dtype=np.uint8)})
        reply = dev.ask(encode_frame(msg))
        assert reply is not None and reply.type == MsgType.ACK, (j, reply)
    baseline = status(dev.proc.pid, "VmHWM:")
    rng = np.random.default_rng(args.seed)
    counts: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()
    accepted_invalid = hello_failures = 0
    max_rss = baseline
    t0 = time.perf_counter()
    for i, (kind, frame, must_refuse) in enumerate(hostile_frames(rng, {"input_dim": 784, "classes": 10}, args.frames)):
        counts[kind] += 1
        reply = dev.ask(frame)
        if reply is None or reply.type in (MsgType.ERROR, MsgType.NACK):
            refused[kind] += 1
        elif must_refuse and reply.type == MsgType.ACK:
            accepted_invalid += 1
            print(f"accepted invalid {kind}: {str(reply.meta)[:120]}", flush=True)
        hello = dev.ask(encode_frame(Message(MsgType.HELLO, 4_000_000_000 + i)))
        if hello is None or hello.type != MsgType.ACK:
            hello_failures += 1
        if i % 500 == 0:
            max_rss = max(max_rss, status(dev.proc.pid, "VmRSS:"))
        if i % args.report_every == 0:
            print(f"{i} frames, {time.perf_counter() - t0:.0f}s, crashes {dev.crashes}, rss "
                  f"{status(dev.proc.pid, 'VmRSS:') / 2**20:.1f} MiB", flush=True)
    max_rss = max(max_rss, status(dev.proc.pid, "VmHWM:"))
    seconds = time.perf_counter() - t0
    dev.sock.close()
    waits = {f"wait_behind_{name}_s": round(wait_behind(dev.addr, name), 2) for name in ("trickler", "chatty")}
    dev.close()
    budget = parse_size(args.budget)
    rec: dict[str, Any] = {
        "kind": "hostile", "frames": args.frames, "crashes": dev.crashes, "accepted_invalid": accepted_invalid,
        "hello_failures": hello_failures, "max_rss": max_rss, "baseline_rss": baseline, "loaded_rss": loaded,
        "normal_frames": args.normal_frames,
        "budget": budget,
        "max_rss_over_baseline_plus_budget": round(max_rss / (baseline + budget), 4), "seconds": round(seconds, 1),
        "seed": args.seed, "idle_s": 30.0, **waits, **{f"frames_{k}": v for k, v in sorted(counts.items())},
        **{f"refused_{k}": v for k, v in sorted(refused.items())},
    }
    merge_records("device", [rec], ("kind",))
    print(table([rec], ["frames", "crashes", "accepted_invalid", "hello_failures", "max_rss", "baseline_rss", "budget",
                        "max_rss_over_baseline_plus_budget", "seconds", *waits]))


if __name__ == "__main__":
    main()
