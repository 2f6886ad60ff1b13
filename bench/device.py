"""The serial path end to end: a simulated device process on a real pty, driven by the host.

    python bench/device.py [--data-dir ../shared/data] [--fault-frames 10000]

Measured in one run (writes bench/results/device.json, prints tables):

- ``e2e``: load a fresh model, train on-device on 2,000 real MNIST training images (one pass, batch 10),
  evaluate on 1,000 test images; beside it the same numpy training run in this process. Reports both
  accuracies, their prediction agreement, on-device vs in-process time (the link's cost as a ratio), and
  the device's measured peak memory (tracemalloc, numpy buffers included) against its plan and budget.
- ``faults``: ``--fault-frames`` TRAIN frames of one sample each through a port that drops, corrupts,
  duplicates and delays 5% of frames/chunks in both directions; then the device's saved weights against the
  same training run in this process (``weights_max_abs_diff``: any lost, doubled or reordered sample shows
  there), beside the device's own counters (sample count and a CRC over the applied sample ids).
- ``throughput``: TRAIN and INFER frames/s and samples/s over the pty at batch 1, 10, 50.
- ``edge_on_device``: edge-runtime models (``slda-conv``, ``cfl-mlp``, the conv preset ``cfl-conv``) uploaded as
  edge files to a device at a budget they fit (load, stream 300 samples at batch 10, evaluate 300 at batch 50:
  the device's traced peak against the largest plan of the requests it accepted, ``edgeff.edge.plan``) and at
  one they do not (refused at load, in one line).

    python bench/device.py --edge-only      # only the edge_on_device records
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from _common import merge_records, table
from edgeff.firmware_sim.device import parse_size
from edgeff.firmware_sim.edge_model import EdgeModel, new_model
from edgeff.firmware_sim.faults import FaultyPort

from edgeff.data import load_data
from edgeff.host import DeviceClient


def start_device(budget: str, state_dir: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "edgeff.firmware_sim.device", "--budget", budget, "--state-dir",
                             state_dir], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split("port: ", 1)[1].strip()


def expected_crc(n: int) -> int:
    crc = 0
    for i in range(n):
        crc = zlib.crc32(i.to_bytes(8, "little"), crc)
    return crc


def in_process(blob: bytes) -> tuple[EdgeModel, np.random.Generator]:
    """The device's model in this process, with the generator the device seeds for it at LOAD."""
    net, _ = EdgeModel.from_bytes(blob)
    return net, np.random.default_rng(int(net.spec["seed"]))


def e2e(url: str, budget: int, rule: str, widths: list[int], x: np.ndarray, y: np.ndarray, xt: np.ndarray,
        yt: np.ndarray, dataset: str) -> dict[str, Any]:
    blob = new_model(rule, widths)
    with DeviceClient(url) as dev:
        before = dev.device_stats(reset_peak=True)  # the device's own buffers (and the model it holds, if any)
        idle = int(before["traced_current"]) - int(before.get("memory", {}).get("resident", 0))
        dev.load(blob)
        load_peak = dev.device_stats(reset_peak=True)  # the upload's peak; then the training stream's
        res = dev.stream(x, y, batch_size=10, save_every=500)  # with a SAVE every 500 samples
        train_peak = dev.device_stats(reset_peak=True)
        t0 = time.perf_counter()
        acc, pred = dev.evaluate(xt, yt, batch_size=50)
        eval_s = time.perf_counter() - t0
        st = dev.device_stats(reset_peak=True)
        dev.add_class("extra", x[:50])
        add_peak = dev.device_stats()
    net, rng = in_process(blob)
    t0 = time.perf_counter()
    for i in range(0, len(x), 10):
        net.train_step(x[i : i + 10], y[i : i + 10], rng)
    local_s = time.perf_counter() - t0
    local = net.scores(xt).argmax(1)
    plan = net.memory_plan(10)
    return {
        "kind": "e2e", "rule": rule, "widths": "-".join(map(str, widths)), "dataset": dataset,
        "train_samples": len(x), "test_samples": len(xt), "batch_size": 10, "epochs": 1,
        "device_test_acc": acc, "inproc_test_acc": float((local == yt).mean()),
        "agreement": float((pred == local).mean()), "device_train_s": res.seconds, "inproc_train_s": local_s,
        "train_time_ratio": res.seconds / local_s, "device_eval_s": eval_s,
        "budget_kib": budget / 1024, "plan_kib": plan["total"] / 1024,
        "load_peak_kib": load_peak["traced_peak"] / 1024, "add_class_peak_kib": add_peak["traced_peak"] / 1024,
        "max_peak_over_budget": max(p["traced_peak"] for p in (load_peak, train_peak, st, add_peak)) / budget,
        "train_peak_kib": train_peak["traced_peak"] / 1024, "eval_peak_kib": st["traced_peak"] / 1024,
        "peak_over_budget": train_peak["traced_peak"] / budget,
        # the training stream's peak over the largest plan of the requests the device accepted in it (SAVEs included)
        # (above the device's idle memory: its buffers and reply cache, which no model plan holds)
        "idle_kib": idle / 1024,
        "peak_over_plan": (train_peak["traced_peak"] - idle) / max(train_peak["planned_peak"], 1),
        "torch_in_device": st["torch_loaded"],
    }


