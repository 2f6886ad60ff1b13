"""``edgeff`` CLI: parses options, builds configs, calls the library, prints. No logic lives here."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

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
    memory_report: Annotated[bool, typer.Option("--memory-report", help="measure per-layer memory on real batches after training")] = False,
) -> None:
    """Train a preset on a data set, streaming batches, then report test accuracy."""
    from edgeff import checkpoint, evaluate, get_preset, make_learner
    from edgeff.data import load_data
    from edgeff.errors import EdgeFFError
    from edgeff.trainer import train_epochs

    try:
        p = get_preset(preset)
        ds = load_data(data.value, data_dir)
        if optim_state not in ("float32", "bfloat16", "float16"):
            _fail(f"--optim-state must be float32, bfloat16 or float16, got {optim_state!r}")
        tc = replace(p.train, seed=seed, device=device, optim_state_dtype=optim_state)
        if batch_size is not None:
            tc = replace(tc, batch_size=batch_size)
        if lr is not None:
            tc = replace(tc, lr=lr)
        if schedule is not None:
            tc = replace(tc, schedule=schedule.value)
        n_epochs = epochs if epochs is not None else tc.epochs
        if tc.batch_size < 1:
            _fail(f"--batch-size must be at least 1, got {tc.batch_size}")
        if n_epochs < 1:
            _fail(f"--epochs must be at least 1, got {n_epochs}")
        tc = replace(tc, epochs=n_epochs)
        name = f"{preset}{'-bp' if backprop and p.algorithm != 'bp' else ''}"
        path = out_path or Path("runs") / f"{name}.pt"
        if resume and path.is_file():
            learner, _ = checkpoint.load(path, device=device)
            out.print(f"resuming {path} at {learner.samples_seen} samples")
        else:
            learner = make_learner(p, input_shape=ds.input_shape, num_classes=len(ds.classes), train=tc,
                                   backprop=backprop)
        per_epoch = min(samples, len(ds.y_train)) if samples else len(ds.y_train)
        total = per_epoch * n_epochs
        out.print(f"[bold]{name}[/] on {ds.name}: {per_epoch} samples x {n_epochs} epochs, batch "
                  f"{tc.batch_size}, device {learner.device}", highlight=False)
        t0 = time.perf_counter()
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
        meta = {"dataset": ds.name, "classes": list(ds.classes), "mean": list(ds.mean), "std": list(ds.std),
                "preset": preset, "samples_per_epoch": per_epoch}
        checkpoint.save(learner, path, meta=meta)
        res = evaluate(learner, ds.test_batches(500), per_layer=True)
    except EdgeFFError as e:
        _fail(str(e))
        return
    if memory_report:
        from edgeff.memory import account, measure_learner

        real = list(ds.train_batches(tc.batch_size, seed=seed + 1, limit=4 * tc.batch_size))[:4]
        measured = measure_learner(learner, real)
        if learner.kind == "local":
            measured = {**measured, "local_layers": measured["layers"], "local_transient": measured["transient"]}
        report = account(learner.model_cfg, learner.train_cfg, tc.batch_size)
        _print_memory(report, measured if learner.kind == "local" else None,
                      f"{name}: memory per layer on real {ds.name} batches of {tc.batch_size}")
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
        out.print(f"  layer {i + 1} goodness alone: {a:.2%}")


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
    table = Table(title=title)
    recs = rows(report, measured)
    cols = list(recs[0])
    for c in cols:
        table.add_column(c.replace("_kib", " KiB").replace("_", " "), justify="right")
    for r in recs:
        table.add_row(*[str(r[c]) if c == "layer" else _kib(r[c]) for c in cols])
    out.print(table)
    out.print(f"accounted peak: layer-local ({report.schedule}) {report.local_peak / 1024:,.1f} KiB, backprop "
              f"{report.bp_peak / 1024:,.1f} KiB, ratio {report.local_peak / report.bp_peak:.2f}; physical limit "
              f"(greedy) {report.physical_limit / 1024:,.1f} KiB", highlight=False)
    if measured is not None:
        lt, bt = measured["local_transient"], measured.get("bp_transient")
        line = f"measured step peak above the resident baseline ({measured['method']}): layer-local {lt / 1024:,.1f} KiB"
        if bt:
            line += f", backprop {bt / 1024:,.1f} KiB, ratio {lt / bt:.2f}"
        out.print(line + f" (accounted: {report.local_transient / 1024:,.1f} / {report.bp_transient / 1024:,.1f} KiB)",
                  highlight=False)


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
) -> None:
    """Per-layer memory of a training step: layer-local next to backprop on the same architecture."""
    from edgeff import get_preset
    from edgeff.errors import EdgeFFError
    from edgeff.memory import account
    from edgeff.memory import measure as measure_fn
    from edgeff.memory import plot as plot_fn

    try:
        p = get_preset(preset)
        if batch_size < 1:
            _fail(f"--batch-size must be at least 1, got {batch_size}")
        tc = replace(p.train, device=device, optim_state_dtype=optim_state)
        if schedule is not None:
            tc = replace(tc, schedule=schedule.value)
        report = account(p.model, tc, batch_size, dtype=dtype)
        measured = measure_fn(p.model, tc, batch_size) if measure else None
        _print_memory(report, measured, f"{preset}, batch {batch_size}, {dtype}")
        if plot is not None:
            plot_fn(report, str(plot), measured, title=f"{preset}: training memory, batch {batch_size}")
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
