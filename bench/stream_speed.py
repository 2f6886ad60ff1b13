"""Batch-1 streaming speed, layer-local against backprop, interleaved in one process.

A busy machine changes speed from minute to minute, so the two learners are timed in turns: rounds of
``--round`` steps of the local learner, then as many of its backprop twin (the same layers and the same
stream recipe: ``edgeff.presets.stream_train``), on the same MNIST samples in the same order, until each
has learned ``--samples`` samples. Each learner's samples per second is its samples over its own summed
step time; the ratio is local / backprop. One thread.

    python bench/stream_speed.py --data-dir ../shared/data                      # cfl-mlp, symba-mlp, ff-mlp
    python bench/stream_speed.py --data-dir ../shared/data --presets cfl-mlp --window 0

Writes bench/results/stream_speed.json (records merged by preset, dataset, window, bp_window) and prints a table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _common import merge_records, table

from edgeff import get_preset, make_learner
from edgeff.contract import family_of, train_read
from edgeff.data import load_data
from edgeff.loop import planned_batches
from edgeff.presets import stream_preset, stream_train


def measure(preset: str, data: Any, samples: int, rnd: int, window: int | None) -> dict[str, Any]:
    p = stream_preset(get_preset(preset), 1)
    base = replace(p.train, batch_size=1, epochs=1, device="cpu", seed=0)
    configs = [stream_train(p, base, backprop=bp) for bp in (False, True)]  # each family's part of the recipe
    if window is not None:  # for the families that take a window
        configs = [replace(c, window=window) if "window" in train_read(family_of(p.model, backprop=bp), p.model, c)
                   else c for c, bp in zip(configs, (False, True), strict=True)]
    tc = configs[0]
    learners = [make_learner(p, input_shape=data.input_shape, num_classes=len(data.classes), train=c, backprop=bp)
                for c, bp in zip(configs, (False, True), strict=True)]
    streams = [[(x, y) for x, y, _, _ in planned_batches(c, 0, data, epochs=1, batch_size=1, limit=samples + 20)]
               for c in configs]
    for learner, batches in zip(learners, streams, strict=True):  # warm-up: optimizer state, lazy allocations
        for x, y in batches[:20]:
            learner.learn_many(x, y)
    spent = [0.0, 0.0]
    for start in range(20, 20 + samples, rnd):
        for i, learner in enumerate(learners):
            t0 = time.perf_counter()
            for x, y in streams[i][start:start + rnd]:
                learner.learn_many(x, y)
            spent[i] += time.perf_counter() - t0
    local, bp = samples / spent[0], samples / spent[1]
    print(f"{preset}: window {tc.window}, local {local:.1f} samples/s, backprop {bp:.1f} samples/s, "
          f"ratio {local / bp:.3f}", flush=True)
    return {"preset": preset, "dataset": data.name, "batch_size": 1, "window": tc.window, "lr": tc.lr,
            "bp_window": configs[1].window, "bp_lr": configs[1].lr,
            "optimizer": tc.optimizer, "samples": samples, "round": rnd, "threads": torch.get_num_threads(),
            "samples_per_s": round(local, 1), "bp_samples_per_s": round(bp, 1), "ratio": round(local / bp, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--presets", default="cfl-mlp,symba-mlp,ff-mlp")
    ap.add_argument("--samples", type=int, default=3000, help="samples each learner learns (timed)")
    ap.add_argument("--round", type=int, default=100, help="steps per turn")
    ap.add_argument("--window", type=int, default=None, help="override the stream recipe's window")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data("mnist", args.data_dir)
    records = [measure(name, data, args.samples, args.round, args.window) for name in args.presets.split(",")]
    merge_records("stream_speed", records, ("preset", "dataset", "window", "bp_window"))
    print(table(records, ["preset", "window", "samples", "samples_per_s", "bp_samples_per_s", "ratio"]))


if __name__ == "__main__":
    main()