def weights(blob: bytes) -> dict[str, np.ndarray]:
    """The numeric arrays of a device model file (weights, optimizer state, label codes)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files if z[k].dtype.kind in "fiu" and k not in ("spec", "state", "header")}


def faults(url: str, n: int, x: np.ndarray, y: np.ndarray, rate: float, state_dir: str) -> dict[str, Any]:
    """The stream through a faulty link, then the device's weights against the same training run in this
    process (content, not the device's own counters: a dropped, duplicated or reordered sample changes them)."""
    blob = new_model("device-embed", [32])
    with DeviceClient(url) as dev:
        dev.load(blob)
    ports: list[FaultyPort] = []

    def wrap(p: object) -> FaultyPort:
        ports.append(FaultyPort(p, rate=rate, seed=7, max_delay=0.01))
        return ports[-1]

    idx = np.arange(n) % len(x)
    with DeviceClient(url, timeout=0.05, wrap=wrap) as dev:
        res = dev.stream(x[idx], y[idx], batch_size=1, save_every=None)
        link = dev.stats
    with DeviceClient(url) as dev:
        st = dev.device_stats()
        dev.save()
    device_w = weights((Path(state_dir) / "state.npz").read_bytes())
    ref, rng = in_process(blob)
    for i in idx:  # the same samples, one per step, in order, with the device's generator
        ref.train_step(x[i : i + 1], y[i : i + 1], rng)
    ref_w = weights(ref.to_bytes())
    common = sorted(set(device_w) & set(ref_w))
    max_diff = max(float(np.abs(device_w[k].astype(np.float64) - ref_w[k].astype(np.float64)).max())
                   for k in common if device_w[k].shape == ref_w[k].shape)
    injected = {k: sum(p.injected[k] for p in ports) for k in ports[0].injected}
    seen = int(st["samples_seen"])
    return {
        "kind": "faults", "fault_rate": rate, "frames": n, "samples_sent": n, "device_samples": seen,
        "lost": max(0, n - seen), "double_applied": max(0, seen - n),
        "crc_ok": st["applied_crc"] == expected_crc(n), "injected": sum(injected.values()),
        "weights_max_abs_diff": max_diff, "weights_compared": len(common),
        **{f"inj_{k}": v for k, v in injected.items()},
        "retransmits": link.retransmits, "nacks": link.nacks, "corrupt_replies": link.corrupt_replies,
        "device_duplicates": st["counters"]["duplicates"], "device_frame_errors": st["counters"]["frame_errors"],
        "seconds": res.seconds, "samples_per_s": res.samples_per_s,
    }


def throughput(url: str, x: np.ndarray, y: np.ndarray, batch: int, n: int) -> list[dict[str, Any]]:
    out = []
    with DeviceClient(url) as dev:
        dev.load(new_model("device-embed", [128, 128]))
        res = dev.stream(x[:n], y[:n], batch_size=batch, save_every=None)
        frames = -(-n // batch)
        out.append({"kind": "throughput", "op": "train", "batch_size": batch, "frames": frames,
                    "seconds": res.seconds, "frames_per_s": frames / res.seconds, "samples_per_s": n / res.seconds})
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            dev.infer(x[i : i + batch])
        dt = time.perf_counter() - t0
        out.append({"kind": "throughput", "op": "infer", "batch_size": batch, "frames": frames, "seconds": dt,
                    "frames_per_s": frames / dt, "samples_per_s": n / dt})
    return out


EDGE_BUDGETS = {"slda-conv": ("160MiB", "64MiB"), "cfl-mlp": ("32MiB", "16MiB"), "cfl-conv": ("32MiB", "2MiB")}


def edge_blob(preset: str) -> bytes:
    from edgeff.edge import make_edge_learner, save

    learner = make_edge_learner(preset, input_shape=(1, 28, 28), num_classes=10)
    with tempfile.TemporaryDirectory() as tmp:
        save(learner, Path(tmp) / "m.npz", meta={"preset": preset})
        return (Path(tmp) / "m.npz").read_bytes()


def edge_on_device(preset: str, budget: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray
                   ) -> dict[str, Any]:
    from edgeff.host import DeviceRefusedError

    rec: dict[str, Any] = {"kind": "edge_on_device", "preset": preset, "budget": parse_size(budget),
                           "train_samples": len(x), "test_samples": len(xt), "batch_size": 10}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_device(budget, tmp)
        try:
            with DeviceClient(url) as dev:
                idle = int(dev.device_stats(reset_peak=True)["traced_current"])  # the device's own buffers
                try:
                    dev.load(edge_blob(preset))
                except DeviceRefusedError as e:
                    return {**rec, "accepted": False, "refusal": str(e), "planned": None, "peak": None, "test_acc": None}
                phases = [dev.device_stats(reset_peak=True)]
                dev.stream(x, y, batch_size=10, save_every=None)
                phases.append(dev.device_stats(reset_peak=True))
                acc, _ = dev.evaluate(xt, yt, batch_size=50)
                phases.append(dev.device_stats(reset_peak=True))
        finally:
            proc.kill()
            proc.wait()
    peaks = [int(p["traced_peak"]) - idle for p in phases]  # above the device's idle memory
    plans = [int(p["planned_peak"]) for p in phases]
    worst = max(range(3), key=lambda i: peaks[i] / max(plans[i], 1))
    return {**rec, "accepted": True, "planned": max(plans), "peak": max(peaks), "test_acc": acc, "idle": idle,
            "device_peak": max(int(p["traced_peak"]) for p in phases),
            "peak_over_plan": round(max(p / max(q, 1) for p, q in zip(peaks, plans, strict=True)), 3),
            "worst_phase": ("load", "train", "eval")[worst], "peak_over_budget": round(max(int(p["traced_peak"]) for p in phases) / parse_size(budget), 3),
            **{f"{ph}_peak": p for ph, p in zip(("load", "train", "eval"), peaks, strict=True)},
            **{f"{ph}_planned": q for ph, q in zip(("load", "train", "eval"), plans, strict=True)}}


def edge_rows(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> list[dict[str, Any]]:
    records = []
    for preset, budgets in EDGE_BUDGETS.items():
        for budget in budgets:
            records.append(edge_on_device(preset, budget, x[:300], y[:300], xt[:300], yt[:300]))
            r = records[-1]
            print(f"edge_on_device {preset} @ {budget}: " + (f"peak {r['peak'] / 1024:.0f} KiB, plan {r['planned'] / 1024:.0f} "
                  f"KiB ({r['peak_over_plan']:.2f} in its worst phase, {r['worst_phase']}), acc {r['test_acc']:.3f}"
                  if r["accepted"] else f"refused: {r['refusal']}"), flush=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="full MNIST (default: the builtin real MNIST subset)")
    ap.add_argument("--fault-frames", type=int, default=10_000)
    ap.add_argument("--fault-rate", type=float, default=0.05)
    ap.add_argument("--budget", default="4MiB")
    ap.add_argument("--edge-only", action="store_true", help="only the edge_on_device records")
    args = ap.parse_args()
    ds = load_data("mnist" if args.data_dir else "builtin", args.data_dir)
    x = ds.x_train.reshape(len(ds.x_train), -1)[:2000]
    y = ds.y_train[:2000].astype(np.int64)
    xt = ds.x_test.reshape(len(ds.x_test), -1)[:1000]
    yt = ds.y_test[:1000].astype(np.int64)
    budget = parse_size(args.budget)
    if args.edge_only:
        records = edge_rows(x, y, xt, yt)
        merge_records("device", records, ("kind", "preset", "budget", "rule", "op", "batch_size", "fault_rate"))
        return
    records: list[dict[str, Any]] = edge_rows(x, y, xt, yt)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_device(args.budget, tmp)
        try:
            for rule, widths in [("device-embed", [128, 128]), ("device-goodness", [64, 64])]:
                records.append(e2e(url, budget, rule, widths, x, y, xt, yt, ds.name))
                print(f"e2e {rule}: {records[-1]['device_test_acc']:.4f}", flush=True)
            for batch in (1, 10, 50):
                records += throughput(url, x, y, batch, 1000 if batch == 1 else 2000)
            records.append(faults(url, args.fault_frames, x, y, args.fault_rate, tmp))
        finally:
            proc.kill()
            proc.wait()
    merge_records("device", records, ("kind", "preset", "budget", "rule", "op", "batch_size", "fault_rate"))
    print(table([r for r in records if r["kind"] == "e2e"],
                ["rule", "widths", "train_samples", "device_test_acc", "inproc_test_acc", "agreement",
                 "device_train_s", "inproc_train_s", "train_time_ratio", "budget_kib", "plan_kib", "load_peak_kib",
                 "train_peak_kib", "eval_peak_kib", "add_class_peak_kib", "max_peak_over_budget", "torch_in_device"]))
    print()
    print(table([r for r in records if r["kind"] == "throughput"],
                ["op", "batch_size", "frames", "seconds", "frames_per_s", "samples_per_s"]))
    print()
    print(table([r for r in records if r["kind"] == "faults"],
                ["fault_rate", "frames", "device_samples", "lost", "double_applied", "crc_ok", "weights_max_abs_diff", "injected",
                 "retransmits", "nacks", "corrupt_replies", "device_duplicates", "device_frame_errors", "seconds"]))


if __name__ == "__main__":
    main()
