"""Training memory per step, layer-local vs backprop on the same architecture, accounted and measured;
and streaming throughput at batch size 1.

    python bench/memory.py [--batches 1,32,256]

Models: the 6-layer CNN of the ``trifecta-cnn`` preset and a 4-layer MLP (4x1000, the ``symba-mlp``
recipe made deeper), both with Adam. Measured values come from a fresh subprocess per configuration
(1 thread, /proc VmHWM after a warm-up step, see ``edgeff.memory``) and are the step's peak above the
resident baseline (parameters and optimizer state already allocated); ``*_peak`` adds the accounted
resident bytes. Throughput: real MNIST images (the built-in subset), 1 thread, batch 1, same process.
Writes bench/results/memory.json and prints tables.

    python bench/memory.py --process --data-dir ../shared/data [--presets symba-mlp,cfl-mlp] [--process-batches 1,32]

Process mode (the edge-runtime issue): every row is a fresh process (``bench/_process.py``, 1 thread) that
trains a preset for one pass over the data set (the same streamed batches in the same order for every
runtime), evaluates on the full test set, and exits; its whole-process peak RSS comes from the kernel
(its VmHWM at exit; wait4's ru_maxrss is recorded too, but it counts the forking parent's pages). Runtimes: the numpy edge runtime (no torch imported), the torch local
learner and torch backprop on the same layers. Records ``{"kind": "process", "runtime", "method",
"preset", "dataset", "batch_size", "peak_rss", "samples_per_s", "test_acc", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
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


RUNTIMES = (("numpy", "local"), ("torch", "local"), ("torch", "bp"))


def run_process(job: dict[str, Any]) -> dict[str, Any]:
    """One fresh process; its line plus the kernel's peak RSS of that process (bytes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_process.py")), json.dumps(job)],
                             stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdout is not None
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{job} failed with exit code {child.returncode}")
    line = json.loads(out.strip().splitlines()[-1])
    # the child's own VmHWM at exit: wait4's ru_maxrss would also count the pages of this (torch-importing)
    # parent that the fork shared before the exec
    return {"kind": "process", "runtime": job["runtime"], "method": job["method"], "preset": job["preset"],
            "dataset": job["dataset"], "batch_size": job["batch_size"], "epochs": job.get("epochs", 1),
            "threads": 1, "peak_rss": line["vm_hwm"], "ru_maxrss_wait4": usage.ru_maxrss * 1024, **line}


def process_rows(args: argparse.Namespace) -> None:
    jobs = []
    for preset in args.presets.split(","):
        for b in map(int, args.process_batches.split(",")):
            for runtime, method in RUNTIMES:
                if f"{runtime}:{method}" in args.runtimes.split(","):
                    jobs.append({"runtime": runtime, "method": method, "preset": preset, "dataset": args.dataset,
                                 "data_dir": args.data_dir, "batch_size": b, "limit": args.limit,
                                 "test_limit": args.test_limit})
    records = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for rec in pool.map(run_process, jobs):
            mib = rec["peak_rss"] / 2**20
            print(f"{rec['preset']} b={rec['batch_size']} {rec['runtime']}/{rec['method']}: peak {mib:.1f} MiB, "
                  f"{rec['samples_per_s']} samples/s, test {rec['test_acc']:.4f}", flush=True)
            records.append(rec)
    for rec in records:  # ratios against the torch backprop process and the torch local learner of the same row
        same = {(r["runtime"], r["method"]): r for r in records
                if (r["preset"], r["batch_size"]) == (rec["preset"], rec["batch_size"])}
        if ("torch", "bp") in same:
            rec["peak_over_bp"] = round(rec["peak_rss"] / same[("torch", "bp")]["peak_rss"], 4)
            rec["bp_test_acc"] = same[("torch", "bp")]["test_acc"]
        if ("torch", "local") in same:
            rec["samples_per_s_over_torch_local"] = round(rec["samples_per_s"] / same[("torch", "local")]["samples_per_s"], 4)
            rec["acc_minus_torch_local"] = round(rec["test_acc"] - same[("torch", "local")]["test_acc"], 4)
    merge_records("memory", records, ("kind", "runtime", "method", "preset", "dataset", "batch_size"))
    rows = [dict(r, peak_mib=round(r["peak_rss"] / 2**20, 1)) for r in records]
    print(table(rows, ["preset", "dataset", "batch_size", "runtime", "method", "samples", "peak_mib", "peak_over_bp",
                       "samples_per_s", "samples_per_s_over_torch_local", "test_acc", "acc_minus_torch_local"]))


