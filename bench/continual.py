"""Class-incremental learning: edgeff against backprop baselines, measured in the same run.

    python bench/continual.py --data-dir ../shared/data [--jobs ...] [--workers 2]

Jobs (writes bench/results/continual.json, prints tables):

- ``split:DATA:LEARNER`` — online split-MNIST / split-Fashion-MNIST / split-CIFAR-10 (5 experiences x 2 classes, one pass,
  batches of 10, learners start with no class and grow one per new label). LEARNER is ``edgeff``
  (the ``--preset`` local learner) or ``bp`` (end-to-end backprop on the same architecture, growing
  head), each ``-naive`` (no buffer), ``-ace`` (reservoir buffer of ``--buffer`` samples, ER-ACE's
  asymmetric loss: fresh samples compete only with the fresh classes) or ``-er`` (the same buffer,
  plain experience replay), the buffer filled by each of ``--policies`` (``reservoir``: Vitter's algorithm R;
  ``balanced``: class-balanced reservoir sampling). Reports the accuracy matrix, average accuracy,
  forgetting, backward transfer.
- ``add:DATA:LEARNER`` — train on 9 classes (``--pretrain-epochs``), then stream 2,000 old-class samples
  with k = 5, 20, 50 examples of class 9 at random positions (batch 10, the ``-ace`` buffer); each k
  starts from a copy of the same pretrained model. Reports new-class recall and the old classes'
  accuracy drop.

Each job runs single-threaded; ``--workers`` run side by side, so times are comparable within a run.
"""

from __future__ import annotations

import argparse
import copy
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _common import merge_records, table

from edgeff.continual import ReplayBuffer, add_one_class, pretrain_without, split_scenario
from edgeff.data import load_data

LEARNERS = ["edgeff-naive", "edgeff-ace", "edgeff-er", "bp-naive", "bp-ace", "bp-er"]
JOBS = ([f"split:mnist:{lr}" for lr in LEARNERS] + [f"split:fashion-mnist:{lr}" for lr in LEARNERS]
        + ["add:mnist:edgeff-ace", "add:mnist:bp-ace"])
# natural images (not in the default list: each takes 15-20 CPU minutes per seed):
#   --jobs split:cifar10:edgeff-naive --preset kmeans-conv --seeds 0,1,2     (k-means features + streaming LDA)
#   --jobs split:cifar10:edgeff-naive --preset slda-conv --seeds 0,1,2       (random features + streaming LDA)
#   --jobs split:cifar10:bp-ace --preset kmeans-conv --policies balanced     (backprop ER-ACE on the same network)


def run_job(job: str, data_dir: Path, preset: str, buffer: int, pretrain_epochs: int, seed: int,
            policy: str = "reservoir") -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    kind, dataset, learner = job.split(":")
    family, mode = learner.split("-")
    backprop = family == "bp"
    buf = 0 if mode == "naive" else buffer
    ds = load_data(dataset, data_dir)
    base = {"job": job, "scenario": kind, "dataset": dataset, "learner": learner, "preset": preset,
            "backprop": backprop, "buffer": buf, "asymmetric": mode == "ace", "batch_size": 10, "seed": seed,
            "buffer_policy": policy if buf else "none"}
    t0 = time.perf_counter()
    if kind == "split":
        res = split_scenario(ds, preset=preset, backprop=backprop, buffer=buf, asymmetric=mode == "ace",
                             buffer_policy=policy, batch_size=10, seed=seed)
        return [{**base, "epochs": 1, "seconds": time.perf_counter() - t0, "avg_acc": res.average_accuracy,
                 "forgetting": res.forgetting, "bwt": res.backward_transfer,
                 "final_row": ",".join(f"{v:.4f}" for v in res.matrix[-1]),
                 "diagonal": ",".join(f"{res.matrix[i, i]:.4f}" for i in range(len(res.matrix)))}]
    pre = pretrain_without(ds, 9, preset=preset, backprop=backprop, epochs=pretrain_epochs, seed=seed)
    pre_seconds = time.perf_counter() - t0
    out = []
    for k in (5, 20, 50):
        t1 = time.perf_counter()
        learner_k = copy.deepcopy(pre)
        replay = ReplayBuffer(buf, seed=seed, asymmetric=mode == "ace", policy=policy) if buf else None
        r = add_one_class(learner_k, ds, 9, k, traffic=2000, batch_size=10, replay=replay, seed=seed)
        out.append({**base, "k": k, "epochs": pretrain_epochs, "pretrain_seconds": pre_seconds,
                    "seconds": time.perf_counter() - t1, "new_recall": r.new_recall, "old_before": r.old_before,
                    "old_after": r.old_after, "old_drop_pt": r.old_drop, "stream_samples": r.samples})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, from: {', '.join(JOBS)}")
    ap.add_argument("--preset", default="cfl-mlp-stream", help="edgeff's learner (BP runs on its architecture)")
    ap.add_argument("--buffer", type=int, default=500)
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; every job runs once per seed")
    ap.add_argument("--policies", default="reservoir", help="buffer policies (reservoir, balanced), comma-separated; "
                    "every job with a buffer runs once per policy")
    args = ap.parse_args()
    runs = [(j, seed, pol) for j in args.jobs.split(",") for seed in map(int, args.seeds.split(","))
            for pol in (args.policies.split(",") if not j.endswith("-naive") else ["reservoir"])]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_job, j, args.data_dir, args.preset, args.buffer, args.pretrain_epochs, seed, pol)
                   for j, seed, pol in runs]
        records = [r for f in futures for r in f.result()]
    # side-by-side ratios: each edgeff record against backprop with the same buffer mode in this run
    for r in records:
        if r["backprop"]:
            continue
        twin = next((b for b in records if b["backprop"] and b["scenario"] == r["scenario"]
                     and b["dataset"] == r["dataset"] and b["learner"].split("-")[1] == r["learner"].split("-")[1]
                     and b.get("k") == r.get("k") and b["seed"] == r["seed"]
                     and b["buffer_policy"] == r["buffer_policy"]), None)
        if twin is not None:
            key = "avg_acc" if r["scenario"] == "split" else "new_recall"
            r[f"bp_{key}"] = twin[key]
            r["ratio"] = r[key] / twin[key] if twin[key] else float("nan")
    merge_records("continual", records, ("job", "preset", "buffer", "buffer_policy", "seed", "k"))
    split = [r for r in records if r["scenario"] == "split"]
    add = [r for r in records if r["scenario"] == "add"]
    if split:
        print(table(split, ["dataset", "learner", "buffer", "buffer_policy", "seed", "avg_acc", "forgetting", "bwt", "bp_avg_acc", "ratio",
                            "seconds", "final_row"]))
    if add:
        print(table(add, ["dataset", "learner", "k", "new_recall", "old_before", "old_after", "old_drop_pt",
                          "bp_new_recall", "seconds"]))


if __name__ == "__main__":
    main()
