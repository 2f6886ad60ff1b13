"""Accuracy of the layer-local presets next to end-to-end backprop on the same architecture.

Each job trains a preset on real data, then the backprop baseline on the same layers, the same data
order, batch size and number of epochs, in the same process, and records both test accuracies and
their ratio. A job has a CPU-time budget (the process's CPU seconds, so a job that shares the machine
with another still gets its budget of computation): training stops after the epoch in which the budget
runs out, and the record says how many epochs were done (the baseline then gets that many). Records
keep wall-clock ``seconds`` and CPU ``cpu_seconds`` for both learners.

    python bench/accuracy.py --data-dir ../shared/data                 # every job
    python bench/accuracy.py --data-dir ../shared/data --jobs symba-mlp:mnist,stream:symba-mlp:mnist

Writes bench/results/accuracy.json (a job's rows replaced by its new one) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, merge_records, table

from edgeff import evaluate, get_preset, make_learner
from edgeff.checkpoint import save
from edgeff.data import load_data
from edgeff.explain import attention_maps, save_attention
from edgeff.presets import (
    TRIFECTA_CIFAR_READOUT,
    TRIFECTA_PAPER_RECIPE,
    _cnn,
    for_data,
    stream_preset,
    stream_train,
    twin_train,
    with_changes,
)
from edgeff.trainer import train_epochs

# job name -> (preset, dataset, mode, budget in CPU seconds for the local learner). A job named PRESET:DATA trains
# the preset's recipe for that data set (edgeff.presets.for_data: what `edgeff train --preset P --data D` trains,
# epochs and batch size included); PRESET:DATA:VARIANT adds VARIANTS' changes (screens and earlier recipes).
# Streaming jobs (batch 1, one pass) train both learners with the preset's stream recipe
# (edgeff.presets.stream_train: lr 1e-4 constant, a window of the 8 samples before each new one; each learner
# the part its family reads: slda-conv has no lr and takes no window, its backprop twin gets both), and
# record samples per second (training samples / wall seconds) of both, measured in the same run.
JOBS: dict[str, tuple[str, str, str, float]] = {
    "ff-mlp:mnist": ("ff-mlp", "mnist", "epochs", 25 * 60),
    "symba-mlp:mnist": ("symba-mlp", "mnist", "epochs", 12 * 60),
    "trifecta-cnn:mnist:paper-recipe": ("trifecta-cnn", "mnist", "epochs", 25 * 60),
    "trifecta-cnn:mnist": ("trifecta-cnn", "mnist", "epochs", 25 * 60),
    "trifecta-cnn:mnist:lda-last3": ("trifecta-cnn", "mnist", "epochs", 25 * 60),
    "trifecta-cnn:fashion-mnist": ("trifecta-cnn", "fashion-mnist", "epochs", 18 * 60),
    "cfl-mlp:mnist": ("cfl-mlp", "mnist", "epochs", 12 * 60),
    "cff-mlp:mnist": ("cff-mlp", "mnist", "epochs", 12 * 60),
    "cfl-mlp:fashion-mnist:two-views-flips": ("cfl-mlp", "fashion-mnist", "epochs", 12 * 60),
    "cff-mlp:fashion-mnist:two-views-flips": ("cff-mlp", "fashion-mnist", "epochs", 12 * 60),
    "cfl-conv512:mnist": ("cfl-conv512", "mnist", "epochs", 30 * 60),
    "cfl-conv:mnist": ("cfl-conv", "mnist", "epochs", 30 * 60),
    "cfl-conv512:fashion-mnist": ("cfl-conv512", "fashion-mnist", "epochs", 30 * 60),
    "cfl-conv512:cifar10": ("cfl-conv512", "cifar10", "epochs", 30 * 60),
    "cfl-conv512:cifar10:hflip": ("cfl-conv512", "cifar10", "epochs", 30 * 60),
    "cfl-conv512:cifar10:10-epochs": ("cfl-conv512", "cifar10", "epochs", 30 * 60),
    "cff-vit:cifar10": ("cff-vit", "cifar10", "epochs", 30 * 60),
    "cff-vit:cifar10:40-epochs": ("cff-vit", "cifar10", "epochs", 40 * 60),
    "cff-vit:cifar10:head-predictor": ("cff-vit", "cifar10", "epochs", 30 * 60),
    "cff-vit:mnist": ("cff-vit", "mnist", "epochs", 30 * 60),
    "cff-vit:fashion-mnist": ("cff-vit", "fashion-mnist", "epochs", 30 * 60),
    "ffcl-mirror:mnist": ("ffcl-mirror", "mnist", "epochs", 12 * 60),
    "ffcl-mirror-paper:mnist": ("ffcl-mirror-paper", "mnist", "epochs", 12 * 60),
    "stream:symba-mlp:mnist": ("symba-mlp", "mnist", "stream", 30 * 60),
    "stream:trifecta-cnn:mnist": ("trifecta-cnn", "mnist", "stream", 30 * 60),
    "stream:cfl-mlp:mnist": ("cfl-mlp", "mnist", "stream", 30 * 60),
    "stream:ff-mlp:mnist": ("ff-mlp", "mnist", "stream", 30 * 60),
    "stream:slda-conv:mnist": ("slda-conv", "mnist", "stream", 30 * 60),
    "stream:slda-conv:fashion-mnist": ("slda-conv", "fashion-mnist", "stream", 30 * 60),
    "slda-conv:mnist": ("slda-conv", "mnist", "epochs", 30 * 60),
    "ff-mlp:fashion-mnist": ("ff-mlp", "fashion-mnist", "epochs", 12 * 60),
    "symba-mlp:fashion-mnist": ("symba-mlp", "fashion-mnist", "epochs", 12 * 60),
    "ffcl-mirror:fashion-mnist": ("ffcl-mirror", "fashion-mnist", "epochs", 12 * 60),
    "cff-mlp:mnist:one-forward": ("cff-mlp", "mnist", "epochs", 12 * 60),
    "cfl-mlp:fashion-mnist": ("cfl-mlp", "fashion-mnist", "epochs", 12 * 60),
    "cff-mlp:fashion-mnist": ("cff-mlp", "fashion-mnist", "epochs", 12 * 60),
    "cfl-conv:fashion-mnist": ("cfl-conv", "fashion-mnist", "epochs", 30 * 60),
    "cfl-mlp3072:fashion-mnist": ("cfl-mlp3072", "fashion-mnist", "epochs", 15 * 60),
    "ff-mlp:cifar10": ("ff-mlp", "cifar10", "epochs", 12 * 60),
    "symba-mlp:cifar10": ("symba-mlp", "cifar10", "epochs", 12 * 60),
    "cfl-mlp:cifar10": ("cfl-mlp", "cifar10", "epochs", 12 * 60),
    "cff-mlp:cifar10": ("cff-mlp", "cifar10", "epochs", 12 * 60),
    "ffcl-mirror:cifar10": ("ffcl-mirror", "cifar10", "epochs", 12 * 60),
    "ffcl-mirror-paper:cifar10": ("ffcl-mirror-paper", "cifar10", "epochs", 12 * 60),
    "trifecta-cnn:cifar10": ("trifecta-cnn", "cifar10", "epochs", 25 * 60),
    "trifecta-cnn:cifar10:mnist-recipe": ("trifecta-cnn", "cifar10", "epochs", 25 * 60),
    "trifecta-cnn:cifar10:goodness-predictor": ("trifecta-cnn", "cifar10", "epochs", 25 * 60),
    "trifecta-cnn:cifar10:wide": ("trifecta-cnn", "cifar10", "epochs", 60 * 60),
    "trifecta-cnn:cifar10:crop-flip": ("trifecta-cnn", "cifar10", "epochs", 40 * 60),
    "trifecta-cnn:cifar10:flip": ("trifecta-cnn", "cifar10", "epochs", 40 * 60),
    "cfl-conv:cifar10": ("cfl-conv", "cifar10", "epochs", 30 * 60),
    "cfl-mlp3072:cifar10": ("cfl-mlp3072", "cifar10", "epochs", 15 * 60),
    "kmeans-conv3200:cifar10": ("kmeans-conv3200", "cifar10", "epochs", 60 * 60),
}
# jobs whose backprop twin trains for the local learner's CPU seconds (as many epochs as fit, at least one) instead
# of its number of epochs: a one-pass closed-form learner against backprop at equal budget, not at one epoch
EQUAL_CPU = {"kmeans-conv3200:cifar10": 40}  # job -> the twin's epoch cap
# test batches smaller than 1000 where the twin's activations are large (3,200 maps of 27x27: 9.3 GB per 1,000 images)
TEST_BATCH = {"kmeans-conv3200:cifar10": 100}
# a variant job's changes to its preset's recipe (TrainConfig and ModelConfig fields by name)
VARIANTS: dict[str, dict[str, Any]] = {
    # trifecta-cnn on MNIST as the paper trains it (its row was measured before peer normalisation and lr 1e-2)
    "trifecta-cnn:mnist:paper-recipe": TRIFECTA_PAPER_RECIPE,
    "trifecta-cnn:mnist:lda-last3": {"eval_layers": "last:3", "readout_size": 0},
    # the MNIST default (lr 1e-2, peer normalisation, an lda readout on the last four layers) on CIFAR-10
    "trifecta-cnn:cifar10:mnist-recipe": {"lr": 1e-2, "peer_norm": 0.06, "relu_grad": "pass", "predictor": "lda",
                                          "eval_layers": "last:4", "readout_size": 7, "shrinkage": 3e-3},
    # the paper's predictor (the last layer's goodness) instead of the recipe's lda readout on layers 2-6
    "trifecta-cnn:cifar10:goodness-predictor": {k: TRIFECTA_PAPER_RECIPE[k] for k in TRIFECTA_CIFAR_READOUT},
    # twice the channels (32-32-64-64-128-128, about 4x the conv work) for 20 epochs instead of 50
    "trifecta-cnn:cifar10:wide": {"layers": _cnn((32, 32, 64, 64, 128, 128)), "epochs": 20},
    # augmentation on both sides: random crops (4 replicated border pixels) and flips, or flips alone; the local
    # learner's lda readout also counts each sample mirrored
    "trifecta-cnn:cifar10:crop-flip": {"crop_padding": 4, "hflip": True},
    "trifecta-cnn:cifar10:flip": {"hflip": True},
    "cfl-mlp:fashion-mnist:two-views-flips": {"views": 2, "crop_padding": 2, "hflip": True},
    "cff-mlp:fashion-mnist:two-views-flips": {"views": 2, "crop_padding": 1, "hflip": True},
    "cff-mlp:mnist:one-forward": {"views": 1, "crop_padding": 0, "hflip": False},
    "cfl-conv512:cifar10:hflip": {"hflip": True},  # random flips on both sides, one view (no extra forward)
    "cfl-conv512:cifar10:10-epochs": {"epochs": 10},
    # the head on the last layer's mean token (the recipe before its lda readout; the 40-epoch variant reads it too)
    "cff-vit:cifar10:head-predictor": {"predictor": "head", "eval_layers": "all-but-first", "readout_size": 0,
                                       "shrinkage": 0.01},
    "cff-vit:cifar10:40-epochs": {"epochs": 40, "predictor": "head", "eval_layers": "all-but-first", "readout_size": 0,
                                  "shrinkage": 0.01},  # twice the recipe's epochs (10 epochs: 0.857x, 20: 0.931x)  # the recipe before 20 epochs (0.945x; 20 epochs: 0.967x)
}


def _layer_name(spec: Any) -> str:
    """A variant's layers in its record: kind and width (``conv32``)."""
    return f"{spec.kind}{spec.out}"


