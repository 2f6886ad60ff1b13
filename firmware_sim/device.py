"""The simulated device: a RAM budget, a numpy network, and the protocol's request handlers.

``Device.receive(bytes) -> bytes`` is the whole firmware: it decodes frames, drops duplicates by
sequence number (answering them from its reply cache, never applying twice), NACKs corrupt frames and
answers every request with an ACK or an ERROR. ``serve_pty`` / ``serve_socket`` put it at one end of a
real pty pair or a TCP socket; ``main`` is ``edgeff device-sim``. No torch is imported here.

RAM budget: a model or a batch is refused (ERROR ``too_big``, saying by how much) when
the numpy runtime's plan (``edgeff.edge.plan``: weights, optimizer state, label codes, closed-form statistics,
one layer's working set) exceeds the budget; an upload is planned from its header before the model is built. Measured memory (``tracemalloc``, which sees numpy's buffers) is reported by STATS. A model
upload is staged in RAM and counts against the budget: its declared size (and the host's declared plan)
is checked at the first chunk, an abandoned upload is freed by the next request of another kind, and an
``.npz`` is refused if its members unpack to more than the budget.

Hostile input never stops the firmware: frames are bounded before anything is allocated
(``protocol.MAX_*``), every request field is validated, a reply that cannot be encoded becomes a short
ERROR, any other failure an ERROR ``internal``; a model (or class) that would make later replies too big to
send is refused before it is installed or saved, and an unrepresentable saved state is ignored at boot.
ONNX files whose tensors point at external files are refused.

State survives resets: SAVE writes the model, optimizer state, RNG and sample counters atomically to
``state_dir/state.npz``; RESET (or a restart of the process) restores from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import socket
import sys
import tempfile
import threading
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgeff.firmware_sim.edge_model import RULES, EdgeModel, ModelError, model_from_bytes, new_model
from edgeff.firmware_sim.onnx_check import OnnxFormatError, uses_external_data
from edgeff.firmware_sim.protocol import (
    MAX_PAYLOAD,
    VERSION,
    FrameDecoder,
    FrameError,
    Message,
    MsgType,
    encode_frame,
)

from edgeff.edge.plan import file_plan
from edgeff.edge.rand import Rng
from edgeff.files import BytesReader
from edgeff.kinds import numpy_kinds
from edgeff.names import name_problem, names_problem

STATE_FILE = "state.npz"
ONNX_FILE = "model.onnx"
MAX_TEXT = 300  # characters of an error text in a reply
MAX_CLASSES = 1024
MAX_MEMBERS = 1024  # arrays in an uploaded .npz model (a 12-layer edge model with Adam state holds ~150)
MAX_BATCH = 4096  # samples in one TRAIN or INFER request
MAX_INPUT = 1e6  # largest |value| of a float input after the float32 cast (normalised pixels are O(1))
# requests that may run long (a readout solve, a large batch): with ``Device.background`` set they continue in a
# worker once that long has passed, and the device answers HELLO meanwhile
LONG_REQUESTS = frozenset({MsgType.INFER, MsgType.TRAIN, MsgType.ADD_CLASS})


def _int(meta: dict[str, Any], key: str, lo: int = 0, hi: int = 2**53) -> int:
    """An integer field of a request, checked (JSON floats such as 1e999 and booleans are refused)."""
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise DeviceError("bad_request", f"field {key!r} must be an integer in {lo}..{hi}, got {str(v)[:40]}")
    return v


def _samples(arrays: dict[str, np.ndarray], key: str = "x") -> np.ndarray:
    """A request's input batch (B, D): uint8 pixels, or floats that stay finite and bounded in float32."""
    if key not in arrays:
        raise DeviceError("bad_request", f"the request carries no {key!r} array")
    x = arrays[key]
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_BATCH:
        raise DeviceError("bad_input", f"expected a batch of shape (B, D) with 1 <= B <= {MAX_BATCH}, got {x.shape}")
    if x.dtype != np.uint8:
        with np.errstate(over="ignore", invalid="ignore"):
            xf = x.astype(np.float32)
        if not np.all(np.isfinite(xf)) or float(np.abs(xf).max()) > MAX_INPUT:
            raise DeviceError("bad_input", f"inputs must be finite and within ±{MAX_INPUT:g} as float32 "
                                           "(normalised pixels); send uint8 pixels or clean the batch")
        return xf
    return x


def _zip_members(blob: bytes | bytearray) -> int | None:
    """The entry count a zip archive's end-of-central-directory record declares (0xFFFF: a zip64 archive,
    which no model needs), or None without one; read before the archive is parsed."""
    tail = memoryview(blob)[-(22 + 65535):]
    at = bytes(tail).rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None
    return int.from_bytes(tail[at + 10:at + 12], "little")


