"""``edgeff add-class`` and ``edgeff continual``: growing a trained model, and class-incremental streams."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from edgeff.cli.common import (
    CheckpointArg,
    DataDirOpt,
    Dataset,
    JsonOpt,
    MaxPixelsOpt,
    err,
    fail,
    guarded,
    out,
    progress_bar,
)
from rich.table import Table

from edgeff.images import DEFAULT_MAX_PIXELS, set_max_pixels


class Scenario(str, Enum):
    split_ = "split"
    add_one_class = "add-one-class"


def added_path(path: Path, name: str) -> Path:
    """Where ``add-class`` writes by default: beside the input, never over it (``model-cup.pt``)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip()) or "class"
    return path.with_name(f"{path.stem}-{safe}{path.suffix or '.pt'}")


@guarded()
def add_class(
    checkpoint_path: CheckpointArg,
    name: Annotated[str, typer.Option(help="the new class's name")],
    data_path: Annotated[Path | None, typer.Option("--data", help="examples of the class: a folder of images, or a .npy/.npz array (uint8 pixels or normalised floats)")] = None,
    held_out: Annotated[Path | None, typer.Option(help="more examples of the class, not learned from: its recall is printed")] = None,
    replay_data: Annotated[str | None, typer.Option(help="old-class samples to replay while learning it, and to measure the old classes on: a data set name or image folder [default: the checkpoint's buffer, else the data set it was trained on]")] = None,
    data_dir: DataDirOpt = None,
    passes: Annotated[int, typer.Option(help="passes over the examples, each batch mixed with replayed old samples (0: only imprint the class)")] = 10,
    buffer: Annotated[int, typer.Option(help="replay buffer samples when it is built from --replay-data")] = 500,
    out_path: Annotated[Path | None, typer.Option("--out", help="checkpoint to write [default: CHECKPOINT's name + -NAME, beside it]")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="overwrite CHECKPOINT instead of writing a new file")] = False,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
) -> None:
    """Add a class to a trained model: a new label embedding (or pattern / head row) from the examples' mean
    feature, then learned from them with replay of the old classes, whose accuracy is printed before and after."""
    from edgeff import checkpoint
    from edgeff.data import load_examples
    from edgeff.files import check_output
    from edgeff.learn import add_class as add_fn
    from edgeff.names import checked_name

    name = checked_name(name)  # before its name becomes a file name
    set_max_pixels(max_pixels)
    if in_place and out_path is not None:
        fail("--in-place overwrites CHECKPOINT; drop --out, or drop --in-place to write --out")
    target = check_output(checkpoint_path if in_place else out_path or added_path(checkpoint_path, name))
    if data_path is None and passes:
        passes = 0  # nothing to learn from: the class is added from a random row
    learner, meta = checkpoint.load(checkpoint_path, device="cpu")
    shape, norm = learner.model_cfg.input_shape, (tuple(meta.get("mean", [0.0])), tuple(meta.get("std", [1.0])))
    if "mean" not in meta and data_path is not None:
        err.print("warning: the checkpoint records no pixel mean/std; uint8 examples are only scaled to [0, 1] "
                  "(save it with `edgeff train`, or pass normalised float arrays)", highlight=False)
    x = None if data_path is None else load_examples(data_path, shape, *norm)
    xh = None if held_out is None else load_examples(held_out, shape, *norm)
    if x is None:  # no examples: a random row, nothing to learn from or measure
        names = list(meta.get("classes", []))
        if not learner.model_cfg.class_names and len(names) == learner.model_cfg.num_classes:
            learner.model_cfg = replace(learner.model_cfg, class_names=tuple(names))
        idx = learner.add_class(name)
        path = checkpoint.save(learner, target, meta={**meta, "classes": list(learner.class_names)})
        out.print(f"added class {name!r} as index {idx} (no examples: it learns when training resumes)", highlight=False)
        out.print(f"checkpoint: {path}", highlight=False)
        return
    with err.status(f"learning {name!r} from {x.shape[0]} examples", spinner="dots"):
        r = add_fn(checkpoint_path, name, x, out=target, held_out=xh, replay_data=replay_data, data_dir=data_dir,
                   buffer=buffer, passes=passes)
    pct = lambda v: "-" if v is None else f"{v:.2%}"
    how = {"none": "without replay", "closed form": "in closed form (one pass; no replay needed)"}.get(
        r.replay, f"with replay from {r.replay}")
    out.print(f"added class {name!r} as index {r.index}; {r.steps} steps {how}", highlight=False)
    out.print(f"old classes {pct(r.old_before)} -> {pct(r.old_after)}; {r.examples_hit}/{x.shape[0]} of its "
              f"examples predicted as {name!r}" + ("" if r.held_out_recall is None else
                                                   f"; held-out recall {pct(r.held_out_recall)}"), highlight=False)
    out.print(f"checkpoint: {r.path}", highlight=False)


