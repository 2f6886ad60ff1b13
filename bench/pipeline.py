"""The layer pipeline against one process: samples/s and test accuracy, same data, same epochs.

    python bench/pipeline.py --data-dir ../shared/data [--samples 30000] [--epochs 1]

Rows (each a fresh run, one after another on an otherwise idle machine): one process with one thread, one
process with two threads, and ``torchrun --nproc-per-node 2`` with one thread per rank in ``overlap`` and
``lockstep`` mode (``edgeff train --pipeline``), all training ``symba-mlp4 --schedule all`` (4x1000) on full
MNIST and evaluating on the 10,000 test images. ``speedup`` is samples/s over the one-thread process's;
``acc_delta_pt`` the test-accuracy difference in points. Writes results/pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import merge_records, table

PRESET = "symba-mlp4"


def run(kind: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    common = ["train", "--preset", PRESET, "--schedule", "all", "--data", "mnist", "--data-dir", args.data_dir,
              "--samples", str(args.samples), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--device", "cpu", "--no-progress", "--checkpoint-every", "0"]
    threads = 2 if kind == "process-2threads" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if kind.startswith("process"):
        cmd = [sys.executable, "-m", "edgeff.cli.app", *common, "--out", str(tmp / f"{kind}.pt")]
    else:
        mode = kind.split("-")[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "edgeff.cli.app", *common, "--out", str(tmp / f"{kind}.pt"), "--pipeline", "--pipeline-mode", mode]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    text = " ".join(out.stdout.split())
    acc = float(re.search(r"test accuracy ([\d.]+)%", text).group(1)) / 100  # type: ignore[union-attr]
    if kind.startswith("process"):
        secs = float(re.search(r"trained in ([\d.]+)s", text).group(1))  # type: ignore[union-attr]
        sps = args.samples * args.epochs / secs
    else:
        sps = float(re.search(r"\(([\d.]+) samples/s\)", text).group(1))  # type: ignore[union-attr]
    return {"preset": PRESET, "dataset": "mnist", "samples": args.samples * args.epochs, "epochs": args.epochs,
            "batch_size": args.batch_size, "ranks": 1 if kind.startswith("process") else 2,
            "mode": "single" if kind.startswith("process") else kind.split("-")[1], "threads": threads,
            "samples_per_s": round(sps, 1), "test_acc": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--samples", type=int, default=30_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("process-1thread", "pipeline-overlap", "pipeline-lockstep", "process-2threads"):
            rec = run(kind, args, Path(tmp))
            print(f"{kind}: {rec['samples_per_s']} samples/s, test {rec['test_acc']:.4f}", flush=True)
            records.append(rec)
    base = records[0]
    for r in records:
        r["speedup"] = round(r["samples_per_s"] / base["samples_per_s"], 3)
        r["acc_delta_pt"] = round(100 * (r["test_acc"] - base["test_acc"]), 2)
    merge_records("pipeline", records, ("preset", "ranks", "mode", "threads", "samples", "batch_size"))
    print(table(records, ["preset", "ranks", "mode", "threads", "samples", "samples_per_s", "speedup", "test_acc",
                          "acc_delta_pt"]))


if __name__ == "__main__":
    main()
