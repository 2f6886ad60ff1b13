"""What every ``edgeff`` command shares: the consoles, option types, the one error path, progress bars
and how live metrics are shown."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Dataset(str, Enum):
    builtin = "builtin"
    mnist = "mnist"
    fashion_mnist = "fashion-mnist"
    cifar10 = "cifar10"
    cifar10_exact = "cifar10-exact"


class Schedule(str, Enum):
    all = "all"
    greedy = "greedy"
    olu = "olu"


DataDirOpt = Annotated[Path | None, typer.Option(help="folder holding MNIST/raw, FashionMNIST/raw or CIFAR10")]
CheckpointArg = Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="a file written by `edgeff train`")]
LayersOpt = Annotated[str | None, typer.Option(help="layers that predict: all, all-but-first, last, last:K")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
MaxPixelsOpt = Annotated[int, typer.Option(help="image files: the largest width x height read (a larger image is refused before it is decoded)")]


def fail(msg: str) -> None:
    """Print a one-line error and exit with status 2."""
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False)  # escaped: `pip install 'edgeff[plot]'`
    raise typer.Exit(2)


F = TypeVar("F", bound=Callable[..., Any])


def declared(table: tuple[Any, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A typer command whose options are ``table``'s (``edgeff.options.Opt``: the declarations ``edgeff-edge``
    builds its argparse options from), passed to the function as keyword arguments."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = []
        for o in table:
            if o.type is bool:
                decl = (f"{o.spelling}/{o.off_spelling}",) if o.negatable else (o.spelling,)
            else:
                decl = (o.flag,) if o.flag else ()
            kind = o.type | None if o.optional else o.type
            params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                                            annotation=Annotated[kind, typer.Option(*decl, help=o.help)]))

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


def guarded(*also: type[Exception]) -> Callable[[F], F]:
    """The one error path of every command: a user's mistake (``EdgeFFError``, a ``ValueError`` from a
    config, or one of ``also``) becomes a one-line error and exit status 2, never a traceback."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            from edgeff.errors import EdgeFFError

            caught: tuple[type[Exception], ...] = (EdgeFFError, ValueError, *also)
            try:
                return fn(*args, **kwargs)
            except typer.Exit:
                raise  # `fail` itself (an Exit is a RuntimeError, which some commands also catch)
            except caught as e:
                fail(str(e))

        return run  # type: ignore[return-value]

    return wrap


def progress_bar(console: Console = out, *, disable: bool = False, metrics: bool = False) -> Progress:
    """A bar that fits 80 columns: what, bar, n/total, elapsed, remaining (and the live metrics)."""
    cols: list[Any] = [TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn()]
    if metrics:
        cols.append(TextColumn("{task.fields[metrics]}"))
    return Progress(*cols, console=console, disable=disable, transient=False)


LEGENDS = {  # one line each, within 80 columns
    "goodness": "live: Lk loss/sep = layer k's loss / goodness separation (higher is better)",
    "norm": "live: Lk loss/norm = layer k's contrastive loss / mean feature norm",
    "loss": "live: the training loss (mirror: Lk = layer k's cosine loss)",
    "spread": "live: spread = the batch's mean squared distance to its class means",
}


def metrics_text(metrics: Any, kind: str, width: int) -> str:
    """``metrics`` (a list of ``LayerMetrics``) in at most ``width`` characters, for the family's ``kind``
    of metrics (``LearnerBase.metrics``); layers that do not fit are summarised as ``+N``."""
    if kind == "goodness":
        parts = [f"L{i + 1} {m.loss:.3f}/{m.separation:+.2f}" for i, m in enumerate(metrics)]
    elif kind == "norm":
        parts = [f"L{i + 1} {m.loss:.3f}/{m.g_pos:.2f}" for i, m in enumerate(metrics)]
    elif kind == "spread":
        parts = [f"spread {metrics[0].loss:.3f}"]
    elif len(metrics) == 1:
        parts = [f"loss {metrics[0].loss:.3f}"]
    else:
        parts = [f"L{i + 1} {m.loss:.3f}" for i, m in enumerate(metrics)]
    text = ""
    for j, part in enumerate(parts):
        more = len(parts) - j - 1
        cand = f"{text} {part}".strip()
        if len(cand) + (len(f" +{more}") if more else 0) > width:
            return f"{text} +{len(parts) - j}".strip()
        text = cand
    return text


def kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


__all__ = [
    "LEGENDS",
    "CheckpointArg",
    "DataDirOpt",
    "Dataset",
    "JsonOpt",
    "LayersOpt",
    "Schedule",
    "declared",
    "err",
    "fail",
    "guarded",
    "kib",
    "metrics_text",
    "out",
    "progress_bar",
]