@guarded()
def learn(
    checkpoint_path: CheckpointArg,
    data: Annotated[str, typer.Option(help="the new data: a data set's name or a folder with one sub-folder of images per class")],
    data_dir: DataDirOpt = None,
    buffer: Annotated[int | None, typer.Option(help="replay buffer samples [default: the checkpoint's buffer, else none]")] = None,
    batch_size: Annotated[int, typer.Option(help="stream samples per step")] = 10,
    out_path: Annotated[Path | None, typer.Option("--out", help="checkpoint to write [default: CHECKPOINT's name + -learned]")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="overwrite CHECKPOINT")] = False,
    seed: Annotated[int, typer.Option(help="data order seed")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Continue learning from a checkpoint on new data (one pass, replay): new classes grow, the replay
    buffer is kept in the checkpoint, old-class accuracy is printed before and after."""
    from edgeff.learn import learn as learn_fn

    if in_place and out_path is not None:
        fail("--in-place overwrites CHECKPOINT; drop --out, or drop --in-place to write --out")
    with progress_bar(err, disable=not progress) as bar:
        task = bar.add_task("learn", total=None)
        r = learn_fn(checkpoint_path, data, data_dir=data_dir, buffer=buffer, batch_size=batch_size, seed=seed,
                     out=checkpoint_path if in_place else out_path, on_step=lambda m, n: bar.update(task, advance=n))
    pct = lambda v: "-" if v is None else f"{v:.2%}"
    grown = ", ".join(r.new_classes) or "none"
    out.print(f"learned from {r.samples} samples; new classes: {grown}", highlight=False)
    out.print(f"old classes {pct(r.old_before)} -> {pct(r.old_after)}; new classes {pct(r.new_acc)}", highlight=False)
    out.print(f"replay buffer: {r.buffer_size} samples, {r.buffer_bytes / 1024:,.1f} KiB (kept in the checkpoint)",
              highlight=False)
    out.print(f"checkpoint: {r.path}", highlight=False)


def _add_one(ds: Any, o: dict[str, Any], who: str, quiet: bool) -> None:
    from edgeff.continual import ReplayBuffer, add_one_class, pretrain_without

    new = o["new_class"]
    note = f"training {who} on every class but {ds.classes[new]!r} ({o['pretrain_epochs']} epoch(s))"
    with contextlib.nullcontext() if quiet else err.status(note, spinner="dots"):
        learner = pretrain_without(ds, new, preset=o["preset"], backprop=o["backprop"], epochs=o["pretrain_epochs"],
                                   seed=o["seed"])
    replay = ReplayBuffer(o["buffer"], seed=o["seed"], asymmetric=o["asymmetric"]) if o["buffer"] else None
    r = add_one_class(learner, ds, new, o["k"], traffic=o["traffic"], batch_size=o["batch_size"], replay=replay,
                      seed=o["seed"])
    rec = {"scenario": "add-one-class", "dataset": ds.name, "preset": o["preset"], "backprop": o["backprop"],
           "k": o["k"], "new_class": ds.classes[new], "new_recall": r.new_recall, "old_before": r.old_before,
           "old_after": r.old_after, "old_drop_pt": r.old_drop, "buffer": o["buffer"]}
    if o["as_json"]:
        out.print(json.dumps(rec), highlight=False)
        return
    out.print(f"{who} on {ds.name}: class {ds.classes[new]!r} added from {o['k']} examples in {r.samples} streamed "
              f"samples: new-class recall {r.new_recall:.2%}, old classes {r.old_before:.2%} -> {r.old_after:.2%} "
              f"(drop {r.old_drop:.2f} pt)", highlight=False)


def _split(ds: Any, o: dict[str, Any], who: str, quiet: bool) -> None:
    from edgeff.continual import plot_stream, split_scenario

    n = len(ds.y_train)
    with progress_bar(err, disable=quiet) as bar:
        task = bar.add_task("stream", total=n)
        res = split_scenario(ds, preset=o["preset"], backprop=o["backprop"], buffer=o["buffer"],
                             asymmetric=o["asymmetric"], batch_size=o["batch_size"], seed=o["seed"],
                             eval_every=max(1, n // 50) if o["plot"] else 0, on_step=lambda m, b: bar.update(task, advance=b))
    title = f"{who}, split {ds.name}, buffer {o['buffer']}"
    if o["plot"] is not None:
        plot_stream(res, o["plot"], names=ds.classes, title=title)
    if o["as_json"]:
        out.print(json.dumps({"scenario": "split", "dataset": ds.name, "preset": o["preset"], "backprop": o["backprop"],
                              "buffer": o["buffer"], "matrix": res.matrix.tolist(), "average_accuracy": res.average_accuracy,
                              "forgetting": res.forgetting, "backward_transfer": res.backward_transfer}), highlight=False)
        return
    table = Table(title=f"{title}: accuracy on each experience (rows: after training on)")
    table.add_column("after")
    for cls in res.classes:
        table.add_column("+".join(ds.classes[c] for c in cls), justify="right")
    for i, row in enumerate(res.matrix):
        table.add_row(f"exp {i + 1}", *[f"{100 * v:.1f}" for v in row])
    out.print(table)
    out.print(f"average accuracy {res.average_accuracy:.2%}, forgetting {100 * res.forgetting:.2f} pt, "
              f"backward transfer {100 * res.backward_transfer:+.2f} pt", highlight=False)
    if o["plot"] is not None:
        out.print(f"plot: {o['plot']}", highlight=False)


@guarded(RuntimeError)
def continual(
    scenario: Annotated[Scenario, typer.Argument(help="split (5 experiences x 2 classes, online) or add-one-class")],
    data: Annotated[Dataset, typer.Option(help="builtin, mnist, fashion-mnist, cifar10 or cifar10-exact (natural images: --preset kmeans-conv)")] = Dataset.builtin,
    data_dir: DataDirOpt = None,
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
    as_json: JsonOpt = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Run a class-incremental scenario and print the accuracy matrix, forgetting and backward transfer."""
    import torch

    from edgeff.data import load_data
    from edgeff.files import check_output

    torch.manual_seed(seed)
    if buffer < 0 or batch_size < 1:
        fail("--buffer must be >= 0 and --batch-size >= 1")
    if plot is not None:
        check_output(plot, (".png",), what="--plot")
    ds = load_data(data.value, data_dir)
    if scenario == Scenario.add_one_class and not 0 <= new_class < len(ds.classes):
        fail(f"--new-class must be a class of {ds.name}: 0..{len(ds.classes) - 1}, got {new_class}")
    o = {"preset": preset, "backprop": backprop, "buffer": buffer, "asymmetric": asymmetric, "batch_size": batch_size,
         "k": k, "new_class": new_class, "traffic": traffic, "pretrain_epochs": pretrain_epochs, "seed": seed,
         "plot": plot, "as_json": as_json}
    who = f"{preset}{' (backprop)' if backprop else ''}"
    (_add_one if scenario == Scenario.add_one_class else _split)(ds, o, who, not progress or as_json)


__all__ = ["Scenario", "add_class", "continual", "learn"]
