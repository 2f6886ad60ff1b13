"""``edgeff`` CLI: parses options, builds configs, calls the library, prints. No logic lives here."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

app = typer.Typer(help="edgeff: on-device continual learning without backpropagation.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Dataset(str, Enum):
    builtin = "builtin"
    mnist = "mnist"
    fashion_mnist = "fashion-mnist"
    cifar10 = "cifar10"
    cifar10_exact = "cifar10-exact"


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


class Quant(str, Enum):
    static = "static"
    dynamic = "dynamic"


class Schedule(str, Enum):
    all = "all"
    greedy = "greedy"
    olu = "olu"


def _fail(msg: str) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(2)


CHECKPOINT_SECONDS = 300.0  # train saves its checkpoint this often by default


def _train_pipeline(preset: str, data: Dataset, data_dir: Path | None, epochs: int | None, samples: int | None,
                    batch_size: int | None, seed: int, out_path: Path | None, resume: bool, mode: str,
                    split: str | None, checkpoint_every: int | None, schedule: Schedule | None) -> None:
    """`train --pipeline`: this process is one rank of a torchrun job (edgeff.pipeline)."""
    import os

    from edgeff import pipeline
    from edgeff.errors import EdgeFFError

    if "WORLD_SIZE" not in os.environ:
        _fail("--pipeline runs under torchrun: torchrun --nproc-per-node 2 -m edgeff.cli.app train --pipeline ...")
    try:
        res = pipeline.run(preset, data.value, data_dir, epochs=epochs, batch_size=batch_size, samples=samples,
                           out=out_path, seed=seed, mode=mode, split=split, resume=resume,
                           checkpoint_every=200 if checkpoint_every is None else checkpoint_every,
                           train_overrides={"schedule": schedule.value} if schedule is not None else None)
    except EdgeFFError as e:
        _fail(str(e))
        return
    if res is not None:
        out.print(f"pipeline {preset}: {res.samples} samples in {res.seconds:.1f}s ({res.samples_per_s:.1f} samples/s) "
                  f"over {len(res.split)} ranks, layers {' | '.join(f'{a + 1}-{b}' for a, b in res.split)}; test "
                  f"accuracy {res.test_acc:.2%}", highlight=False)
        out.print(f"checkpoint: {res.merged}", highlight=False)


def _check_train_options(path: Path, lr: float | None, device: str, epochs: int | None, lr_epochs: int | None,
                         checkpoint_every: int | None, chunk: int) -> None:
    """Every option mistake found before any work starts (one line each, exit 2)."""
    import math
    import os

    from edgeff.trainer import resolve_device

    if lr is not None and not (math.isfinite(lr) and lr > 0):
        _fail(f"--lr must be a positive finite number, got {lr}")
    for opt, v in (("--epochs", epochs), ("--lr-epochs", lr_epochs)):
        if v is not None and v < 1:
            _fail(f"{opt} must be at least 1, got {v}")
    if checkpoint_every is not None and checkpoint_every < 0:
        _fail(f"--checkpoint-every must be 0 (only at the end) or a number of samples, got {checkpoint_every}")
    if chunk < 0:
        _fail(f"--chunk must be 0 (the whole batch) or a number of pairs, got {chunk}")
    resolve_device(device)  # InputError: unknown or unavailable device
    if path.is_dir():
        _fail(f"--out {path} is a folder; give a file name such as {path / 'model.pt'}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"cannot create the folder for --out {path}: {e.strerror or e}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        _fail(f"cannot write --out {path}: no write permission; choose another path")


def _layer_summary(metrics: object) -> str:
    from edgeff.trainer import LayerMetrics

    if isinstance(metrics, list) and metrics and isinstance(metrics[0], LayerMetrics):
        return " ".join(f"L{i + 1} {m.loss:.3f}/{m.separation:+.2f}" for i, m in enumerate(metrics))
    return f"loss {float(metrics):.3f}"  # type: ignore[arg-type]


@app.command()
def train(
    preset: Annotated[str, typer.Option(help="named configuration; see `edgeff presets`")] = "symba-mlp",
    data: Annotated[Dataset, typer.Option(help="data set")] = Dataset.builtin,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding MNIST/raw, FashionMNIST/raw or CIFAR10")] = None,
    epochs: Annotated[int | None, typer.Option(help="passes over the training set [default: the preset's]")] = None,
    samples: Annotated[int | None, typer.Option(help="use only this many (shuffled) training samples per pass")] = None,
    batch_size: Annotated[int | None, typer.Option(help="samples per step, 1 for pure streaming [default: the preset's]")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate [default: the preset's]")] = None,
    schedule: Annotated[Schedule | None, typer.Option(help="layer schedule [default: the preset's]")] = None,
    seed: Annotated[int, typer.Option(help="random seed (weights, negatives, data order)")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    backprop: Annotated[bool, typer.Option("--backprop", help="train the end-to-end backprop baseline on the same architecture")] = False,
    out_path: Annotated[Path | None, typer.Option("--out", help="checkpoint to write [default: runs/PRESET.pt]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from --out if it exists")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    optim_state: Annotated[str, typer.Option(help="optimizer state dtype between steps: float32, bfloat16 or float16 (frugal)")] = "float32",
    lazy: Annotated[bool, typer.Option("--lazy", help="read the IDX training files batch by batch, in file order (no data set in RAM)")] = False,
    frugal: Annotated[bool, typer.Option("--frugal/--whole-batch", help="goodness presets, all/greedy: one layer at a time in chunks of --chunk pairs (the whole-batch update, a fraction of its memory)")] = True,
    chunk: Annotated[int, typer.Option(help="frugal step: positive/negative pairs per chunk (0: the whole batch)")] = 64,
    memory_report: Annotated[bool, typer.Option("--memory-report", help="measure per-layer memory on real batches after training")] = False,
    views: Annotated[int | None, typer.Option(help="contrastive/backprop: 1 (one-forward) or 2 augmented views per batch [default: the preset's]")] = None,
    crop_padding: Annotated[int | None, typer.Option(help="random-crop augmentation: border pixels to pad and crop back, 0 = off [default: the preset's]")] = None,
    hflip: Annotated[bool | None, typer.Option("--hflip/--no-hflip", help="random horizontal flips (not for digits) [default: the preset's]")] = None,
    lr_epochs: Annotated[int | None, typer.Option(help="epochs the lr decay is planned over [default: --epochs]; plan longer to resume a run further later")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="also save the checkpoint every N samples [default: about every 5 minutes of training; 0 = only at the end]")] = None,
    pipeline: Annotated[bool, typer.Option("--pipeline", help="a layer pipeline across the ranks of `torchrun --nproc-per-node N -m edgeff.cli.app train ...`")] = False,
    pipeline_mode: Annotated[str, typer.Option(help="pipeline: overlap (rank 0 runs a step ahead) or lockstep")] = "overlap",
    pipeline_split: Annotated[str | None, typer.Option(help="pipeline: layers per rank, e.g. 2,2 [default: balanced by measured cost]")] = None,
) -> None:
    """Train a preset on a data set, streaming batches, then report test accuracy."""
    if pipeline:
        _train_pipeline(preset, data, data_dir, epochs, samples, batch_size, seed, out_path, resume, pipeline_mode,
                        pipeline_split, checkpoint_every, schedule)
        return
    from edgeff import checkpoint, evaluate, get_preset, make_learner
    from edgeff.data import load_data
    from edgeff.errors import EdgeFFError
    from edgeff.trainer import train_epochs

    try:
        p = get_preset(preset)
        name = f"{preset}{'-bp' if backprop and p.algorithm != 'bp' else ''}"
        path = out_path or Path("runs") / f"{name}.pt"
        _check_train_options(path, lr, device, epochs, lr_epochs, checkpoint_every, chunk)
        if samples is not None and samples < 1:
            _fail(f"--samples must be at least 1, got {samples}")
        ds = load_data(data.value, data_dir)
        if optim_state not in ("float32", "bfloat16", "float16"):
            _fail(f"--optim-state must be float32, bfloat16 or float16, got {optim_state!r}")
        tc = replace(p.train, seed=seed, device=device, optim_state_dtype=optim_state, frugal=frugal, chunk=chunk)
        if batch_size is not None:
            tc = replace(tc, batch_size=batch_size)
        if lr is not None:
            tc = replace(tc, lr=lr)
        if schedule is not None:
            tc = replace(tc, schedule=schedule.value)
        if views is not None:
            tc = replace(tc, views=views)
        if crop_padding is not None:
            tc = replace(tc, crop_padding=crop_padding)
        if hflip is not None:
            tc = replace(tc, hflip=hflip)
        n_epochs = epochs if epochs is not None else tc.epochs
        if tc.batch_size < 1:
            _fail(f"--batch-size must be at least 1, got {tc.batch_size}")
        if n_epochs < 1:
            _fail(f"--epochs must be at least 1, got {n_epochs}")
        tc = replace(tc, epochs=lr_epochs or n_epochs)  # the planned run: the lr schedule's horizon
        if resume and path.is_file():
            learner, old_meta = checkpoint.load(path, device=device)
            if old_meta.get("preset") not in (None, preset) or (learner.kind == "bp") != (backprop or p.algorithm == "bp"):
                _fail(f"{path} holds a {old_meta.get('preset')}{' backprop' if learner.kind == 'bp' else ''} model, "
                      f"not {name}; pass --preset {old_meta.get('preset')} or another --out")
            if old_meta.get("dataset") not in (None, ds.name):
                _fail(f"{path} was trained on {old_meta.get('dataset')}, not {ds.name}; pass --data "
                      f"{old_meta.get('dataset')} or another --out")
            if lr_epochs is not None:
                learner.train_cfg = replace(learner.train_cfg, epochs=lr_epochs)
            planned = learner.train_cfg.epochs
            out.print(f"resuming {path} at {learner.samples_seen} samples (lr schedule planned over {planned} "
                      f"epoch{'s' if planned != 1 else ''}{'; later epochs stay at the final lr' if n_epochs > planned and learner.train_cfg.lr_final is not None else ''})",
                      highlight=False)
        else:
            learner = make_learner(p, input_shape=ds.input_shape, num_classes=len(ds.classes), train=tc,
                                   backprop=backprop)
        per_epoch = min(samples, len(ds.y_train)) if samples else len(ds.y_train)
        total = per_epoch * n_epochs
        out.print(f"[bold]{name}[/] on {ds.name}: {per_epoch} samples x {n_epochs} epochs, batch "
                  f"{tc.batch_size}, device {learner.device}", highlight=False)
        t0 = time.perf_counter()
        meta = {"dataset": ds.name, "classes": list(ds.classes), "mean": list(ds.mean), "std": list(ds.std),
                "preset": preset, "samples_per_epoch": per_epoch}
        saved = [learner.samples_seen, t0]  # periodic checkpoints: samples and time of the last one
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[layers]}"), console=out,
                      disable=not progress, transient=False) as bar:
            task = bar.add_task("train", total=total, completed=min(learner.samples_seen, total), layers="")
            last = [0.0]

            def on_step(m: object, n: int) -> None:
                now = time.perf_counter()
                if now - last[0] > 0.25:
                    bar.update(task, advance=n, layers=_layer_summary(m))
                    last[0] = now
                else:
                    bar.update(task, advance=n)
                due = (learner.samples_seen - saved[0] >= checkpoint_every if checkpoint_every
                       else checkpoint_every is None and now - saved[1] >= CHECKPOINT_SECONDS)
                if due:  # a kill now loses at most this much work; --resume continues from it
                    checkpoint.save(learner, path, meta=meta)
                    saved[:] = [learner.samples_seen, time.perf_counter()]

            if lazy:
                from edgeff.data import lazy_train_batches
                from edgeff.trainer import fit

                for _ in range(n_epochs):
                    fit(learner, lazy_train_batches(ds.name, data_dir or Path("."), tc.batch_size, limit=samples),
                        on_step=on_step)
            else:
                train_epochs(learner, ds, epochs=n_epochs, batch_size=tc.batch_size, seed=seed, limit=samples,
                             on_step=on_step)
        seconds = time.perf_counter() - t0
        checkpoint.save(learner, path, meta=meta)
        res = evaluate(learner, ds.test_batches(500), per_layer=True)
    except EdgeFFError as e:
        _fail(str(e))
        return
    if memory_report:
        from edgeff.memory import account, measure_checkpoint

        methods = ("bp",) if learner.kind == "bp" else ("local", "bp")
        measured = measure_checkpoint(str(path), data.value, str(data_dir) if data_dir else None, tc.batch_size,
                                      seed=seed + 1, methods=methods)
        report = account(learner.model_cfg, learner.train_cfg, tc.batch_size)
        _print_memory(report, measured, f"{name}: memory of a step on real {ds.name} batches of {tc.batch_size}")
    layers = "  ".join(f"L{i + 1} {a:.2%}" for i, a in enumerate(res.layer_accuracy))
    out.print(f"trained in {seconds:.1f}s; test accuracy {res.accuracy:.2%} on {res.n} images"
              + (f"  (per layer: {layers})" if layers else ""), highlight=False)
    out.print(f"checkpoint: {path}", highlight=False)


@app.command("eval")
def eval_cmd(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="a file written by `edgeff train`")],
    data: Annotated[Dataset | None, typer.Option(help="data set [default: the one it was trained on]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the full data sets")] = None,
    layers: Annotated[str | None, typer.Option(help="goodness layers: all, all-but-first, last, last:K")] = None,
    limit: Annotated[int | None, typer.Option(help="evaluate on the first N test images")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    backend: Annotated[Backend, typer.Option(help="torch, or onnx: export (or take a .onnx file) and run onnxruntime")] = Backend.torch,
) -> None:
    """Evaluate a checkpoint (or, with --backend onnx, an exported .onnx file) on a test set."""
    if backend == Backend.onnx:
        _eval_onnx(checkpoint_path, data, data_dir, layers, limit, as_json)
        return
    from edgeff import checkpoint, evaluate
    from edgeff.data import load_data
    from edgeff.errors import EdgeFFError
    from edgeff.model import GoodnessPredictor, select_layers
    from edgeff.trainer import Learner

    try:
        learner, meta = checkpoint.load(checkpoint_path, device=device)
        name = data.value if data is not None else str(meta.get("dataset", "builtin"))
        ds = load_data(name, data_dir)
        if tuple(ds.input_shape) != tuple(learner.model_cfg.input_shape):
            _fail(f"{checkpoint_path} expects inputs of shape {learner.model_cfg.input_shape} but {name} has "
                  f"{ds.input_shape}; evaluate it on the data set it was trained on ({meta.get('dataset')})")
        if layers is not None:
            if not isinstance(learner, Learner):
                _fail("--layers applies to layer-local (goodness) models only")
                return
            select_layers(layers, len(learner.net.local_layers))  # validates
            learner.predictor = GoodnessPredictor(layers)
        res = evaluate(learner, ds.test_batches(500, limit=limit), per_layer=True)
    except (EdgeFFError, ValueError) as e:
        _fail(str(e))
        return
    if as_json:
        out.print_json(json.dumps({"accuracy": res.accuracy, "n": res.n, "layer_accuracy": list(res.layer_accuracy)}))
        return
    out.print(f"{checkpoint_path}: test accuracy {res.accuracy:.2%} on {res.n} {name} images", highlight=False)
    for i, a in enumerate(res.layer_accuracy):
        out.print(f"  layer {i + 1} alone: {a:.2%}")


def _eval_onnx(path: Path, data: Dataset | None, data_dir: Path | None, layers: str | None,
               limit: int | None, as_json: bool) -> None:
    import tempfile

    from edgeff.exporters.onnx import OnnxPredictor, evaluate_onnx, export_onnx

    from edgeff import checkpoint
    from edgeff.data import load_data
    from edgeff.errors import EdgeFFError

    try:
        with tempfile.TemporaryDirectory() as tmp:
            if path.suffix == ".onnx":
                onnx_path = path
            else:
                learner, meta = checkpoint.load(path, device="cpu")
                onnx_path = export_onnx(learner, Path(tmp) / "model.onnx", meta=meta, layers=layers)
            pred = OnnxPredictor(onnx_path)
            name = data.value if data is not None else (pred.meta.get("dataset") or "builtin")
            ds = load_data(name, data_dir)
            if tuple(ds.input_shape) != tuple(pred.input_shape):
                _fail(f"{path} expects inputs of shape {pred.input_shape} but {name} has {ds.input_shape}")
            batches = ((x.numpy(), y.numpy()) for x, y in ds.test_batches(500, limit=limit))
            acc = evaluate_onnx(pred, batches)
    except (EdgeFFError, ValueError) as e:
        _fail(str(e))
        return
    n = min(limit or len(ds.y_test), len(ds.y_test))
    if as_json:
        out.print_json(json.dumps({"accuracy": acc, "n": n, "backend": "onnx"}))
    else:
        out.print(f"{path}: test accuracy {acc:.2%} on {n} {name} images (onnxruntime)", highlight=False)


@app.command()
def export(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="a file written by `edgeff train`")],
    out_path: Annotated[Path, typer.Option("--out", help="the .onnx file to write (a folder with --per-layer)")] = Path("model.onnx"),
    per_layer: Annotated[bool, typer.Option("--per-layer", help="one file per local layer plus manifest.json")] = False,
    int8: Annotated[Quant | None, typer.Option("--int8", help="also write an int8 copy: static (QDQ, calibrated) or dynamic")] = None,
    layers: Annotated[str | None, typer.Option(help="goodness layers: all, all-but-first, last, last:K")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the full data sets (parity and calibration images)")] = None,
) -> None:
    """Export a checkpoint to ONNX with its prediction rule; print sizes and parity against torch."""
    from edgeff.exporters.onnx import OnnxPredictor, export_layers, export_onnx, parity, quantize_onnx

    from edgeff import checkpoint
    from edgeff.data import load_data
    from edgeff.errors import EdgeFFError
    from edgeff.trainer import Learner

    try:
        learner, meta = checkpoint.load(checkpoint_path, device="cpu")
        if per_layer:
            if not isinstance(learner, Learner):
                _fail("--per-layer applies to layer-local models only")
                return
            manifest = export_layers(learner, out_path, meta=meta)
            total = sum(p.stat().st_size for p in out_path.iterdir())
            out.print(f"wrote {len(learner.net.local_layers)} layer files and {manifest} ({total / 1024:.1f} KiB)")
            return
        path = export_onnx(learner, out_path, meta=meta, layers=layers)
        ds = load_data(str(meta.get("dataset", "builtin")), data_dir)
        x, _ = next(ds.test_batches(256))
        pr = parity(learner, OnnxPredictor(path), x)
        out.print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB); parity on {int(pr['n'])} real test images: "
                  f"max |score diff| {pr['max_abs_diff']:.2e}, same label {pr['agreement']:.2%}", highlight=False)
        if int8 is not None:
            cal = [xb.numpy() for xb, _ in ds.train_batches(64, seed=0, limit=512)]
            qpath = quantize_onnx(path, path.with_suffix(f".int8-{int8.value}.onnx"), mode=int8.value, calibration=cal)
            qp = OnnxPredictor(qpath)
            agree = float((qp.predict_many(x.numpy()) == learner.predict_many(x).numpy()).mean())
            out.print(f"wrote {qpath} ({qpath.stat().st_size / 1024:.1f} KiB, "
                      f"{qpath.stat().st_size / path.stat().st_size:.2f}x of fp32); same label as torch on "
                      f"{agree:.2%} of {len(x)} images", highlight=False)
    except (EdgeFFError, ValueError) as e:
        _fail(str(e))


def _kib(v: float) -> str:
    return f"{v:,.1f}"


def _print_memory(report: object, measured: dict | None, title: str) -> None:
    from edgeff.memory import MemoryReport, rows

    assert isinstance(report, MemoryReport)
    table = Table(title=title, caption="KiB live while a layer trains, above the model and its optimizer state")
    recs = rows(report, measured)
    cols = list(recs[0])
    for c in cols:
        table.add_column(c.replace("_kib", "").replace("_", " "), justify="right")
    for r in recs:
        table.add_row(*[r[c] if c == "layer" else ("-" if r[c] is None else _kib(r[c])) for c in cols])
    out.print(table)
    out.print(f"step cost (accounted): layer-local {report.local_step / 1024:,.1f} KiB ({report.schedule}, {report.step}), "
              f"backprop {report.bp_step / 1024:,.1f} KiB, ratio {report.local_step / report.bp_step:.2f}; peak with the "
              f"model: {report.local_peak / 1024:,.1f} vs {report.bp_peak / 1024:,.1f} KiB; physical limit (greedy) "
              f"{report.physical_limit / 1024:,.1f} KiB", highlight=False)
    if measured:
        parts = [f"{'layer-local' if k == 'local' else 'backprop'} {m['step_cost'] / 1024:,.1f} KiB"
                 for k, m in measured.items()]
        line = f"step cost (measured, {next(iter(measured.values()))['method']}): " + ", ".join(parts)
        if {"local", "bp"} <= set(measured):
            line += f", ratio {measured['local']['step_cost'] / measured['bp']['step_cost']:.2f}"
        out.print(line, highlight=False)


@app.command()
def memory(
    preset: Annotated[str, typer.Argument(help="named configuration; see `edgeff presets`")] = "trifecta-cnn",
    batch_size: Annotated[int, typer.Option(help="samples per step")] = 32,
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or float64 (accounting only)")] = "float32",
    schedule: Annotated[Schedule | None, typer.Option(help="layer schedule [default: the preset's]")] = None,
    measure: Annotated[bool, typer.Option("--measure", help="also measure in a fresh subprocess (CPU: /proc, 1 thread)")] = False,
    plot: Annotated[Path | None, typer.Option(help="write a grouped bar chart per layer (needs matplotlib)")] = None,
    device: Annotated[str, typer.Option(help="device for --measure: cpu, cuda or auto")] = "cpu",
    optim_state: Annotated[str, typer.Option(help="optimizer state dtype between steps: float32, bfloat16, float16")] = "float32",
    frugal: Annotated[bool, typer.Option("--frugal/--whole-batch", help="goodness presets, all/greedy: the frugal step (chunks of pairs)")] = True,
    chunk: Annotated[int, typer.Option(help="frugal step: pairs per chunk (0: the whole batch)")] = 64,
) -> None:
    """Memory of a training step, per layer and whole: layer-local next to backprop on the same architecture."""
    from edgeff import get_preset
    from edgeff.errors import EdgeFFError
    from edgeff.memory import account
    from edgeff.memory import measure as measure_fn
    from edgeff.memory import plot as plot_fn

    try:
        p = get_preset(preset)
        if batch_size < 1:
            _fail(f"--batch-size must be at least 1, got {batch_size}")
        tc = replace(p.train, device=device, optim_state_dtype=optim_state, frugal=frugal, chunk=chunk)
        if schedule is not None:
            tc = replace(tc, schedule=schedule.value)
        report = account(p.model, tc, batch_size, dtype=dtype)
        measured = measure_fn(p.model, tc, batch_size) if measure else None
        _print_memory(report, measured, f"{preset}, batch {batch_size}, {dtype}")
        if plot is not None:
            plot_fn(report, str(plot), measured, title=f"{preset}: memory of a training step")
            out.print(f"plot: {plot}")
    except (EdgeFFError, ValueError, RuntimeError) as e:
        _fail(str(e))


@app.command()
def presets() -> None:
    """List the named configurations and the papers they come from."""
    from edgeff.presets import PRESETS

    table = Table(show_lines=True)
    for col in ("preset", "kind", "paper", "what it is"):
        table.add_column(col, overflow="fold")
    for p in PRESETS.values():
        table.add_row(p.name, p.algorithm, p.paper, p.notes)
    out.print(table)


@app.command()
def explain(
    checkpoint_path: Annotated[Path, typer.Argument(help="a cfl-conv / cfl-conv512 checkpoint")],
    out_path: Annotated[Path, typer.Option("--out", help="PNG to write (plus one file per layer)")] = Path("attention.png"),
    index: Annotated[int, typer.Option(help="which test image")] = 0,
    label: Annotated[int | None, typer.Option(help="class to explain [default: the prediction]")] = None,
    data: Annotated[Dataset | None, typer.Option(help="data set [default: the checkpoint's]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the full data sets")] = None,
) -> None:
    """Attention maps of a label-embedding conv model: per layer, each location's feature · the class embedding."""
    from edgeff import checkpoint
    from edgeff.contrastive import ContrastiveLearner
    from edgeff.data import load_data
    from edgeff.errors import EdgeFFError
    from edgeff.explain import attention_maps, save_attention

    try:
        learner, meta = checkpoint.load(checkpoint_path, device="cpu")
        if not isinstance(learner, ContrastiveLearner):
            _fail("attention maps need a label-embedding model (cfl-conv, cfl-conv512)")
        ds = load_data((data.value if data else meta.get("dataset", "builtin")), data_dir)
        if not 0 <= index < len(ds.y_test):
            _fail(f"--index must be in 0..{len(ds.y_test) - 1}")
        x = ds.normalise(ds.x_test[index : index + 1])[0]
        maps, cls = attention_maps(learner, x, label)  # type: ignore[arg-type]
        files = save_attention(ds.x_test[index], maps, out_path)
    except EdgeFFError as e:
        _fail(str(e))
    names = ds.classes
    out.print(f"test image {index} (true {names[int(ds.y_test[index])]}), explaining class {names[cls]}: "
              f"{', '.join(str(f) for f in files)}", highlight=False)


