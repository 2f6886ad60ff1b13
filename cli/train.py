"""``edgeff train``, ``eval`` and ``export``: option parsing and printing around ``edgeff.run``,
``edgeff.evaluation`` and ``edgeff.exporters``."""

from __future__ import annotations

import json
import os
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from edgeff.cli.common import (
    LEGENDS,
    CheckpointArg,
    DataDirOpt,
    JsonOpt,
    LayersOpt,
    MaxPixelsOpt,
    declared,
    err,
    fail,
    guarded,
    metrics_text,
    out,
    progress_bar,
)

from edgeff.images import DEFAULT_MAX_PIXELS, set_max_pixels
from edgeff.options import check_choices, options


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


class Quant(str, Enum):
    static = "static"
    dynamic = "dynamic"


def _pipeline(o: Any, mode: str, split: str | None) -> None:
    """`train --pipeline`: this process is one rank of a torchrun job (edgeff.pipeline)."""
    from edgeff import pipeline

    if "WORLD_SIZE" not in os.environ:
        fail("--pipeline runs under torchrun: torchrun --nproc-per-node 2 -m edgeff.cli.app train --pipeline ...")
    res = pipeline.run(o.preset, o.data, o.data_dir, epochs=o.epochs, batch_size=o.batch_size, samples=o.samples,
                       out=o.out, seed=o.seed or 0, mode=mode, split=split, resume=o.resume,
                       checkpoint_every=200 if o.checkpoint_every is None else o.checkpoint_every,
                       train_overrides={k: v for k, v in (("schedule", o.schedule), ("window", o.window))
                                        if v is not None} or None)  # --window: refused by the pipeline
    if res is not None:
        ranks = " | ".join(f"{a + 1}-{b}" for a, b in res.split)
        out.print(f"pipeline {o.preset}: {res.samples} samples in {res.seconds:.1f}s ({res.samples_per_s:.1f} "
                  f"samples/s) over {len(res.split)} ranks, layers {ranks}; test accuracy {res.test_acc:.2%}",
                  highlight=False)
        out.print(f"checkpoint: {res.merged}", highlight=False)


def _memory_report(run: Any) -> None:
    from edgeff.cli.info import print_memory

    from edgeff.errors import UnsupportedError
    from edgeff.memory import account, measure_checkpoint

    o, learner, b = run.options, run.learner, run.learner.train_cfg.batch_size
    methods = ("bp",) if learner.kind == "bp" else ("local", "bp")
    measured = measure_checkpoint(str(run.path), o.data, str(o.data_dir) if o.data_dir else None, b, seed=run.seed + 1,
                                  methods=methods)
    try:
        report = account(learner.model_cfg, learner.train_cfg, b)
    except UnsupportedError as e:  # a closed-form family: the measured step only
        k = 1024
        parts = [f"{'local' if key == 'local' else 'backprop'} step {m['step_cost'] / k:,.1f} KiB, peak RSS "
                 f"{m['peak_rss'] / k / k:,.1f} MiB" for key, m in measured.items()]
        out.print(f"{run.name}: measured on real {run.data.name} batches of {b} ({next(iter(measured.values()))['method']}): "
                  f"{'; '.join(parts)}\n({e})", highlight=False)
        return
    print_memory(report, measured, f"{run.name}: memory of a step on real {run.data.name} batches of {b}")


