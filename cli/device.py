"""``edgeff device ...`` (info, load, stream, add-class, eval) and ``edgeff device-sim``: a board, real or
simulated, behind a serial port URL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from edgeff.cli.common import Dataset, fail, guarded, out, progress_bar
from rich.table import Table

device_app = typer.Typer(help="Talk to a device (a real board, or `edgeff device-sim`) over any serial port URL.",
                         no_args_is_help=True)

PortOpt = Annotated[str, typer.Option("--port", help="pyserial URL: /dev/ttyUSB0, a pty path, socket://host:port")]


def _bkib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def device_sim(
    budget: Annotated[str, typer.Option(help="RAM budget, e.g. 512KiB or 4MiB")] = "4MiB",
    state_dir: Annotated[Path | None, typer.Option(help="where SAVE writes state and a restart restores it")] = None,
    socket_port: Annotated[int | None, typer.Option("--socket", help="serve socket://127.0.0.1:PORT instead of a pty (0 = any)")] = None,
    link: Annotated[Path | None, typer.Option(help="keep a symlink to the pty at this path (stable across restarts)")] = None,
    idle: Annotated[float, typer.Option(help="socket mode: seconds a client has to complete each frame (and to take "
                                             "each reply); a client that trickles or stalls is dropped")] = 30.0,
    seed: Annotated[int, typer.Option(help="device RNG seed")] = 0,
) -> None:
    """Run a simulated device (numpy only, no torch) on a new pty or a TCP port; prints the port to use."""
    from edgeff.firmware_sim.device import main as sim_main

    if not idle > 0:
        fail(f"--idle must be a positive number of seconds, got {idle}")
    argv = ["--budget", budget, "--seed", str(seed), "--idle", str(idle)]
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
@guarded()
def device_info(port: PortOpt) -> None:
    """Capabilities, loaded model, per-layer memory and link counters of a device."""

    with _client(port) as c:
        info, st = c.info, c.device_stats()
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
@guarded()
def device_load(
    port: PortOpt,
    checkpoint_path: Annotated[Path | None, typer.Option("--checkpoint", help="a trained checkpoint of a preset the edge runtime trains (converted on the way)")] = None,
    onnx_path: Annotated[Path | None, typer.Option("--onnx", help="an `edgeff export` ONNX file (inference only on the device)")] = None,
    edge_path: Annotated[Path | None, typer.Option("--edge", help="an edge-runtime model (`edgeff-edge train`, .npz): any preset it trains")] = None,
    preset: Annotated[str, typer.Option(help="fresh model: a preset the edge runtime trains (device-embed: CFL's dictionary loss; device-goodness: SymBa + ICP)")] = "device-embed",
    layers: Annotated[str | None, typer.Option(help="fresh MLP model: comma-separated layer widths [default: the preset's]")] = None,
    optimizer: Annotated[str | None, typer.Option(help="fresh model: adam, adamw or sgd (SGD keeps half the optimizer state) [default: the preset's]")] = None,
    lr: Annotated[float | None, typer.Option(help="fresh model: learning rate [default: the preset's]")] = None,
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
    data: Annotated[Dataset, typer.Option(help="data set the model is for (input size, classes, normalisation)")] = Dataset.builtin,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the full data sets")] = None,
) -> None:
    """Upload a model: a fresh one of an edge preset to train on the device, a trained checkpoint, an edge file
    or an ONNX file."""
    ds, _, _ = _device_data(data, data_dir)
    for path, what, hint in ((onnx_path, "ONNX model", "`edgeff export`"),
                             (edge_path, "edge model", "`edgeff-edge train`")):
        if path is None:
            continue
        if not path.is_file():
            fail(f"{what} {path} does not exist; write one with {hint}")
        blob = path.read_bytes()
        with _client(port) as c:
            meta = c.load(blob)
            budget = c.info["ram_budget"]
        only = ", inference only" if what == "ONNX model" else ""
        out.print(f"loaded {what} {path.name} ({len(blob)} bytes{only}); needs about {_bkib(meta['memory'])} of "
                  f"the device's {_bkib(budget)}", highlight=False)
        return
    if checkpoint_path is not None:
        from edgeff import checkpoint
        from edgeff.edge.store import to_bytes
        from edgeff.interchange import to_edge

        learner, meta = checkpoint.load(checkpoint_path, device="cpu")
        edge = to_edge(learner)
        blob = to_bytes(edge, {"preset": meta.get("preset"), "classes": list(edge.class_names),
                               "mean": list(meta.get("mean", ds.mean)), "std": list(meta.get("std", ds.std))})
        what = f"{meta.get('preset') or 'trained'} checkpoint {checkpoint_path.name}"
    else:
        from edgeff.firmware_sim.edge_model import new_model

        widths = [int(w) for w in layers.split(",") if w.strip()] if layers is not None else None
        blob = new_model(preset, widths, input_shape=tuple(ds.input_shape), classes=list(ds.classes), seed=seed,
                         optimizer=optimizer, lr=lr, mean=list(ds.mean), std=list(ds.std))
        what = f"fresh {preset} model" + (f" {widths}" if widths else "")
    with _client(port) as c, progress_bar() as bar:
        task = bar.add_task("upload", total=len(blob))
        meta = c.load(blob, progress=lambda done, total: bar.update(task, completed=done))
        budget = c.info["ram_budget"]
    out.print(f"loaded {what} ({len(blob)} bytes); needs {_bkib(meta['memory'])} of the device's {_bkib(budget)}",
              highlight=False)


@device_app.command("stream")
@guarded()
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

    if batch_size < 1:
        fail("--batch-size must be at least 1")
    if samples is not None and samples < 1:
        fail(f"--samples must be at least 1, got {samples}")
    if save_every < 0:
        fail(f"--save-every must be 0 (only at the end) or a number of samples, got {save_every}")
    ds, x, _ = _device_data(data, data_dir)
    order = np.random.default_rng([seed, 0]).permutation(len(x))[:samples]
    xs, ys = x[order], ds.y_train[order].astype(np.int64)
    c = _client(port, fault_rate, seed)
    c.open()
    with progress_bar() as bar:
        task = bar.add_task("stream", total=len(xs))
        res = c.stream(xs, ys, batch_size=batch_size, save_every=save_every or None,
                       progress=lambda pos: bar.update(task, completed=pos))
    st = c.device_stats()
    c.close()
    ls = res.losses[-1] if res.losses else []
    out.print(f"{res.samples} samples in {res.seconds:.1f} s ({res.samples_per_s:.0f} samples/s), last losses "
              f"{' '.join(f'{v:.3f}' for v in ls)}; link: {c.stats.requests} requests, {c.stats.retransmits} "
              f"retransmits, {res.reconnects} reconnects; device memory peak {_bkib(st['traced_peak'])} of "
              f"{_bkib(st['ram_budget'])}", highlight=False)


@device_app.command("add-class")
@guarded()
def device_add_class(
    port: PortOpt,
    name: Annotated[str, typer.Option(help="the new class's name")],
    data_path: Annotated[Path | None, typer.Option("--data", help="examples: a folder of images or a .npy/.npz array")] = None,
    data: Annotated[Dataset, typer.Option("--data-set", help="data set the device model is for (image size)")] = Dataset.builtin,
) -> None:
    """Add a class on the device (a new label embedding initialised from the examples, or a new pattern).
    Images go as uint8 pixels (the device model normalises them), float arrays as they are."""
    from edgeff.data import load_pixels
    from edgeff.names import checked_name

    name = checked_name(name)
    shape = (3, 32, 32) if data in (Dataset.cifar10, Dataset.cifar10_exact) else (1, 28, 28)
    x = None
    if data_path is not None:
        x = load_pixels(data_path, shape)
        x = x.reshape(len(x), -1)  # (N, C*H*W), the device's input layout
    with _client(port) as c:
        meta = c.add_class(name, x)
    out.print(f"device added class {name!r} as index {meta['index']}; classes now {meta['classes']}", highlight=False)


@device_app.command("eval")
@guarded()
def device_eval(
    port: PortOpt,
    data: Annotated[Dataset, typer.Option(help="data set to evaluate on (its test split)")] = Dataset.builtin,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the full data sets")] = None,
    limit: Annotated[int | None, typer.Option(help="evaluate only the first N test samples")] = None,
    batch_size: Annotated[int, typer.Option(help="samples per INFER frame")] = 50,
) -> None:
    """Accuracy of the device's on-device predictions on a test set."""

    ds, _, xt = _device_data(data, data_dir)
    xt, yt = xt[:limit], ds.y_test[:limit]
    t0 = time.perf_counter()
    with _client(port) as c:
        acc, _ = c.evaluate(xt, yt, batch_size=batch_size)
    dt = time.perf_counter() - t0
    out.print(f"device accuracy {acc * 100:.2f}% on {len(yt)} {ds.name} test samples ({len(yt) / dt:.0f} samples/s)",
              highlight=False)


