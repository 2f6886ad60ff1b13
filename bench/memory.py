"""Memory of a training step, layer-local vs backprop on the same architecture, measured and accounted;
and whole-process memory of a run, numpy edge runtime vs torch.

    python bench/memory.py [--no-depth] [--jobs 2]

Step mode (the default): every row is a fresh 1-thread process (``bench/_step.py``) with glibc returning
freed memory at once. Its ``step_cost`` is the peak RSS over 4 steps after a warm-up step, above the
model and its optimizer state (every gradient dropped first: backprop keeps its gradients between steps,
and they are part of what its step needs); ``step_cost_after_warmup`` is the peak above the RSS before the
steps (what a method keeps between steps left out) and ``peak_rss`` the process's whole peak. Configurations:
symba-mlp at batch 1 and trifecta-cnn at batch 256 (olu, all, greedy; frugal and whole-batch step) beside
backprop, and a depth series (6, 12, 24 conv layers of 32 channels, batch 256) drawn in
results/memory_depth.png (records also in results/memory_depth.json). Records ``{"kind": "step", "model",
"depth", "batch_size", "method", "schedule", "step_cost", "step_cost_accounted", ...}``.

    python bench/memory.py --cli --data-dir ../shared/data [--presets symba-mlp,cfl-mlp] [--process-batches 1,32]

CLI mode (``bench/_cli.py``): the commands users run, each a fresh 1-thread process under ``/usr/bin/time``:
``edgeff-edge train`` (10,000 samples at batch 32, 2,000 at batch 1), ``eval`` (the full test set), ``train
--resume`` (a second pass), ``convert`` (the torch checkpoint to an edge file), and ``edgeff train`` / ``eval``
with the same arguments, each train pair run back to back. Records ``{"kind": "cli", "runtime", "command",
"preset", "batch_size", "peak_rss", "floor", "samples_per_s", "test_acc", ...}``; the floor (a bare ``import
numpy`` / ``import torch`` process + the model's uncompressed state) is measured in the same run.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import RESULTS, merge_records, table

from edgeff.presets import PRESETS

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


STEP_JOBS = [  # (preset, method, batch, train overrides); the preset's defaults otherwise (frugal step, chunks of 64)
    ("symba-mlp", "local", 1, {}), ("symba-mlp", "local", 1, {"frugal": False}), ("symba-mlp", "bp", 1, {}),
    ("trifecta-cnn", "local", 256, {}),  # olu, the preset's schedule: two layers' graphs by design
    ("trifecta-cnn", "local", 256, {"schedule": "all", "frugal": False}),
    ("trifecta-cnn", "local", 256, {"schedule": "all"}), ("trifecta-cnn", "local", 256, {"schedule": "greedy"}),
    ("trifecta-cnn", "bp", 256, {}),
]
DEPTH_BLOCK = {"kind": "conv", "out": 32, "norm": "batch"}  # trifecta-cnn's layer, 32 channels, no pooling
DEPTHS = (6, 12, 24)


def run_step(job: dict[str, Any]) -> dict[str, Any]:
    """One fresh process of ``bench/_step.py``; its record."""
    from edgeff.memory import MEASURE_ENV

    out = subprocess.run([sys.executable, str(Path(__file__).with_name("_step.py")), json.dumps(job)],
                         env={**os.environ, **MEASURE_ENV}, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{job} failed: {out.stderr[-2000:]}")
    line = json.loads(out.stdout.strip().splitlines()[-1])
    p = PRESETS[job["preset"]]
    train = replace(p.train, **job.get("train", {}))
    depth = line["depth"]
    return {"kind": "step", "model": f"conv32x{depth}" if "block" in job else job["preset"], "depth": depth,
            "batch_size": job["batch_size"], "method": job["method"],
            "schedule": "bp" if job["method"] == "bp" else train.schedule, "step": line["step"],
            "frugal": line["step"].startswith("frugal"), "chunk": train.chunk if line["step"].startswith("frugal") else 0,
            "optimizer": train.optimizer, "optim_state_dtype": train.optim_state_dtype,
            "step_cost": line["step_cost"], "step_cost_accounted": line["step_cost_accounted"],
            "measured_over_accounted": round(line["step_cost"] / line["step_cost_accounted"], 4),
            "step_cost_after_warmup": line["step_cost_after_warmup"], "kept_between_steps": line["kept_between_steps"],
            "peak_rss": line["peak_rss"], "rss_model": line["rss_model"], "layers_measured": line["layers"],
            "layers_accounted": line["layers_accounted"], "dynamo_imported": line["dynamo_imported"], "threads": 1}


def step_rows(args: argparse.Namespace) -> None:
    """Step costs of fresh processes: the issue's configurations and the depth series (see ``bench/_step.py``)."""
    jobs = [{"preset": pr, "method": m, "batch_size": b, "train": t} for pr, m, b, t in STEP_JOBS]
    if not args.no_depth:
        jobs += [{"preset": "trifecta-cnn", "method": m, "batch_size": 256, "depth": d, "block": DEPTH_BLOCK,
                  "train": {"schedule": "all"} if m == "local" else {}} for d in DEPTHS for m in ("local", "bp")]
    records = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for rec in pool.map(run_step, jobs):
            print(f"{rec['model']} b={rec['batch_size']} {rec['method']} {rec['schedule']} ({rec['step']}): "
                  f"{rec['step_cost'] / 2**20:.1f} MiB (accounted {rec['step_cost_accounted'] / 2**20:.1f})", flush=True)
            records.append(rec)
    for r in records:
        bp = next(q for q in records if q["model"] == r["model"] and q["method"] == "bp"
                  and q["batch_size"] == r["batch_size"])
        r["step_cost_over_bp"] = round(r["step_cost"] / bp["step_cost"], 4)
        r["peak_rss_over_bp"] = round(r["peak_rss"] / bp["peak_rss"], 4)
    merge_records("memory", records, ("kind", "model", "batch_size", "method", "schedule", "frugal"),
                  drop=None if args.no_depth else lambda r: r.get("kind") in ("step", "memory", "throughput"))
    print(table([dict(r, step_mib=round(r["step_cost"] / 2**20, 1), accounted_mib=round(r["step_cost_accounted"] / 2**20, 1),
                      peak_mib=round(r["peak_rss"] / 2**20, 1)) for r in records],
                ["model", "batch_size", "method", "schedule", "step", "step_mib", "accounted_mib", "measured_over_accounted",
                 "step_cost_over_bp", "peak_mib", "peak_rss_over_bp"]))
    depth = [r for r in records if r["model"].startswith("conv32x")]
    if depth:
        (RESULTS / "memory_depth.json").write_text(json.dumps(depth, indent=1) + "\n")
        depth_figure(depth, RESULTS / "memory_depth.png")