# Fashion-MNIST super-classes for CFL zero-shot (a new class = the mean of its members' embeddings)
SUPER_CLASSES = {
    "fashion-mnist": {"tops": [0, 2, 4, 6], "footwear": [5, 7, 9], "trouser+dress": [1, 3], "bag": [8]},
    "mnist": {"round": [0, 6, 8, 9], "straight": [1, 4, 7], "curved": [2, 3, 5]},
    "cifar10": {"vehicles": [0, 1, 8, 9], "animals": [2, 3, 4, 5, 6, 7]},
}


def zero_shot(local: Any, bp: Any, data: Any) -> dict[str, Any]:
    """CFL zero-shot super-class accuracy, next to both trained classifiers' fine predictions mapped to
    the same super-classes (the paper's comparison), on the whole test set."""
    groups = list(SUPER_CLASSES[data.name].values())
    to_group = torch.tensor([next(g for g, members in enumerate(groups) if c in members)
                             for c in range(len(data.classes))])
    hits = {"zs": 0, "mapped": 0, "bp_mapped": 0}
    n = 0
    for x, y in data.test_batches(1000):
        g = to_group[y]
        hits["zs"] += int((local.zero_shot_scores(x, groups).argmax(1).cpu() == g).sum())
        hits["mapped"] += int((to_group[local.predict_many(x)] == g).sum())
        hits["bp_mapped"] += int((to_group[bp.predict_many(x)] == g).sum())
        n += len(y)
    out = {"zero_shot_groups": ";".join(f"{k}={'+'.join(map(str, v))}" for k, v in SUPER_CLASSES[data.name].items()),
           "zero_shot_acc": hits["zs"] / n, "mapped_acc": hits["mapped"] / n, "bp_mapped_acc": hits["bp_mapped"] / n}
    print(f"  zero-shot super-classes {out['zero_shot_acc']:.4f} (CFL fine->super {out['mapped_acc']:.4f}, "
          f"BP fine->super {out['bp_mapped_acc']:.4f})", flush=True)
    return out