# --------------------------------------------------------------------------- continual learning
class Scenario(str, Enum):
    split_ = "split"
    add_one_class = "add-one-class"


@app.command("add-class")
def add_class(
    checkpoint_path: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="a file written by `edgeff train`")],
    name: Annotated[str, typer.Option(help="the new class's name")],
    data_path: Annotated[Path | None, typer.Option("--data", help="examples of the class: a folder of images, or a .npy/.npz array (uint8 pixels or normalised floats)")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="checkpoint to write [default: overwrite CHECKPOINT]")] = None,
) -> None:
    """Add a class to a trained model: a new label embedding (or pattern / head row), initialised from
    the examples' mean feature, usable at once; it keeps learning when training resumes."""
    from edgeff import checkpoint
    from edgeff.data import load_examples
    from edgeff.errors import EdgeFFError

    try:
        learner, meta = checkpoint.load(checkpoint_path, device="cpu")
        names = list(meta.get("classes", []))
        if not learner.model_cfg.class_names and len(names) == learner.model_cfg.num_classes:
            learner.model_cfg = replace(learner.model_cfg, class_names=tuple(names))
        x = None
        if data_path is not None:
            x = load_examples(data_path, learner.model_cfg.input_shape, tuple(meta.get("mean", [0.0])),
                              tuple(meta.get("std", [1.0])))
        before = learner.model_cfg.num_classes
        idx = learner.add_class(name, examples=x)  # type: ignore[union-attr]
        path = checkpoint.save(learner, out_path or checkpoint_path, meta={**meta, "classes": list(learner.class_names)})  # type: ignore[union-attr]
    except EdgeFFError as e:
        _fail(str(e))
        return
    out.print(f"added class {name!r} as index {idx} ({before} -> {before + 1} classes)", highlight=False)
    if x is not None:
        hits = int((learner.predict_many(x) == idx).sum())
        out.print(f"{hits}/{x.shape[0]} of its {x.shape[0]} examples are already predicted as {name!r}", highlight=False)
    out.print(f"checkpoint: {path}", highlight=False)