STEP_JOBS = [  # (preset, method, batch, train overrides)
    ("symba-mlp", "local", 1, {}), ("symba-mlp", "local", 1, {"frugal": True}), ("symba-mlp", "bp", 1, {}),
    ("trifecta-cnn", "local", 256, {}), ("trifecta-cnn", "local", 256, {"schedule": "all"}),
    ("trifecta-cnn", "local", 256, {"schedule": "all", "frugal": True}),
    ("trifecta-cnn", "local", 256, {"schedule": "greedy", "frugal": True}), ("trifecta-cnn", "bp", 256, {}),
]


def step_rows() -> None:
    """Step cost (bytes) of a fresh process per configuration: the peak RSS over 4 steps after a warm-up
    step, above the RSS before them, glibc returning freed memory at once (``bench/_step.py``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="4096",
               MALLOC_TRIM_THRESHOLD_="0", MALLOC_TOP_PAD_="0")
    records = []
    for preset, method, b, train in STEP_JOBS:
        job = {"preset": preset, "method": method, "batch_size": b, "train": train}
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("_step.py")), json.dumps(job)], env=env,
                             capture_output=True, text=True, check=True).stdout
        line = json.loads(out.strip().splitlines()[-1])
        schedule = "bp" if method == "bp" else train.get("schedule", PRESETS[preset].train.schedule)
        records.append({"kind": "step", "model": preset, "depth": len(PRESETS[preset].model.layers), "batch_size": b,
                        "method": method, "schedule": schedule, "frugal": bool(train.get("frugal", False)),
                        "optimizer": PRESETS[preset].train.optimizer, "step_cost": line["step_cost"]})
        print(f"{preset} b={b} {method} {schedule} frugal={records[-1]['frugal']}: "
              f"{line['step_cost'] / 2**20:.1f} MiB", flush=True)
    for r in records:
        bp = next(q for q in records if q["model"] == r["model"] and q["method"] == "bp")
        r["step_cost_over_bp"] = round(r["step_cost"] / bp["step_cost"], 4)
    merge_records("memory", records, ("kind", "model", "batch_size", "method", "schedule", "frugal"))
    print(table([dict(r, step_mib=round(r["step_cost"] / 2**20, 1)) for r in records],
                ["model", "batch_size", "method", "schedule", "frugal", "step_mib", "step_cost_over_bp"]))


def readme_table() -> str:
    """The README's process table (markdown), regenerated from results/memory.json."""
    from _common import RESULTS

    recs = [r for r in json.loads((RESULTS / "memory.json").read_text()) if r.get("kind") == "process" and r["dataset"] == "mnist"]
    order = {("numpy", "local"): 0, ("torch", "local"): 1, ("torch", "bp"): 2}
    recs.sort(key=lambda r: (r["preset"], r["batch_size"], order[(r["runtime"], r["method"])]))
    name = {("numpy", "local"): "numpy edge, local", ("torch", "local"): "torch, local", ("torch", "bp"): "torch, backprop"}
    lines = ["| preset | batch | samples | runtime | peak RSS MiB | / torch BP | samples/s | / torch local | test acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {r['preset']} | {r['batch_size']} | {r['samples']:,} | {name[(r['runtime'], r['method'])]} | "
                     f"{r['peak_rss'] / 2**20:.1f} | {r.get('peak_over_bp', 0):.3f} | {r['samples_per_s']:.1f} | "
                     f"{r.get('samples_per_s_over_torch_local', 0):.2f} | {100 * r['test_acc']:.2f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--stream-samples", type=int, default=1000)
    ap.add_argument("--process", action="store_true", help="whole-process rows: numpy edge runtime vs torch")
    ap.add_argument("--presets", default="symba-mlp,cfl-mlp")
    ap.add_argument("--process-batches", default="1,32")
    ap.add_argument("--runtimes", default="numpy:local,torch:local,torch:bp")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=None, help="training samples per process (default: one epoch)")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time")
    ap.add_argument("--step", action="store_true", help="step-cost rows (frugal step vs standard vs backprop)")
    ap.add_argument("--readme", action="store_true", help="print the README's process table from memory.json")
    args = ap.parse_args()
    if args.readme:
        print(readme_table())
        return
    if args.process:
        process_rows(args)
        return
    if args.step:
        step_rows()
        return
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
