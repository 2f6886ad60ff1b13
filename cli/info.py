"""``edgeff memory``, ``presets`` and ``explain``: what a step costs, what the presets are, what a
label-embedding model looks at."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from edgeff.cli.common import DataDirOpt, Dataset, Schedule, fail, guarded, out
from rich.table import Table


def print_memory(report: Any, measured: dict[str, Any] | None, title: str) -> None:
    """The per-layer table of a ``MemoryReport`` (KiB) and its step costs, accounted and measured."""
    from edgeff.memory import rows

    table = Table(title=title, caption="KiB live while a layer trains, above the model and its optimizer state")
    recs = rows(report, measured)
    cols = list(recs[0])
    for c in cols:
        table.add_column(c.replace("_kib", "").replace("_", " "), justify="right")
    for r in recs:
        table.add_row(*[r[c] if c == "layer" else ("-" if r[c] is None else f"{r[c]:,.1f}") for c in cols])
    out.print(table)
    k = 1024
    out.print(f"step ({report.schedule}, {report.step}), accounted:\n"
              f"  layer-local {report.local_step / k:,.1f} KiB, backprop {report.bp_step / k:,.1f} KiB, "
              f"ratio {report.local_step / report.bp_step:.2f}\n"
              f"  peak with the model {report.local_peak / k:,.1f} vs {report.bp_peak / k:,.1f} KiB; "
              f"greedy limit {report.physical_limit / k:,.1f} KiB", highlight=False)
    if measured:
        parts = [f"{'layer-local' if key == 'local' else 'backprop'} {m['step_cost'] / k:,.1f} KiB"
                 for key, m in measured.items()]
        line = "  " + ", ".join(parts)
        if {"local", "bp"} <= set(measured):
            line += f", ratio {measured['local']['step_cost'] / measured['bp']['step_cost']:.2f}"
        out.print(f"measured ({next(iter(measured.values()))['method']}):\n{line}", highlight=False)


@guarded(RuntimeError)
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
    chunk: Annotated[int | None, typer.Option(help="frugal step: pairs per chunk (0: the whole batch) [default: the preset's]")] = None,
) -> None:
    """Memory of a training step, per layer and whole: layer-local next to backprop on the same architecture."""
    from edgeff import get_preset
    from edgeff.memory import account
    from edgeff.memory import measure as measure_fn
    from edgeff.memory import plot as plot_fn

    p = get_preset(preset)
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    tc = replace(p.train, device=device, optim_state_dtype=optim_state, frugal=frugal,
                 chunk=p.train.chunk if chunk is None else chunk)
    if schedule is not None:
        tc = replace(tc, schedule=schedule.value)
    report = account(p.model, tc, batch_size, dtype=dtype)
    measured = measure_fn(p.model, tc, batch_size) if measure else None
    print_memory(report, measured, f"{preset}, batch {batch_size}, {dtype}")
    if plot is not None:
        plot_fn(report, str(plot), measured, title=f"{preset}: memory of a training step")
        out.print(f"plot: {plot}")


def presets() -> None:
    """List the named configurations and the papers they come from."""
    from edgeff.contract import family_of
    from edgeff.presets import PRESETS

    table = Table(show_lines=True)
    for col in ("preset", "family", "paper", "what it is", "recipe per data set"):
        table.add_column(col, overflow="fold")
    for p in PRESETS.values():
        recipes = "\n".join(f"{d}: " + ", ".join(f"{k}={v}" for k, v in r.items()) for d, r in p.recipes.items())
        table.add_row(p.name, family_of(p.model, backprop=p.algorithm == "bp").family, p.paper, p.notes,
                      recipes or "the defaults")
    out.print(table)


@guarded()
def explain(
    checkpoint_path: Annotated[Path, typer.Argument(help="a cfl-conv / cfl-conv512 checkpoint")],
    out_path: Annotated[Path, typer.Option("--out", help="PNG to write (plus one file per layer)")] = Path("attention.png"),
    index: Annotated[int, typer.Option(help="which test image")] = 0,
    label: Annotated[int | None, typer.Option(help="class to explain [default: the prediction]")] = None,
    data: Annotated[Dataset | None, typer.Option(help="data set [default: the checkpoint's]")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Attention maps of a label-embedding conv model: per layer, each location's feature · the class embedding."""
    from edgeff import checkpoint
    from edgeff.data import load_data
    from edgeff.explain import attention_maps, save_attention
    from edgeff.files import check_output

    check_output(out_path, (".png",))
    learner, meta = checkpoint.load(checkpoint_path, device="cpu")
    if not learner.supports("attention_maps"):
        fail("attention maps need a label-embedding model (cfl-conv, cfl-conv512)")
    ds = load_data((data.value if data else meta.get("dataset", "builtin")), data_dir)
    if not 0 <= index < len(ds.y_test):
        fail(f"--index must be in 0..{len(ds.y_test) - 1}")
    x = ds.normalise(ds.x_test[index : index + 1])[0]
    maps, cls = attention_maps(learner, x, label)  # type: ignore[arg-type]
    files = save_attention(ds.x_test[index], maps, out_path)
    names = ds.classes
    out.print(f"test image {index} (true {names[int(ds.y_test[index])]}), explaining class {names[cls]}: "
              f"{', '.join(str(f) for f in files)}", highlight=False)


__all__ = ["explain", "memory", "presets", "print_memory"]
