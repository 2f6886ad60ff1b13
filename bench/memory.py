"""Training memory per step, layer-local vs backprop on the same architecture, accounted and measured;
and streaming throughput at batch size 1.

    python bench/memory.py [--batches 1,32,256]

Models: the 6-layer CNN of the ``trifecta-cnn`` preset and a 4-layer MLP (4x1000, the ``symba-mlp``
recipe made deeper), both with Adam. Measured values come from a fresh subprocess per configuration
(1 thread, /proc VmHWM after a warm-up step, see ``edgeff.memory``) and are the step's peak above the
resident baseline (parameters and optimizer state already allocated); ``*_peak`` adds the accounted
resident bytes. Throughput: real MNIST images (the built-in subset), 1 thread, batch 1, same process.
Writes bench/results/memory.json and prints tables.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import torch
from _common import merge_records, table

from edgeff import BPLearner, LayerSpec, Learner
from edgeff.data import load_data
from edgeff.memory import account, measure
from edgeff.presets import PRESETS


def models() -> dict[str, tuple[Any, Any]]:
    cnn = PRESETS["trifecta-cnn"]
    mlp = PRESETS["symba-mlp"]
    mlp4 = replace(mlp.model, layers=tuple(LayerSpec("linear", 1000, norm="length") for _ in range(4)))
    return {"trifecta-cnn": (cnn.model, replace(cnn.train, device="cpu")),
            "mlp-4x1000": (mlp4, replace(mlp.train, device="cpu"))}


def throughput(model: Any, train: Any, n: int) -> dict[str, float]:
    data = load_data("builtin")
    batches = list(data.train_batches(1, seed=0, limit=n))
    out = {}
    for name, learner in (("local", Learner(model, train)), ("bp", BPLearner(model, train))):
        for x, y in batches[:20]:
            learner.learn_many(x, y)  # warm-up
        t = time.perf_counter()
        for x, y in batches:
            learner.learn_many(x, y)
        out[name] = len(batches) / (time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--stream-samples", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    records: list[dict[str, Any]] = []
    for name, (model, train) in models().items():
        for b in map(int, args.batches.split(",")):
            acc = account(model, train, b)
            m = measure(model, train, b)
            rec = {
                "kind": "memory", "model": name, "batch_size": b, "schedule": train.schedule, "method": m["method"],
                "local_transient_accounted": acc.local_transient, "local_transient_measured": m["local_transient"],
                "bp_transient_accounted": acc.bp_transient, "bp_transient_measured": m["bp_transient"],
                "local_peak_accounted": acc.local_peak, "bp_peak_accounted": acc.bp_peak,
                "local_peak_measured": acc.local_resident + m["local_transient"],
                "bp_peak_measured": acc.bp_resident + m["bp_transient"],
                "physical_limit": acc.physical_limit,
                "ratio_measured": round((acc.local_resident + m["local_transient"])
                                        / (acc.bp_resident + m["bp_transient"]), 4),
                "ratio_accounted": round(acc.local_peak / acc.bp_peak, 4),
                "measured_over_accounted": round(m["local_transient"] / acc.local_transient, 4),
                "local_layers_measured": ",".join(str(v) for v in m["local_layers"]),
            }
            print(f"{name} batch {b}: local/bp measured {rec['ratio_measured']}", flush=True)
            records.append(rec)
        tp = throughput(model, train, args.stream_samples)
        records.append({"kind": "throughput", "model": name, "batch_size": 1, "threads": 1,
                        "samples": args.stream_samples, "local_samples_per_s": round(tp["local"], 1),
                        "bp_samples_per_s": round(tp["bp"], 1), "ratio": round(tp["local"] / tp["bp"], 4)})
    merge_records("memory", records, ("kind", "model", "batch_size"))
    mib = 1024 * 1024
    mem = [dict(r, **{k: round(r[k] / mib, 2) for k in r if k.endswith(("accounted", "measured", "limit"))
                      and isinstance(r[k], int)}) for r in records if r["kind"] == "memory"]
    print("(MiB)")
    print(table(mem, ["model", "batch_size", "local_peak_accounted", "local_peak_measured", "bp_peak_accounted",
                      "bp_peak_measured", "ratio_measured", "measured_over_accounted", "physical_limit"]))
    print(table([r for r in records if r["kind"] == "throughput"],
                ["model", "batch_size", "threads", "local_samples_per_s", "bp_samples_per_s", "ratio"]))


if __name__ == "__main__":
    main()
