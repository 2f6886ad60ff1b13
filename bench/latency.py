"""Export every exportable preset, check onnxruntime parity on the MNIST test set, measure int8 size and
accuracy, and time torch eager vs onnxruntime fp32 vs onnxruntime int8 (1 thread, same run).

    python bench/latency.py --data-dir ../shared/data [--train-samples 10000] [--presets symba-mlp,...]

Each preset is first trained for one pass over ``--train-samples`` real MNIST training images so the
parity and int8 numbers are taken on a model that predicts something. Writes
bench/results/latency.json (records with kind = parity | int8 | latency) and prints tables.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import merge_records, table
from edgeff.exporters.onnx import OnnxPredictor, export_onnx, quantize_onnx

from edgeff import get_preset, make_learner
from edgeff.data import load_data
from edgeff.trainer import train_epochs

PRESETS = ["ff-mlp", "symba-mlp", "trifecta-cnn", "bp-mlp", "bp-cnn"]


def _median_ms(fn: Any, x: Any, calls: int) -> float:
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def run(preset: str, data_dir: Path, train_samples: int, calls: int, tmp: Path) -> list[dict[str, Any]]:
    data = load_data("mnist", data_dir)
    p = get_preset(preset)
    learner = make_learner(p, train=replace(p.train, device="cpu", epochs=1))
    train_epochs(learner, data, epochs=1, batch_size=p.train.batch_size, limit=train_samples)
    meta = {"preset": preset, "dataset": "mnist", "classes": list(data.classes), "mean": list(data.mean),
            "std": list(data.std)}
    fp32 = export_onnx(learner, tmp / f"{preset}.onnx", meta=meta)
    cal = [x.numpy() for x, _ in data.train_batches(64, seed=1, limit=512)]
    paths = {"fp32": fp32}
    for mode in ("static", "dynamic"):
        paths[f"int8-{mode}"] = quantize_onnx(fp32, tmp / f"{preset}.{mode}.onnx", mode=mode, calibration=cal)
    sessions = {k: OnnxPredictor(v, threads=1) for k, v in paths.items()}

    # parity and accuracy over the full test set
    y_all, torch_pred, torch_scores = [], [], []
    preds: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    max_diff = 0.0
    for x, y in data.test_batches(500):
        s = learner.scores(x).numpy()
        torch_scores.append(s)
        torch_pred.append(s.argmax(1))
        y_all.append(y.numpy())
        for k, sess in sessions.items():
            so = sess.scores(x.numpy())
            preds[k].append(so.argmax(1))
            if k == "fp32":
                max_diff = max(max_diff, float(np.abs(so - s).max()))
    y_np, tp = np.concatenate(y_all), np.concatenate(torch_pred)
    acc = {k: float((np.concatenate(v) == y_np).mean()) for k, v in preds.items()}
    torch_acc = float((tp == y_np).mean())
    recs: list[dict[str, Any]] = [{
        "kind": "parity", "preset": preset, "dataset": "mnist", "test_samples": len(y_np),
        "train_samples": train_samples, "torch_acc": torch_acc, "onnx_acc": acc["fp32"],
        "agreement": float((np.concatenate(preds["fp32"]) == tp).mean()), "max_abs_diff": max_diff,
    }]
    size32 = fp32.stat().st_size
    for mode in ("static", "dynamic"):
        k = f"int8-{mode}"
        recs.append({"kind": "int8", "preset": preset, "dataset": "mnist", "mode": mode,
                     "fp32_bytes": size32, "int8_bytes": paths[k].stat().st_size,
                     "size_ratio": round(paths[k].stat().st_size / size32, 4), "fp32_acc": acc["fp32"],
                     "int8_acc": acc[k], "acc_delta_pt": round(100 * (acc[k] - acc["fp32"]), 3)})

    # latency, 1 thread, same process and inputs
    torch.set_num_threads(1)
    x_all = next(data.test_batches(64))[0]
    for batch in (1, 64):
        xt = x_all[:batch].contiguous()
        xn = xt.numpy()
        t_torch = _median_ms(learner.scores, xt, calls)
        rec: dict[str, Any] = {"kind": "latency", "preset": preset, "dataset": "mnist", "batch_size": batch,
                               "calls": calls, "torch_ms": round(t_torch, 4)}
        for k, sess in sessions.items():
            t = _median_ms(sess.scores, xn, calls)
            rec[f"ort_{k.replace('-', '_')}_ms"] = round(t, 4)
            rec[f"ratio_{k.replace('-', '_')}"] = round(t / t_torch, 4)
        recs.append(rec)
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            print(f"{preset} ...", flush=True)
            recs = run(preset, args.data_dir, args.train_samples, args.calls, Path(tmp))
            merge_records("latency", recs, ("kind", "preset", "mode", "batch_size"))
            records += recs
    print(table([r for r in records if r["kind"] == "parity"],
                ["preset", "test_samples", "torch_acc", "onnx_acc", "agreement", "max_abs_diff"]))
    print(table([r for r in records if r["kind"] == "int8"],
                ["preset", "mode", "fp32_bytes", "int8_bytes", "size_ratio", "fp32_acc", "int8_acc", "acc_delta_pt"]))
    print(table([r for r in records if r["kind"] == "latency"],
                ["preset", "batch_size", "torch_ms", "ort_fp32_ms", "ort_int8_static_ms", "ort_int8_dynamic_ms",
                 "ratio_fp32", "ratio_int8_static", "ratio_int8_dynamic"]))


if __name__ == "__main__":
    main()