@guarded()
@declared(options("torch"))
def train(**o: Any) -> None:
    """Train a preset on a data set, streaming batches, then report test accuracy."""
    from edgeff.run import Run, RunOptions

    check_choices(o, "torch")
    set_max_pixels(o.pop("max_pixels"))
    progress, memory_report = o.pop("progress"), o.pop("memory_report")
    pipeline, pipeline_mode, pipeline_split = o.pop("pipeline"), o.pop("pipeline_mode"), o.pop("pipeline_split")
    out_path = o.pop("out_path")
    opts = RunOptions(**o, out=out_path)
    if pipeline:
        return _pipeline(opts, pipeline_mode, pipeline_split)
    run = Run(opts)
    if run.resumed:
        out.print(run.resume_note(), highlight=False)
    learner = run.learner
    out.print(f"[bold]{run.name}[/] on {run.data.name}: {run.per_epoch} samples x {run.epochs} "
              f"epoch{'s' if run.epochs != 1 else ''}, batch {learner.train_cfg.batch_size}, device {learner.device}",
              highlight=False)
    note = run.stream_note()
    if note:
        out.print(note, highlight=False, style="dim")
    if progress:
        out.print(LEGENDS[learner.metrics], highlight=False, style="dim")
    with progress_bar(disable=not progress, metrics=True) as bar:
        task = bar.add_task("train", total=run.total, completed=min(learner.samples_seen, run.total), metrics="")
        width, last = max(12, out.width - 58), [0.0]

        def on_step(m: Any, n: int) -> None:
            now = time.perf_counter()
            fresh = now - last[0] > 0.25
            bar.update(task, advance=n, **({"metrics": metrics_text(m, learner.metrics, width)} if fresh else {}))
            last[0] = now if fresh else last[0]

        run.train(on_step)
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("test", total=len(run.data.y_test))
        res = run.finish(on_batch=lambda n: bar.update(task, advance=n))
    if run.readied:
        out.print(run.readied, highlight=False, style="dim")
    if memory_report:
        _memory_report(run)
    rate = f" ({run.trained / run.seconds:.1f} samples/s)" if run.seconds > 0 and run.trained else ""
    out.print(f"trained in {run.seconds:.1f}s{rate}; test accuracy {res.accuracy:.2%} on {res.n} images", highlight=False)
    if res.layer_accuracy:
        out.print("each layer alone: " + "  ".join(f"L{i + 1} {a:.1%}" for i, a in enumerate(res.layer_accuracy)),
                  highlight=False)
    out.print(f"checkpoint: {run.path}", highlight=False)