def run_job(name: str, data_dir: Path, threads: int, budget_scale: float, keep: Path | None = None) -> dict[str, Any]:
    preset_name, dataset, mode, budget = JOBS[name]
    budget *= budget_scale
    p = with_changes(for_data(get_preset(preset_name), dataset), VARIANTS.get(name, {}))
    data = load_data(dataset, data_dir)
    epochs, batch = (1, 1) if mode == "stream" else (p.train.epochs, p.train.batch_size)
    tc = replace(p.train, device="cpu", batch_size=batch, epochs=epochs, seed=0)
    bp_tc = twin_train(p, tc)  # the twin's own recipe where the preset has one (trifecta-cnn: lr 1e-3)
    if mode == "stream":  # the recipe a user streaming at batch 1 gets, each learner the part its family reads
        p, tc, bp_tc = stream_preset(p, 1), stream_train(p, tc), stream_train(p, tc, backprop=True)

    def train(backprop: bool, n_epochs: int, time_budget: float | None) -> tuple[Any, int, float, float]:
        learner = make_learner(p, input_shape=data.input_shape, num_classes=len(data.classes),
                               train=bp_tc if backprop else tc, backprop=backprop)
        t0, c0 = time.perf_counter(), time.process_time()
        done = 0
        for ep in range(n_epochs):
            train_epochs(learner, data, epochs=ep + 1, batch_size=batch, seed=0)
            done = ep + 1
            el, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"  {'bp   ' if backprop else 'local'} epoch {done}: {el:.0f}s ({cpu:.0f} CPU s)", flush=True)
            if time_budget is not None and cpu > time_budget and done < n_epochs:
                break
        return learner, done, time.perf_counter() - t0, time.process_time() - c0

    print(f"{name}: {preset_name} on {dataset} ({mode}), up to {epochs} epochs, batch {batch}, "
          f"views {tc.views}, crop {tc.crop_padding}, flip {tc.hflip}", flush=True)
    local, done, seconds, cpu_seconds = train(False, epochs, budget)
    if local.kind == "analytic":  # its closed-form solve belongs to its training budget
        t1, c1 = time.perf_counter(), time.process_time()
        local.readout()
        seconds, cpu_seconds = seconds + time.perf_counter() - t1, cpu_seconds + time.process_time() - c1
    test_batch = TEST_BATCH.get(name, 1000)
    res = evaluate(local, data.test_batches(test_batch), per_layer=True)
    extra: dict[str, Any] = {}
    if keep is not None:  # the trained local model (its readout as trained), for analyses after the run
        save(local, keep / f"{name.replace(':', '_')}.pt", meta={"job": name, "dataset": dataset})
    print(f"  local test accuracy {res.accuracy:.4f}", flush=True)
    if mode == "stream" and (tc.readout_memory > 0 or tc.readout_window > 0):
        # a readout that followed the stream read each sample's features as they were then, one solved from a
        # window the last samples' only; the same readout solved afterwards on the final layers' features of
        # every sample takes a second look at each (not a stream): the reference
        lc = time.process_time()
        local.solve_readout(data.train_batches(1000, seed=0))
        extra["readout_final_acc"] = evaluate(local, data.test_batches(1000)).accuracy
        extra["readout_final_cpu_seconds"] = round(time.process_time() - lc, 1)
        print(f"  the readout solved on the final features instead: {extra['readout_final_acc']:.4f}", flush=True)
    if name in EQUAL_CPU:
        bp, bp_done, bp_seconds, bp_cpu_seconds = train(True, EQUAL_CPU[name], cpu_seconds)
        extra["bp_epochs"] = bp_done
    else:
        bp, _, bp_seconds, bp_cpu_seconds = train(True, done, None)
    bp_acc = evaluate(bp, data.test_batches(test_batch)).accuracy
    print(f"  bp test accuracy {bp_acc:.4f}", flush=True)
    if local.supports("zero_shot") and dataset in SUPER_CLASSES:
        extra.update(zero_shot(local, bp, data))
        if all(len(s) == 3 for s in local.net.shapes):
            x = data.normalise(data.x_test[:1])[0]
            maps, _ = attention_maps(local, x)
            # named by the job: a variant (PRESET:DATA:VARIANT) keeps its own maps beside its main job's
            files = save_attention(data.x_test[0], maps, RESULTS / f"attention_{name.replace(':', '_')}.png")
            extra["attention_png"] = ",".join(str(f.relative_to(RESULTS.parent)) for f in files)
    return {**extra,
        "job": name, "preset": preset_name, "dataset": dataset, "mode": mode, "batch_size": batch,
        "epochs_planned": epochs, "variant": json.dumps(VARIANTS.get(name, {}), sort_keys=True, default=_layer_name),
        "epochs": done, "train_samples": len(data.y_train) * done, "test_samples": res.n,
        "seconds": round(seconds, 1), "bp_seconds": round(bp_seconds, 1), "budget_s": budget,
        "cpu_seconds": round(cpu_seconds, 1), "bp_cpu_seconds": round(bp_cpu_seconds, 1), "budget": "cpu",
        "views": tc.views, "crop_padding": tc.crop_padding, "hflip": tc.hflip,
        "test_acc": res.accuracy, "bp_test_acc": bp_acc, "ratio": round(res.accuracy / bp_acc, 4),
        "layer_acc": ",".join(f"{a:.4f}" for a in res.layer_accuracy), "threads": threads,
        "schedule": tc.schedule, "lr": tc.lr, "lr_final": tc.lr_final, "lr_hold": tc.lr_hold, "window": tc.window,
        "bp_lr": bp_tc.lr, "bp_window": bp_tc.window, "predictor": tc.predictor, "eval_layers": tc.eval_layers, "readout_memory": tc.readout_memory,
        "readout_window": tc.readout_window, "readout_size": tc.readout_size, "shrinkage": p.model.shrinkage if tc.predictor == "lda" else None,
        "stream_model": ",".join(f"{k}={v}" for k, v in p.stream_model.items()) if mode == "stream" else "",
        "samples_per_s": round(len(data.y_train) * done / seconds, 1),
        "bp_samples_per_s": round(len(data.y_train) * extra.get("bp_epochs", done) / bp_seconds, 1),
        "layer": ",".join(f"{s.kind}{s.out}" for s in p.model.layers),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, from: {', '.join(JOBS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every job's time budget")
    ap.add_argument("--keep", type=Path, default=None, help="save each job's trained local model in this folder")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    cols = ["preset", "dataset", "mode", "views", "batch_size", "window", "epochs", "cpu_seconds", "test_acc", "bp_cpu_seconds", "bp_test_acc", "samples_per_s", "bp_samples_per_s",
            "ratio"]
    records = []
    for name in args.jobs.split(","):
        if name not in JOBS:
            raise SystemExit(f"unknown job {name!r}; choose from {', '.join(JOBS)}")
        rec = run_job(name, args.data_dir, args.threads, args.budget_scale, args.keep)
        records.append(rec)
        merge_records("accuracy", [rec], ("job",))  # a rerun of a job replaces its rows
    print(table(records, cols))


if __name__ == "__main__":
    main()
