"""``edgeff-edge``: the commands a board without torch needs (numpy, onnxruntime, pyserial, typer, rich).

train / continue training, evaluate (edge models and ONNX files), list what the edge runtime trains,
convert torch checkpoints (on a machine with torch), and run the simulated device. No torch is
imported by any command but ``convert``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from edgeff.cli.common import Dataset, err, out  # the main CLI's choices and consoles (no torch at load)
from edgeff.cli.common import fail as _fail
from edgeff.cli.device import device_sim

if TYPE_CHECKING:
    from edgeff.edge.learner import EdgeLearner

app = typer.Typer(help="edgeff's edge runtime: train and run layer-local models with numpy alone (no torch).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _user_errors():  # type: ignore[no-untyped-def]
    from edgeff.errors import EdgeFFError

    return (EdgeFFError, FileNotFoundError)


@app.command()
def train(
    preset: Annotated[str, typer.Option(help="named configuration; see `edgeff-edge presets`")] = "symba-mlp",
    data: Annotated[Dataset, typer.Option(help="data set")] = Dataset.builtin,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding MNIST/raw, FashionMNIST/raw or CIFAR10")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="where .gz data files are unpacked once [default: ~/.cache/edgeff]")] = None,
    epochs: Annotated[int | None, typer.Option(help="passes over the training set in all [default: the preset's]")] = None,
    samples: Annotated[int | None, typer.Option(help="use only this many (shuffled) training samples per pass")] = None,
    batch_size: Annotated[int | None, typer.Option(help="samples per step, 1 for pure streaming [default: the preset's]")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate [default: the preset's]")] = None,
    schedule: Annotated[str | None, typer.Option(help="all or greedy [default: the preset's]")] = None,
    views: Annotated[int | None, typer.Option(help="CFL: 1 or 2 augmented views per batch [default: the preset's]")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (weights, negatives, data order)")] = None,
    window: Annotated[int | None, typer.Option(help="each step also learns the N samples just before it (0 = off) [default: the preset's; at --batch-size 1 its stream recipe's]")] = None,
    predictor: Annotated[str | None, typer.Option(help="goodness presets: goodness (one pass per label) or lda (a closed-form readout on neutral-label features) [default: the preset's]")] = None,
    eval_layers: Annotated[str | None, typer.Option(help="the layers the predictor reads: all, all-but-first, last or last:K [default: the preset's]")] = None,
    readout_size: Annotated[int | None, typer.Option(help="lda predictor: conv maps larger than N×N are average-pooled to about N×N (0 = as they are) [default: the preset's]")] = None,
    shrinkage: Annotated[float | None, typer.Option(help="lda predictor: the covariance's ridge, a share of its mean variance [default: the preset's, 0.01]")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="model file to write [default: runs/PRESET.npz]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from --out if it exists")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train a preset with numpy alone, streaming batches from disk, then report test accuracy."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgeff.edge.run import train_run

    overrides = {k: v for k, v in {"lr": lr, "schedule": schedule, "views": views, "seed": seed, "window": window,
                                   "predictor": predictor, "eval_layers": eval_layers,
                                   "readout_size": readout_size}.items() if v is not None}
    if views is not None and views == 1:
        overrides["crop_padding"] = 0
    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[m]}"),
                   console=err, disable=not progress)
    task = None

    def on_start(learner: EdgeLearner, total: int) -> None:
        nonlocal task
        if learner.train_cfg.batch_size == 1 and learner.samples_seen == 0:  # a new stream: its recipe, said
            from edgeff.presets import get_preset, stream_line

            out.print(stream_line(learner.train_cfg, dict(get_preset(preset).stream_model),
                                  closed_form=learner.family == "analytic"),
                      highlight=False, style="dim")
        task = bar.add_task("train", total=total, m="")

    def on_step(metrics: object, n: int) -> None:
        summary = " ".join(f"L{i + 1} {m.loss:.3f}" for i, m in enumerate(metrics))  # type: ignore[attr-defined, arg-type, var-annotated]
        bar.update(task, advance=n, m=summary)  # type: ignore[arg-type]

    try:
        with bar:
            res = train_run(preset=preset, data=data.value, data_dir=data_dir, cache_dir=cache_dir, out=out_path,
                            resume=resume, epochs=epochs, batch_size=batch_size, samples=samples, overrides=overrides,
                            shrinkage=shrinkage, on_step=on_step, on_start=on_start)
    except _user_errors() as e:
        _fail(str(e))
    if res.readied:
        out.print(res.readied, highlight=False, style="dim")
    layers = " ".join(f"L{i + 1} {a:.2%}" for i, a in enumerate(res.test["layer_accuracy"]))
    rate = f" ({res.trained / res.seconds:.1f} samples/s)" if res.seconds > 0 and res.trained else ""
    out.print(f"trained in {res.seconds:.1f}s{rate}", highlight=False)
    out.print(f"test accuracy {res.test['accuracy']:.2%} on {res.test['samples']} images (per layer: {layers})")
    out.print(f"wrote {res.path} ({res.learner.samples_seen} samples seen)")


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="an edge model (.npz) or an ONNX file (.onnx)")],
    data: Annotated[Dataset, typer.Option(help="data set")] = Dataset.builtin,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the data set")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="where .gz data files are unpacked")] = None,
    limit: Annotated[int | None, typer.Option(help="evaluate on the first N test images")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Test accuracy of an edge model (and each layer's own) or of an ONNX file in onnxruntime."""
    from edgeff.edge.data import load_edge_data

    try:
        ds = load_edge_data(data.value, data_dir, cache_dir=cache_dir)
        if model.suffix == ".onnx":
            from edgeff.exporters.runtime import OnnxPredictor, evaluate_onnx

            res = {"accuracy": evaluate_onnx(OnnxPredictor(model), ds.test_batches(200, limit=limit)),
                   "samples": min(limit or len(ds.y_test), len(ds.y_test)), "backend": "onnxruntime"}
        else:
            from edgeff.edge import evaluate, load
            from edgeff.edge.limits import check_fits
            from edgeff.edge.plan import still_needed

            learner, meta = load(model, optimizer=False)  # predicting: the optimizer's moments stay on disk
            check_fits(still_needed(learner, 200, predict_only=True), f"evaluating {model.name}")
            per_epoch = meta.get("samples_per_epoch")  # a readout not solved yet takes a pass over the training data
            learner.ready_to_predict(lambda: ds.train_batches(500, seed=0, limit=per_epoch))
            res = {**evaluate(learner, ds.test_batches(200, limit=limit), per_layer=True), "backend": "numpy"}
    except _user_errors() as e:
        _fail(str(e))
    if as_json:
        out.print(json.dumps(res), highlight=False)
        return
    out.print(f"test accuracy {res['accuracy']:.2%} on {res['samples']} images ({res['backend']})")
    if "layer_accuracy" in res:
        out.print("per layer: " + " ".join(f"L{i + 1} {a:.2%}" for i, a in enumerate(res["layer_accuracy"])))