def depth_figure(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label in (("local", "layer-local (frugal step, schedule all)"), ("bp", "backprop")):
        rs = sorted((r for r in records if r["method"] == method), key=lambda r: r["depth"])
        ax.plot([r["depth"] for r in rs], [r["step_cost"] / 2**20 for r in rs], "o-", label=label + ", measured")
        ax.plot([r["depth"] for r in rs], [r["step_cost_accounted"] / 2**20 for r in rs], "x--", alpha=0.6,
                label=label + ", accounted")
    ax.set_xlabel("layers (conv3x3, 32 channels, BN)")
    ax.set_ylabel("step cost, MiB")
    ax.set_xticks(sorted({r["depth"] for r in records}))
    ax.set_title("memory of a training step vs depth, batch 256, Adam float32 state\n(peak RSS above the model "
                 "and its optimizer state, fresh 1-thread processes)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli_rows(args: argparse.Namespace) -> None:
    from _cli import rows

    batches = [int(b) for b in args.process_batches.split(",")]
    samples = {b: args.limit or (2000 if b == 1 else 10000) for b in batches}
    records = rows(args.presets.split(","), batches, args.dataset, str(Path(args.data_dir).resolve()), samples)
    merge_records("memory", records, key=("kind", "runtime", "command", "preset", "dataset", "batch_size"))
    print(table(records, ["preset", "batch_size", "runtime", "command", "peak_rss", "floor", "peak_over_floor",
                          "samples_per_s", "samples_per_s_over_torch", "test_acc"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--process", action="store_true", help="whole-process rows: numpy edge runtime vs torch")
    ap.add_argument("--cli", action="store_true", help="the commands users run (edgeff-edge train/eval/resume/convert, "
                    "edgeff train/eval), each a fresh process under /usr/bin/time, beside the runtime's floor")
    ap.add_argument("--presets", default="symba-mlp,cfl-mlp")
    ap.add_argument("--process-batches", default="1,32")
    ap.add_argument("--runtimes", default="numpy:local,torch:local,torch:bp")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=None, help="training samples per process (default: one epoch)")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time")
    ap.add_argument("--step", action="store_true", help="step-cost rows (the default)")
    ap.add_argument("--no-depth", action="store_true", help="step rows without the depth series (6/12/24 layers)")
    args = ap.parse_args()
    if args.cli:
        cli_rows(args)
        return
    if args.process:
        process_rows(args)
        return
    step_rows(args)


if __name__ == "__main__":
    main()