def _class_name(v: Any) -> str:
    if (why := name_problem(v)) is not None:
        raise DeviceError("bad_request", why)
    return v


class DeviceError(Exception):
    """A request the device refuses; becomes an ERROR reply with ``code`` and a message."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


def parse_size(text: str) -> int:
    """``"512KiB"``, ``"4MiB"``, ``"1.5MB"``, ``"65536"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a size from {text!r}; write e.g. 512KiB or 4MiB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or unit == "" else 1000
    return int(num * base ** " KMG".index(unit or " "))


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


class OnnxModel:
    """An ``edgeff export`` ONNX graph run by onnxruntime (inference only). Input normalisation, shape
    and class names come from the file's metadata. Planned RAM: twice the file size (onnxruntime holds
    the initializers next to the parsed graph) — onnxruntime's own allocations are outside tracemalloc."""

    def __init__(self, blob: bytes) -> None:

        try:
            external = uses_external_data(blob)
        except OnnxFormatError as e:
            raise DeviceError("bad_model", f"neither an edgeff device model nor a readable ONNX file ({e})") from None
        if external:
            raise DeviceError("bad_model", "this ONNX model keeps tensors in external files, which a device does "
                                           "not read; export it with its weights inside (edgeff export)")
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            self.session = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
            props = self.session.get_modelmeta().custom_metadata_map
            self.shape = tuple(int(v) for v in json.loads(props["input_shape"]))
            c = self.shape[0]
            self.mean = np.asarray(json.loads(props.get("mean", "[]")) or [0.0] * c, np.float32).reshape(1, -1, 1, 1)
            self.std = np.asarray(json.loads(props.get("std", "[]")) or [1.0] * c, np.float32).reshape(1, -1, 1, 1)
            self.classes = json.loads(props.get("classes", "[]"))  # checked by Device._representable
        except ImportError:
            raise DeviceError("unsupported", "this device has no onnxruntime; load a device model instead") from None
        except Exception as e:  # noqa: BLE001 - any parse failure is the same user-facing error
            raise DeviceError("bad_model", f"neither an edgeff device model nor a readable edgeff ONNX file "
                                           f"({type(e).__name__}: {e})") from None
        self.blob = blob
        self.input_dim = int(np.prod(self.shape))
        self.plan_bytes = self.plan(len(blob))

    @staticmethod
    def plan(size: int) -> int:
        """Planned RAM of an ONNX file of ``size`` bytes: the file and onnxruntime's copy of its initializers."""
        return 2 * size

    def scores(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise DeviceError("bad_input", f"expected inputs of shape (B, {self.input_dim}), got {x.shape}")
        xf = x.reshape(-1, *self.shape).astype(np.float32)
        if x.dtype == np.uint8:
            xf = (xf / np.float32(255.0) - self.mean) / self.std
        return np.asarray(self.session.run(["scores"], {"x": np.ascontiguousarray(xf, np.float32)})[0])


class Device:
    """Firmware state and request handlers (see the module docstring).

    Args:
        budget: RAM budget in bytes.
        state_dir: where SAVE writes and boot restores state; ``None`` keeps nothing across resets.
        seed: seeds the RNG for negatives, noise and new classes (saved with the state).
    """

    def __init__(self, budget: int, state_dir: str | Path | None = None, *, seed: int = 0) -> None:
        self.budget = budget
        self.state_dir = Path(state_dir) if state_dir is not None else None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.boots = 0
        self.decoder = FrameDecoder()
        self.planned_peak = 0  # the largest plan of a request accepted since STATS last reset the peak
        self.counters = {"frames_rx": 0, "frames_tx": 0, "frame_errors": 0, "nacks": 0, "duplicates": 0,
                         "stale_train": 0, "busy": 0}
        # seconds a long request runs before it continues in a worker thread (the serving loops set it: the
        # device then answers HELLO while it solves); None: every request is answered before receive returns
        self.background: float | None = None
        self.job: tuple[Message, threading.Thread, list[Message]] | None = None  # (request, worker, its reply)
        self.boot()

    # ----------------------------------------------------------------- lifecycle
    def boot(self) -> None:
        """Start from the saved state (or empty): what a power cycle does."""
        self.boots += 1
        self.boot_id = int.from_bytes(os.urandom(4), "little")
        self.net: EdgeModel | None = None  # an edge-runtime model (edgeff.edge's learners)
        self.onnx: OnnxModel | None = None
        self.rng = Rng(self.seed)
        self.samples_seen = 0
        self.applied_crc = 0  # crc32 over the ids of every applied sample, in order
        self.last_seq: int | None = None
        self.last_reply: bytes | None = None
        self.staging: dict[str, Any] | None = None
        self.decoder = FrameDecoder()
        path = self.state_dir / STATE_FILE if self.state_dir is not None else None
        if self.state_dir is not None and (self.state_dir / ONNX_FILE).exists():
            try:
                onnx = OnnxModel((self.state_dir / ONNX_FILE).read_bytes())
                self._representable(onnx=onnx)
                self.onnx = onnx
            except DeviceError as e:
                print(f"device: ignoring unreadable saved ONNX model ({e})", file=sys.stderr)
            return
        if path is not None and path.exists():
            try:
                net, state = model_from_bytes(path.read_bytes())
                self._representable(net=net)
            except (ModelError, DeviceError) as e:
                print(f"device: ignoring unreadable saved state ({str(e)[:MAX_TEXT]})", file=sys.stderr)
                return
            self.net = net
            self.samples_seen = int(state.get("samples_seen", 0))
            self.applied_crc = int(state.get("applied_crc", 0))
            if "rng" in state:
                self.rng.state = state["rng"]

    def save(self) -> int:
        if self.state_dir is None:
            raise DeviceError("no_storage", "this device was started without a state directory (--state-dir)")
        if self.onnx is not None:
            self._write_atomic(ONNX_FILE, lambda f: f.write(self.onnx.blob))  # type: ignore[union-attr]
            (self.state_dir / STATE_FILE).unlink(missing_ok=True)
            return len(self.onnx.blob)
        if self.net is None:
            raise DeviceError("no_model", "no model loaded; send LOAD_MODEL first")
        state = {"samples_seen": self.samples_seen, "applied_crc": self.applied_crc,
                 "rng": self.rng.state}
        net = self.net
        plan = net.memory_plan(1)
        self._planned(plan["resident"] + plan["save"])
        size = self._write_atomic(STATE_FILE, lambda f: net.write(f, state=state))  # array by array
        (self.state_dir / ONNX_FILE).unlink(missing_ok=True)
        return size

    def _write_atomic(self, name: str, write: Callable[[Any], Any]) -> int:
        assert self.state_dir is not None
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".state-")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, self.state_dir / name)  # atomic: a reset never sees half a file
        return size

    # ----------------------------------------------------------------- bytes in, bytes out
    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the link; returns the bytes to send back."""
        out = bytearray()
        for item in self.decoder.feed(data):
            if isinstance(item, FrameError):
                self.counters["frame_errors"] += 1
                self.counters["nacks"] += 1
                out += self._send(Message(MsgType.NACK, 0, {"error": str(item)}))
                continue
            self.counters["frames_rx"] += 1
            if self.job is not None:  # a long request is being worked on: HELLO is answered, the rest waits
                out += self._while_busy(item)
                continue
            if item.type != MsgType.HELLO and item.seq == self.last_seq and self.last_reply is not None:
                self.counters["duplicates"] += 1  # a retransmission: answer again, apply nothing
                self.counters["frames_tx"] += 1
                out += self.last_reply
                continue
            if item.type != MsgType.LOAD_MODEL:
                self.staging = None  # an upload interrupted by anything else is abandoned: its bytes are freed
            if self.background is not None and item.type in LONG_REQUESTS:
                done: list[Message] = []
                worker = threading.Thread(target=lambda m=item, d=done: d.append(self.handle(m)), daemon=True)
                worker.start()
                worker.join(self.background)
                if worker.is_alive():  # it goes on; its reply is sent by ``poll`` when it is ready
                    self.job = (item, worker, done)
                    continue
                reply = self._send(done[0])
                self.last_seq, self.last_reply = item.seq, reply
                out += reply
                continue
            reply = self._send(self.handle(item))
            if item.type == MsgType.RESET:
                self.boot()  # the reply was built before rebooting; the new boot has an empty cache
            else:
                self.last_seq, self.last_reply = item.seq, reply
            out += reply
        return bytes(out)

    def _while_busy(self, item: Message) -> bytes:
        """A frame that arrives while a long request runs: HELLO is answered (the host's liveness check); anything
        else, the running request's retransmission included, gets a ``busy`` ERROR (nothing applied, not cached:
        the host asks again, and gets the running request's reply once it is done)."""
        assert self.job is not None
        running = self.job[0]
        if item.type == MsgType.HELLO:
            return self._send(self.handle(item))
        if item.seq == running.seq:
            self.counters["duplicates"] += 1  # the host asks again: it is told to wait (its reply follows)
        self.counters["busy"] += 1
        return self._send(Message(MsgType.ERROR, item.seq, {
            "code": "busy", "text": f"the device is working on {running.type.name} (seq {running.seq}); retry when "
                                    "it has answered", "boot": self.boot_id}))

    def poll(self) -> bytes:
        """The reply of a long request that has finished in the background (the serving loops call this while
        one runs); empty while it still runs or when there is none."""
        if self.job is None or self.job[1].is_alive():
            return b""
        item, _, done = self.job
        self.job = None
        reply = self._send(done[0])
        self.last_seq, self.last_reply = item.seq, reply
        return reply

    def _send(self, msg: Message) -> bytes:
        """Encode a reply; one that cannot be represented becomes a short ERROR (the device never dies on it)."""
        self.counters["frames_tx"] += 1
        try:
            return encode_frame(msg)
        except (ValueError, TypeError, OverflowError) as e:
            self.counters["reply_errors"] = self.counters.get("reply_errors", 0) + 1
            return encode_frame(Message(MsgType.ERROR, msg.seq, {"code": "reply_too_big",
                                                                 "text": f"the reply could not be sent: {str(e)[:120]}"}))

    def handle(self, msg: Message) -> Message:
        """One request -> its ACK or ERROR reply (the state is unchanged when it is an ERROR)."""
        handlers = {
            MsgType.HELLO: self._hello, MsgType.LOAD_MODEL: self._load, MsgType.INFER: self._infer,
            MsgType.TRAIN: self._train, MsgType.ADD_CLASS: self._add_class, MsgType.STATS: self._stats,
            MsgType.SAVE: self._save, MsgType.RESET: self._reset,
        }
        fn = handlers.get(msg.type)
        try:
            if fn is None:
                raise DeviceError("bad_request", f"{msg.type.name} is not a request")
            meta, arrays = fn(msg)
        except DeviceError as e:
            return Message(MsgType.ERROR, msg.seq, {"code": e.code, "text": str(e)[:MAX_TEXT], "boot": self.boot_id})
        except (ModelError, KeyError, TypeError, ValueError, ArithmeticError, IndexError) as e:
            return Message(MsgType.ERROR, msg.seq, {"code": "bad_request", "text": f"{type(e).__name__}: {e}"[:MAX_TEXT],
                                                    "boot": self.boot_id})
        except Exception as e:  # noqa: BLE001 - firmware answers every request and keeps running
            self.counters["internal_errors"] = self.counters.get("internal_errors", 0) + 1
            return Message(MsgType.ERROR, msg.seq, {"code": "internal", "text": f"{type(e).__name__}: {e}"[:MAX_TEXT],
                                                    "boot": self.boot_id})
        return Message(MsgType.ACK, msg.seq, {**meta, "boot": self.boot_id}, arrays)

    # ----------------------------------------------------------------- handlers
    def _require_model(self) -> EdgeModel:
        if self.onnx is not None:
            raise DeviceError("unsupported", "the loaded model is an ONNX graph, which this device runs for "
                                             "inference only; load a device model (edgeff device load --preset or "
                                             "--checkpoint) to train or grow it")
        if self.net is None:
            raise DeviceError("no_model", "no model loaded; send LOAD_MODEL first (edgeff device load)")
        return self.net

    def _fit(self, net: EdgeModel, batch: int, what: str) -> dict[str, Any]:
        plan = net.memory_plan(batch)
        need = int(plan.get("train", plan["total"]))
        if need > self.budget:
            raise DeviceError(
                "too_big",
                f"{what} needs {kib(need)} (resident {kib(plan['resident'])} + working set "
                f"{kib(need - plan['resident'])} at batch {batch}) but the RAM budget is {kib(self.budget)}: over by "
                f"{kib(need - self.budget)}. Use fewer or narrower layers, SGD instead of Adam, "
                "or a smaller batch.",
            )
        self._planned(need)
        return plan

    def _fit_inference(self, net: EdgeModel, batch: int, what: str) -> None:
        """A forward pass only: the resident model plus the largest inference working set (and, for a closed-form
        readout, what solving it adds)."""
        plan = net.memory_plan(batch)
        need = int(plan.get("infer", plan["resident"] + max(lay["infer_working"] for lay in plan["layers"])))
        if need > self.budget:
            raise DeviceError("too_big", f"{what} needs {kib(need)} (resident {kib(plan['resident'])} + inference "
                                         f"working set at batch {batch}) but the RAM budget is {kib(self.budget)}: "
                                         f"over by {kib(need - self.budget)}. Send a smaller batch.")
        self._planned(need)

    def _planned(self, need: int) -> None:
        """The largest plan of a request accepted since STATS last reset the peak (reported beside the peak)."""
        self.planned_peak = max(self.planned_peak, need)

    def _hello(self, msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self.last_seq = None  # a new session: sequence numbers start over
        net = self.net
        return {
            "protocol": VERSION, "device": "edgeff-firmware-sim", "ram_budget": self.budget,
            "max_payload": MAX_PAYLOAD, "layer_kinds": numpy_kinds(), "norms": ["none", "length", "layer", "batch"],
            "rules": list(RULES), "losses": ["symba", "ff", "cfl", "lda"], "boot_id": self.boot_id, "boots": self.boots,
            "samples_seen": self.samples_seen, "applied_crc": self.applied_crc, "storage": self.state_dir is not None,
            "model": {"rule": "onnx", "classes": self.onnx.classes, "widths": [], "input_dim": self.onnx.input_dim}
            if self.onnx is not None else None if net is None else {"rule": net.rule, "classes": net.spec["classes"],
                                               "widths": [net.layer_out(i) for i in range(net.n_layers)],
                                               "input_dim": net.spec["input_dim"]},
        }, {}

    def _representable(self, net: EdgeModel | None = None, onnx: OnnxModel | None = None) -> None:
        """Refuse a model whose class list would make later replies (HELLO) unsendable: checked before
        the model is installed or stored, so no state can brick the device."""
        classes = onnx.classes if onnx is not None else net.spec["classes"] if net is not None else []
        if not isinstance(classes, list) or len(classes) > MAX_CLASSES:
            raise DeviceError("bad_model", f"a model holds a list of at most {MAX_CLASSES} class names")
        if (why := names_problem(classes)) is not None:  # the product's one rule for names (edgeff.names)
            raise DeviceError("bad_model", f"the model's classes: {why}")
        old = self.net, self.onnx
        self.net, self.onnx = (net, onnx) if net is not None or onnx is not None else old
        try:
            encode_frame(Message(MsgType.ACK, 0, {**self._hello(Message(MsgType.HELLO, 0))[0], "boot": 0}))
        except (ValueError, TypeError) as e:
            raise DeviceError("bad_model", f"the model's description would not fit in a reply ({e})") from None
        finally:
            self.net, self.onnx = old

    def _load(self, msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One chunk of an upload. The first (offset 0) declares the file's size: refused at once when it
        cannot be staged within the RAM budget (the staged bytes count against it; a loaded model that
        would not fit beside them is unloaded — SAVEd state stays on storage). An abandoned upload is freed."""
        chunk_arr = msg.arrays.get("chunk", np.zeros(0, np.uint8))
        if chunk_arr.dtype != np.uint8 or chunk_arr.ndim != 1:
            raise DeviceError("bad_request", "a model chunk is a 1-D uint8 array")
        offset = _int(msg.meta, "offset", 0, self.budget)
        total = _int(msg.meta, "total", 1, 2**53)
        crc = _int(msg.meta, "crc32", 0, 2**32 - 1)
        if offset == 0:
            self.staging = None
            if total > self.budget:
                raise DeviceError("too_big", f"a model file of {kib(total)} cannot be staged in the RAM budget of "
                                             f"{kib(self.budget)} (over by {kib(total - self.budget)}); it is refused "
                                             "before the upload")
            declared = msg.meta.get("memory")
            if isinstance(declared, int) and not isinstance(declared, bool) and declared > self.budget:
                raise DeviceError("too_big", f"this model needs {kib(declared)} (declared by the host) but the RAM "
                                             f"budget is {kib(self.budget)}: over by {kib(declared - self.budget)}")
            unloaded = False
            resident = self._resident()
            if resident + total > self.budget:  # no room to stage beside the loaded model: unload it
                self.net = self.onnx = None
                unloaded = resident > 0
            # staged in one buffer of the declared size (counted against the budget above): no joined copy
            self.staging = {"total": total, "crc32": crc, "buf": bytearray(total), "have": 0, "crc": 0,
                            "unloaded": unloaded}
        st = self.staging
        if st is None or st["total"] != total or st["crc32"] != crc:
            raise DeviceError("bad_request", "model chunk out of order; restart the upload at offset 0")
        if offset != st["have"]:
            raise DeviceError("bad_request", f"model chunk at offset {offset}, expected {st['have']}")
        n = chunk_arr.size
        if st["have"] + n > total:
            self.staging = None
            raise DeviceError("bad_request", "model chunks run past the declared size; restart the upload")
        st["buf"][st["have"]:st["have"] + n] = chunk_arr.data
        st["crc"] = zlib.crc32(chunk_arr.data, st["crc"])
        st["have"] += n
        have = st["have"]
        if have < total:
            return {"received": have, "unloaded": st["unloaded"]}, {}
        self.staging = None
        blob, blob_crc = st["buf"], st["crc"]
        del st
        if blob_crc != crc:
            raise DeviceError("bad_model", "model checksum mismatch after upload; send it again")
        if not blob.startswith(b"PK"):  # not an .npz (zip): an ONNX graph, for inference only
            need = OnnxModel.plan(len(blob))
            if need > self.budget:  # before onnxruntime (which takes bytes: one copy, inside the plan) sees it
                raise DeviceError("too_big", f"this ONNX model needs about {kib(need)} but the RAM "
                                             f"budget is {kib(self.budget)}: over by {kib(need - self.budget)}")
            blob = bytes(blob)
            model = OnnxModel(blob)
            self._representable(onnx=model)
            self.onnx, self.net = model, None
            self.samples_seen = self.applied_crc = 0
            return {"received": have, "memory": model.plan_bytes, "classes": model.classes, "format": "onnx"}, {}
        net = self._unpack(blob)
        plan = self._fit(net, 1, "this model")
        self._representable(net=net)
        self.net, self.onnx = net, None
        self.samples_seen = 0
        self.applied_crc = 0
        self.rng = Rng(int(net.spec.get("seed", self.seed)) % 2**63)
        return {"received": have, "memory": plan["total"], "classes": net.spec["classes"]}, {}

    def _resident(self) -> int:
        if self.onnx is not None:
            return self.onnx.plan_bytes
        return int(self.net.memory_plan(1)["resident"]) if self.net is not None else 0

    def _unpack(self, blob: bytearray) -> EdgeModel:
        """An .npz model. Its member count is read from the archive's end record and bounded before the
        archive is parsed (each member costs a parsed entry), and the file plus what it unpacks to — both held
        while it is read — must fit in the budget before anything is decompressed."""
        members = _zip_members(blob)
        if members is None:
            raise DeviceError("bad_model", "not a readable model file (no zip end record)")
        if members > MAX_MEMBERS:
            raise DeviceError("bad_model", f"the model file holds {members} arrays; a model has at most {MAX_MEMBERS}")
        try:
            with zipfile.ZipFile(BytesReader(blob)) as zf:
                infos = zf.infolist()
                unpacked = sum(i.file_size for i in infos)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise DeviceError("bad_model", f"not a readable model file ({e})") from None
        if len(infos) > MAX_MEMBERS:  # the end record lied
            raise DeviceError("bad_model", f"the model file holds {len(infos)} arrays; a model has at most {MAX_MEMBERS}")
        if len(blob) + unpacked > self.budget:
            need = len(blob) + unpacked
            raise DeviceError("too_big", f"the model file ({kib(len(blob))}) and its {kib(unpacked)} of arrays, held "
                                         f"together while it is read, need {kib(need)} but the RAM budget is "
                                         f"{kib(self.budget)}: over by {kib(need - self.budget)}")
        self._fit_file(blob)
        try:
            net, _ = model_from_bytes(blob)
        except ModelError as e:
            raise DeviceError("bad_model", str(e)[:MAX_TEXT]) from None
        return net

    def _fit_file(self, blob: bytearray) -> None:
        """An edge file's plan (``edgeff.edge.plan.file_plan``, from its header and its members' sizes), checked
        before the model is built: loading (the file, its arrays and the model together), training and predicting
        at batch 1. A file without an edge header is refused when it is read."""
        try:
            plan = file_plan(blob, 1)
        except Exception as e:  # noqa: BLE001 - any unreadable header is a bad model, said in one line
            raise DeviceError("bad_model", f"not a readable edge model header ({type(e).__name__}: {e})"[:MAX_TEXT]) from None
        if plan is None:
            return
        if plan["total"] > self.budget:
            raise DeviceError("too_big", f"this model needs {kib(plan['total'])} (loading {kib(plan['load'])}, training "
                                         f"{kib(plan['train'])}, predicting {kib(plan['infer'])} at batch 1) but the RAM "
                                         f"budget is {kib(self.budget)}: over by {kib(plan['total'] - self.budget)}")
        self._planned(plan["load"])

    def _infer(self, msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        x = _samples(msg.arrays)
        if self.onnx is not None:
            scores = self.onnx.scores(x)
            return {}, {"scores": scores, "pred": scores.argmax(1).astype(np.int64)}
        net = self._require_model()
        self._fit_inference(net, x.shape[0], f"inference on {x.shape[0]} samples")
        layer_scores = net.layer_scores(x)  # (B, K, L)
        scores = layer_scores[..., net.spec["eval_layers"]].sum(-1)
        arrays = {"scores": scores, "pred": scores.argmax(1).astype(np.int64)}
        if msg.meta.get("per_layer") is True:
            arrays["layer_pred"] = layer_scores.argmax(1).astype(np.int64)  # (B, L)
        return {}, arrays

    def _train(self, msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        net = self._require_model()
        x = _samples(msg.arrays)
        y = msg.arrays.get("y")
        if x.shape[1] != int(net.spec["input_dim"]):
            raise DeviceError("bad_input", f"expected inputs of shape (B, {net.spec['input_dim']}), got {x.shape}")
        if y is None or y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
            raise DeviceError("bad_input", f"expected {x.shape[0]} integer labels in 'y'")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= len(net.spec["classes"])):
            raise DeviceError("bad_input", f"labels must lie in 0..{len(net.spec['classes']) - 1}")
        first = _int(msg.meta, "first", 0, 2**53)
        if first < self.samples_seen:  # already applied (a retransmission across a reconnect)
            self.counters["stale_train"] += 1
            return {"applied": False, "samples_seen": self.samples_seen}, {}
        if first > self.samples_seen:
            raise DeviceError("out_of_order", f"batch starts at sample {first} but the device has applied "
                                              f"{self.samples_seen}; resume from there")
        self._fit(net, x.shape[0], f"training on a batch of {x.shape[0]}")
        losses = net.train_step(x, y, self.rng)
        for i in range(first, first + x.shape[0]):
            self.applied_crc = zlib.crc32(i.to_bytes(8, "little"), self.applied_crc)
        self.samples_seen += x.shape[0]
        return {"applied": True, "losses": losses, "samples_seen": self.samples_seen}, {}

    def _add_class(self, msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        net = self._require_model()
        name = _class_name(msg.meta.get("name"))
        if len(net.spec["classes"]) >= MAX_CLASSES:
            raise DeviceError("too_big", f"the model already holds {MAX_CLASSES} classes")
        x = _samples(msg.arrays) if "x" in msg.arrays else None
        if x is not None and net.rule != "goodness":  # the examples pass forward once (goodness does not read them)
            self._fit_inference(net, x.shape[0], f"the {x.shape[0]} examples of class {name!r}")
        restore = net.class_snapshot()  # references, not a copy of the model
        rng_state = self.rng.state
        try:
            index = net.add_class(name, self.rng, x)
            self._fit(net, 1, f"the model with class {name!r}")
            self._representable(net=net)
        except (DeviceError, ModelError):
            restore()
            self.rng.state = rng_state
            raise
        return {"index": index, "classes": net.spec["classes"]}, {}

    def _stats(self, msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        cur, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
        meta: dict[str, Any] = {
            "ram_budget": self.budget, "traced_current": cur, "traced_peak": peak, "boot_id": self.boot_id,
            "samples_seen": self.samples_seen, "applied_crc": self.applied_crc, "counters": dict(self.counters),
            "torch_loaded": "torch" in sys.modules, "planned_peak": self.planned_peak,
        }
        if self.onnx is not None:
            meta["memory"] = {"layers": [], "resident": self.onnx.plan_bytes, "working": 0,
                              "total": self.onnx.plan_bytes}
        if self.net is not None:
            plan = self.net.memory_plan(1)
            for lay, used in zip(plan["layers"], getattr(self.net, "last_working", None) or [0] * self.net.n_layers,
                                 strict=False):
                lay["last_working"] = used
            meta["memory"] = plan
        if msg.meta.get("reset_peak") and tracemalloc.is_tracing():
            tracemalloc.reset_peak()
            self.planned_peak = 0
        return meta, {}

    def _save(self, msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"bytes": self.save(), "samples_seen": self.samples_seen}, {}

    def _reset(self, msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"rebooting": True}, {}


# --------------------------------------------------------------------------- transports
BACKGROUND = 0.2  # seconds a long request holds the serving loop before it continues in a worker (Device.background)
POLL = 0.01  # seconds between checks for a background request's reply


def serve_fd(dev: Device, fd: int, *, idle: float = 0.5, until: float | None = None) -> None:
    """Serve on a file descriptor (a pty master) until ``until`` (a ``time.monotonic`` deadline) or forever.
    A long request continues in a worker after ``BACKGROUND`` seconds; HELLO is answered meanwhile."""
    dev.background = BACKGROUND
    while until is None or time.monotonic() < until:
        ready, _, _ = select.select([fd], [], [], idle if dev.job is None else POLL)
        reply = dev.poll()
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: no one has the other end open right now
                time.sleep(0.05)
                continue
            reply += dev.receive(data)
        view = memoryview(reply)
        while view:
            n = os.write(fd, view)
            view = view[n:]


def open_pty(link: str | Path | None = None) -> tuple[int, int, str]:
    """A raw pty pair: (master fd, slave fd, slave path). With ``link``, a symlink to the slave is
    (re)pointed atomically, so a host can reopen the same path after the device restarts."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    path = os.ttyname(slave)
    if link is not None:
        link = Path(link)
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(path, tmp)
        os.replace(tmp, link)
    return master, slave, path


def serve_socket(dev: Device, port: int, *, host: str = "127.0.0.1", announce: bool = True, idle: float = 30.0,
                 backlog: int = 1, share: float = 1.0, turn: float = 5.0) -> None:
    """Serve TCP clients one at a time (pyserial URL ``socket://HOST:PORT``), forever, each in a bounded session:
    a client must complete each frame within ``idle`` seconds of its previous reply (a deadline per frame, not
    per read: one byte every few seconds does not hold the device), and while another client waits it is let go
    once it has sent no complete frame for ``share`` seconds, or at the latest ``turn`` seconds later (a host
    that is let go reconnects and waits its turn). A reply not taken within ``idle`` seconds drops the
    client. At most ``backlog`` more wait to be served (the kernel refuses the rest); a client that resets or
    vanishes mid-reply is dropped, the device keeps serving."""
    dev.background = BACKGROUND
    srv = socket.create_server((host, port), backlog=backlog)
    if announce:
        print(f"port: socket://{host}:{srv.getsockname()[1]}", flush=True)
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            continue
        with conn:
            _serve_client(dev, conn, srv, idle, share, turn)
        dev.decoder = FrameDecoder()  # a half frame from a dropped client must not prefix the next one


def _serve_client(dev: Device, conn: socket.socket, srv: socket.socket, idle: float, share: float,
                  turn: float) -> None:
    """One client's session (see ``serve_socket``); returns when it ends, for any reason."""
    last = time.monotonic()  # the session's start, then each completed frame's reply
    waited: float | None = None  # since when another client has been waiting
    try:
        while True:
            now = time.monotonic()
            if now >= last + idle and dev.job is None:
                return  # no complete frame within the deadline: idle or trickling
            wait = POLL if dev.job is not None else min(last + idle - now, share)
            ready, _, _ = select.select([conn, srv], [], [], max(0.0, wait))
            reply = dev.poll()  # a long request's reply, once its worker is done
            if conn in ready:
                data = conn.recv(65536)
                if not data:
                    return
                reply += dev.receive(data)
            if reply:
                conn.settimeout(idle)  # the whole reply within the deadline (sendall's total since 3.5)
                conn.sendall(reply)
                conn.setblocking(True)
                last = time.monotonic()
            if srv in ready:
                now = time.monotonic()
                waited = now if waited is None else waited
                if now >= last + share or now >= waited + turn:
                    return  # another client waits: this one paused for `share` s, or has had `turn` s more
    except (TimeoutError, ConnectionError, OSError):
        return


def warm_up() -> None:
    """Run every code path once (model I/O, training, inference, frames, a state save) so the modules
    they import lazily are loaded before memory tracing starts: code lives in flash on a board, and the
    RAM figures should count data only."""
    try:  # onnxruntime's library and environment (~20 MB) load on the first ONNX model: load them now
        OnnxModel(b"\x08\x07")
    except DeviceError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        dev = Device(1 << 30, tmp)
        for preset in ("device-embed", "device-goodness"):
            blob = new_model(preset, [4], input_shape=(1, 2, 2), classes=["a", "b"])
            frames = [Message(MsgType.LOAD_MODEL, 1, {"offset": 0, "total": len(blob), "crc32": zlib.crc32(blob)},
                              {"chunk": np.frombuffer(blob, np.uint8)}),
                      Message(MsgType.TRAIN, 2, {"first": 0}, {"x": np.zeros((2, 4), np.uint8), "y": np.zeros(2, np.int64)}),
                      Message(MsgType.INFER, 3, {}, {"x": np.zeros((2, 4), np.uint8)}),
                      Message(MsgType.ADD_CLASS, 4, {"name": "c"}, {"x": np.zeros((1, 4), np.uint8)}),
                      Message(MsgType.SAVE, 5), Message(MsgType.STATS, 6), Message(MsgType.RESET, 7)]
            for msg in frames:
                dev.receive(encode_frame(msg))


def main(argv: list[str] | None = None) -> int:
    """``edgeff device-sim``: run a simulated device and print the port to open."""
    ap = argparse.ArgumentParser(prog="edgeff device-sim", description=__doc__.split("\n")[0])
    ap.add_argument("--budget", default="4MiB", help="RAM budget, e.g. 512KiB or 4MiB (default 4MiB)")
    ap.add_argument("--state-dir", default=None, help="where SAVE writes state and boot restores it")
    ap.add_argument("--socket", type=int, default=None, metavar="PORT",
                    help="serve socket://127.0.0.1:PORT instead of a pty (0 = any free port)")
    ap.add_argument("--link", default=None, help="keep a symlink at this path pointing to the pty")
    ap.add_argument("--idle", type=float, default=30.0,
                    help="socket mode: seconds a client has to complete each frame and take each reply")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        budget = parse_size(args.budget)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warm_up()
    tracemalloc.start()
    dev = Device(budget, args.state_dir, seed=args.seed)
    if args.socket is not None:
        serve_socket(dev, args.socket, idle=args.idle)
        return 0
    master, _slave, path = open_pty(args.link)  # the slave stays open here so the pty survives host reconnects
    print(f"port: {args.link or path}", flush=True)
    print(f"device: RAM budget {kib(budget)}, state {args.state_dir or '(none)'}, pty {path}", file=sys.stderr,
          flush=True)
    try:
        serve_fd(dev, master)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