@app.command()
def presets() -> None:
    """The presets the edge runtime trains, and why the others need torch."""
    from edgeff.config import TrainConfig
    from edgeff.edge.learner import UnsupportedError, check_supported
    from edgeff.presets import PRESETS

    for name, p in PRESETS.items():
        if p.algorithm != "local":
            out.print(f"{name:20s} no: a backprop preset (train it with torch)")
            continue
        try:
            check_supported(p.model, p.train)
            out.print(f"{name:20s} yes")
        except UnsupportedError as e:
            try:
                check_supported(p.model, TrainConfig(**{**p.train.to_dict(), "schedule": "all"}))
                out.print(f"{name:20s} with --schedule all ({e})")
            except UnsupportedError:
                out.print(f"{name:20s} no: {e}")


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="a torch checkpoint (.pt) or an edge model (.npz)")],
    dst: Annotated[Path, typer.Argument(help="the file to write: .npz (edge) or .pt (torch)")],
) -> None:
    """Convert a torch checkpoint to an edge model or back (needs torch: run it on the laptop)."""
    try:
        from edgeff.interchange import convert_file
    except ImportError:
        _fail("convert needs torch (pip install torch); the edge runtime itself never does")
    try:
        path = convert_file(src, dst)
    except _user_errors() as e:
        _fail(str(e))
    out.print(f"wrote {path}")


# the same simulated device as `edgeff device-sim` (cli/device.py imports no torch)
app.command("device-sim")(device_sim)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