@guarded()
def eval_cmd(
    checkpoint_path: CheckpointArg,
    data: Annotated[str | None, typer.Option(help="data set or image folder [default: the one it was trained on]")] = None,
    data_dir: DataDirOpt = None,
    layers: LayersOpt = None,
    limit: Annotated[int | None, typer.Option(help="evaluate on the first N test images")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    as_json: JsonOpt = False,
    backend: Annotated[Backend, typer.Option(help="torch, or onnx: export (or take a .onnx file) and run onnxruntime")] = Backend.torch,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Evaluate a checkpoint (or, with --backend onnx, an exported .onnx file) on a test set."""
    if backend == Backend.onnx or checkpoint_path.suffix == ".onnx":
        return _eval_onnx(checkpoint_path, data, data_dir, layers, limit, as_json)
    from edgeff import checkpoint, evaluate
    from edgeff.data import load_data

    learner, meta = checkpoint.load(checkpoint_path, device=device)
    name = data if data is not None else str(meta.get("dataset", "builtin"))
    ds = load_data(name, data_dir, input_shape=learner.model_cfg.input_shape)
    if tuple(ds.input_shape) != tuple(learner.model_cfg.input_shape):
        fail(f"{checkpoint_path} expects inputs of shape {learner.model_cfg.input_shape} but {name} has "
             f"{ds.input_shape}; evaluate it on the data set it was trained on ({meta.get('dataset')})")
    if layers is not None:
        learner.select_eval_layers(layers)
    per_epoch = meta.get("samples_per_epoch")  # a readout not solved yet takes a pass over the training data
    readied = learner.ready_to_predict(lambda: ds.train_batches(500, seed=0, limit=per_epoch))
    if readied and not as_json:
        out.print(readied, highlight=False, style="dim")
    with progress_bar(err, disable=not progress or as_json) as bar:
        task = bar.add_task("test", total=min(limit or len(ds.y_test), len(ds.y_test)))
        res = evaluate(learner, ds.test_batches(500, limit=limit), per_layer=True,
                       on_batch=lambda n: bar.update(task, advance=n))
    if as_json:
        out.print_json(json.dumps({"accuracy": res.accuracy, "n": res.n, "layer_accuracy": list(res.layer_accuracy)}))
        return
    out.print(f"{checkpoint_path}: test accuracy {res.accuracy:.2%} on {res.n} {name} images", highlight=False)
    for i, a in enumerate(res.layer_accuracy):
        out.print(f"  layer {i + 1} alone: {a:.2%}")


def _eval_onnx(path: Path, data: str | None, data_dir: Path | None, layers: str | None, limit: int | None,
               as_json: bool) -> None:
    from edgeff.exporters.onnx import OnnxPredictor, evaluate_onnx, export_onnx

    from edgeff import checkpoint
    from edgeff.data import load_data

    with tempfile.TemporaryDirectory() as tmp:
        if path.suffix == ".onnx":
            onnx_path = path
        else:
            learner, meta = checkpoint.load(path, device="cpu")
            onnx_path = export_onnx(learner, Path(tmp) / "model.onnx", meta=meta, layers=layers)
        pred = OnnxPredictor(onnx_path)
        name = data if data is not None else (pred.meta.get("dataset") or "builtin")
        ds = load_data(name, data_dir, input_shape=tuple(pred.input_shape))
        if tuple(ds.input_shape) != tuple(pred.input_shape):
            fail(f"{path} expects inputs of shape {pred.input_shape} but {name} has {ds.input_shape}")
        acc = evaluate_onnx(pred, ((x.numpy(), y.numpy()) for x, y in ds.test_batches(500, limit=limit)))
    n = min(limit or len(ds.y_test), len(ds.y_test))
    if as_json:
        out.print_json(json.dumps({"accuracy": acc, "n": n, "backend": "onnx"}))
    else:
        out.print(f"{path}: test accuracy {acc:.2%} on {n} {name} images (onnxruntime)", highlight=False)


@guarded()
def export(
    checkpoint_path: CheckpointArg,
    out_path: Annotated[Path, typer.Option("--out", help="the .onnx file to write (a folder with --per-layer)")] = Path("model.onnx"),
    per_layer: Annotated[bool, typer.Option("--per-layer", help="one file per local layer plus manifest.json")] = False,
    int8: Annotated[Quant | None, typer.Option("--int8", help="also write an int8 copy: static (QDQ, calibrated) or dynamic")] = None,
    layers: LayersOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the full data sets (parity and calibration images)")] = None,
) -> None:
    """Export a checkpoint to ONNX with its prediction rule; print sizes and parity against torch."""
    from edgeff.exporters.onnx import OnnxPredictor, export_layers, export_onnx, parity, quantize_onnx

    from edgeff import checkpoint
    from edgeff.data import load_data
    from edgeff.files import check_output

    if not per_layer:
        check_output(out_path, (".onnx",))
    elif out_path.exists() and not out_path.is_dir():
        fail(f"--out {out_path} is a file; --per-layer writes a folder of layer files")
    learner, meta = checkpoint.load(checkpoint_path, device="cpu")
    readied = learner.ready_to_predict()
    if readied:
        out.print(readied, highlight=False, style="dim")
    if per_layer:
        manifest = export_layers(learner, out_path, meta=meta)
        total = sum(p.stat().st_size for p in out_path.iterdir())
        out.print(f"wrote {len(learner.model_cfg.layers)} layer files and {manifest} ({total / 1024:.1f} KiB)")
        return
    path = export_onnx(learner, out_path, meta=meta, layers=layers)
    ds = load_data(str(meta.get("dataset", "builtin")), data_dir)
    x, _ = next(ds.test_batches(256))
    pr = parity(learner, OnnxPredictor(path), x)
    out.print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB); parity on {int(pr['n'])} real test images: "
              f"max |score diff| {pr['max_abs_diff']:.2e} ({pr['max_rel_diff']:.1e} of the largest score), same label {pr['agreement']:.2%}", highlight=False)
    if int8 is not None:
        cal = [xb.numpy() for xb, _ in ds.train_batches(64, seed=0, limit=512)]
        qpath = quantize_onnx(path, path.with_suffix(f".int8-{int8.value}.onnx"), mode=int8.value, calibration=cal)
        agree = float((OnnxPredictor(qpath).predict_many(x.numpy()) == learner.predict_many(x).numpy()).mean())
        out.print(f"wrote {qpath} ({qpath.stat().st_size / 1024:.1f} KiB, {qpath.stat().st_size / path.stat().st_size:.2f}x "
                  f"of fp32); same label as torch on {agree:.2%} of {len(x)} images", highlight=False)


@guarded()
def predict(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="a checkpoint (`edgeff train`) or an ONNX file (`edgeff export`)")],
    images: Annotated[Path, typer.Argument(metavar="IMAGES", help="an image file, a folder of images, or a .npy/.npz array")],
    top: Annotated[int, typer.Option(help="how many classes to show per image")] = 3,
    as_json: JsonOpt = False,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
) -> None:
    """Predict the class of each image with a trained model, with its best scores."""
    from edgeff.predict import predict_images

    set_max_pixels(max_pixels)
    if top < 1:
        fail(f"--top must be at least 1, got {top}")
    preds = predict_images(model, images, top=top)
    if as_json:
        out.print(json.dumps([{"item": p.item, "label": p.label, "index": p.index, "top": [list(t) for t in p.top]}
                              for p in preds]), highlight=False, soft_wrap=True)
        return
    for p in preds:
        rest = ", ".join(f"{name} {score:.3g}" for name, score in p.top)
        out.print(f"{Path(p.item).name}: {p.label}  ({rest})", highlight=False)


__all__ = ["Backend", "Quant", "err", "eval_cmd", "export", "predict", "train"]