@app.command()
def continual(
    scenario: Annotated[Scenario, typer.Argument(help="split (5 experiences x 2 classes, online) or add-one-class")],
    data: Annotated[Dataset, typer.Option(help="builtin, mnist or fashion-mnist")] = Dataset.builtin,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding MNIST/raw or FashionMNIST/raw")] = None,
    preset: Annotated[str, typer.Option(help="architecture and local rule")] = "cfl-mlp-stream",
    backprop: Annotated[bool, typer.Option("--backprop", help="the end-to-end backprop baseline (growing head) instead")] = False,
    buffer: Annotated[int, typer.Option(help="reservoir replay buffer capacity (0: none)")] = 0,
    asymmetric: Annotated[bool, typer.Option(help="with a buffer: fresh samples compete only with the fresh classes (ER-ACE)")] = True,
    batch_size: Annotated[int, typer.Option(help="stream samples per step")] = 10,
    k: Annotated[int, typer.Option(help="add-one-class: examples of the new class in the stream")] = 50,
    new_class: Annotated[int, typer.Option(help="add-one-class: which class arrives last")] = 9,
    traffic: Annotated[int, typer.Option(help="add-one-class: old-class samples streamed alongside")] = 2000,
    pretrain_epochs: Annotated[int, typer.Option(help="add-one-class: epochs on the other classes first")] = 1,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    plot: Annotated[Path | None, typer.Option(help="split: write accuracy over the stream to this PNG (needs matplotlib)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Run a class-incremental scenario and print the accuracy matrix, forgetting and backward transfer."""
    import torch

    from edgeff.continual import (
        ReplayBuffer,
        add_one_class,
        plot_stream,
        pretrain_without,
        split_scenario,
    )
    from edgeff.data import load_data
    from edgeff.errors import EdgeFFError

    torch.manual_seed(seed)
    try:
        if data not in (Dataset.builtin, Dataset.mnist, Dataset.fashion_mnist):
            _fail("continual scenarios run on builtin, mnist or fashion-mnist")
        if buffer < 0 or batch_size < 1:
            _fail("--buffer must be >= 0 and --batch-size >= 1")
        ds = load_data(data.value, data_dir)
        who = f"{preset}{' (backprop)' if backprop else ''}"
        if scenario == Scenario.add_one_class:
            with err.status(f"training {who} on every class but {ds.classes[new_class]!r} ({pretrain_epochs} epoch(s))",
                            spinner="dots") if progress and not as_json else contextlib.nullcontext():
                learner = pretrain_without(ds, new_class, preset=preset, backprop=backprop, epochs=pretrain_epochs,
                                           seed=seed)
            replay = ReplayBuffer(buffer, seed=seed, asymmetric=asymmetric) if buffer else None
            r = add_one_class(learner, ds, new_class, k, traffic=traffic, batch_size=batch_size, replay=replay, seed=seed)
            rec = {"scenario": scenario.value, "dataset": ds.name, "preset": preset, "backprop": backprop, "k": k,
                   "new_class": ds.classes[new_class], "new_recall": r.new_recall, "old_before": r.old_before,
                   "old_after": r.old_after, "old_drop_pt": r.old_drop, "buffer": buffer}
            if as_json:
                out.print(json.dumps(rec), highlight=False)
            else:
                out.print(f"{who} on {ds.name}: class {ds.classes[new_class]!r} added from {k} examples in "
                          f"{r.samples} streamed samples: new-class recall {r.new_recall:.2%}, old classes "
                          f"{r.old_before:.2%} -> {r.old_after:.2%} (drop {r.old_drop:.2f} pt)", highlight=False)
            return
        n = len(ds.y_train)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=err, disable=not progress or as_json) as bar:
            task = bar.add_task("stream", total=n)
            res = split_scenario(ds, preset=preset, backprop=backprop, buffer=buffer, asymmetric=asymmetric,
                                 batch_size=batch_size, seed=seed, eval_every=max(1, n // 50) if plot else 0,
                                 on_step=lambda m, b: bar.update(task, advance=b))
        if plot is not None:
            plot_stream(res, plot, names=ds.classes, title=f"{who}, split {ds.name}, buffer {buffer}")
    except (EdgeFFError, RuntimeError) as e:
        _fail(str(e))
        return
    if as_json:
        out.print(json.dumps({"scenario": scenario.value, "dataset": ds.name, "preset": preset, "backprop": backprop,
                              "buffer": buffer, "matrix": res.matrix.tolist(), "average_accuracy": res.average_accuracy,
                              "forgetting": res.forgetting, "backward_transfer": res.backward_transfer}), highlight=False)
        return
    table = Table(title=f"{who}, split {ds.name}, buffer {buffer}: accuracy on each experience (rows: after training on)")
    table.add_column("after")
    heads = ["+".join(ds.classes[c] for c in cls) for cls in res.classes]
    for h in heads:
        table.add_column(h, justify="right")
    for i, row in enumerate(res.matrix):
        table.add_row(f"exp {i + 1}", *[f"{100 * v:.1f}" for v in row])
    out.print(table)
    out.print(f"average accuracy {res.average_accuracy:.2%}, forgetting {100 * res.forgetting:.2f} pt, "
              f"backward transfer {100 * res.backward_transfer:+.2f} pt", highlight=False)
    if plot is not None:
        out.print(f"plot: {plot}", highlight=False)


# --------------------------------------------------------------------------- device
device_app = typer.Typer(help="Talk to a device (a real board, or `edgeff device-sim`) over any serial port URL.",
                         no_args_is_help=True)
app.add_typer(device_app, name="device")

PortOpt = Annotated[str, typer.Option("--port", help="pyserial URL: /dev/ttyUSB0, a pty path, socket://host:port")]


def _bkib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


class Rule(str, Enum):
    goodness = "goodness"
    embed = "embed"


@app.command("device-sim")
def device_sim(
    budget: Annotated[str, typer.Option(help="RAM budget, e.g. 512KiB or 4MiB")] = "4MiB",
    state_dir: Annotated[Path | None, typer.Option(help="where SAVE writes state and a restart restores it")] = None,
    socket_port: Annotated[int | None, typer.Option("--socket", help="serve socket://127.0.0.1:PORT instead of a pty (0 = any)")] = None,
    link: Annotated[Path | None, typer.Option(help="keep a symlink to the pty at this path (stable across restarts)")] = None,
    seed: Annotated[int, typer.Option(help="device RNG seed")] = 0,
) -> None:
    """Run a simulated device (numpy only, no torch) on a new pty or a TCP port; prints the port to use."""
    from edgeff.firmware_sim.device import main as sim_main

    argv = ["--budget", budget, "--seed", str(seed)]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    if socket_port is not None:
        argv += ["--socket", str(socket_port)]
    if link is not None:
        argv += ["--link", str(link)]
    raise typer.Exit(sim_main(argv))


def _client(port: str, fault_rate: float = 0.0, seed: int = 0):  # type: ignore[no-untyped-def]
    from edgeff.firmware_sim.faults import FaultyPort

    from edgeff.host import DeviceClient

    if fault_rate > 0:
        return DeviceClient(port, timeout=0.05, wrap=lambda p: FaultyPort(p, rate=fault_rate, seed=seed))
    return DeviceClient(port)


def _device_data(data: Dataset, data_dir: Path | None):  # type: ignore[no-untyped-def]
    from edgeff.data import load_data

    ds = load_data(data.value, data_dir)
    return ds, ds.x_train.reshape(len(ds.x_train), -1), ds.x_test.reshape(len(ds.x_test), -1)


@device_app.command("info")
def device_info(port: PortOpt) -> None:
    """Capabilities, loaded model, per-layer memory and link counters of a device."""
    from edgeff.errors import EdgeFFError

    try:
        with _client(port) as c:
            info, st = c.info, c.device_stats()
    except EdgeFFError as e:
        _fail(str(e))
    model = info.get("model")
    out.print(f"device {info['device']} protocol {info['protocol']}, RAM budget {_bkib(info['ram_budget'])}, "
              f"boot {info['boot_id']:#x}, samples seen {info['samples_seen']}", highlight=False)
    out.print(f"layer kinds {info['layer_kinds']}, rules {info['rules']}, losses {info['losses']}", highlight=False)
    if model is None:
        out.print("no model loaded (edgeff device load)")
        return
    out.print(f"model: {model['rule']}, widths {model['widths']}, {len(model['classes'])} classes", highlight=False)
    mem = st["memory"]
    table = Table(title="device memory (KiB)")
    for col in ("layer", "params", "optimizer", "train working set (plan)", "last step working set"):
        table.add_column(col, justify="right")
    for lay in mem["layers"]:
        table.add_row(str(lay["layer"] + 1), _bkib(lay["params"]), _bkib(lay["optimizer"]), _bkib(lay["train_working"]),
                      _bkib(lay.get("last_working", 0)))
    out.print(table)
    out.print(f"planned total at batch 1 {_bkib(mem['total'])} of {_bkib(st['ram_budget'])}; measured now "
              f"{_bkib(st['traced_current'])}, peak {_bkib(st['traced_peak'])}; counters {st['counters']}", highlight=False)


@device_app.command("load")
def device_load(
    port: PortOpt,
    checkpoint_path: Annotated[Path | None, typer.Option("--checkpoint", help="a trained symba-mlp/ff-mlp checkpoint to upload")] = None,
    onnx_path: Annotated[Path | None, typer.Option("--onnx", help="an `edgeff export` ONNX file (inference only on the device)")] = None,
    edge_path: Annotated[Path | None, typer.Option("--edge", help="an edge-runtime model (`edgeff-edge train`, .npz): any preset it trains")] = None,
    rule: Annotated[Rule, typer.Option(help="fresh model: goodness (SymBa + ICP) or embed (label embeddings)")] = Rule.embed,
    layers: Annotated[str, typer.Option(help="fresh model: comma-separated layer widths")] = "128,128",
    groups: Annotated[int, typer.Option(help="embed rule: feature groups per layer")] = 4,
    optimizer: Annotated[str, typer.Option(help="adam or sgd (SGD keeps half the optimizer state)")] = "adam",
    lr: Annotated[float, typer.Option(help="learning rate")] = 1e-3,
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
    data: Annotated[Dataset, typer.Option(help="data set the model is for (input size, classes, normalisation)")] = Dataset.builtin,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the full data sets")] = None,
) -> None:
    """Upload a model: a trained checkpoint, or a fresh one to train on the device."""
    from edgeff.firmware_sim.numpy_net import ModelError, init_model

    from edgeff.errors import EdgeFFError

    try:
        ds, _, _ = _device_data(data, data_dir)
        for path, what, hint in ((onnx_path, "ONNX model", "`edgeff export`"),
                                 (edge_path, "edge model", "`edgeff-edge train`")):
            if path is None:
                continue
            if not path.is_file():
                _fail(f"{what} {path} does not exist; write one with {hint}")
            blob = path.read_bytes()
            with _client(port) as c:
                meta = c.load(blob)
                budget = c.info["ram_budget"]
            only = ", inference only" if what == "ONNX model" else ""
            out.print(f"loaded {what} {path.name} ({len(blob)} bytes{only}); needs about {_bkib(meta['memory'])} of "
                      f"the device's {_bkib(budget)}", highlight=False)
            return
        if checkpoint_path is not None:
            from edgeff.exporters.device import to_device_model

            from edgeff import checkpoint

            learner, meta = checkpoint.load(checkpoint_path, device="cpu")
            net = to_device_model(learner, classes=list(ds.classes), mean=float(np.mean(ds.mean)),  # type: ignore[arg-type]
                                  std=float(np.mean(ds.std)))
        else:
            widths = [int(w) for w in layers.split(",") if w.strip()]
            net = init_model(rule.value, widths, input_dim=int(np.prod(ds.input_shape)), classes=list(ds.classes),
                             seed=seed, groups=groups if rule == Rule.embed else 1, optimizer=optimizer, lr=lr,
                             input_mean=float(np.mean(ds.mean)), input_std=float(np.mean(ds.std)))
        blob = net.to_bytes()
        with _client(port) as c, Progress(TextColumn("upload"), BarColumn(), MofNCompleteColumn(), console=out) as bar:
            task = bar.add_task("upload", total=len(blob))
            meta = c.load(blob, progress=lambda done, total: bar.update(task, completed=done))
            budget = c.info["ram_budget"]
    except (EdgeFFError, ModelError, ValueError) as e:
        _fail(str(e))
    out.print(f"loaded {net.rule} model {[net.layer_out(i) for i in range(net.n_layers)]} ({len(blob)} bytes); "
              f"needs {_bkib(meta['memory'])} of the device's {_bkib(budget)}", highlight=False)


@device_app.command("stream")
def device_stream(
    port: PortOpt,
    data: Annotated[Dataset, typer.Option(help="data set to stream")] = Dataset.builtin,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the full data sets")] = None,
    samples: Annotated[int | None, typer.Option(help="stream only the first N (shuffled) training samples")] = None,
    batch_size: Annotated[int, typer.Option(help="samples per TRAIN frame")] = 10,
    save_every: Annotated[int, typer.Option(help="device saves its state every N samples (0 = only at the end)")] = 500,
    seed: Annotated[int, typer.Option(help="data order seed")] = 0,
    fault_rate: Annotated[float, typer.Option(help="inject link faults at this rate (testing)")] = 0.0,
) -> None:
    """Train on the device from a stream of training samples; resumes by itself after a device reset."""
    from edgeff.errors import EdgeFFError

    if batch_size < 1:
        _fail("--batch-size must be at least 1")
    if samples is not None and samples < 1:
        _fail(f"--samples must be at least 1, got {samples}")
    if save_every < 0:
        _fail(f"--save-every must be 0 (only at the end) or a number of samples, got {save_every}")
    try:
        ds, x, _ = _device_data(data, data_dir)
        order = np.random.default_rng([seed, 0]).permutation(len(x))[:samples]
        xs, ys = x[order], ds.y_train[order].astype(np.int64)
        c = _client(port, fault_rate, seed)
        c.open()
        with Progress(TextColumn("stream"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=out) as bar:
            task = bar.add_task("stream", total=len(xs))
            res = c.stream(xs, ys, batch_size=batch_size, save_every=save_every or None,
                           progress=lambda pos: bar.update(task, completed=pos))
        st = c.device_stats()
        c.close()
    except (EdgeFFError, ValueError) as e:
        _fail(str(e))
    ls = res.losses[-1] if res.losses else []
    out.print(f"{res.samples} samples in {res.seconds:.1f} s ({res.samples_per_s:.0f} samples/s), last losses "
              f"{' '.join(f'{v:.3f}' for v in ls)}; link: {c.stats.requests} requests, {c.stats.retransmits} "
              f"retransmits, {res.reconnects} reconnects; device memory peak {_bkib(st['traced_peak'])} of "
              f"{_bkib(st['ram_budget'])}", highlight=False)


@device_app.command("add-class")
def device_add_class(
    port: PortOpt,
    name: Annotated[str, typer.Option(help="the new class's name")],
    data_path: Annotated[Path | None, typer.Option("--data", help="examples: a folder of images or a .npy/.npz array")] = None,
    data: Annotated[Dataset, typer.Option("--data-set", help="data set the device model is for (image size)")] = Dataset.builtin,
) -> None:
    """Add a class on the device (a new label embedding initialised from the examples, or a new pattern).
    Images go as uint8 pixels (the device model normalises them), float arrays as they are."""
    from edgeff.data import load_pixels
    from edgeff.errors import EdgeFFError

    try:
        shape = (3, 32, 32) if data in (Dataset.cifar10, Dataset.cifar10_exact) else (1, 28, 28)
        x = None
        if data_path is not None:
            x = load_pixels(data_path, shape)
            x = x.reshape(len(x), -1)  # (N, C*H*W), the device's input layout
        with _client(port) as c:
            meta = c.add_class(name, x)
    except (EdgeFFError, ValueError) as e:
        _fail(str(e))
        return
    out.print(f"device added class {name!r} as index {meta['index']}; classes now {meta['classes']}", highlight=False)


@device_app.command("eval")
def device_eval(
    port: PortOpt,
    data: Annotated[Dataset, typer.Option(help="data set to evaluate on (its test split)")] = Dataset.builtin,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the full data sets")] = None,
    limit: Annotated[int | None, typer.Option(help="evaluate only the first N test samples")] = None,
    batch_size: Annotated[int, typer.Option(help="samples per INFER frame")] = 50,
) -> None:
    """Accuracy of the device's on-device predictions on a test set."""
    from edgeff.errors import EdgeFFError

    try:
        ds, _, xt = _device_data(data, data_dir)
        xt, yt = xt[:limit], ds.y_test[:limit]
        t0 = time.perf_counter()
        with _client(port) as c:
            acc, _ = c.evaluate(xt, yt, batch_size=batch_size)
        dt = time.perf_counter() - t0
    except (EdgeFFError, ValueError) as e:
        _fail(str(e))
    out.print(f"device accuracy {acc * 100:.2f}% on {len(yt)} {ds.name} test samples ({len(yt) / dt:.0f} samples/s)",
              highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
